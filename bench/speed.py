"""Indexer throughput and query latency, each against bare KAZE extraction in the same run.

    .venv/bin/python -m bench.speed --photos ../shared/photos --count 200

Throughput: ``build_index`` (a fresh index, ``--workers`` processes) against a single-process
loop of ``cv2.KAZE_create().detectAndCompute`` on the same photos, already decoded to the
engine's working size (so the loop times KAZE and nothing else). Rounds alternate the two so
that load from other programs falls on both. Besides wall-clock throughput, every build is
accounted in CPU seconds (each thread of this process, each worker process) because CPU
seconds do not change when other programs compete for the cores, while wall-clock time does.

Query latency: an index of ``--collection`` photos (enough for the PCA-whitened codebook the
engine uses in production), queried in-process with edited copies of collection photos and
with held-out unrelated photos; each query's stages come from ``StageTimings``, and decode
and extraction are timed apart on the same photo. Every query is compared with bare KAZE on
its own working image, measured right before it.

The JSON file gets everything; Markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import cProfile
import hashlib
import os
import pickle
import pstats
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import psutil
from tqdm import tqdm

from bench.common import (
    DEFAULT_OUT_DIR,
    derive_seed,
    list_photos,
    load_rgb,
    machine_info,
    markdown_table,
    median,
    seeded_sample,
    split_photos,
    write_json,
)
from indexer import (
    BuildReport,
    CpuPool,
    EngineSettings,
    IndexerError,
    SearchService,
    StageTimings,
    build_index,
)

# The worker stage profile re-runs the stages of one extraction apart (decode, KAZE, ...),
# which the engine does not time one by one: it needs the modules of those stages.
from indexer.analysis import Analysis, FileAnalysis, analyze_folder_file
from indexer.features import KazeParams, extract_features, limit_threads
from indexer.images import load_working_image
from testsupport.edits import EDITS_BY_NAME, encode_jpeg
from testsupport.engine import opened_service, percentile

GrayImage = npt.NDArray[np.uint8]

QUERY_EDITS = ("crop", "rotate")
UNRELATED_KIND = "unrelated"
# Stages the engine times itself (StageTimings); encoding is inside "candidates".
ENGINE_STAGES = ("analyze", "candidates", "verify", "catalog")
PROFILE_ROWS = 15
# Below this many keypoints the engine extracts again at a lower threshold (0: no such rule).
ENOUGH_KEYPOINTS = int(getattr(EngineSettings().kaze, "enough_keypoints", 0))


@dataclass(frozen=True)
class Config:
    photos: Path
    out: Path
    work: Path
    count: int
    collection: int
    unrelated: int
    queries_per_kind: int
    rounds: int
    workers: int
    seed: int
    profile_queries: int
    parts: tuple[str, ...]
    reuse_index: bool
    variants: tuple[str, ...]


PARTS = ("throughput", "queries")


# -- CPU accounting ------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds used so far by each thread role of this process and by each child process."""

    wall: float
    process: float  # every thread of this process, including ended ones
    threads: dict[str, float]
    children: dict[int, float]


def _thread_role(thread: threading.Thread) -> str:
    if thread is threading.main_thread():
        return "event loop"
    kind = type(thread).__name__
    if "_connection_worker_thread" in thread.name:
        return "sqlite"
    if kind == "_ExecutorManagerThread" or thread.name.startswith("QueueFeederThread"):
        return "ipc"
    if kind == "TMonitor":
        return "progress"
    if thread.name.startswith("asyncio"):
        return "to_thread"
    return "other"


def cpu_snapshot() -> CpuSnapshot:
    me = psutil.Process()
    roles = {t.native_id: _thread_role(t) for t in threading.enumerate() if t.native_id}
    threads: dict[str, float] = defaultdict(float)
    for thread in me.threads():
        threads[roles.get(thread.id, "other")] += thread.user_time + thread.system_time
    children: dict[int, float] = {}
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        children[child.pid] = times.user + times.system
    return CpuSnapshot(time.perf_counter(), time.process_time(), dict(threads), children)


