"""Tests of indexer.search: the search service end to end on real photos.

Queries are edits of the CC0 photos of ``photos_dir`` (cropped, rotated,
flipped, shrunk and recompressed, brightened, captioned, framed); the index of
those photos is built once per session and copied here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import OK, BadInput, BadInputCorpus, stored_for_orientation
from conftest import jpeg_bytes, photo_array
from engine_fixtures import (
    EDITS,
    QUERY_PHOTOS,
    TEST_SETTINGS,
    UNINDEXED_PHOTOS,
    VERIFIED_SCORE,
    FifoWatchdog,
    copy_of_shared_index,
    edited_jpeg,
    noise_jpeg,
    run_build,
    shapes_jpeg,
    stem,
)
from PIL import Image

from indexer.analysis import analyze_bytes
from indexer.ann import ANNOY_FILE, CODEBOOK_FILE, CURRENT_FILE, IDS_FILE, MANIFEST_FILE
from indexer.catalog import GLOBAL_SCOPE
from indexer.copies import CopyFinder, CopyQuestion
from indexer.errors import (
    ImageError,
    IndexerError,
    IndexNotFoundError,
    NoFeaturesError,
    NotFoundError,
    SourceError,
    StorageFullError,
)
from indexer.features import LocalFeatures
from indexer.search import GENERATIONS_DIR, ORIGINALS_DIR, Match, SearchService, StageTimings
from indexer.settings import EngineSettings
from indexer.workers import CpuPool
from testsupport.edits import compose_page
from testsupport.engine import copy_index, opened_service

CHAT_A = -1001
CHAT_B = -1002
MAX_STORED_KEYPOINTS = 500
BYTES_PER_KEYPOINT = 68


@pytest.fixture(scope="module")
def search_index(tmp_path_factory: pytest.TempPathFactory, photos_dir: Path) -> Path:
    """This module's copy of the 12-photo index; tests that change it copy it again."""
    return copy_of_shared_index(tmp_path_factory, photos_dir, "search")


@pytest.fixture
def private_index(search_index: Path, tmp_path: Path) -> Path:
    return copy_index(search_index, tmp_path / "index")


def describe(matches: list[Match]) -> str:
    """Results as shown in a failure message: name, verified, inliers, score."""
    return ", ".join(
        f"{stem(m)}(verified={m.verified}, inliers={m.inliers}, score={m.score:.3f})"
        for m in matches
    )


def jpeg_of(image: np.ndarray, quality: int = 90, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, **options)
    return buffer.getvalue()


# --- edits find their originals ------------------------------------------------------------


def edit_cases() -> list[object]:
    """Every (photo, edit) pair. Half of them, chosen so that each edit meets three
    photos and each photo four edits, run by default; the other half is marked
    slow (``make test-slow``): each query costs a KAZE extraction."""
    cases = []
    for photo_number, photo in enumerate(QUERY_PHOTOS):
        for edit_number, edit in enumerate(EDITS):
            marks = [pytest.mark.slow] if (photo_number + edit_number) % 2 else []
            cases.append(pytest.param(photo, edit, marks=marks, id=f"{photo}-{edit}"))
    return cases


@pytest.mark.parametrize(("photo", "edit"), edit_cases())
async def test_an_edited_photo_finds_its_original_first_and_verified(
    search_index: Path, photo: str, edit: str
) -> None:
    async with opened_service(search_index) as service:
        matches = await service.query(edited_jpeg(photo, edit), top=3)

    assert matches, "no results at all"
    best = matches[0]
    assert (stem(best), best.verified) == (photo, True), describe(matches)
    assert best.mirrored == (edit == "flip"), describe(matches)
    assert best.score > VERIFIED_SCORE
    assert best.path.is_absolute()
    assert best.path.exists()
    # Only the original is the same picture; the rest rank below it, unverified.
    assert not any(m.verified for m in matches[1:]), describe(matches)
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)


# --- the quick look ----------------------------------------------------------------------

WITHOUT_QUICK_LOOK = dataclasses.replace(TEST_SETTINGS, quick_vote=None)


@pytest.mark.parametrize(
    ("photo", "edit"),
    [("coffee", "crop"), ("rocket", "rotate_15"), ("chelsea", "caption"), ("camera", "brighter")],
)
async def test_a_copy_the_quick_look_finds_is_answered_as_the_first_look_answers_it(
    search_index: Path, photo: str, edit: str
) -> None:
    query = edited_jpeg(photo, edit)
    timings = StageTimings()
    async with opened_service(search_index) as service:
        quick = await service.query(query, top=3, timings=timings)
    async with opened_service(search_index, settings=WITHOUT_QUICK_LOOK) as service:
        first_look = await service.query(query, top=3)

    assert timings.counts.get("quick look found") == 1
    assert (stem(quick[0]), quick[0].verified) == (photo, True), describe(quick)
    assert (quick[0].image.id, quick[0].inliers, quick[0].mirrored) == (
        first_look[0].image.id,
        first_look[0].inliers,
        first_look[0].mirrored,
    )
    # Its global similarity is read from the stored vector instead of found by Annoy.
    assert quick[0].similarity == pytest.approx(first_look[0].similarity, abs=1e-4)
    assert len(quick) == 3
    assert all(m.score < VERIFIED_SCORE for m in quick[1:]), describe(quick)


