"""Tests of indexer.catalog: schema migrations, settings, images with their
features and vectors, folder sources, failures, and a full disk."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from indexer.catalog import (
    GLOBAL_SCOPE,
    MIGRATIONS,
    SCHEMA_VERSION,
    Catalog,
    NewFrame,
    NewImage,
)
from indexer.errors import CatalogError, IndexIncompatibleError, NotFoundError, StorageFullError
from indexer.features import DESCRIPTOR_SIZE, LocalFeatures
from indexer.search import SearchService
from indexer.settings import EngineSettings

FloatArray = npt.NDArray[np.float32]


def unit_rows(rows: npt.NDArray[np.floating]) -> FloatArray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def features(seed: int, count: int = 50) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    return LocalFeatures(
        points=rng.uniform(0, [640, 480], size=(count, 2)).astype(np.float32),
        descriptors=unit_rows(rng.normal(size=(count, DESCRIPTOR_SIZE))),
        width=640,
        height=480,
    )


def new_image(
    seed: int,
    path: str | None = None,
    *,
    scope: int = GLOBAL_SCOPE,
    keypoints: int = 50,
    vector: FloatArray | None = None,
    codebook_id: str | None = None,
) -> NewImage:
    return NewImage(
        content_hash=f"hash-{seed}",
        scope=scope,
        path=path or f"/photos/{seed}.jpg",
        file_size=1000 + seed,
        file_mtime_ns=seed,
        width=640,
        height=480,
        features=features(seed, keypoints),
        vector=vector,
        codebook_id=codebook_id,
    )


def unit_vector(seed: int, dimensions: int = 16) -> FloatArray:
    return unit_rows(np.random.default_rng(seed).normal(size=(1, dimensions)))[0]


def read_only_query(database: Path, sql: str) -> list[tuple[object, ...]]:
    """Look at the file as any other SQLite client would."""
    connection = sqlite3.connect(database)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


@pytest.fixture
async def catalog(tmp_path: Path) -> AsyncIterator[Catalog]:
    opened = await Catalog.open(tmp_path / "catalog.sqlite")
    yield opened
    await opened.close()


# --- schema -----------------------------------------------------------------------------------


async def test_a_new_catalog_is_migrated_to_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"

    async with await Catalog.open(path):
        pass

    assert read_only_query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = {row[0] for row in read_only_query(path, "SELECT name FROM sqlite_master")}
    assert {"images", "features", "vectors", "failures", "settings"} <= tables


async def test_a_catalog_of_the_first_schema_is_upgraded_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    async with await Catalog.open(path) as catalog:
        [image_id] = await catalog.insert_images([new_image(3, "/photos/kept.jpg")])
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("DROP INDEX images_by_path")
        connection.execute("PRAGMA user_version = 1")
    connection.close()

    async with await Catalog.open(path) as catalog:
        assert [r.id for r in await catalog.find_by_path("/photos/kept.jpg")] == [image_id]

    assert read_only_query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    indexes = {row[0] for row in read_only_query(path, "SELECT name FROM sqlite_master")}
    assert "images_by_path" in indexes


async def test_reopening_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    async with await Catalog.open(path) as first:
        [image_id] = await first.insert_images([new_image(1)])

    async with await Catalog.open(path) as second:
        assert (await second.get(image_id)).content_hash == "hash-1"
        assert await second.count() == 1
    assert read_only_query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_a_catalog_from_a_newer_version_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    async with await Catalog.open(path) as catalog:
        await catalog.insert_images([new_image(1)])
    newer = SCHEMA_VERSION + 1
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {newer}")
    connection.close()

    with pytest.raises(IndexIncompatibleError) as raised:
        await Catalog.open(path)

    assert f"schema version {newer}" in str(raised.value)
    assert read_only_query(path, "PRAGMA user_version") == [(newer,)]
    assert read_only_query(path, "SELECT count(*) FROM images") == [(1,)]


async def test_a_file_that_is_not_a_database_is_a_catalog_error(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    path.write_bytes(b"this is a text file, not SQLite\n" * 100)

    with pytest.raises(CatalogError):
        await Catalog.open(path)


# --- settings ---------------------------------------------------------------------------------


async def test_settings_round_trip_and_update(catalog: Catalog) -> None:
    await catalog.save_settings({"dimensions": "16", "centroids": "64"})
    await catalog.save_settings({"dimensions": "32"})

    assert await catalog.settings() == {"dimensions": "32", "centroids": "64"}


def test_engine_settings_survive_being_stored() -> None:
    """What defines an index comes back exactly (floats included); how to search
    stays the caller's choice."""
    chosen = EngineSettings(
        working_side=800, max_keypoints=300, kaze_threshold=0.0025, centroids=32, dimensions=48
    )
    caller = EngineSettings(search_k=123, verify_limit=7)

    restored = caller.with_stored(chosen.stored())

    assert restored == replace(chosen, search_k=123, verify_limit=7)
    assert restored.kaze == chosen.kaze


