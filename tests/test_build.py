"""Tests of indexer.build: building from a folder full of bad inputs, and
incremental rebuilds (unchanged, changed, deleted, fixed files, a second folder).

Builds start a process pool and run KAZE, so each module fixture below runs a
whole sequence of builds once and the tests check what each step reported.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from bad_inputs import OK, BadInput, BadInputCorpus, write_bad_inputs
from engine_fixtures import (
    FifoWatchdog,
    edited_jpeg,
    run_build,
    shared_index,
    stem,
)

from indexer.ann import GenerationStore
from indexer.build import IMAGE_SUFFIXES, BuildReport, build_index
from indexer.catalog import Catalog
from indexer.errors import SourceError
from indexer.inverted_file import POSTINGS_DIR
from indexer.search import CATALOG_FILE, GENERATIONS_DIR, Match
from indexer.segments import SegmentStore
from testsupport.engine import opened_service

# --- a folder of bad inputs -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadFolderBuild:
    corpus: BadInputCorpus
    index: Path
    first: BuildReport
    rerun: BuildReport
    fifo_releases: int  # times a build was found blocked opening the FIFO


@pytest.fixture(scope="module")
def bad_folder_build(tmp_path_factory: pytest.TempPathFactory) -> BadFolderBuild:
    folder = tmp_path_factory.mktemp("bad-photos")
    corpus = write_bad_inputs(folder)
    index = tmp_path_factory.mktemp("bad-index") / "index"
    fifo = folder / "pipe.jpg"
    with FifoWatchdog(fifo) as watchdog:
        first = run_build(folder, index)
        rerun = run_build(folder, index)
    return BadFolderBuild(corpus, index, first, rerun, watchdog.released)


def is_scanned_file(record: BadInput) -> bool:
    """Whether a build looks at this case: a file (not a folder, not absent) with
    an image suffix. Other files (``.HEIC``, ``.svg``) are not photos to a build."""
    return (
        os.path.lexists(record.path)
        and not record.path.is_dir()
        and record.path.suffix.lower() in IMAGE_SUFFIXES
    )


def must_fail(corpus: BadInputCorpus) -> set[str]:
    """Paths a build must report: undecodable files, and pictures without keypoints."""
    paths = {
        str(r.path)
        for r in corpus
        if is_scanned_file(r) and (r.expected != OK or r.expected_features == "none")
    }
    if "symlink_loop" in {r.name for r in corpus}:
        # The loop is two links pointing at each other; the corpus records one.
        paths.add(str(corpus["symlink_loop"].path.with_name("b.jpg")))
    return paths


def must_be_indexed(corpus: BadInputCorpus) -> set[str]:
    return {str(r.path) for r in corpus if r.expected == OK and r.expected_features == "some"}


def test_every_bad_file_is_reported_with_a_reason(bad_folder_build: BadFolderBuild) -> None:
    reported = dict(bad_folder_build.first.failed)

    assert set(reported) == must_fail(bad_folder_build.corpus)
    assert all(reason.strip() for reason in reported.values())
    assert len(reported) >= 20


async def test_the_good_files_among_bad_ones_are_indexed(bad_folder_build: BadFolderBuild) -> None:
    expected = must_be_indexed(bad_folder_build.corpus)
    async with await Catalog.open(bad_folder_build.index / CATALOG_FILE) as catalog:
        indexed = {path for path in expected if await catalog.find_by_path(path)}
        count = await catalog.count()

    assert indexed == expected
    # Pure noise may or may not keep enough keypoints: the only other candidate.
    assert count - len(expected) in (0, 1)
    assert bad_folder_build.first.images == count
    assert bad_folder_build.first.added == count


def test_a_fifo_in_the_folder_does_not_block_the_build(bad_folder_build: BadFolderBuild) -> None:
    if "fifo" in bad_folder_build.corpus.skipped:
        pytest.skip(bad_folder_build.corpus.skipped["fifo"])

    assert bad_folder_build.fifo_releases == 0, "the build opened the FIFO and waited for a writer"


def test_a_rerun_retries_no_unchanged_failure(bad_folder_build: BadFolderBuild) -> None:
    first, rerun = bad_folder_build.first, bad_folder_build.rerun
    failed = {path for path, _ in first.failed}
    remembered = {path for path in failed if _stat_works(path)}
    # A file that cannot even be stat-ed (a symlink loop) is reported by every scan.
    unstatable = failed - remembered

    assert rerun.added == rerun.updated == rerun.removed == 0
    assert rerun.unchanged == first.added
    assert {path for path, _ in rerun.failed} == unstatable
    assert rerun.still_failing == len(remembered)


def _stat_works(path: str) -> bool:
    try:
        os.stat(path)  # noqa: PTH116 - the build's own scan follows file symlinks like this
    except OSError:
        return False
    return True


async def test_failures_are_listed_in_the_stats(bad_folder_build: BadFolderBuild) -> None:
    async with opened_service(bad_folder_build.index) as service:
        stats = await service.stats()
        listed = dict(await service.catalog.failures())

    assert stats.failures == len(listed)
    assert set(listed) == {path for path, _ in bad_folder_build.first.failed if _stat_works(path)}


def test_a_missing_photo_folder_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as raised:
        asyncio.run(build_index(tmp_path / "no-such-folder", tmp_path / "index", progress=False))

    assert "no-such-folder" in str(raised.value)  # says which folder
    assert not (tmp_path / "index").exists()


def test_a_file_is_not_a_photo_folder(tmp_path: Path, photos_dir: Path) -> None:
    with pytest.raises(SourceError):
        asyncio.run(build_index(photos_dir / "coffee.jpg", tmp_path / "index", progress=False))


# --- incremental builds ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class History:
    first_folder: Path
    second_folder: Path
    index: Path
    reports: dict[str, BuildReport]
    ids_before_rerun: dict[str, int]
    ids_after_rerun: dict[str, int]


async def _ids_by_path(index: Path) -> dict[str, int]:
    async with await Catalog.open(index / CATALOG_FILE) as catalog:
        records = await catalog.get_many(list(range(1, await catalog.max_id() + 1)))
    return {record.path: record.id for record in records.values()}


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory, photos_dir: Path) -> History:
    """One index through five builds:

    1. first folder: astronaut, coffee, camera, and a truncated JPEG
    2. the same again, nothing touched
    3. camera.jpg overwritten with another photo (chelsea), coffee.jpg deleted,
       the truncated JPEG replaced by a good photo (rocket)
    4. a second folder (hubble_deep_field, immunohistochemistry) into the same index
    5. the first folder again
    """
    root = tmp_path_factory.mktemp("incremental")
    first, second, index = root / "first", root / "second", root / "index"
    first.mkdir()
    second.mkdir()
    for name in ("astronaut", "coffee", "camera"):
        shutil.copyfile(photos_dir / f"{name}.jpg", first / f"{name}.jpg")
    good_rocket = (photos_dir / "rocket.jpg").read_bytes()
    (first / "broken.jpg").write_bytes(good_rocket[: len(good_rocket) // 3])
    for name in ("hubble_deep_field", "immunohistochemistry"):
        shutil.copyfile(photos_dir / f"{name}.jpg", second / f"{name}.jpg")

    reports = {"first": run_build(first, index)}
    ids_before = asyncio.run(_ids_by_path(index))
    reports["untouched"] = run_build(first, index)
    ids_after = asyncio.run(_ids_by_path(index))
    (first / "camera.jpg").write_bytes((photos_dir / "chelsea.jpg").read_bytes())
    (first / "coffee.jpg").unlink()
    (first / "broken.jpg").write_bytes(good_rocket)
    reports["changed"] = run_build(first, index)
    reports["second_folder"] = run_build(second, index)
    reports["first_again"] = run_build(first, index)
    return History(first, second, index, reports, ids_before, ids_after)


def counts(report: BuildReport) -> dict[str, int]:
    return {
        "scanned": report.scanned,
        "added": report.added,
        "updated": report.updated,
        "removed": report.removed,
        "unchanged": report.unchanged,
        "failed": len(report.failed),
        "still_failing": report.still_failing,
        "images": report.images,
    }


def test_the_first_build_adds_the_photos_and_reports_the_broken_one(history: History) -> None:
    report = history.reports["first"]

    assert counts(report) == {
        "scanned": 4, "added": 3, "updated": 0, "removed": 0, "unchanged": 0,
        "failed": 1, "still_failing": 0, "images": 3,
    }
    assert [Path(path).name for path, _ in report.failed] == ["broken.jpg"]


def test_a_rerun_on_an_untouched_folder_extracts_nothing(history: History) -> None:
    report = history.reports["untouched"]

    assert counts(report) == {
        "scanned": 4, "added": 0, "updated": 0, "removed": 0, "unchanged": 3,
        "failed": 0, "still_failing": 1, "images": 3,
    }
    # Nothing was replaced, and no new generation was written.
    assert history.ids_after_rerun == history.ids_before_rerun
    assert report.generation == history.reports["first"].generation


def test_changed_deleted_and_fixed_files_are_noticed(history: History) -> None:
    assert counts(history.reports["changed"]) == {
        "scanned": 3, "added": 1, "updated": 1, "removed": 1, "unchanged": 1,
        "failed": 0, "still_failing": 0, "images": 3,
    }


def test_a_second_folder_adds_to_the_index_and_leaves_the_first_alone(history: History) -> None:
    second, first_again = history.reports["second_folder"], history.reports["first_again"]

    assert (second.added, second.removed, second.unchanged, second.images) == (2, 0, 0, 5)
    assert (first_again.added, first_again.removed, first_again.unchanged) == (0, 0, 3)
    assert first_again.images == 5


async def test_photos_added_by_a_later_build_are_sealed_into_the_inverted_file(
    history: History,
) -> None:
    # Committed, not only held in memory: otherwise every start-up reads and
    # assigns them again, which for a large folder added later takes minutes.
    committed = SegmentStore(history.index / POSTINGS_DIR).load()
    async with await Catalog.open(history.index / CATALOG_FILE) as catalog:
        newest = await catalog.max_id()
        held = set((await catalog.ids()).tolist())

    assert committed is not None
    assert committed.ceiling == newest
    sealed = {int(i) for s in committed.sealed for i in s.lists.ids} - committed.tombstones
    assert sealed == held


async def best_match(index: Path, query: bytes) -> Match:
    async with opened_service(index) as service:
        [best, *_] = await service.query(query, top=5)
    return best


@pytest.mark.parametrize(
    ("photo", "indexed_as"),
    [
        ("astronaut", "first/astronaut.jpg"),
        ("chelsea", "first/camera.jpg"),  # the overwritten file's new content
        ("rocket", "first/broken.jpg"),  # the fixed file
        ("hubble_deep_field", "second/hubble_deep_field.jpg"),
    ],
)
async def test_the_final_index_finds_each_file_by_its_current_content(
    history: History, photo: str, indexed_as: str
) -> None:
    best = await best_match(history.index, edited_jpeg(photo, "crop"))

    assert best.verified, f"{photo}: best was {stem(best)} with {best.inliers} inliers"
    assert best.path == history.first_folder.parent / indexed_as


@pytest.mark.parametrize("photo", ["coffee", "camera"])
async def test_deleted_and_overwritten_content_is_no_longer_found(
    history: History, photo: str
) -> None:
    async with opened_service(history.index) as service:
        matches = await service.query(edited_jpeg(photo, "crop"), top=10)

    assert not any(m.verified for m in matches)
    assert history.first_folder / "coffee.jpg" not in [m.path for m in matches]


# --- reproducibility ---------------------------------------------------------------------------


def codebook_id(index: Path) -> str:
    generation = GenerationStore(index / GENERATIONS_DIR).load_current(verify_checksums=False)
    assert generation is not None
    generation.unload()
    return generation.codebook.id


def test_the_same_photos_always_train_the_same_codebook(
    tmp_path_factory: pytest.TempPathFactory, photos_dir: Path, tmp_path: Path
) -> None:
    """Two workers finish photos in whatever order the machine allows, and the
    catalog numbers them in that order; the codebook must not depend on it."""
    again = tmp_path / "index"
    run_build(photos_dir, again)

    assert codebook_id(again) == codebook_id(shared_index(tmp_path_factory, photos_dir))


# --- removals hold -----------------------------------------------------------------------------


async def _remove_as_an_admin_would(index: Path, photo: Path) -> int:
    """Find ``photo`` by searching with it, and remove what was found (the bot's /remove)."""
    async with opened_service(index) as service:
        [match] = await service.query(photo, top=1)
        await service.remove(match.image.id, scope=match.image.scope)
    return match.image.id


async def _found_by_path(index: Path, photo: Path) -> list[str]:
    async with opened_service(index) as service:
        return [str(match.path) for match in await service.query(photo, top=3) if match.verified]


def test_a_removed_photo_stays_removed_until_its_file_changes(
    tmp_path: Path, photos_dir: Path
) -> None:
    folder, index = tmp_path / "photos", tmp_path / "index"
    folder.mkdir()
    for name in ("astronaut", "coffee", "rocket"):
        shutil.copyfile(photos_dir / f"{name}.jpg", folder / f"{name}.jpg")
    coffee = folder / "coffee.jpg"
    run_build(folder, index)
    asyncio.run(_remove_as_an_admin_would(index, coffee))

    untouched = run_build(folder, index)
    status = coffee.stat()
    os.utime(coffee, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # same bytes
    touched = run_build(folder, index)
    gone = asyncio.run(_found_by_path(index, coffee))
    coffee.write_bytes(edited_jpeg("coffee", "crop"))  # a new picture at the same path
    changed = run_build(folder, index)
    back = asyncio.run(_found_by_path(index, coffee))

    assert (untouched.added, untouched.held_removed, untouched.images) == (0, 1, 2)
    assert (touched.added, touched.held_removed, touched.images) == (0, 1, 2)
    assert gone == []
    assert (changed.added, changed.held_removed, changed.images) == (1, 0, 3)
    assert back == [str(coffee)]