async def test_a_photo_just_added_has_its_global_similarity_in_a_quick_answer(
    private_index: Path,
) -> None:
    query = edited_jpeg("coins", "crop")
    async with opened_service(private_index) as service:
        added = await service.add(jpeg_bytes(photo_array("coins")), added_by="alice")
        assert (await service.stats()).fresh == 1  # its vector is in the fresh buffer
        timings = StageTimings()
        quick = await service.query(query, top=2, timings=timings)
    async with opened_service(private_index, settings=WITHOUT_QUICK_LOOK) as service:
        first_look = await service.query(query, top=2)

    assert timings.counts.get("quick look found") == 1
    assert (quick[0].image.id, quick[0].verified) == (added.image.id, True), describe(quick)
    assert first_look[0].image.id == added.image.id
    assert quick[0].similarity == pytest.approx(first_look[0].similarity, abs=1e-4)
    assert quick[0].similarity > 0


async def test_what_the_quick_look_cannot_verify_takes_every_other_look(
    search_index: Path,
) -> None:
    # A photo shown small on a page of text: the page's words outvote it, and only
    # the look at the photo framed inside the query finds it.
    page = compose_page(photo_array("chelsea"), 3, [photo_array("brick")])
    timings = StageTimings()
    async with opened_service(search_index) as service:
        matches = await service.query(jpeg_bytes(page.image, 85), top=3, timings=timings)

    assert "quick look found" not in timings.counts
    assert (stem(matches[0]), matches[0].verified) == ("chelsea", True), describe(matches)


@pytest.mark.parametrize(
    "query",
    [*UNINDEXED_PHOTOS, "noise_1", "shapes_1", "shapes_2"],
)
async def test_a_picture_not_in_the_collection_verifies_nothing(
    search_index: Path, query: str
) -> None:
    kind, _, seed = query.partition("_")
    if kind == "noise":
        data = noise_jpeg(int(seed))
    elif kind == "shapes":
        data = shapes_jpeg(int(seed))
    else:
        data = jpeg_bytes(photo_array(query))

    async with opened_service(search_index) as service:
        matches = await service.query(data, top=12)

    assert matches, "the closest photos are still listed"
    assert not any(m.verified for m in matches), describe(matches)
    assert all(m.score < VERIFIED_SCORE for m in matches)


async def test_a_framed_photo_is_searched_only_when_the_whole_query_verifies_nothing(
    search_index: Path,
) -> None:
    photo = analyze_bytes(edited_jpeg("coffee", "crop"), TEST_SETTINGS, for_query=True).features
    noise = analyze_bytes(noise_jpeg(7), TEST_SETTINGS, for_query=True).features
    extracted: list[str] = []

    async def framed_photo() -> LocalFeatures:
        extracted.append("coffee")
        return photo

    async with opened_service(search_index) as service:
        whole_verified = await service.search_features(photo, inner=[framed_photo], top=3)
        assert extracted == []  # the whole query sufficed: no second extraction
        framed_verified = await service.search_features(noise, inner=[framed_photo], top=3)

    assert (stem(whole_verified[0]), whole_verified[0].verified) == ("coffee", True)
    assert extracted == ["coffee"]
    assert (stem(framed_verified[0]), framed_verified[0].verified) == ("coffee", True)


@pytest.mark.parametrize("photo", ["astronaut", "rocket"])
def test_a_screenshot_query_carries_the_frame_of_its_photo(photo: str) -> None:
    data = edited_jpeg(photo, "screenshot")
    assert analyze_bytes(data, TEST_SETTINGS, for_query=True).frames
    # Stored photos are described whole: frames are looked for in queries only.
    assert analyze_bytes(data, TEST_SETTINGS).frames == ()


# Pages on which the whole page, its votes and its windows all miss the photo
# (text takes most of the keypoints): only the look at the photo itself finds it.
@pytest.mark.parametrize(("photo", "seed"), [("chelsea", 3), ("coffee", 4), ("camera", 6)])
async def test_a_photo_shown_small_on_a_page_of_text_is_found(
    search_index: Path, photo: str, seed: int
) -> None:
    page = compose_page(photo_array(photo), seed, [photo_array("brick")])

    async with opened_service(search_index) as service:
        matches = await service.query(jpeg_bytes(page.image, 85), top=3)

    assert (stem(matches[0]), matches[0].verified) == (photo, True), describe(matches)


# --- a closer look at deep crops ----------------------------------------------------------------


def corner_crop(photo: str, horizontal: float, vertical: float, side: float = 0.35) -> bytes:
    """JPEG of ``side`` of the photo's width and height (an eighth of its area), at
    native resolution, placed at ``horizontal`` and ``vertical`` (0 to 1) of the rest."""
    image = photo_array(photo)
    height, width = image.shape[:2]
    part_width, part_height = int(width * side), int(height * side)
    left = int((width - part_width) * horizontal)
    top = int((height - part_height) * vertical)
    part = image[top : top + part_height, left : left + part_width]
    return jpeg_bytes(np.ascontiguousarray(part))


async def with_and_without_closer_looks(
    index: Path, query: bytes
) -> tuple[list[Match], list[Match], StageTimings]:
    """The answers to ``query`` with the engine's settings and with no closer look,
    and the timings of the first."""
    timings = StageTimings()
    async with opened_service(index) as service:
        matches = await service.query(query, top=3, timings=timings)
    without = dataclasses.replace(TEST_SETTINGS, closer_looks=0)
    async with opened_service(index, settings=without) as service:
        stored_alone = await service.query(query, top=3)
    return matches, stored_alone, timings


