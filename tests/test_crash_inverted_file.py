"""Crash safety of the inverted file: SIGKILL during adds, segment seals and merges.

A child process adds drawings one by one with a tiny seal size and merge factor, so that
every few adds it seals a segment and merges segments in the background; it is killed at a
seeded random moment. The next start must hold every image the catalog committed exactly once
in the inverted file (none lost, none doubled), and find each of them by its edited copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from pathlib import Path

import pytest
from reliability_helpers import (
    FAST_ENGINE,
    catalog_health,
    create_empty_index,
    kill_group,
    report_figures,
    service_of,
    started_script,
)
from test_reliability_crash import drawing, drawing_query

from indexer.catalog import Catalog
from indexer.inverted_file import POSTINGS_DIR
from indexer.search import CATALOG_FILE
from indexer.segments import SegmentStore

# Seal every 3 adds, merge every 2 segments: a kill lands in a seal or a merge often.
SEALING_ENGINE = dataclasses.replace(FAST_ENGINE, seal_after=3, merge_factor=2)
FIRST_SEED = 900
CORRUPTION_WARNING = "rebuilding the inverted file"

ADD_SCRIPT = """
import asyncio, dataclasses, sys
from pathlib import Path
sys.path.insert(0, "tests")
from reliability_helpers import FAST_ENGINE
from test_reliability_crash import drawing
from indexer.search import SearchService

async def main(index, first, count):
    settings = dataclasses.replace(FAST_ENGINE, seal_after=3, merge_factor=2)
    service = await SearchService.open(Path(index), settings=settings)
    print("ready", flush=True)
    for seed in range(first, first + count):
        result = await service.add(drawing(seed))
        print("added", seed, result.image.id, flush=True)
    await service.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def added_until_killed(index: Path, first: int, delay: float) -> list[int]:
    """Start adding drawings from seed ``first``; SIGKILL after ``delay`` s; the seeds reported."""
    process, _ = await started_script(ADD_SCRIPT, index, first, 200)
    await asyncio.sleep(delay)
    kill_group(process.pid)
    await process.wait()
    assert process.returncode != 0  # killed, not finished
    lines = (await process.stdout.read()).decode().splitlines()
    return [int(line.split()[1]) for line in lines if line.startswith("added")]


async def check_kills(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, *, kills: int, seed: int
) -> None:
    index = tmp_path / "index"
    await create_empty_index(index, SEALING_ENGINE)
    rng = random.Random(seed)
    first = FIRST_SEED
    reported: list[int] = []
    outcomes = []
    for _ in range(kills):
        reported += await added_until_killed(index, first, rng.uniform(1.0, 4.0))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="indexer"):
            async with service_of(index, settings=SEALING_ENGINE) as service:
                stats = await service.stats()
                # The catalog is the truth: each image it holds is in the inverted file once.
                assert stats.voting_images == stats.images
                assert stats.images >= len(reported)  # an add the kill beat the report of counts
                # The newest adds (in the open set or the last seal) and a sample of the rest.
                for drawing_seed in {*reported[-3:], *rng.sample(reported, min(3, len(reported)))}:
                    [match] = await service.query(drawing_query(drawing_seed), top=1)
                    assert match.verified, drawing_seed
        assert CORRUPTION_WARNING not in caplog.text
        assert catalog_health(index).problems == []
        outcomes.append({"images": stats.images, "segments": stats.segments})
        first = FIRST_SEED + stats.images + len(outcomes)  # never re-add a committed drawing
    # Segments the last commit does not name are removed at the next start.
    async with service_of(index, settings=SEALING_ENGINE) as service:
        committed = (await service.stats()).segments
    on_disk = [
        p for p in (index / POSTINGS_DIR).iterdir() if p.is_dir() and not p.name.startswith(".")
    ]
    assert len(on_disk) == committed
    report_figures("crash-inverted-file", kills=kills, outcomes=outcomes)


async def test_adds_seals_and_merges_killed_at_random_points_lose_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await check_kills(tmp_path, caplog, kills=2, seed=21)


@pytest.mark.slow
async def test_many_kills_during_seals_and_merges_lose_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await check_kills(tmp_path, caplog, kills=8, seed=22)


async def test_an_index_without_an_inverted_file_gets_one_at_open_and_finds_by_votes(
    tmp_path: Path,
) -> None:
    """An index built before the inverted file existed: opened, it is migrated from the catalog."""
    index = tmp_path / "index"
    await create_empty_index(index, SEALING_ENGINE)
    async with service_of(index, settings=SEALING_ENGINE) as service:
        for drawing_seed in range(5):
            await service.add(drawing(drawing_seed))
    for path in sorted((index / POSTINGS_DIR).iterdir(), reverse=True):
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()
    (index / POSTINGS_DIR).rmdir()

    async with service_of(index, settings=SEALING_ENGINE) as service:
        stats = await service.stats()
        [match] = await service.query(drawing_query(3), top=1)

    assert stats.voting_images == stats.images == 5
    assert match.verified
    assert (index / POSTINGS_DIR / "SEGMENTS.json").exists()


async def test_a_segment_whose_images_were_all_removed_is_dropped_and_deleted(
    tmp_path: Path,
) -> None:
    index = tmp_path / "index"
    unmerged = dataclasses.replace(SEALING_ENGINE, merge_factor=8)  # segments stay apart
    await create_empty_index(index, unmerged)
    async with service_of(index, settings=unmerged) as service:
        added = {(await service.add(drawing(seed))).image.id: seed for seed in range(9)}
    store = SegmentStore(index / POSTINGS_DIR)
    before = store.load()
    assert before is not None
    assert len(before.sealed) >= 2
    emptied = before.sealed[0]
    removed = [int(i) for i in emptied.lists.ids]

    async with service_of(index, settings=unmerged) as service:
        for image_id in removed:
            await service.remove(image_id)
    # Closing waited for the upkeep that the emptied segment started.
    after = store.read_commit()
    assert after is not None
    on_disk = {p.name for p in (index / POSTINGS_DIR).iterdir() if p.is_dir()}

    assert emptied.name not in after.segments
    assert after.segments == tuple(s.name for s in before.sealed[1:])
    assert after.tombstones == frozenset()  # no live segment holds a removed image
    assert on_disk == set(after.segments)
    async with service_of(index, settings=unmerged) as service:
        stats = await service.stats()
        kept = next(i for i in added if i not in removed)
        [match] = await service.query(drawing_query(added[kept]), top=1)
    assert stats.voting_images == stats.images == len(added) - len(removed)
    assert (match.image.id, match.verified) == (kept, True)


async def test_an_index_left_with_an_emptied_segment_drops_it_when_opened(
    tmp_path: Path,
) -> None:
    index = tmp_path / "index"
    unmerged = dataclasses.replace(SEALING_ENGINE, merge_factor=8)
    await create_empty_index(index, unmerged)
    async with service_of(index, settings=unmerged) as service:
        for seed in range(9):
            await service.add(drawing(seed))
    store = SegmentStore(index / POSTINGS_DIR)
    before = store.load()
    assert before is not None
    emptied = before.sealed[0]
    removed = [int(i) for i in emptied.lists.ids]
    # The state an older version left behind: removed from the catalog, tombstoned
    # in a committed segment, never merged.
    async with await Catalog.open(index / CATALOG_FILE) as catalog:
        await catalog.delete_images(removed)
    store.commit(before.without_images(removed))

    async with service_of(index, settings=unmerged) as service:
        stats = await service.stats()
    after = store.read_commit()

    assert after is not None
    assert emptied.name not in after.segments
    assert stats.voting_images == stats.images == 9 - len(removed)
