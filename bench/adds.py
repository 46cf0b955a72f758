"""Adds while querying: the add rate the engine sustains, and what adds cost the queries.

    .venv/bin/python -m bench.adds --photos ../shared/photos --out bench/out/adds.json

Issue 10's target: "an added photo is found by the next query; 1,000 adds a minute sustained
while querying, with query p95 within 20% of idle".

Set-up: an index of a seeded ``--indexed`` (100) of the photos, made by
``indexer.build.build_index`` with the default engine settings, served by ``SearchService``
on a ``CpuPool.processes(--workers)`` pool, as the bot serves it.

Three phases, interleaved because the machine is shared and absolute times drift:

1. idle: a querier issues edited copies of the indexed photos (every ``testsupport.edits`` kind that
   shows the photo alone) at a steady ``--query-rate``, open loop (each query is started on
   time whether or not the previous one has returned); nothing is added;
2. loaded: the same querier, while an adder adds the other photos of the folder, each once,
   paced at ``--add-rate`` a minute for ``--duration`` seconds, at most ``--adds-in-flight`` at
   once (the bot runs several updates at once). Photos are downscaled to ``--add-side`` px on
   their longest side before they are added, so that KAZE costs about 0.4x what it costs at
   the engine's 640-px working size. Every ``--check-every``-th add is followed, as soon as it
   returns, by a query with an edited copy of that photo, which must return it first and
   verified;
3. idle again.

Reported: query p50/p95 per phase and the ratio of the loaded p95 to the idle ones; the add
rate achieved, add latency p50/p95; the seals, merges and rebuilds that happened (log lines
and ``SearchService.stats()``); CPU seconds of the service process (event loop, catalog,
inverted file, Annoy) and of the worker processes (KAZE, verification) per phase. Then, with
nothing else running, where the time of one add goes, step by step, on ``--breakdown``
further photos. The JSON gets everything; a Markdown summary is written beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

from bench.common import (
    as_telegram_photo,
    derive_seed,
    list_photos,
    load_rgb,
    machine_info,
    markdown_table,
    median,
    split_photos,
    write_json,
)
from indexer import CpuPool, ImageError, SearchService, StageTimings, build_index

# The merge cost and the add path's own extraction are measured on the engine's parts.
from indexer.analysis import analyze_bytes
from indexer.segments import SegmentStore, merged
from testsupport.edits import EDIT_KINDS, EDITS_BY_NAME, encode_jpeg
from testsupport.engine import percentile

SEED = 10
QUERY_KINDS = tuple(kind for kind in EDIT_KINDS if not kind.fillers_wanted)
# The checks after an add ask "is it there", not "how hard an edit is found": mild edits.
CHECK_KINDS = ("crop", "rotate", "brightness_contrast", "border", "caption")
# The engine's log lines that say what the index did in the background.
UPKEEP_MESSAGES = {
    "sealed": "seals",
    "merged": "merges",
    "index generation": "annoy_generations",
    "inverted file rebuilt": "inverted_file_rebuilds",
    "trained a vocabulary": "vocabulary_trainings",
    "trained a codebook": "codebook_trainings",
}


@dataclass(frozen=True)
class Config:
    photos: Path
    out: Path
    indexed: int
    duration: float
    add_rate: float
    adds_in_flight: int
    add_side: int
    query_rate: float
    queries_in_flight: int
    idle_queries: int
    check_every: int
    breakdown: int
    workers: int
    seed: int


@dataclass(frozen=True)
class PhotoToAdd:
    path: Path
    data: bytes  # downscaled JPEG


@dataclass
class QuerySample:
    seconds: float
    hit: bool  # the original first and verified


@dataclass
class Phase:
    name: str
    queries: list[QuerySample] = field(default_factory=list)
    seconds: float = 0.0
    cpu_service: float = 0.0
    cpu_workers: float = 0.0
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class AddLog:
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)  # started this late against the pace
    finished_at: list[float] = field(default_factory=list)  # since the phase started
    created: int = 0
    duplicates: int = 0
    failures: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)


class UpkeepLog(logging.Handler):
    """Collects the engine's background-work log lines with their times."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((record.created, record.getMessage()))

    def counts(self, since: float, until: float) -> dict[str, int]:
        found = dict.fromkeys(UPKEEP_MESSAGES.values(), 0)
        for at, message in self.events:
            for prefix, name in UPKEEP_MESSAGES.items():
                if since <= at <= until and message.startswith(prefix):
                    found[name] += 1
        return found


def downscaled_jpeg(path: Path, side: int) -> bytes:
    return as_telegram_photo(load_rgb(path), side=side, quality=90)