def thumbnail_jpeg(photo: str, side: int, quality: int) -> bytes:
    """A JPEG copy of the photo, its longest side ``side`` px, at ``quality``."""
    picture = Image.fromarray(photo_array(photo))
    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# Deep crops: an eighth of the area holds too few of the 500 keypoints stored for
# the whole photo, 9 to 11 inliers; described again, the same part gives 55 to 180.
# Thumbnails: stored sharp, a 40-48 px q15 copy's keypoints sit on its JPEG blocks,
# 6 to 11 inliers; its candidate, reduced to the copy's size and saved with its JPEG
# table, gives 64 to 218.
COPIES_THE_STORED_KEYPOINTS_MISS = [
    pytest.param("chelsea", lambda: corner_crop("chelsea", 0.9, 0.1), id="chelsea-crop"),
    pytest.param("astronaut", lambda: corner_crop("astronaut", 0.1, 0.1), id="astronaut-crop"),
    pytest.param(
        "hubble_deep_field", lambda: corner_crop("hubble_deep_field", 0.5, 0.9), id="hubble-crop"
    ),
    pytest.param("astronaut", lambda: thumbnail_jpeg("astronaut", 40, 15), id="astronaut-40px"),
    pytest.param("coffee", lambda: thumbnail_jpeg("coffee", 48, 15), id="coffee-48px"),
    pytest.param("chelsea", lambda: thumbnail_jpeg("chelsea", 40, 15), id="chelsea-40px"),
]


@pytest.mark.parametrize(("photo", "copy"), COPIES_THE_STORED_KEYPOINTS_MISS)
async def test_a_copy_the_stored_keypoints_miss_is_verified_by_a_closer_look(
    search_index: Path, photo: str, copy: Callable[[], bytes]
) -> None:
    matches, stored_alone, timings = await with_and_without_closer_looks(search_index, copy())

    assert (stem(matches[0]), matches[0].verified) == (photo, True), describe(matches)
    assert timings.counts["closer look"] >= 1
    assert not any(m.verified for m in stored_alone), describe(stored_alone)


@pytest.mark.parametrize(("photo", "horizontal"), [("coins", 0.0), ("moon", 1.0)])
async def test_a_crop_of_a_small_photo_added_through_the_service_gets_a_closer_look(
    private_index: Path, photo: str, horizontal: float
) -> None:
    # A 100 px photo kept under the index folder; its 45 x 35 px corner is enlarged
    # nine times to be described, its stored keypoints only a fourth as much.
    small = Image.fromarray(photo_array(photo))
    small.thumbnail((100, 100), Image.Resampling.LANCZOS)
    pixels = np.asarray(small.convert("RGB"))
    height, width = pixels.shape[:2]
    part_width, part_height = int(width * 0.45), int(height * 0.45)
    left = int((width - part_width) * horizontal)
    corner = jpeg_bytes(np.ascontiguousarray(pixels[:part_height, left : left + part_width]))

    async with opened_service(private_index) as service:
        added = await service.add(jpeg_bytes(pixels))
    matches, stored_alone, _ = await with_and_without_closer_looks(private_index, corner)

    assert (matches[0].image.id, matches[0].verified) == (added.image.id, True), describe(matches)
    assert not any(m.verified for m in stored_alone), describe(stored_alone)


async def test_a_closer_look_at_every_candidate_verifies_no_unrelated_photo(
    search_index: Path,
) -> None:
    # Every candidate with a fit gets a closer look, not only the nearly verified.
    eager = dataclasses.replace(TEST_SETTINGS, closer_look_inliers=0, closer_looks=4)
    queries = {
        f"{photo} {part}": data
        for photo in UNINDEXED_PHOTOS
        for part, data in (
            ("whole", jpeg_bytes(photo_array(photo))),
            ("middle", corner_crop(photo, 0.5, 0.5)),
            ("corner", corner_crop(photo, 1.0, 0.0)),
            ("thumbnail", thumbnail_jpeg(photo, 40, 15)),
        )
        if (photo, part) != ("clock", "corner")  # a flat wall: no keypoints at all
    }

    timings = StageTimings()
    async with opened_service(search_index, settings=eager) as service:
        answers = {name: await service.query(data, top=12, timings=timings)
                   for name, data in queries.items()}

    # Most unrelated candidates have too few matches for a fit to look closer by.
    assert timings.counts["closer look"] >= 1
    verified = {name: describe(m) for name, m in answers.items() if any(x.verified for x in m)}
    assert verified == {}


async def test_a_candidate_whose_file_is_gone_keeps_its_verdict_without_a_closer_look(
    photos_copy: Path, tmp_path: Path
) -> None:
    photo, horizontal, vertical = "chelsea", 0.9, 0.1  # verified by a closer look (above)
    await asyncio.to_thread(run_build, photos_copy, tmp_path / "index")
    (photos_copy / f"{photo}.jpg").unlink()  # moved away since it was indexed

    timings = StageTimings()
    async with opened_service(tmp_path / "index") as service:
        matches = await service.query(
            corner_crop(photo, horizontal, vertical), top=3, timings=timings
        )

    assert stem(matches[0]) == photo, describe(matches)
    assert not matches[0].verified
    assert "closer look" not in timings.counts


# --- bad input ----------------------------------------------------------------------------------


def refused(corpus: BadInputCorpus) -> list[BadInput]:
    """Inputs a query must refuse: those the decoder refuses, and flat pictures."""
    return [r for r in corpus if r.expected != OK or r.expected_features == "none"]