def test_an_index_made_before_keypoints_were_spread_keeps_the_strongest() -> None:
    made_before = {k: v for k, v in EngineSettings().stored().items() if k != "keypoint_grid"}

    assert EngineSettings().keypoint_grid > 0
    assert EngineSettings().with_stored(made_before).keypoint_grid == 0
    assert EngineSettings().with_stored(EngineSettings().stored()).keypoint_grid > 0


def test_an_index_built_with_four_kaze_octaves_is_queried_with_four() -> None:
    """The default dropped to three octaves; an older index must keep describing
    queries at the scales its stored keypoints were found at."""
    made_before = EngineSettings(kaze_octaves=4).stored()

    restored = EngineSettings().with_stored(made_before)

    assert EngineSettings().kaze_octaves == 3
    assert restored.kaze.octaves == 4
    assert restored.query_kaze.octaves == 4


async def test_an_index_keeps_the_settings_it_was_made_with(tmp_path: Path) -> None:
    made_with = EngineSettings(dimensions=16, max_keypoints=300, search_k=100)
    service = await SearchService.open(tmp_path / "index", settings=made_with, create=True)
    await service.close()

    asked_for = EngineSettings(dimensions=64, max_keypoints=900, search_k=2000)
    service = await SearchService.open(tmp_path / "index", settings=asked_for)
    try:
        # What defines the stored data comes from the index; how to search from the caller.
        assert service.settings.dimensions == 16
        assert service.settings.max_keypoints == 300
        assert service.settings.search_k == 2000
    finally:
        await service.close()


# --- images, features, vectors -----------------------------------------------------------------


async def test_an_inserted_image_comes_back_with_its_features(catalog: Catalog) -> None:
    image = new_image(2, keypoints=120, vector=unit_vector(2), codebook_id="cb1")

    [image_id] = await catalog.insert_images([image])
    record = await catalog.get(image_id)
    stored = (await catalog.features([image_id]))[image_id]

    assert (record.content_hash, record.path, record.scope) == ("hash-2", "/photos/2.jpg", 0)
    assert (record.width, record.height, record.file_size) == (640, 480, 1002)
    assert len(stored) == 120
    np.testing.assert_allclose(stored.points, image.features.points, atol=0.25)
    assert np.abs(stored.descriptors - image.features.descriptors).max() < 0.02
    [(ids, scopes, vectors)] = [batch async for batch in catalog.iter_vectors("cb1")]
    assert ids.tolist() == [image_id]
    assert scopes.tolist() == [GLOBAL_SCOPE]
    np.testing.assert_allclose(vectors[0], unit_vector(2), atol=2e-3)  # stored as float16


async def test_stored_features_cost_68_bytes_a_keypoint(catalog: Catalog) -> None:
    await catalog.insert_images([new_image(3, keypoints=100), new_image(4, keypoints=300)])

    sizes = await catalog.bytes_per_image()

    assert sizes["keypoints"] == 200
    assert sizes["features"] == 200 * 68


