"""What the closer look costs, and whether it ever calls an unrelated photo the same
picture: queries that are not in the collection, with and without closer looks.

    .venv/bin/python -m bench.closer_look --photos ../shared/photos \
        --index bench/out/engine/collection-<key>/index --out bench/out/closer-look.json

The index is the 900-photo collection that ``bench.quality`` builds (same split and seed),
so its 100 held-out photos are unrelated to every indexed one. Each held-out photo is asked
whole and in two edited copies (the watch's edit kinds, taken in turn, so the deep crops and
the 0.25x q15 copies that a closer look is for are among them), as Telegram would store
them. Both services open the same index in one process and answer each query in turn, one
with the engine's settings and one with ``closer_looks=0``: the ratio of their times is
measured in the same run. Reported: false verdicts, the share of queries that took a closer
look, its median time, and the mean time a query takes with it against without it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import (
    as_telegram_photo,
    derive_seed,
    list_photos,
    load_rgb,
    machine_info,
    split_photos,
    write_json,
)
from indexer import EngineSettings, ImageError, SearchService, StageTimings
from testsupport.edits import EDIT_KINDS

SOLO_KINDS = tuple(kind for kind in EDIT_KINDS if not kind.fillers_wanted)
STAGE = "closer look"


def unrelated_queries(held_out: list[Path]) -> list[tuple[str, bytes]]:
    """Each held-out photo whole, then in two edit kinds (taken in turn)."""
    queries = []
    for number, path in enumerate(held_out):
        image = load_rgb(path)
        queries.append((f"{path.name} whole", as_telegram_photo(image)))
        for copy in range(2):
            kind = SOLO_KINDS[(2 * number + copy) % len(SOLO_KINDS)]
            edited = kind.edit(image, derive_seed("closer look", number, copy))
            queries.append((f"{path.name} {kind.name}", as_telegram_photo(
                edited, quality=kind.jpeg_quality)))
    return queries


async def measure(index: Path, queries: list[tuple[str, bytes]]) -> dict[str, Any]:
    closer = await SearchService.open(index, settings=EngineSettings())
    without = await SearchService.open(index, settings=EngineSettings(closer_looks=0))
    seconds: dict[str, list[float]] = {"closer": [], "without": []}
    looked: list[float] = []
    share_of_query: list[float] = []
    false_verified: list[str] = []
    refused = 0
    try:
        for name, data in queries:
            timings = StageTimings()
            try:
                start = time.perf_counter()
                matches = await closer.query(data, top=5, timings=timings)
                seconds["closer"].append(time.perf_counter() - start)
                start = time.perf_counter()
                await without.query(data, top=5)
                seconds["without"].append(time.perf_counter() - start)
            except ImageError:
                refused += 1
                continue
            false_verified += [f"{name}: {m.path.name}" for m in matches if m.verified]
            if timings.counts.get(STAGE):
                looked.append(timings.seconds[STAGE])
                share_of_query.append(timings.seconds[STAGE] / seconds["closer"][-1])
    finally:
        await closer.close()
        await without.close()
    answered = len(seconds["closer"])
    return {
        "queries": len(queries),
        "refused": refused,
        "false_verified": len(false_verified),
        "false_verified_queries": false_verified,
        "with_closer_look": len(looked),
        "with_closer_look_share": len(looked) / max(answered, 1),
        "closer_look_median_ms": 1000 * statistics.median(looked) if looked else None,
        "closer_look_share_of_those_queries_median": (
            statistics.median(share_of_query) if share_of_query else None),
        "mean_query_ms": {k: 1000 * statistics.fmean(v) for k, v in seconds.items() if v},
        "median_query_ms": {k: 1000 * statistics.median(v) for k, v in seconds.items() if v},
        "mean_ratio_closer_to_without": (
            statistics.fmean(seconds["closer"]) / statistics.fmean(seconds["without"])
            if answered else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--index", type=Path, required=True,
                        help="an index of the collection bench.quality builds (same split)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/closer-look.json"))
    parser.add_argument("--collection", type=int, default=900)
    parser.add_argument("--unrelated", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="bench.quality's --seed")
    args = parser.parse_args()

    photos = list_photos(args.photos)
    split = split_photos(photos, args.collection, args.unrelated,
                         derive_seed(args.seed, "split"))
    report = asyncio.run(measure(args.index, unrelated_queries(list(split.unrelated))))
    report.update(machine=machine_info(), command=" ".join(["python -m bench.closer_look",
                  f"--photos {args.photos}", f"--index {args.index}"]))
    write_json(args.out, report)
    print(f"{report['queries']} unrelated queries ({report['refused']} refused): "
          f"{report['false_verified']} verified; {report['with_closer_look']} "
          f"({report['with_closer_look_share']:.1%}) took a closer look, median "
          f"{report['closer_look_median_ms'] or 0:.0f} ms; mean query with closer looks "
          f"{report['mean_ratio_closer_to_without'] or 0:.3f}x without")


if __name__ == "__main__":
    main()