@dataclass(frozen=True)
class CpuDelta:
    wall: float
    process: float
    threads: dict[str, float]
    children: float

    @property
    def total(self) -> float:
        return self.process + self.children


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot) -> CpuDelta:
    roles = set(before.threads) | set(after.threads)
    return CpuDelta(
        wall=after.wall - before.wall,
        process=after.process - before.process,
        threads={r: after.threads.get(r, 0.0) - before.threads.get(r, 0.0) for r in roles},
        # A child that appeared meanwhile (a worker) counts from zero: its start-up is included.
        children=sum(cpu - before.children.get(pid, 0.0) for pid, cpu in after.children.items()),
    )


# -- throughput --------------------------------------------------------------------------------


class WorkerCpuSampler:
    """CPU seconds of this process's descendants (the build's workers), read from the OS.

    Workers are gone when ``build_index`` returns, so their CPU is sampled while they run:
    the last reading of each worker counts (what it used in its last interval is missed).
    """

    def __init__(self, interval_s: float = 0.1) -> None:
        self._interval_s = interval_s
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> WorkerCpuSampler:
        self._before = dict(cpu_snapshot().children)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._last.update(cpu_snapshot().children)

    @property
    def seconds(self) -> float:
        """CPU of every descendant since the sampler started (new ones from zero)."""
        return sum(cpu - self._before.get(pid, 0.0) for pid, cpu in self._last.items())


@dataclass
class BuildRun:
    images: int
    failed: int
    wall: float
    cpu: CpuDelta  # this process over the whole build, and the workers as sampled
    report: BuildReport  # the engine's own phase timings


async def timed_build(folder: Path, index_dir: Path, workers: int) -> BuildRun:
    if index_dir.exists():
        shutil.rmtree(index_dir)
    before = cpu_snapshot()
    with WorkerCpuSampler() as sampler:
        report = await build_index(folder, index_dir, workers=workers, progress=True)
    after = cpu_snapshot()
    cpu = cpu_delta(before, after)
    cpu = CpuDelta(cpu.wall, cpu.process, cpu.threads, sampler.seconds)
    return BuildRun(report.added, len(report.failed), cpu.wall, cpu, report)


@dataclass
class BareRun:
    images: int
    wall: float
    cpu: float
    per_image_cpu: list[float]


def kaze_detector(params: KazeParams) -> cv2.KAZE:
    """One pass of the engine's own KAZE (its first pass, before any retry)."""
    return cv2.KAZE_create(
        threshold=params.threshold, nOctaves=params.octaves, nOctaveLayers=params.octave_layers
    )


def baseline_detector() -> cv2.KAZE:
    """The baseline the targets name: KAZE with OpenCV's defaults, whatever the engine uses."""
    return cv2.KAZE_create()


def bare_kaze(grays: Sequence[GrayImage]) -> BareRun:
    """The baseline's detectAndCompute alone, one image after another, on one core."""
    detector = baseline_detector()
    per_image: list[float] = []
    wall_start, cpu_start = time.perf_counter(), time.thread_time()
    for gray in grays:
        started = time.thread_time()
        detector.detectAndCompute(gray, None)
        per_image.append(time.thread_time() - started)
    return BareRun(len(grays), time.perf_counter() - wall_start, time.thread_time() - cpu_start,
                   per_image)


def working_images(photos: Sequence[Path], settings: EngineSettings) -> list[GrayImage]:
    """The grayscale images the engine would extract from (photos it rejects are left out)."""
    grays = []
    for photo in photos:
        try:
            image = load_working_image(
                photo.read_bytes(), working_side=settings.working_side, min_side=settings.min_side,
                max_bytes=settings.max_file_bytes, max_pixels=settings.max_pixels,
            )
        except IndexerError:
            continue
        grays.append(image.gray)
    return grays


STAGE_NAMES = ("read", "decode", "extract", "hash", "pickle")