async def test_removing_an_image_removes_its_features_and_vector(catalog: Catalog) -> None:
    [kept, removed] = await catalog.insert_images(
        [
            new_image(5, vector=unit_vector(5), codebook_id="cb"),
            new_image(6, vector=unit_vector(6), codebook_id="cb"),
        ]
    )

    assert await catalog.delete_images([removed, 12345]) == [removed]

    with pytest.raises(NotFoundError):
        await catalog.get(removed)
    assert set(await catalog.features([kept, removed])) == {kept}
    assert set(await catalog.get_many([kept, removed])) == {kept}
    batches = [batch async for batch in catalog.iter_vectors("cb")]
    assert [int(i) for ids, _, _ in batches for i in ids] == [kept]
    orphans = read_only_query(
        catalog.path, "SELECT count(*) FROM features WHERE image_id NOT IN (SELECT id FROM images)"
    )
    assert orphans == [(0,)]


async def test_ids_are_never_reused_after_a_removal(catalog: Catalog) -> None:
    [first, last] = await catalog.insert_images([new_image(7), new_image(8)])
    await catalog.delete_images([last])

    [newest] = await catalog.insert_images([new_image(9)])

    assert newest > last > first


async def test_reinserting_a_folder_file_replaces_its_row(catalog: Catalog) -> None:
    [old] = await catalog.insert_images([new_image(10, "/photos/same.jpg")])

    [new] = await catalog.insert_images([new_image(11, "/photos/same.jpg")])

    assert new != old
    assert [r.id for r in await catalog.find_by_path("/photos/same.jpg")] == [new]
    assert await catalog.count() == 1


async def test_the_same_path_may_exist_once_per_scope(catalog: Catalog) -> None:
    await catalog.insert_images(
        [new_image(12, "originals/ab/x.jpg", scope=-100), new_image(12, "originals/ab/x.jpg")]
    )

    assert len(await catalog.find_by_path("originals/ab/x.jpg")) == 2
    assert await catalog.count(scope=-100) == 1
    assert await catalog.count(scope=GLOBAL_SCOPE) == 1


async def test_identical_bytes_are_found_only_from_scopes_that_see_them(catalog: Catalog) -> None:
    [in_chat] = await catalog.insert_images([new_image(13, scope=-555)])

    seen = await catalog.find_by_hash("hash-13", [GLOBAL_SCOPE, -555])
    from_elsewhere = await catalog.find_by_hash("hash-13", [GLOBAL_SCOPE, -777])

    assert seen is not None
    assert seen.id == in_chat
    assert from_elsewhere is None


async def test_images_after_an_id_are_those_added_later_even_past_a_removed_last_one(
    catalog: Catalog,
) -> None:
    first, last = await catalog.insert_images([new_image(15), new_image(16)])
    await catalog.delete_images([last])
    [later] = await catalog.insert_images([new_image(17)])

    after_first = await catalog.images_after(first)
    after_removed = await catalog.images_after(last)

    assert [record.id for record in after_first] == [later]
    assert [record.id for record in after_removed] == [later]
    assert later > last  # ids are never reused, so a look's "newest seen" stays a fence


async def test_the_telegram_file_id_is_remembered(catalog: Catalog) -> None:
    [image_id] = await catalog.insert_images([new_image(14)])

    await catalog.set_telegram_file_id(image_id, "AgACAgIAAxkBAAIB")

    assert (await catalog.get(image_id)).telegram_file_id == "AgACAgIAAxkBAAIB"


async def test_vectors_of_another_codebook_count_as_missing(catalog: Catalog) -> None:
    [old, fresh, bare] = await catalog.insert_images(
        [
            new_image(15, vector=unit_vector(15), codebook_id="old"),
            new_image(16, vector=unit_vector(16), codebook_id="new"),
            new_image(17),
        ]
    )

    assert await catalog.ids_without_vector("new") == [old, bare]

    await catalog.save_vectors("new", [(old, unit_vector(15)), (bare, unit_vector(17))])
    await catalog.save_vectors("new", [(99999, unit_vector(1))])  # a removed image: ignored

    assert await catalog.ids_without_vector("new") == []
    assert await catalog.ids_without_vector("old", after_id=fresh) == [bare]
    batches = [batch async for batch in catalog.iter_vectors("new", after_id=old, up_to_id=fresh)]
    assert [int(i) for ids, _, _ in batches for i in ids] == [fresh]