def expected_error(record: BadInput) -> type[IndexerError]:
    return NoFeaturesError if record.expected == OK else record.expected


async def test_every_bad_input_is_refused_with_its_own_error(
    search_index: Path, corpus: BadInputCorpus
) -> None:
    outcomes = {}
    async with opened_service(search_index) as service:
        for record in refused(corpus):
            if record.name == "fifo":
                continue  # its own test: it could hang
            try:
                await service.query(record.path)
            except IndexerError as error:
                outcomes[record.name] = type(error)
            else:
                outcomes[record.name] = None

    expected = {r.name: expected_error(r) for r in refused(corpus) if r.name != "fifo"}
    assert outcomes == expected


async def test_bad_bytes_are_refused_like_bad_files(
    search_index: Path, corpus: BadInputCorpus
) -> None:
    """The bot hands over bytes, not paths."""
    files = [
        r
        for r in refused(corpus)
        if r.path.is_file() and issubclass(expected_error(r), ImageError)
    ]
    async with opened_service(search_index) as service:
        for record in files:
            with pytest.raises(expected_error(record)):
                await service.query(record.path.read_bytes())
    assert len(files) >= 15


async def test_a_fifo_is_refused_without_waiting_for_a_writer(
    search_index: Path, corpus: BadInputCorpus
) -> None:
    if "fifo" in corpus.skipped:
        pytest.skip(corpus.skipped["fifo"])
    fifo = corpus["fifo"].path

    async with opened_service(search_index) as service:
        with FifoWatchdog(fifo) as watchdog, pytest.raises(IndexerError) as raised:
            await service.query(fifo)

    assert watchdog.released == 0, "the query opened the FIFO and waited for a writer"
    assert isinstance(raised.value, SourceError)


# --- EXIF orientation -----------------------------------------------------------------------------