def worker_stage_profile(
    photos: Sequence[Path], settings: EngineSettings
) -> dict[str, list[float]]:
    """CPU seconds of each step a build worker takes per photo, run inline on one core.

    ``extract`` is the engine's ``extract_features`` (KAZE, again at a lower threshold when
    a photo gives few keypoints, then keeping the strongest); ``kaze`` is one bare
    detectAndCompute on the same image right after it, so ``extract`` minus ``kaze`` is
    what the engine adds to one KAZE pass; ``pickle`` is the round trip the result makes
    from worker to main process. ``first_pass_keypoints`` are the bare pass's keypoints.
    """
    stages: dict[str, list[float]] = {
        name: [] for name in (*STAGE_NAMES, "kaze", "first_pass_keypoints")
    }
    detector = kaze_detector(settings.kaze)
    for photo in photos:
        clock = time.thread_time()
        data = photo.read_bytes()
        marks = [clock, time.thread_time()]
        try:
            image = load_working_image(
                data, working_side=settings.working_side, min_side=settings.min_side,
                max_bytes=settings.max_file_bytes, max_pixels=settings.max_pixels,
            )
            marks.append(time.thread_time())
            features = extract_features(
                image.gray, max_keypoints=settings.max_keypoints, params=settings.kaze
            )
        except IndexerError:
            continue
        marks.append(time.thread_time())
        content_hash = hashlib.sha256(data).hexdigest()
        marks.append(time.thread_time())
        result = FileAnalysis(
            str(photo), len(data), 0,
            Analysis(features, content_hash, image.width, image.height, len(data), image.format),
            None,
        )
        # Only our own freshly pickled object is loaded back: nothing untrusted.
        pickle.loads(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))  # noqa: S301
        marks.append(time.thread_time())
        for name, start, end in zip(STAGE_NAMES, marks[:-1], marks[1:], strict=True):
            stages[name].append(end - start)
        clock = time.thread_time()
        keypoints, _ = detector.detectAndCompute(image.gray, None)
        stages["kaze"].append(time.thread_time() - clock)
        stages["first_pass_keypoints"].append(float(len(keypoints)))
    return stages


def few_keypoint_share(stages: dict[str, list[float]], settings: EngineSettings) -> float | None:
    """Share of photos whose first KAZE pass gives fewer keypoints than the engine wants
    (it then extracts again at a lower threshold); None if the engine has no such rule."""
    enough = getattr(settings.kaze, "enough_keypoints", None)
    if enough is None:
        return None
    counts = stages["first_pass_keypoints"]
    return sum(1 for count in counts if count < enough) / len(counts)


def worker_shares(stages: dict[str, list[float]]) -> dict[str, float]:
    """How a worker's CPU divides between KAZE and everything around it."""
    sums = {name: sum(values) for name, values in stages.items()}
    parts = {
        "read": sums["read"],
        "decode": sums["decode"],
        "kaze": sums["kaze"],
        "extract beyond one KAZE pass": max(sums["extract"] - sums["kaze"], 0.0),
        "hash": sums["hash"],
        "pickle": sums["pickle"],
    }
    total = sum(parts.values())
    return {name: value / total for name, value in parts.items()}


async def worker_startup(workers: int, settings: EngineSettings) -> dict[str, float]:
    """Wall and CPU seconds until a fresh pool has run one trivial task per worker
    (forkserver start, process start, importing OpenCV and numpy)."""
    before = cpu_snapshot()
    pool = CpuPool.processes(workers)
    try:
        missing = str(Path("no-such-photo.jpg").absolute())
        await asyncio.gather(*(pool.run(analyze_folder_file, missing, settings)
                               for _ in range(workers * 4)))
        after = cpu_snapshot()
    finally:
        pool.shutdown()
    delta = cpu_delta(before, after)
    return {"wall": delta.wall, "children_cpu": delta.children, "process_cpu": delta.process}


def progress_cost(updates: int) -> float:
    """Seconds that ``updates`` progress-bar updates cost, measured in isolation."""
    started = time.perf_counter()
    with open(os.devnull, "w") as sink:  # noqa: PTH123 - a plain text sink for tqdm
        bar = tqdm(total=updates, unit="img", file=sink, smoothing=0.05)
        for _ in range(updates):
            bar.update(1)
        bar.close()
    return time.perf_counter() - started