async def test_features_come_in_id_order(catalog: Catalog) -> None:
    ids = await catalog.insert_images([new_image(seed) for seed in range(20, 30)])

    every = [image_id async for image_id, _, _ in catalog.iter_features(batch=3)]

    assert every == ids


async def test_the_training_sample_does_not_depend_on_insertion_order(tmp_path: Path) -> None:
    """A parallel build inserts photos in the order its workers finish them; the
    codebook must not change with it."""
    images = [new_image(seed) for seed in range(40)]
    samples = []
    for name, order in (("forward", images), ("backward", images[::-1])):
        async with await Catalog.open(tmp_path / f"{name}.sqlite") as catalog:
            await catalog.insert_images(order)
            ids = [i async for i, _ in catalog.iter_training_features(15, batch=4)]
            records = await catalog.get_many(ids)
            samples.append([records[i].content_hash for i in ids])

    assert samples[0] == samples[1]
    assert samples[0] == sorted(image.content_hash for image in images)[:15]


async def test_the_training_sample_is_the_whole_catalog_when_it_is_smaller(
    catalog: Catalog,
) -> None:
    ids = await catalog.insert_images([new_image(seed) for seed in range(5)])

    sampled = [image_id async for image_id, _ in catalog.iter_training_features(100, batch=2)]

    assert sorted(sampled) == ids


# --- folder sources and failures ----------------------------------------------------------------


async def test_sources_under_a_folder_ignore_lookalike_folders(catalog: Catalog) -> None:
    """``_`` and ``%`` are LIKE wildcards: a folder named ``a_b`` must not take in
    ``aXb``, and ``100%`` must not take in ``1000``."""
    await catalog.insert_images(
        [
            new_image(30, "/photos/a_b/one.jpg"),
            new_image(31, "/photos/a_b/deeper/two.jpg"),
            new_image(32, "/photos/aXb/three.jpg"),
            new_image(33, "/photos/100%/four.jpg"),
            new_image(34, "/photos/1000/five.jpg"),
            new_image(35, "/photos/a_b/chat.jpg", scope=-42),  # an upload, not a folder file
        ]
    )
    await catalog.record_failures([("/photos/a_b/broken.jpg", 10, 20, "truncated")])

    under_a_b = await catalog.sources_under("/photos/a_b")
    under_percent = await catalog.sources_under("/photos/100%/")

    assert set(under_a_b) == {
        "/photos/a_b/one.jpg",
        "/photos/a_b/deeper/two.jpg",
        "/photos/a_b/broken.jpg",
    }
    assert under_a_b["/photos/a_b/broken.jpg"].image_id is None
    assert under_a_b["/photos/a_b/one.jpg"].image_id is not None
    one = under_a_b["/photos/a_b/one.jpg"]
    assert (one.file_size, one.file_mtime_ns) == (1030, 30)
    assert set(under_percent) == {"/photos/100%/four.jpg"}


async def test_sources_under_a_folder_ignore_folders_that_differ_in_case(catalog: Catalog) -> None:
    await catalog.insert_images(
        [new_image(36, "/photos/Trip/one.jpg"), new_image(37, "/photos/trip/two.jpg")]
    )

    assert set(await catalog.sources_under("/photos/trip")) == {"/photos/trip/two.jpg"}


async def test_failures_are_remembered_updated_and_forgotten(catalog: Catalog) -> None:
    await catalog.record_failures([("/p/a.jpg", 1, 1, "empty"), ("/p/b.jpg", 2, 2, "truncated")])
    await catalog.record_failures([("/p/a.jpg", 5, 5, "not an image")])

    assert await catalog.failures() == [("/p/a.jpg", "not an image"), ("/p/b.jpg", "truncated")]

    await catalog.forget_failures(["/p/a.jpg"])
    await catalog.insert_images([new_image(40, "/p/b.jpg")])  # fixed and indexed

    assert await catalog.failures() == []