def exif_oriented_jpeg(upright: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_of(stored_for_orientation(upright, orientation), 92, exif=exif.tobytes())


async def test_a_photo_saved_with_exif_orientation_6_is_the_same_picture(
    search_index: Path,
) -> None:
    async with opened_service(search_index) as service:
        matches = await service.query(exif_oriented_jpeg(photo_array("coffee"), 6), top=2)

    assert (stem(matches[0]), matches[0].verified, matches[0].mirrored) == (
        "coffee",
        True,
        False,
    ), describe(matches)


async def test_a_transposed_exif_photo_is_not_taken_for_a_mirror_image(
    search_index: Path,
) -> None:
    """Orientation 5 stores the picture transposed (a rotation plus a flip). Read
    with its EXIF it is the upright photo; read without, it would only match as
    a mirror image. So this tells whether orientation is honoured."""
    async with opened_service(search_index) as service:
        matches = await service.query(exif_oriented_jpeg(photo_array("chelsea"), 5), top=2)

    assert (stem(matches[0]), matches[0].verified) == ("chelsea", True), describe(matches)
    assert not matches[0].mirrored


async def test_an_added_exif_rotated_photo_is_stored_with_its_upright_size(
    private_index: Path,
) -> None:
    upright = photo_array("horse")  # 400 x 328, landscape
    async with opened_service(private_index) as service:
        added = await service.add(exif_oriented_jpeg(upright, 6))
        matches = await service.query(jpeg_of(upright), top=1)

    assert added.created
    assert (added.image.width, added.image.height) == (400, 328)
    assert (matches[0].image.id, matches[0].verified, matches[0].mirrored) == (
        added.image.id,
        True,
        False,
    )


# --- adding and removing --------------------------------------------------------------------------


async def test_an_added_photo_is_searchable_at_once(private_index: Path) -> None:
    coins = jpeg_bytes(photo_array("coins"))
    async with opened_service(private_index) as service:
        before = await service.stats()

        added = await service.add(coins, added_by="alice", origin_chat_id=CHAT_A)
        during = await service.stats()
        matches = await service.query(edited_jpeg("coins", "crop"), top=2)

    assert added.created
    assert added.image.added_by == "alice"
    assert added.image.origin_chat_id == CHAT_A
    assert during.images == before.images + 1
    assert during.fresh == 1  # searched exactly, no rebuild needed
    assert during.generation == before.generation
    assert (matches[0].image.id, matches[0].verified) == (added.image.id, True), describe(matches)
    assert matches[0].path.read_bytes() == coins
    assert matches[0].path.is_relative_to(private_index / ORIGINALS_DIR)


async def test_an_added_photo_stays_searchable_after_a_rebuild(private_index: Path) -> None:
    async with opened_service(private_index) as service:
        added = await service.add(jpeg_bytes(photo_array("moon")))
        await service.rebuild()
        stats = await service.stats()
        matches = await service.query(edited_jpeg("moon", "rotate_15"), top=1)

    assert (stats.fresh, stats.indexed, stats.images) == (0, 13, 13)
    assert (matches[0].image.id, matches[0].verified) == (added.image.id, True)


async def test_adding_the_same_bytes_again_creates_nothing(private_index: Path) -> None:
    clock = jpeg_bytes(photo_array("clock"))
    async with opened_service(private_index) as service:
        first = await service.add(clock)
        again = await service.add(clock)
        images = (await service.stats()).images

    assert first.created
    assert not again.created
    assert again.image.id == first.image.id
    assert images == 13


async def test_adding_a_recompressed_smaller_copy_creates_nothing(private_index: Path) -> None:
    retina = photo_array("retina")
    smaller = np.asarray(Image.fromarray(retina).resize((600, 600), Image.Resampling.LANCZOS))
    async with opened_service(private_index) as service:
        first = await service.add(jpeg_bytes(retina, 92))
        copy = await service.add(jpeg_of(smaller, 60))
        images = (await service.stats()).images

    assert first.created
    assert (copy.created, copy.image.id) == (False, first.image.id)
    assert images == 13


async def test_adding_a_copy_of_a_collection_photo_returns_the_collection_photo(
    private_index: Path,
) -> None:
    async with opened_service(private_index) as service:
        result = await service.add(edited_jpeg("camera", "brighter"), scope=CHAT_A)

    assert not result.created
    assert (Path(result.image.path).stem, result.image.scope) == ("camera", GLOBAL_SCOPE)


class CountingExecutor(ThreadPoolExecutor):
    """Threads that count the work handed to them."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def test_an_add_s_work_goes_to_the_background_workers_and_a_query_s_does_not(
    private_index: Path,
) -> None:
    interactive, background = CountingExecutor(), CountingExecutor()
    pool = CpuPool(interactive, 2, background=background)
    try:
        async with opened_service(private_index, pool=pool) as service:
            await service.query(edited_jpeg("camera", "crop"), top=1)
            by_the_query = (interactive.submitted, background.submitted)
            await service.add(jpeg_bytes(photo_array("clock")))
            by_both = (interactive.submitted, background.submitted)
    finally:
        pool.shutdown()

    assert by_the_query[0] > 0
    assert by_the_query[1] == 0
    assert by_both[0] == by_the_query[0]  # the add: extraction and verification, all of it
    assert by_both[1] > 0


async def test_two_adds_of_one_picture_side_by_side_keep_one(private_index: Path) -> None:
    retina = photo_array("retina")
    smaller = np.asarray(Image.fromarray(retina).resize((600, 600), Image.Resampling.LANCZOS))
    pool = CpuPool(ThreadPoolExecutor(max_workers=2), workers=2)
    try:
        async with opened_service(private_index, pool=pool) as service:
            results = await asyncio.gather(
                service.add(jpeg_bytes(retina, 92)),
                service.add(jpeg_of(smaller, 60)),
                service.add(jpeg_bytes(retina, 92)),
            )
            images = (await service.stats()).images
    finally:
        pool.shutdown()

    created = [result for result in results if result.created]
    assert len(created) == 1
    assert {result.image.id for result in results} == {created[0].image.id}
    assert images == 13


async def test_an_add_checks_again_under_the_lock_the_photos_added_since_its_look(
    private_index: Path,
) -> None:
    retina = photo_array("retina")
    smaller = np.asarray(Image.fromarray(retina).resize((600, 600), Image.Resampling.LANCZOS))
    copy = jpeg_of(smaller, 60)
    async with opened_service(private_index) as service:
        copies = CopyFinder(service.catalog, service.pipeline)
        analysis = await service.analyze(copy)
        looks = {
            scope: await copies.look(CopyQuestion(copy, analysis, scope, (), every_look=False))
            for scope in (CHAT_A, CHAT_B)
        }
        # Added after the looks: no look saw it.
        added = await service.add(jpeg_bytes(retina, 92), scope=CHAT_A)
        told_apart = CopyQuestion(copy, analysis, CHAT_A, (added.image.id,), every_look=False)

        in_the_same_chat = await copies.confirm(looks[CHAT_A])
        said_to_differ = await copies.confirm(
            dataclasses.replace(looks[CHAT_A], question=told_apart)
        )
        in_another_chat = await copies.confirm(looks[CHAT_B])

    assert [look.found for look in looks.values()] == [None, None]
    assert in_the_same_chat is not None
    assert in_the_same_chat.id == added.image.id
    assert said_to_differ is None
    assert in_another_chat is None


async def test_a_copy_removed_after_the_look_is_not_returned(private_index: Path) -> None:
    clock = jpeg_bytes(photo_array("clock"))
    copy = jpeg_bytes(photo_array("clock"), 60)
    async with opened_service(private_index) as service:
        added = await service.add(clock, scope=CHAT_A)
        copies = CopyFinder(service.catalog, service.pipeline)
        analysis = await service.analyze(copy)
        look = await copies.look(CopyQuestion(copy, analysis, CHAT_A, (), every_look=False))
        await service.remove(added.image.id)
        confirmed = await copies.confirm(look)
        readded = await service.add(copy, scope=CHAT_A)

    assert look.found is not None
    assert look.found.id == added.image.id
    assert confirmed is None
    assert readded.created


async def test_an_add_takes_a_query_s_every_look_for_its_copy_only_when_asked(
    private_index: Path,
) -> None:
    # The page of tests above on which only the look at the photo itself finds it.
    page = jpeg_bytes(compose_page(photo_array("chelsea"), 3, [photo_array("brick")]).image, 85)

    async with opened_service(private_index) as service:
        every_look = await service.add(page, scope=CHAT_A, every_look=True)
        first_look = await service.add(page, scope=CHAT_A)

    assert (every_look.created, Path(every_look.image.path).stem) == (False, "chelsea")
    assert first_look.created  # bulk adds stay fast: to the first look the page is new


async def test_a_removed_photo_is_no_longer_found(private_index: Path) -> None:
    async with opened_service(private_index) as service:
        added = await service.add(jpeg_bytes(photo_array("coins")))
        stored_original = service.resolve_path(added.image)

        removed = await service.remove(added.image.id)
        matches = await service.query(edited_jpeg("coins", "crop"), top=12)

        assert removed.id == added.image.id
        assert added.image.id not in [m.image.id for m in matches]
        assert not stored_original.exists()
        with pytest.raises(NotFoundError):
            await service.remove(added.image.id)


async def test_a_removed_collection_photo_leaves_the_annoy_results(private_index: Path) -> None:
    async with opened_service(private_index) as service:
        [astronaut] = [
            m.image for m in await service.query(edited_jpeg("astronaut", "crop"), top=1)
        ]
        await service.remove(astronaut.id)
        matches = await service.query(edited_jpeg("astronaut", "crop"), top=12)

    assert astronaut.id not in [m.image.id for m in matches]
    assert not any(m.verified for m in matches), describe(matches)


async def test_a_photo_cannot_be_removed_from_another_chat(private_index: Path) -> None:
    async with opened_service(private_index) as service:
        added = await service.add(jpeg_bytes(photo_array("horse")), scope=CHAT_A)

        with pytest.raises(NotFoundError):
            await service.remove(added.image.id, scope=CHAT_B)
        with pytest.raises(NotFoundError):
            await service.remove(added.image.id, scope=GLOBAL_SCOPE)
        still_there = await service.query(jpeg_bytes(photo_array("horse")), scope=CHAT_A, top=1)

        assert still_there[0].image.id == added.image.id
        assert (await service.remove(added.image.id, scope=CHAT_A)).id == added.image.id


async def test_removing_a_path_removes_the_collection_photo(
    private_index: Path, photos_dir: Path
) -> None:
    async with opened_service(private_index) as service:
        [removed] = await service.remove_path(photos_dir / "rocket.jpg")
        matches = await service.query(edited_jpeg("rocket", "border"), top=12)
        with pytest.raises(NotFoundError):
            await service.remove_path(photos_dir / "rocket.jpg")

    assert Path(removed.path).stem == "rocket"
    assert "rocket" not in [stem(m) for m in matches]


# --- scopes ---------------------------------------------------------------------------------


async def test_a_chat_photo_is_never_shown_to_another_chat(private_index: Path) -> None:
    horse = jpeg_bytes(photo_array("horse"))
    async with opened_service(private_index) as service:
        added = await service.add(horse, scope=CHAT_A)
        in_a = await service.query(horse, scope=CHAT_A, top=20)
        in_b = await service.query(horse, scope=CHAT_B, top=20)
        in_collection = await service.query(horse, scope=GLOBAL_SCOPE, top=20)
        await service.rebuild()  # from Annoy too, not only from the fresh buffer
        in_b_after_rebuild = await service.query(horse, scope=CHAT_B, top=20)

    assert (in_a[0].image.id, in_a[0].verified) == (added.image.id, True)
    for results in (in_b, in_collection, in_b_after_rebuild):
        assert added.image.id not in [m.image.id for m in results]
        assert {m.image.scope for m in results} == {GLOBAL_SCOPE}


async def test_collection_photos_are_shown_to_every_chat(private_index: Path) -> None:
    query = edited_jpeg("chelsea", "caption")
    async with opened_service(private_index) as service:
        await service.add(jpeg_bytes(photo_array("coins")), scope=CHAT_A)
        for scope in (CHAT_A, CHAT_B, GLOBAL_SCOPE):
            matches = await service.query(query, scope=scope, top=1)
            assert (stem(matches[0]), matches[0].verified) == ("chelsea", True)


async def test_the_same_upload_in_two_chats_is_kept_for_each(private_index: Path) -> None:
    horse = jpeg_bytes(photo_array("horse"))
    async with opened_service(private_index) as service:
        in_a = await service.add(horse, scope=CHAT_A)
        in_b = await service.add(horse, scope=CHAT_B)
        await service.remove(in_a.image.id, scope=CHAT_A)
        matches = await service.query(horse, scope=CHAT_B, top=1)

    assert in_a.created
    assert in_b.created
    assert in_b.image.id != in_a.image.id
    assert (matches[0].image.id, matches[0].verified) == (in_b.image.id, True)
    # Both rows share one stored file: removing chat A's must not delete chat B's.
    assert matches[0].path.exists()


# --- sizes and stats ---------------------------------------------------------------------------


async def test_stored_features_stay_within_500_keypoints_a_photo(private_index: Path) -> None:
    async with opened_service(private_index) as service:
        collection = (await service.stats()).bytes_per_image
        # A query keeps up to 1000 keypoints; an add must store no more than 500.
        upload = jpeg_bytes(photo_array("coins"))
        described = analyze_bytes(upload, TEST_SETTINGS, for_query=True).features
        added = await service.add(upload)
        stored = (await service.catalog.features([added.image.id]))[added.image.id]
        with_upload = (await service.stats()).bytes_per_image

    assert collection["features"] <= MAX_STORED_KEYPOINTS * BYTES_PER_KEYPOINT
    assert collection["features"] == collection["keypoints"] * BYTES_PER_KEYPOINT
    assert len(described) > MAX_STORED_KEYPOINTS
    assert len(stored) == MAX_STORED_KEYPOINTS
    assert with_upload["features"] <= MAX_STORED_KEYPOINTS * BYTES_PER_KEYPOINT


async def test_stats_describe_the_index(search_index: Path, photos_dir: Path) -> None:
    async with opened_service(search_index) as service:
        stats = await service.stats()

    assert (stats.images, stats.indexed, stats.fresh, stats.failures) == (12, 12, 0, 0)
    assert stats.generation is not None
    assert (search_index / GENERATIONS_DIR / stats.generation).is_dir()
    assert stats.codebook_trained_on == 12
    # Too few images to whiten: the exact VLAD of 64 centroids x 64 components.
    assert stats.dimensions == 64 * 64


async def test_the_telegram_file_id_is_remembered(private_index: Path) -> None:
    async with opened_service(private_index) as service:
        [match] = await service.query(edited_jpeg("coffee", "crop"), top=1)
        await service.remember_file_id(match.image.id, "AgACAgQAAx0CfileId")
        [again] = await service.query(edited_jpeg("coffee", "crop"), top=1)

    assert again.image.telegram_file_id == "AgACAgQAAx0CfileId"


@pytest.mark.parametrize(
    ("indexed", "threshold"),
    [(0, 500), (4_000, 500), (20_000, 2_000), (100_000, 10_000), (1_000_000, 10_000)],
)
def test_rebuilds_come_rarer_as_the_index_grows_but_the_fresh_buffer_stays_small(
    indexed: int, threshold: int
) -> None:
    assert EngineSettings().rebuild_threshold(indexed) == threshold


# --- opening ------------------------------------------------------------------------------------


async def test_opening_a_folder_without_an_index_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError) as raised:
        await SearchService.open(tmp_path / "nothing-here")

    assert str(tmp_path / "nothing-here") in str(raised.value)  # says where it looked
    assert not (tmp_path / "nothing-here").exists()


async def test_a_new_empty_index_answers_with_no_results_then_learns_from_adds(
    tmp_path: Path,
) -> None:
    async with opened_service(tmp_path / "index", settings=TEST_SETTINGS, create=True) as service:
        empty = await service.query(jpeg_bytes(photo_array("coffee")))
        first = await service.add(jpeg_bytes(photo_array("coffee")))
        second = await service.add(jpeg_bytes(photo_array("rocket")))
        coffee = await service.query(edited_jpeg("coffee", "flip"), top=1)
        rocket = await service.query(edited_jpeg("rocket", "rotate_90"), top=1)

    assert empty == []
    assert (first.created, second.created) == (True, True)
    assert (coffee[0].image.id, coffee[0].verified) == (first.image.id, True)
    assert (rocket[0].image.id, rocket[0].verified) == (second.image.id, True)


# --- damaged derived files ------------------------------------------------------------------------


def current_generation(index: Path) -> Path:
    name = (index / GENERATIONS_DIR / CURRENT_FILE).read_text(encoding="utf-8").strip()
    return index / GENERATIONS_DIR / name


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 3])
    else:  # garble: same size, other bytes
        path.write_bytes(np.random.default_rng(31).bytes(len(data)))


async def answered_by_a_rebuilt_generation(
    index: Path, damaged: Path, photo: str, edit: str
) -> str | None:
    """Open ``index``: it serves a generation other than ``damaged``, holding all 12
    photos, that finds ``photo`` verified from an ``edit`` of it. Returns its name."""
    async with opened_service(index) as service:
        stats = await service.stats()
        matches = await service.query(edited_jpeg(photo, edit), top=1)
    assert stats.generation != damaged.name
    assert (stats.images, stats.indexed) == (12, 12)
    assert (stem(matches[0]), matches[0].verified) == (photo, True)
    return stats.generation


@pytest.mark.parametrize(
    ("file_name", "how"),
    [
        (ANNOY_FILE, "truncate"),
        (CODEBOOK_FILE, "garble"),
        (CODEBOOK_FILE, "truncate"),
        (IDS_FILE, "garble"),
        (MANIFEST_FILE, "garble"),
    ],
)
async def test_a_damaged_derived_file_is_rebuilt_from_the_catalog_on_open(
    private_index: Path, file_name: str, how: str
) -> None:
    damaged = current_generation(private_index)
    damage(damaged / file_name, how)

    rebuilt = await answered_by_a_rebuilt_generation(
        private_index, damaged, "hubble_deep_field", "crop"
    )

    # The rebuilt generation is whole: it opens with every checksum verified.
    async with opened_service(private_index) as reopened:
        assert (await reopened.stats()).generation == rebuilt


async def test_a_garbled_annoy_file_is_never_searched_and_is_rebuilt_in_the_background(
    private_index: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The same size, other bytes: only its checksum can tell, which is checked after
    # the start (hashing it was most of a start-up at a million images).
    damaged = current_generation(private_index)
    damage(damaged / ANNOY_FILE, "garble")

    with caplog.at_level(logging.WARNING, logger="indexer"):
        async with opened_service(private_index) as service:
            crop = await service.query(edited_jpeg("hubble_deep_field", "crop"), top=1)
            # Unrelated: every look runs, Annoy's searches included, and find nothing.
            unrelated = await service.query(noise_jpeg(5), top=3)
        # Closing waited for the check and the rebuild it started.

    assert (stem(crop[0]), crop[0].verified) == ("hubble_deep_field", True)
    assert not any(match.verified for match in unrelated)
    assert any(
        "fails its checksum" in r.getMessage() and ANNOY_FILE in r.getMessage()
        for r in caplog.records
    )
    await answered_by_a_rebuilt_generation(private_index, damaged, "camera", "rotate_15")


async def test_current_naming_a_vanished_generation_is_rebuilt(private_index: Path) -> None:
    pointer = private_index / GENERATIONS_DIR / CURRENT_FILE
    pointer.write_text("g00000000000000000042", encoding="utf-8")

    async with opened_service(private_index) as service:
        matches = await service.query(edited_jpeg("camera", "rotate_15"), top=1)

    assert (stem(matches[0]), matches[0].verified) == ("camera", True)


# --- generations swapped while queries run -------------------------------------------------------


async def test_queries_keep_finding_originals_while_generations_are_swapped(
    private_index: Path,
) -> None:
    """Queries run on worker threads (as on the bot's process pool) while the index
    is rebuilt and swapped several times, once with a retrained codebook."""
    queries = {photo: edited_jpeg(photo, "quarter_size_jpeg_20") for photo in QUERY_PHOTOS[:3]}
    rebuilds_done = asyncio.Event()
    answers: list[tuple[str, str, bool]] = []
    failures: list[str] = []

    async def keep_querying(service: SearchService) -> None:
        while True:
            for photo, data in queries.items():
                try:
                    matches = await service.query(data, top=2)
                except Exception as error:  # any failure is what this test looks for
                    failures.append(f"{photo}: {type(error).__name__}: {error}")
                    continue
                if matches:
                    answers.append((photo, stem(matches[0]), matches[0].verified))
                else:
                    failures.append(f"{photo}: no results at all")
            if rebuilds_done.is_set():
                return

    pool = CpuPool(ThreadPoolExecutor(max_workers=2), workers=2)
    try:
        async with opened_service(private_index, pool=pool) as service:
            readers = [asyncio.create_task(keep_querying(service)) for _ in range(2)]
            names = []
            for round_number in range(10):
                names.append(await service.rebuild(retrain=round_number == 3))
                await asyncio.sleep(0)
            rebuilds_done.set()
            await asyncio.gather(*readers)
    finally:
        pool.shutdown()

    assert failures == []
    assert len(set(names)) == 10
    assert len(answers) >= 2 * len(queries)
    assert [a for a in answers if a[1:] != (a[0], True)] == []


def read_current_generation(root: Path) -> str | None:
    """What a reader in another process sees: None if CURRENT names a whole
    generation, else what is wrong with it."""
    name = (root / CURRENT_FILE).read_text(encoding="utf-8").strip()
    try:
        manifest = json.loads((root / name / MANIFEST_FILE).read_text(encoding="utf-8"))
        for file_name, expected in manifest["files"].items():
            size = (root / name / file_name).stat().st_size
            if size != expected["size"]:
                return f"{name}/{file_name}: {size} bytes, manifest says {expected['size']}"
    except (OSError, ValueError, KeyError) as error:
        return f"{name}: {type(error).__name__}: {error}"
    return None


async def test_a_reader_never_sees_a_missing_or_partial_generation(private_index: Path) -> None:
    root = private_index / GENERATIONS_DIR
    stop = threading.Event()
    problems: list[str] = []
    reads = 0

    def keep_reading() -> None:
        nonlocal reads
        while not stop.is_set():
            problem = read_current_generation(root)
            reads += 1
            if problem is not None:
                problems.append(problem)

    reader = threading.Thread(target=keep_reading, name="generation-reader")
    reader.start()
    try:
        async with opened_service(private_index) as service:
            for _ in range(8):
                await service.rebuild()
    finally:
        stop.set()
        reader.join()

    assert reads > 0
    assert problems == []


# --- a full disk ---------------------------------------------------------------------------------


async def test_an_add_on_a_full_disk_saves_nothing(private_index: Path) -> None:
    coins = jpeg_bytes(photo_array("coins"))
    # A catalog allowed no room to grow fails on the add's first write, as on a full disk.
    full = await SearchService.open(private_index, settings=TEST_SETTINGS, max_catalog_bytes=1)
    try:
        before = await full.stats()
        with pytest.raises(StorageFullError):
            await full.add(coins)
        after = await full.stats()
    finally:
        await full.close()
    leftovers = [p for p in (private_index / ORIGINALS_DIR).rglob("*") if p.is_file()]
    async with opened_service(private_index) as service:  # space freed
        retried = await service.add(coins)

    assert (after.images, after.fresh) == (before.images, before.fresh)
    assert leftovers == []
    assert retried.created


# --- a background rebuild that fails ------------------------------------------------------------


async def test_a_failed_background_rebuild_is_logged_and_the_index_keeps_serving(
    private_index: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rebuild_at_once = dataclasses.replace(TEST_SETTINGS, rebuild_after_fresh=1)
    service = await SearchService.open(private_index, settings=rebuild_at_once)
    try:
        # The generations folder turns into a file: the rebuild cannot write its new one.
        shutil.rmtree(private_index / GENERATIONS_DIR)
        (private_index / GENERATIONS_DIR).write_bytes(b"")
        with caplog.at_level(logging.ERROR, logger="indexer"):
            added = await service.add(jpeg_bytes(photo_array("coins")))
            await asyncio.sleep(0)  # the rebuild starts in the background
            matches = await service.query(edited_jpeg("coins", "crop"), top=1)
    finally:
        await service.close()  # waits for the rebuild, and does not raise its failure again

    # The add starts one; the start-up's check of the Annoy file, which finds the file
    # gone, may start another once the first has failed.
    failures = [r for r in caplog.records if "background rebuild failed" in r.getMessage()]
    assert failures
    assert all(f.levelno == logging.ERROR and f.exc_info is not None for f in failures)
    assert (matches[0].image.id, matches[0].verified) == (added.image.id, True)