def edited_copy(data: bytes, kind_name: str, seed: int) -> bytes:
    kind = EDITS_BY_NAME[kind_name]
    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB"))
    return encode_jpeg(kind.edit(rgb, seed), kind.jpeg_quality)


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds so far of this process, and of its child processes (the pool's workers)."""
    me = psutil.Process()
    own = me.cpu_times()
    children = 0.0
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        children += times.user + times.system
    return own.user + own.system, children


async def build_collection(config: Config, collection: Sequence[Path], work: Path) -> Path:
    folder = work / "photos"
    folder.mkdir()
    for path in collection:
        (folder / path.name).symlink_to(path.absolute())
    index = work / "index"
    report = await build_index(folder, index, workers=config.workers, progress=False)
    if report.failed:
        print(f"build: {len(report.failed)} photos failed: {report.failed[:3]}")
    return index


def query_set(config: Config, collection: Sequence[Path]) -> list[tuple[bytes, int]]:
    """Edited copies of the indexed photos, one kind each in turn (bytes, catalog row)."""
    queries = []
    for row, path in enumerate(collection):
        kind = QUERY_KINDS[row % len(QUERY_KINDS)]
        edited = kind.edit(load_rgb(path), derive_seed(config.seed, kind.name, path.name))
        queries.append((encode_jpeg(edited, kind.jpeg_quality), row))
    return queries


async def run_querier(
    service: SearchService,
    queries: Sequence[tuple[bytes, str]],
    config: Config,
    phase: Phase,
    *,
    stop: asyncio.Event | None,
    count: int | None,
) -> None:
    """Issue ``queries`` in turn at ``query_rate`` a second until ``stop`` is set (or
    ``count`` have been issued), open loop."""
    interval = 1.0 / config.query_rate
    slots = asyncio.Semaphore(config.queries_in_flight)
    started = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []

    async def one(data: bytes, expected_name: str) -> None:
        try:
            clock = time.perf_counter()
            try:
                matches = await service.query(data, top=5)
            except ImageError:  # an edit left too little to describe: the same in every phase
                matches = []
            seconds = time.perf_counter() - clock
            hit = bool(matches) and matches[0].verified and matches[0].path.name == expected_name
            phase.queries.append(QuerySample(seconds, hit))
        finally:
            slots.release()

    for issued in range(10**9):
        if (stop is not None and stop.is_set()) or (count is not None and issued >= count):
            break
        delay = started + issued * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        data, expected = queries[issued % len(queries)]
        tasks.append(asyncio.create_task(one(data, expected)))
    await asyncio.gather(*tasks)


async def run_adder(
    service: SearchService, photos: Sequence[PhotoToAdd], config: Config, log: AddLog
) -> None:
    """Add ``photos`` in order at ``add_rate`` a minute for ``duration`` seconds."""
    interval = 60.0 / config.add_rate
    slots = asyncio.Semaphore(config.adds_in_flight)
    started = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []

    async def one(number: int, photo: PhotoToAdd, scheduled: float) -> None:
        try:
            clock = time.perf_counter()
            log.lags.append(clock - scheduled)
            try:
                result = await service.add(photo.data)
            except Exception as error:  # a benchmark reports a failed add, it does not stop
                log.failures.append(f"{photo.path.name}: {type(error).__name__}: {error}")
                return
            now = time.perf_counter()
            log.latencies.append(now - clock)
            log.finished_at.append(now - started)
            if result.created:
                log.created += 1
            else:
                log.duplicates += 1
        finally:
            slots.release()
        if number % config.check_every == 0:
            # The next query after the add returned: it must find what was just added.
            kind = CHECK_KINDS[(number // config.check_every) % len(CHECK_KINDS)]
            query = edited_copy(photo.data, kind, derive_seed(config.seed, "check", number))
            clock = time.perf_counter()
            try:
                matches = await service.query(query, top=5)
            except ImageError:
                matches = []
            top = matches[0] if matches else None
            log.checks.append({
                "photo": photo.path.name,
                "kind": kind,
                "found_first_verified": bool(
                    top is not None and top.verified and top.image.id == result.image.id
                ),
                "rank": next(
                    (i for i, m in enumerate(matches) if m.image.id == result.image.id), None
                ),
                "seconds": time.perf_counter() - clock,
            })  # fmt: skip

    for number, photo in enumerate(photos):
        scheduled = started + number * interval
        if max(scheduled, time.perf_counter()) - started >= config.duration:
            break  # the phase's time is up, whether or not the pace was held
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        tasks.append(asyncio.create_task(one(number, photo, scheduled)))
    await asyncio.gather(*tasks)


async def measure_phase(
    name: str, service: SearchService, queries: Sequence[tuple[bytes, str]], config: Config,
    *, adds: tuple[Sequence[PhotoToAdd], AddLog] | None = None,
) -> Phase:  # fmt: skip
    phase = Phase(name)
    service_before, workers_before = cpu_seconds()
    started = time.perf_counter()
    if adds is None:
        await run_querier(service, queries, config, phase, stop=None, count=config.idle_queries)
    else:
        stop = asyncio.Event()
        querier = asyncio.create_task(run_querier(service, queries, config, phase, stop=stop,
                                                  count=None))  # fmt: skip
        try:
            await run_adder(service, adds[0], config, adds[1])
        finally:
            stop.set()
            await querier
    phase.seconds = time.perf_counter() - started
    service_after, workers_after = cpu_seconds()
    phase.cpu_service = service_after - service_before
    phase.cpu_workers = workers_after - workers_before
    phase.load_average = os.getloadavg()
    return phase


async def add_breakdown(
    service: SearchService, photos: Sequence[PhotoToAdd], work: Path
) -> dict[str, Any]:
    """Where the time of one add goes, step by step, with nothing else running.

    ``SearchService.add`` extracts the photo's features, checks that the collection has no
    verified copy of it yet (the first look of a query), then stores the original, inserts
    the catalog row and puts the photo in the inverted file's open set and the Annoy fresh
    buffer. The first two are timed on their own; the rest is the add's total minus them,
    and its in-memory part (word assignment and the open set's copy) is timed directly.
    """
    steps: dict[str, list[float]] = {
        "extract": [], "duplicate_check": [], "duplicate_check_candidates": [],
        "duplicate_check_verify": [], "duplicate_check_catalog": [], "add_total": [],
        "store_insert_and_index": [], "inverted_file_add": [],
    }  # fmt: skip
    settings = service.settings
    for photo in photos:
        clock = time.perf_counter()
        analysis = await service.pool.run(analyze_bytes, photo.data, settings, for_query=True)
        steps["extract"].append(time.perf_counter() - clock)
        timings = StageTimings()
        clock = time.perf_counter()
        # The add's own look for a copy: the first look of a query, not every look.
        await service.pipeline.search_analysis(
            photo.data, analysis, top=1, timings=timings, first_look_only=True
        )
        steps["duplicate_check"].append(time.perf_counter() - clock)
        for stage in ("candidates", "verify", "catalog"):
            steps[f"duplicate_check_{stage}"].append(timings.seconds.get(stage, 0.0))
        segments = service.segments
        if segments is not None:
            kept = analysis.features.keep(settings.max_keypoints, grid=settings.keypoint_grid)
            clock = time.perf_counter()
            assignment = segments.vocabulary.assign(kept.descriptors)
            segments.with_images([2**62], [0], [assignment])  # a copy; nothing is changed
            steps["inverted_file_add"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        await service.add(photo.data)
        total = time.perf_counter() - clock
        steps["add_total"].append(total)
        steps["store_insert_and_index"].append(
            total - steps["extract"][-1] - steps["duplicate_check"][-1]
        )
    result: dict[str, Any] = {
        "photos": len(photos),
        "median_seconds": {name: median(values) for name, values in steps.items() if values},
    }
    # A seal writes the open set as a segment (fsynced); a merge reads segments and writes
    # one. Timed here on copies in a scratch folder, as the background task does them.
    segments = service.segments
    if segments is not None and segments.sealed:
        store = SegmentStore(work / "scratch-postings")
        last = segments.sealed[-1]
        clock = time.perf_counter()
        await asyncio.to_thread(store.write_segment, last.lists)
        result["seal_seconds"] = {"images": len(last.lists),
                                  "seconds": time.perf_counter() - clock}  # fmt: skip
        clock = time.perf_counter()
        lists = await asyncio.to_thread(merged, segments.sealed)
        await asyncio.to_thread(store.write_segment, lists)
        result["merge_all_seconds"] = {"segments": len(segments.sealed), "images": len(lists),
                                       "seconds": time.perf_counter() - clock}  # fmt: skip
    return result


def phase_summary(phase: Phase) -> dict[str, Any]:
    latencies = [q.seconds for q in phase.queries]
    return {
        "queries": len(phase.queries),
        "query_p50_s": percentile(latencies, 0.5),
        "query_p95_s": percentile(latencies, 0.95),
        "hit_rate": sum(q.hit for q in phase.queries) / max(len(phase.queries), 1),
        "seconds": phase.seconds,
        "cpu_service_s": phase.cpu_service,
        "cpu_workers_s": phase.cpu_workers,
        "load_average": list(phase.load_average),
    }


async def run(config: Config) -> dict[str, Any]:
    photos = list_photos(config.photos)
    split = split_photos(photos, config.indexed, len(photos) - config.indexed, config.seed)
    handler = UpkeepLog()
    engine_log = logging.getLogger("indexer")
    engine_log.addHandler(handler)
    engine_log.setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="bench-adds-"))
    try:
        print(f"building an index of {len(split.collection)} photos ...", flush=True)
        clock = time.perf_counter()
        index = await build_collection(config, split.collection, work)
        build_seconds = time.perf_counter() - clock
        print(f"  {build_seconds:.0f} s; preparing queries and downscaled photos ...", flush=True)
        queries = [(data, split.collection[row].name)
                   for data, row in query_set(config, split.collection)]  # fmt: skip
        wanted = int(config.add_rate * config.duration / 60) + config.breakdown
        to_add = [PhotoToAdd(path, downscaled_jpeg(path, config.add_side))
                  for path in split.unrelated[:wanted]]  # fmt: skip
        split_at = len(to_add) - config.breakdown
        for_adds, for_breakdown = to_add[:split_at], to_add[split_at:]
        if len(for_adds) < config.add_rate * config.duration / 60:
            print(f"  only {len(for_adds)} photos to add: the loaded phase ends when they do")

        pool = CpuPool.processes(config.workers)
        service = await SearchService.open(index, pool=pool)
        try:
            # Warm the workers (their first KAZE call loads OpenCV) outside any phase.
            for data, _ in queries[:4]:
                await service.query(data)
            before = await service.stats()
            adds = AddLog()
            phases = []
            for name in ("idle-1", "loaded", "idle-2"):
                print(f"phase {name} ...", flush=True)
                since = time.time()
                phase = await measure_phase(
                    name, service, queries, config,
                    adds=(for_adds, adds) if name == "loaded" else None,
                )  # fmt: skip
                phases.append((phase, handler.counts(since, time.time())))
                print(f"  {phase_summary(phase)}", flush=True)
            after = await service.stats()
            print("breakdown of one add ...", flush=True)
            breakdown = await add_breakdown(service, for_breakdown, work)
            final = await service.stats()
        finally:
            await service.close()
            pool.shutdown()
    finally:
        engine_log.removeHandler(handler)
        shutil.rmtree(work, ignore_errors=True)

    summaries = {phase.name: {**phase_summary(phase), "upkeep": upkeep}
                 for phase, upkeep in phases}  # fmt: skip
    loaded = summaries["loaded"]
    idle_p95 = [summaries[name]["query_p95_s"] for name in ("idle-1", "idle-2")]
    idle_p50 = [summaries[name]["query_p50_s"] for name in ("idle-1", "idle-2")]
    span = max(adds.finished_at) if adds.finished_at else float("nan")
    achieved = len(adds.latencies) / span * 60 if adds.finished_at else 0.0
    checks_found = sum(check["found_first_verified"] for check in adds.checks)
    return {
        "config": {
            "photos": os.path.relpath(config.photos),
            "indexed": config.indexed,
            "duration_s": config.duration,
            "add_rate_per_min": config.add_rate,
            "adds_in_flight": config.adds_in_flight,
            "add_side_px": config.add_side,
            "query_rate_per_s": config.query_rate,
            "idle_queries": config.idle_queries,
            "check_every": config.check_every,
            "workers": config.workers,
            "seed": config.seed,
            "query_kinds": [kind.name for kind in QUERY_KINDS],
        },
        "machine": machine_info(),
        "build_seconds": build_seconds,
        "phases": summaries,
        "query_p95_ratio": {
            "loaded_vs_idle_1": loaded["query_p95_s"] / idle_p95[0],
            "loaded_vs_idle_2": loaded["query_p95_s"] / idle_p95[1],
            "loaded_vs_idle_median": loaded["query_p95_s"] / median(idle_p95),
        },
        "query_p50_ratio_vs_idle_median": loaded["query_p50_s"] / median(idle_p50),
        "adds": {
            "attempted": len(adds.lags),
            "completed": len(adds.latencies),
            "created": adds.created,
            "already_in_collection": adds.duplicates,
            "failures": adds.failures,
            "achieved_per_min": achieved,
            "target_per_min": config.add_rate,
            "latency_p50_s": percentile(adds.latencies, 0.5),
            "latency_p95_s": percentile(adds.latencies, 0.95),
            "start_lag_p50_s": percentile(adds.lags, 0.5),
            "start_lag_max_s": max(adds.lags, default=float("nan")),
        },
        "found_after_add": {
            "checked": len(adds.checks),
            "found_first_verified": checks_found,
            "latency_p50_s": percentile([c["seconds"] for c in adds.checks], 0.5),
            "misses": [check for check in adds.checks if not check["found_first_verified"]],
        },
        "index": {
            "before": {
                "images": before.images,
                "segments": before.segments,
                "fresh": before.fresh,
                "generation": before.generation,
            },
            "after_loaded": {
                "images": after.images,
                "segments": after.segments,
                "fresh": after.fresh,
                "generation": after.generation,
                "voting_images": after.voting_images,
            },
            "after_breakdown": {"images": final.images, "segments": final.segments},
        },
        "upkeep_log": [
            {"at": at, "message": message}
            for at, message in handler.events
            if any(message.startswith(prefix) for prefix in UPKEEP_MESSAGES)
        ],
        "add_breakdown": breakdown,
    }


def markdown(result: dict[str, Any]) -> str:
    phases = result["phases"]
    adds = result["adds"]
    found = result["found_after_add"]
    ratio = result["query_p95_ratio"]
    rows = [
        (name, summary["queries"], f"{summary['query_p50_s']:.3f}",
         f"{summary['query_p95_s']:.3f}", f"{100 * summary['hit_rate']:.0f}%",
         f"{summary['cpu_service_s']:.0f} / {summary['cpu_workers_s']:.0f}",
         ", ".join(f"{k} {v}" for k, v in summary["upkeep"].items() if v) or "-")
        for name, summary in phases.items()
    ]  # fmt: skip
    lines = [
        markdown_table(
            (
                "phase",
                "queries",
                "p50 s",
                "p95 s",
                "first + verified",
                "CPU s service / workers",
                "background work",
            ),
            rows,
        ),
        "",
        f"* query p95 loaded / idle: {ratio['loaded_vs_idle_1']:.2f} (idle-1), "
        f"{ratio['loaded_vs_idle_2']:.2f} (idle-2), **{ratio['loaded_vs_idle_median']:.2f}** "
        f"(their median); p50: {result['query_p50_ratio_vs_idle_median']:.2f}",
        f"* adds: **{adds['achieved_per_min']:.0f} a minute** achieved of "
        f"{adds['target_per_min']:.0f} paced; {adds['completed']} completed "
        f"({adds['created']} new, {adds['already_in_collection']} already there, "
        f"{len(adds['failures'])} failed); latency p50 {adds['latency_p50_s']:.3f} s, "
        f"p95 {adds['latency_p95_s']:.3f} s",
        f"* found by the query right after its add: {found['found_first_verified']} of "
        f"{found['checked']}",
    ]
    breakdown = result["add_breakdown"]
    if breakdown.get("median_seconds"):
        lines += ["", "One add, step by step, nothing else running (medians, s):", ""]
        lines.append(markdown_table(("step", "s"), [
            (name, f"{seconds:.4f}" if seconds >= 0 else "~0 (within noise)")
            for name, seconds in breakdown["median_seconds"].items()
        ]))  # fmt: skip
        for key in ("seal_seconds", "merge_all_seconds"):
            if key in breakdown:
                lines.append(f"* {key}: {breakdown[key]}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.adds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/adds.json"))
    parser.add_argument("--indexed", type=int, default=100)
    parser.add_argument("--duration", type=float, default=120.0, help="loaded phase, seconds")
    parser.add_argument("--add-rate", type=float, default=1000.0, help="adds a minute, paced")
    parser.add_argument("--adds-in-flight", type=int, default=4)
    parser.add_argument("--add-side", type=int, default=400, help="longest side of an add, px")
    parser.add_argument("--query-rate", type=float, default=2.0, help="queries a second")
    parser.add_argument("--queries-in-flight", type=int, default=4)
    parser.add_argument("--idle-queries", type=int, default=100, help="queries per idle phase")
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--breakdown", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    config = Config(
        photos=args.photos, out=args.out, indexed=args.indexed, duration=args.duration,
        add_rate=args.add_rate, adds_in_flight=args.adds_in_flight, add_side=args.add_side,
        query_rate=args.query_rate, queries_in_flight=args.queries_in_flight,
        idle_queries=args.idle_queries, check_every=args.check_every,
        breakdown=args.breakdown, workers=args.workers, seed=args.seed,
    )  # fmt: skip
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    result = asyncio.run(run(config))
    write_json(config.out, result)
    summary = markdown(result)
    config.out.with_suffix(".md").write_text(summary, encoding="utf-8")
    print(summary)


if __name__ == "__main__":
    main()