# --- a full disk ----------------------------------------------------------------------------------


def room_for(path: Path, extra_pages: int) -> int:
    """A size limit (``Catalog.open(max_bytes=...)``) that lets the catalog at ``path`` grow by
    ``extra_pages`` pages; past it SQLite reports SQLITE_FULL, exactly what a full disk gives."""
    [(pages,)] = read_only_query(path, "PRAGMA page_count")
    [(page_size,)] = read_only_query(path, "PRAGMA page_size")
    return (int(str(pages)) + extra_pages) * int(str(page_size))


def consistency(path: Path) -> tuple[object, ...]:
    return (
        read_only_query(path, "PRAGMA integrity_check"),
        read_only_query(path, "PRAGMA foreign_key_check"),
        read_only_query(path, "SELECT count(*) FROM images"),
        read_only_query(path, "SELECT count(*) FROM features"),
        read_only_query(path, "SELECT count(*) FROM vectors"),
    )


async def test_a_full_disk_is_reported_as_storage_full(catalog: Catalog) -> None:
    await catalog.insert_images([new_image(50, vector=unit_vector(50), codebook_id="cb")])
    async with await Catalog.open(catalog.path, max_bytes=room_for(catalog.path, 2)) as full:
        with pytest.raises(StorageFullError):
            await full.insert_images(
                [new_image(seed, keypoints=400, vector=unit_vector(seed), codebook_id="cb")
                 for seed in range(51, 56)]
            )

    assert await catalog.count() == 1


async def test_a_full_disk_leaves_the_catalog_consistent_and_usable(catalog: Catalog) -> None:
    [first] = await catalog.insert_images([new_image(60)])
    before = consistency(catalog.path)
    async with await Catalog.open(catalog.path, max_bytes=room_for(catalog.path, 2)) as full:
        with pytest.raises(CatalogError):  # StorageFullError is one; see the test above
            await full.insert_images([new_image(seed, keypoints=400) for seed in range(61, 66)])

    assert consistency(catalog.path) == before
    assert [r.id for r in (await catalog.get_many([first])).values()] == [first]
    [later] = await catalog.insert_images([new_image(66)])  # the same file, without the limit
    assert await catalog.count() == 2
    assert later > first


async def test_a_catalog_from_before_moving_pictures_opens_with_its_images_still(
    tmp_path: Path,
) -> None:
    path = tmp_path / "catalog.sqlite"
    connection = sqlite3.connect(path)
    with connection:
        for number, script in enumerate(MIGRATIONS[:4], start=1):
            connection.executescript(script)
            connection.execute(f"PRAGMA user_version = {number}")
        connection.execute(
            "INSERT INTO images (content_hash, scope, path, file_size, width, height, added_at) "
            "VALUES ('old', 0, '/photos/old.jpg', 10, 640, 480, 1.0)"
        )
    connection.close()

    async with await Catalog.open(path) as catalog:
        [old] = await catalog.find_by_path("/photos/old.jpg")
        [video_id] = await catalog.insert_images(
            [
                replace(
                    new_image(5, "/photos/clip.mp4"),
                    frame_seconds=0.5,
                    later_frames=[NewFrame(1.5, features(6)), NewFrame(2.5, features(7))],
                )
            ]
        )
        frame_ids = await catalog.frame_ids([video_id])
        frames = await catalog.get_many(frame_ids)
        count = await catalog.count()
        removed = await catalog.delete_images([video_id])

    assert (old.moving, old.video_id, old.frame_seconds) == (False, None, None)
    assert [frames[i].frame_seconds for i in frame_ids] == [1.5, 2.5]
    assert {frames[i].video_id for i in frame_ids} == {video_id}
    assert frames[frame_ids[0]].path == "/photos/clip.mp4#t=1.500"
    assert count == 2  # the old photo and the video; its frames are not counted
    assert removed == sorted([video_id, *frame_ids])
    assert read_only_query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
