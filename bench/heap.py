"""Does keeping freed memory pay? Whole queries with the allocator advice of
``indexer/heap.py`` against the C library's own behaviour, in the same run.

    .venv/bin/python -m bench.heap --index bench/out/e2e-100k/index-1000000 \
        --queries bench/out/e2e-100k/queries --rounds 2

The index is any index folder (here the million-image one that ``bench.scale
--end-to-end --keep`` leaves) and the queries any folder of photos. Each round
runs the queries once in a fresh process of each kind, in alternating order,
since the machine's load drifts: ``kept`` (the engine's default) and
``returned`` (``INDEXER_KEEP_FREED_MEMORY=0``). A process opens the index,
answers every query once to warm up, then again for the figures: the whole
query's time, the candidate stage's (``StageTimings``), the page faults the
process took per query, and its private memory at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import list_photos, machine_info, median, write_json
from bench.scale_end_to_end import memory
from indexer import SearchService, StageTimings
from indexer.features import limit_threads

MODES = {"kept": "1", "returned": "0"}


async def _measure(index: Path, queries: Sequence[Path]) -> dict[str, Any]:
    limit_threads()  # one core per query, as in the bot's workers
    service = await SearchService.open(index)
    try:
        for query in queries:  # warm-up: compiled kernels, page cache, the allocator's heap
            await service.query(query, top=5)
        whole, candidates = [], []
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for query in queries:
            timings = StageTimings()
            clock = time.perf_counter()
            await service.query(query, top=5, timings=timings)
            whole.append(time.perf_counter() - clock)
            candidates.append(timings.seconds.get("candidates", 0.0))
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    finally:
        await service.close()
    return {
        "query_ms": 1000 * median(whole),
        "candidate_ms": 1000 * median(candidates),
        "page_faults_per_query": faults / len(queries),
        "private_mb": memory().get("anon_mb", float("nan")),
    }


def _child(mode: str, index: Path, queries: Path) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.heap", "--index", str(index), "--queries", str(queries),
         "--child"],
        env={**os.environ, "INDEXER_KEEP_FREED_MEMORY": MODES[mode]},
        capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        raise SystemExit(f"the {mode} run failed:\n{completed.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.splitlines()[-1])
    return result


def run(index: Path, queries: Path, rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for round_number in range(rounds):
        order = list(MODES) if round_number % 2 == 0 else list(reversed(MODES))
        for mode in order:
            runs[mode].append(_child(mode, index, queries))
            print(mode, runs[mode][-1], flush=True)
    figures = {
        mode: {key: median(run[key] for run in results) for key in results[0]}
        for mode, results in runs.items()
    }
    kept, returned = figures["kept"], figures["returned"]
    return {
        "benchmark": "heap",
        "index": index.name,
        "queries": len(list_photos(queries)),
        "rounds": rounds,
        "median_of_rounds": figures,
        "kept_to_returned": {
            "query": kept["query_ms"] / returned["query_ms"],
            "candidates": kept["candidate_ms"] / returned["candidate_ms"],
        },
        "runs": runs,
        "machine": machine_info(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/out/heap.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        result = asyncio.run(_measure(arguments.index, list_photos(arguments.queries)))
        print(json.dumps(result))
        return
    result = run(arguments.index, arguments.queries, arguments.rounds)
    write_json(arguments.out, result)
    print(json.dumps({k: result[k] for k in ("median_of_rounds", "kept_to_returned")}, indent=2))


if __name__ == "__main__":
    main()