def link_folder(folder: Path, photos: Sequence[Path]) -> Path:
    """A folder of symbolic links to ``photos``: the collection is never copied."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for position, photo in enumerate(photos):
        (folder / f"{position:04d}-{photo.name}").symlink_to(photo.absolute())
    return folder


async def measure_throughput(
    config: Config, photos: Sequence[Path], settings: EngineSettings
) -> dict[str, Any]:
    folder = link_folder(config.work / "throughput-photos", photos)
    startup = await worker_startup(config.workers, settings)
    print(f"worker start-up: {startup['wall']:.2f} s wall", flush=True)
    grays = working_images(photos, settings)
    stages = worker_stage_profile(photos, settings)
    cv2.setNumThreads(-1)  # OpenCV's own default, for one reference pass
    default_threads = cv2.getNumThreads()
    bare_default_threads = bare_kaze(grays)
    limit_threads()
    shares = worker_shares(stages)
    rounds: list[dict[str, Any]] = []
    for number in range(config.rounds):
        load_before = os.getloadavg()[0]
        bare: BareRun | None = None
        if number % 2 == 0:
            bare = bare_kaze(grays)
        build = await timed_build(folder, config.work / "throughput-index", config.workers)
        if bare is None:
            bare = bare_kaze(grays)
        rounds.append(summarize_round(number, build, bare, load_before,
                                      shares=shares, startup_cpu=startup["children_cpu"]))
        print(f"round {number}: build {build.images / build.wall:.2f} img/s, bare "
              f"{bare.images / bare.wall:.2f} img/s, ratio {rounds[-1]['ratio']:.2f}", flush=True)
    per_image = {name: median(values) for name, values in stages.items()}
    return {
        "photos": len(photos),
        "worker_startup": startup,
        "worker_stage_cpu_median": per_image,
        "worker_stage_cpu_sum": {name: sum(values) for name, values in stages.items()},
        "worker_shares": shares,
        "few_keypoint_photos": few_keypoint_share(stages, settings),
        "rebuild_profile": await profile_rebuild(config.work / "throughput-index"),
        "bare_default_threads": {"threads": default_threads, "wall": bare_default_threads.wall,
                                 "images": bare_default_threads.images},
        "progress_seconds": progress_cost(len(photos)),
        "rounds": rounds,
        "median_ratio": median(r["ratio"] for r in rounds),
        "median_cpu_overhead_share": median(r["cpu_overhead_share"] for r in rounds),
        "median_cpu_ratio": median(r["cpu_ratio"] for r in rounds),
        "median_overhead_parts": {
            name: median(r["overhead_parts"][name] for r in rounds)
            for name in rounds[0]["overhead_parts"]
        },
    }


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs what is submitted at once, on the calling thread: as the event loop's default
    executor, it runs ``asyncio.to_thread`` work where cProfile (one thread only) sees it."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the awaiting coroutine, as a thread would
            future.set_exception(error)
        return future


async def profile_rebuild(index_dir: Path) -> list[dict[str, Any]]:
    """cProfile of the step that ends every build: codebook training and the Annoy write.

    It runs on an event loop of its own (in a thread), whose default executor runs inline:
    this benchmark's loop keeps its threads for the queries measured after it.
    """

    async def profiled() -> cProfile.Profile:
        asyncio.get_running_loop().set_default_executor(InlineExecutor())
        async with opened_service(index_dir) as service:
            profiler = cProfile.Profile()
            profiler.enable()
            await service.rebuild(retrain=True)
            profiler.disable()
        return profiler

    return profile_rows(await asyncio.to_thread(asyncio.run, profiled()), 1)


def summarize_round(number: int, build: BuildRun, bare: BareRun, load: float, *,
                    shares: dict[str, float], startup_cpu: float) -> dict[str, Any]:
    """One build against one bare loop: wall-clock ratio, and where the build's CPU went.

    Every CPU second of the build is measured: the workers' as the OS reports them
    (sampled), this process's by the engine's own phase timings (``BuildReport``). The
    workers' seconds are divided into KAZE and the rest by the shares of the inline stage
    profile, after taking out their start-up (measured on its own).
    """
    report, cpu = build.report, build.cpu
    # Workers only extract; everything else (scan, catalog, rebuild) runs in this process.
    build_cpu = cpu.process + cpu.children
    working = max(cpu.children - startup_cpu, 0.0)
    parts = {f"worker {name}": working * share for name, share in shares.items()}
    parts["worker start-up"] = cpu.children - working
    extraction_cpu = report.phase_cpu_seconds.get("extraction", 0.0)
    rebuild_cpu = report.phase_cpu_seconds.get("rebuild", 0.0)
    parts["main during extraction"] = extraction_cpu
    parts["rebuild (codebook + Annoy)"] = rebuild_cpu
    parts["scan, open, close"] = cpu.process - extraction_cpu - rebuild_cpu
    kaze_cpu = parts["worker kaze"]
    return {
        "round": number,
        "load_average_before": load,
        "images": build.images,
        "failed": build.failed,
        "build_wall": build.wall,
        "build_images_per_second": build.images / build.wall,
        "bare_wall": bare.wall,
        "bare_images_per_second": bare.images / bare.wall,
        "ratio": (build.images / build.wall) / (bare.images / bare.wall),
        "bare_cpu_per_image": bare.cpu / bare.images,
        "build_kaze_cpu_per_image": kaze_cpu / build.images,
        "build_cpu": {
            "total": build_cpu,
            "main_process": cpu.process,
            "main_threads": cpu.threads,
            "extraction_phase_main_process": extraction_cpu,
            "extraction_phase_workers": cpu.children,
            "extraction_phase_wall": report.phase_seconds.get("extraction", 0.0),
            "rebuild_cpu": rebuild_cpu,
            "rebuild_wall": report.phase_seconds.get("rebuild", 0.0),
        },
        "cores_used": build_cpu / build.wall,
        "commit_wall": report.phase_seconds.get("commit", 0.0),
        "commits": report.commits,
        "overhead_parts": {name: value / build_cpu for name, value in parts.items()},
        # Share of the build's CPU spent on anything but KAZE itself.
        "cpu_overhead_share": 1.0 - kaze_cpu / build_cpu,
        # The ratio the build would reach with both cores to itself and no idle gaps:
        # the baseline's CPU for these photos, twice, over the build's.
        "cpu_ratio": 2.0 * (bare.cpu / bare.images) * build.images / build_cpu,
    }


# -- query latency ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    kind: str
    path: Path
    original: Path | None  # the collection photo it was made from


@dataclass
class QueryRun:
    kind: str
    total: float
    stages: dict[str, float]
    decode: float
    extract: float
    bare_kaze: float
    keypoints: int
    first_pass_keypoints: int  # what one baseline KAZE pass finds
    top_is_original: bool | None
    verified_matches: int
    regional_fallback: bool  # nothing in the first batch verified: the regional look ran


def make_queries(config: Config, collection: Sequence[Path], unrelated: Sequence[Path],
                 linked: dict[Path, Path]) -> list[Query]:
    folder = config.work / "queries"
    folder.mkdir(parents=True, exist_ok=True)
    queries: list[Query] = []
    for kind_name in QUERY_EDITS:
        kind = EDITS_BY_NAME[kind_name]
        chosen = seeded_sample(collection, config.queries_per_kind,
                               derive_seed(config.seed, "speed-queries", kind_name))
        for photo in chosen:
            target = folder / f"{kind_name}-{photo.stem}.jpg"
            if not target.exists():
                seed = derive_seed(config.seed, kind_name, photo.name)
                target.write_bytes(encode_jpeg(kind.apply(load_rgb(photo), seed),
                                               kind.jpeg_quality))
            queries.append(Query(kind_name, target, linked[photo]))
    queries.extend(Query(UNRELATED_KIND, photo, None) for photo in unrelated)
    return queries


async def run_query(service: SearchService, query: Query, detector: cv2.KAZE) -> QueryRun:
    settings = service.settings
    clock = time.perf_counter()
    image = load_working_image(
        query.path.read_bytes(), working_side=settings.working_side, min_side=settings.min_side,
        max_bytes=settings.max_file_bytes, max_pixels=settings.max_pixels,
    )
    decoded = time.perf_counter()
    features = extract_features(image.gray, max_keypoints=settings.query_keypoints,
                                params=query_kaze(settings))
    extracted = time.perf_counter()
    first_pass, _ = detector.detectAndCompute(image.gray, None)
    bare = time.perf_counter() - extracted
    timings = StageTimings()
    started = time.perf_counter()
    matches = await service.query(query.path, top=5, timings=timings)
    total = time.perf_counter() - started
    top_is_original = None
    if query.original is not None:
        top_is_original = bool(matches) and matches[0].path == query.original.absolute()
    return QueryRun(
        kind=query.kind,
        total=total,
        stages=dict(timings.seconds),
        decode=decoded - clock,
        extract=extracted - decoded,
        bare_kaze=bare,
        keypoints=len(features),
        first_pass_keypoints=len(first_pass),
        top_is_original=top_is_original,
        verified_matches=sum(1 for m in matches if m.verified),
        regional_fallback=timings.counts.get("regional look", 0) > 0,
    )


def query_kaze(settings: EngineSettings) -> KazeParams:
    """The KAZE parameters the engine extracts a query with (older engines: the index's)."""
    return getattr(settings, "query_kaze", settings.kaze)  # type: ignore[no-any-return]


def stage_table(runs: Sequence[QueryRun]) -> dict[str, dict[str, float]]:
    """p50, p95 and share of the summed total for every stage of ``runs``."""
    total_sum = sum(r.total for r in runs)
    columns: dict[str, list[float]] = {
        "decode (apart)": [r.decode for r in runs],
        "extract (apart)": [r.extract for r in runs],
    }
    for stage in ENGINE_STAGES:
        columns[stage] = [r.stages.get(stage, 0.0) for r in runs]
    columns["other"] = [r.total - sum(r.stages.values()) for r in runs]
    columns["total"] = [r.total for r in runs]
    columns["bare KAZE"] = [r.bare_kaze for r in runs]
    return {
        name: {
            "p50": percentile(values, 0.5),
            "p95": percentile(values, 0.95),
            "share": sum(values) / total_sum,
        }
        for name, values in columns.items()
    }


def latency_summary(runs: Sequence[QueryRun]) -> dict[str, Any]:
    return {
        "queries": len(runs),
        "stages": stage_table(runs),
        "median_total_over_median_bare": median(r.total for r in runs)
        / median(r.bare_kaze for r in runs),
        "median_of_ratios": median(r.total / r.bare_kaze for r in runs),
        "regional_fallback_share": sum(r.regional_fallback for r in runs) / len(runs),
        "top_is_original": [r.top_is_original for r in runs].count(True),
        "few_keypoint_queries": sum(1 for r in runs if r.first_pass_keypoints < ENOUGH_KEYPOINTS),
        "verified_any": sum(1 for r in runs if r.verified_matches),
    }


# Query-time settings (free to change on a built index) tried against the default, to
# measure what they save; their effect on retrieval quality belongs to bench.quality.
QUERY_VARIANTS: dict[str, dict[str, int]] = {
    "default": {},
    "verify_limit=16": {"verify_limit": 16},
    "query_keypoints=500": {"query_keypoints": 500},
}


async def measure_queries(config: Config, queries: Sequence[Query], index_dir: Path
                          ) -> dict[str, Any]:
    limit_threads()  # as in the bot's workers: one core per query
    result: dict[str, Any] = {"variants": {}}
    for variant in config.variants:
        overrides = QUERY_VARIANTS[variant]
        async with opened_service(index_dir, settings=EngineSettings(**overrides)) as service:  # type: ignore[arg-type]
            detector = baseline_detector()
            await run_query(service, queries[0], detector)  # warm-up
            runs = [await run_query(service, query, detector)
                    for query in tqdm(queries, unit="query", desc=variant)]
            by_kind = {kind: latency_summary([r for r in runs if r.kind == kind])
                       for kind in (*QUERY_EDITS, UNRELATED_KIND)}
            summary = {"all": latency_summary(runs), "by_kind": by_kind}
            if variant == "default":
                stats = await service.stats()
                result["index_images"] = stats.images
                result["vector_dimensions"] = stats.dimensions
                result["runs"] = [asdict(r) for r in runs]
                result["profile"] = await profile_queries(service, queries,
                                                          config.profile_queries)
                result.update(summary)
            result["variants"][variant] = summary
    return result


async def profile_queries(service: SearchService, queries: Sequence[Query], count: int
                          ) -> list[dict[str, Any]]:
    """cProfile of ``count`` queries spread over the kinds: where a query's time goes."""
    chosen = seeded_sample(list(queries), count, derive_seed("profile"))
    profiler = cProfile.Profile()
    profiler.enable()
    for query in chosen:
        await service.query(query.path, top=5)
    profiler.disable()
    return profile_rows(profiler, len(chosen))


def profile_rows(profiler: cProfile.Profile, runs: int) -> list[dict[str, Any]]:
    """The functions with the most own time, per run."""
    stats = pstats.Stats(profiler)
    total = max(stats.total_tt, 1e-9)  # type: ignore[attr-defined]
    rows = [
        {
            "function": f"{Path(file_name).name}:{line}({function})",
            "calls": calls,
            "own_seconds_per_run": own / runs,
            "cumulative_seconds_per_run": cumulative / runs,
            "own_share": own / total,
        }
        for (file_name, line, function), (_, calls, own, cumulative, _)
        in stats.stats.items()  # type: ignore[attr-defined]
    ]
    rows.sort(key=lambda row: row["own_seconds_per_run"], reverse=True)
    return rows[: PROFILE_ROWS * 2]


# -- report ------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}" if seconds >= 0.01 else f"{seconds * 1000:.1f}"


def print_report(result: dict[str, Any]) -> None:
    if "throughput" in result:
        print_throughput(result["throughput"])
    if "queries" in result:
        print_queries(result["queries"])


def print_throughput(throughput: dict[str, Any]) -> None:
    print("\n## Throughput\n")
    rows = [
        (r["round"], f"{r['load_average_before']:.1f}", r["images"],
         f"{r['build_images_per_second']:.2f}", f"{r['bare_images_per_second']:.2f}",
         f"{r['ratio']:.2f}", f"{r['cores_used']:.2f}", f"{100 * r['cpu_overhead_share']:.1f}%",
         f"{r['cpu_ratio']:.2f}")
        for r in throughput["rounds"]
    ]
    print(markdown_table(("round", "load", "images", "build img/s", "bare KAZE img/s",
                          "ratio", "cores used", "CPU overhead", "CPU-bound ratio"), rows))
    print(f"\nmedian ratio {throughput['median_ratio']:.2f}, median CPU overhead "
          f"{100 * throughput['median_cpu_overhead_share']:.1f}%")
    print("\nShare of the build's CPU (median of rounds):\n")
    print(markdown_table(("part", "share"), [
        (name, f"{100 * share:.2f}%") for name, share in sorted(
            throughput["median_overhead_parts"].items(), key=lambda item: -item[1])
    ]))
    print("\n### rebuild profile (own time)\n")
    print_profile(throughput["rebuild_profile"], "s")


def print_profile(rows: Sequence[dict[str, Any]], unit: str) -> None:
    scale = 1.0 if unit == "s" else 1000.0
    print(markdown_table(
        ("function", "calls", f"own {unit}", f"cumulative {unit}"),
        [(row["function"], row["calls"], f"{row['own_seconds_per_run'] * scale:.3g}",
          f"{row['cumulative_seconds_per_run'] * scale:.3g}") for row in rows[:PROFILE_ROWS]],
    ))


def print_queries(queries: dict[str, Any]) -> None:
    print(f"\n## Query latency ({queries['index_images']} images, "
          f"{queries['vector_dimensions']}-d)\n")
    for label, summary in (("all", queries["all"]), *queries["by_kind"].items()):
        print(f"\n### {label}: {summary['queries']} queries, total/bare KAZE "
              f"{summary['median_total_over_median_bare']:.2f} (median of ratios "
              f"{summary['median_of_ratios']:.2f}), top is original {summary['top_is_original']}, "
              f"regional fallback {100 * summary['regional_fallback_share']:.0f}%\n")
        print(markdown_table(
            ("stage", "p50 ms", "p95 ms", "share"),
            [(name, ms(v["p50"]), ms(v["p95"]), f"{100 * v['share']:.1f}%")
             for name, v in summary["stages"].items()],
        ))
    print("\n### profile (per query)\n")
    print_profile(queries["profile"], "ms")
    print("\n### query-time variants: median of per-query ratios to bare KAZE\n")
    kinds = (*QUERY_EDITS, UNRELATED_KIND)
    print(markdown_table(
        ("variant", "all", *kinds, *(f"top is original ({k})" for k in QUERY_EDITS)),
        [(name, f"{v['all']['median_of_ratios']:.2f}",
          *(f"{v['by_kind'][k]['median_of_ratios']:.2f}" for k in kinds),
          *(v["by_kind"][k]["top_is_original"] for k in QUERY_EDITS))
         for name, v in queries["variants"].items()],
    ))


# -- main ------------------------------------------------------------------------------------


async def run(config: Config) -> dict[str, Any]:
    started = time.perf_counter()
    settings = EngineSettings()
    photos = list_photos(config.photos)
    split = split_photos(photos, max(config.count, config.collection), config.unrelated,
                         config.seed)
    throughput_photos = seeded_sample(split.collection, config.count,
                                      derive_seed(config.seed, "throughput"))
    limit_threads()
    result: dict[str, Any] = {
        "machine": machine_info(),
        "engine_source": engine_source(),
        "config": {key: str(value) for key, value in asdict(config).items()},
        "settings": {"working_side": settings.working_side, "min_side": settings.min_side,
                     "max_keypoints": settings.max_keypoints,
                     "query_keypoints": settings.query_keypoints, "search_k": settings.search_k},
    }
    if "throughput" in config.parts:
        result["throughput"] = await measure_throughput(config, throughput_photos, settings)
    if "queries" in config.parts:
        collection_folder = config.work / "collection-photos"
        link_folder(collection_folder, split.collection)
        linked = {photo: collection_folder / f"{i:04d}-{photo.name}"
                  for i, photo in enumerate(split.collection)}
        index_dir = config.work / "collection-index"
        if not (config.reuse_index and index_dir.exists()):
            collection_build = await timed_build(collection_folder, index_dir, config.workers)
            print(f"collection index: {collection_build.images} images in "
                  f"{collection_build.wall:.1f} s", flush=True)
            result["collection_build"] = {
                "images": collection_build.images, "wall": collection_build.wall,
                "cpu": asdict(collection_build.cpu),
                "phase_seconds": collection_build.report.phase_seconds,
                "commits": collection_build.report.commits,
            }
        queries = make_queries(config, split.collection, split.unrelated, linked)
        result["queries"] = await measure_queries(config, queries, index_dir)
    result["seconds"] = time.perf_counter() - started
    return result


def engine_source() -> dict[str, str]:
    """Which engine code was measured: the commit, and engine files edited since."""
    def git(*arguments: str) -> str:
        done = subprocess.run(["git", *arguments], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": git("status", "--short", "--", "indexer")}


def parse_arguments(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--count", type=int, default=200, help="photos in the throughput build")
    parser.add_argument("--collection", type=int, default=600,
                        help="photos in the queried index (512+ gives the PCA codebook)")
    parser.add_argument("--unrelated", type=int, default=30, help="held-out query photos")
    parser.add_argument("--queries-per-kind", type=int, default=30,
                        help=f"edited queries of each kind: {', '.join(QUERY_EDITS)}")
    parser.add_argument("--rounds", type=int, default=5, help="build-vs-bare rounds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--profile-queries", type=int, default=20)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--variants", default=",".join(QUERY_VARIANTS),
                        help=f"query-time settings to time, of: {', '.join(QUERY_VARIANTS)}")
    parser.add_argument("--reuse-index", action="store_true",
                        help="query the collection index of an earlier run as it is")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "speed.json")
    parser.add_argument("--work", type=Path, default=DEFAULT_OUT_DIR / "speed",
                        help="scratch folder for links, queries and indexes")
    arguments = parser.parse_args(argv)
    return Config(
        photos=arguments.photos, out=arguments.out, work=arguments.work,
        count=arguments.count, collection=arguments.collection, unrelated=arguments.unrelated,
        queries_per_kind=arguments.queries_per_kind, rounds=arguments.rounds,
        workers=arguments.workers, seed=arguments.seed,
        profile_queries=arguments.profile_queries,
        parts=tuple(part for part in arguments.parts.split(",") if part in PARTS),
        reuse_index=arguments.reuse_index,
        variants=tuple(v for v in arguments.variants.split(",") if v in QUERY_VARIANTS),
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_arguments(argv)
    config.work.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(config))
    write_json(config.out, result)
    print_report(result)
    print(f"\n{result['seconds']:.0f} s; everything in {config.out}")


if __name__ == "__main__":
    main()
