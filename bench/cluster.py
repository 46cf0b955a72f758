"""The build on Dask: its background cost, extraction throughput against the local build,
the catalog writer's rate, and vocabulary and codebook training at a million images.

    .venv/bin/python -m bench.cluster --photos ../shared/photos --count 300 --repeats 5 \\
        --idle-repeats 3 --out bench/out/cluster.json

Four parts, in one process (the LocalClusters are started by the builds themselves):

* **idle**: the CPU seconds that a LocalCluster of 1 and of 2 worker processes, with a
  client connected, uses in ``--idle-seconds`` of doing nothing: with Dask's default
  settings and with the quieter ones ``local:N`` uses (``QUIET_CLUSTER_CONFIG``),
  alternating, ``--idle-repeats`` times. This cost runs for as long as a build does.
* **throughput**: ``indexer.build.build_index`` on the same ``--count`` photos (the first of
  the folder in name order, linked into a scratch folder), each build into a new index: the
  local build with 1 process next to ``local:1``, then the local build with 2 processes next
  to ``local:2`` and to a LocalCluster of 2 with Dask's default settings; in each repeat the
  local build runs first, then last, alternately, so that a load rising or falling through a
  repeat favours neither side. Per build: the "extraction" phase of
  ``BuildReport.phase_seconds`` (extraction and cataloguing of every photo: the part Dask
  replaces), the whole build (the LocalCluster's start and the index rebuild included;
  default settings but a vocabulary of 256 half-words, see ``THROUGHPUT_SETTINGS``), and
  the CPU seconds of the whole build's process tree (``TreeCpu``), which other load on the
  machine barely moves. Ratios are taken within a repeat, then their median is quoted: the
  machine is shared and noisy.
* **writer**: ``Catalog.insert_images`` alone, in transactions of ``COMMIT_EVERY`` images,
  into a new catalog: ``--writer-images`` images of ``max_keypoints`` real KAZE descriptors
  each (drawn from the features of the photos of the throughput part), as a build's client
  writes them. The rate, over the per-photo extraction rate of one worker process measured
  above, says how many worker processes one client can keep busy.
* **training**: what a rebuild trains at 1M images. The vocabulary and the codebook are
  trained on ``min(images, training_images)`` = 20,000 images drawn by smallest content hash
  (``Catalog.iter_training_features``): at 1M images exactly as many as at 20,000. So the
  writer's catalog (20,000 images, hashes random) is rebuilt with ``retrain=True`` through
  ``SearchService.rebuild``, and the phases are timed from the engine's own log lines
  ("trained a vocabulary", "inverted file rebuilt", "trained a codebook"); resident memory
  is sampled every 20 ms and its peak per phase reported, in a new process that has only
  opened the index.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import psutil
from distributed import Client

from bench.common import list_photos, machine_info, markdown_table, median, write_json
from indexer.analysis import analyze_bytes
from indexer.build import COMMIT_EVERY, DaskOptions, build_index
from indexer.catalog import GLOBAL_SCOPE, Catalog, NewImage
from indexer.distributed import QUIET_CLUSTER_CONFIG, local_cluster
from indexer.features import LocalFeatures
from indexer.search import CATALOG_FILE, SearchService
from indexer.settings import EngineSettings


@dataclass(frozen=True)
class Mode:
    """One way to build: ``processes`` local processes, or Dask with ``dask``. With
    ``dask_defaults`` the bench starts the LocalCluster itself, with Dask's own settings
    instead of the quieter ones ``local:N`` uses, and the build connects to it."""

    label: str
    processes: int
    dask: DaskOptions | None = None
    dask_defaults: bool = False


MODES: tuple[Mode, ...] = (
    Mode("local, 1 process", 1),
    Mode("Dask local:1", 1, DaskOptions("local:1")),
    Mode("local, 2 processes", 2),
    Mode("Dask local:2", 2, DaskOptions("local:2")),
    Mode("Dask local:2, Dask's default settings", 2, DaskOptions("local:2"), dask_defaults=True),
)
BASELINES = {1: "local, 1 process", 2: "local, 2 processes"}


def repeat_order(repeat: int) -> list[Mode]:
    """The modes of one repeat: each local build next to the Dask builds it is compared
    with, local first in even repeats and last in odd ones, so that a load rising or
    falling through a repeat favours neither."""
    order: list[Mode] = []
    for processes in sorted(BASELINES):
        group = [mode for mode in MODES if mode.processes == processes]
        order.extend(group if repeat % 2 == 0 else reversed(group))
    return order


@contextlib.asynccontextmanager
async def cluster_for(mode: Mode) -> AsyncIterator[DaskOptions | None]:
    """The Dask options a mode's build runs with, and for ``dask_defaults`` its LocalCluster,
    started as ``local:N`` starts one but with Dask's default settings."""
    if not mode.dask_defaults or mode.dask is None:
        yield mode.dask
        return
    async with local_cluster(mode.processes, config={}) as address:
        yield replace(mode.dask, address=address)


def linked_photos(photos: Sequence[Path], folder: Path) -> Path:
    """A folder of symbolic links to ``photos`` (a build follows file links)."""
    folder.mkdir(parents=True)
    for number, photo in enumerate(photos):
        (folder / f"{number:05}{photo.suffix.lower()}").symlink_to(photo.resolve())
    return folder


# The rebuild after extraction runs on the client, the same code in every mode; a smaller
# vocabulary keeps its k-means (65,536 halves x 1,024 words by default) from dominating
# the whole-build times. Extraction does not depend on it.
THROUGHPUT_SETTINGS = EngineSettings(vocabulary_half_words=256)


async def throughput(photos: Path, count: int, repeats: int, scratch: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for repeat in range(repeats):
        for mode in repeat_order(repeat):
            index = scratch / f"index-{repeat}-{len(runs)}"
            load_before = os.getloadavg()[0]
            with TreeCpu() as cpu:
                async with cluster_for(mode) as dask:
                    report = await build_index(
                        photos, index, workers=mode.processes, progress=False, dask=dask,
                        settings=THROUGHPUT_SETTINGS,
                    )  # fmt: skip
            assert report.added == count, (mode, report)
            extraction = report.phase_seconds["extraction"]
            runs.append({
                "repeat": repeat, "mode": mode.label, "processes": mode.processes,
                "extract_s": extraction, "build_s": report.seconds, "cpu_s": cpu.seconds,
                "load_before": load_before, "load_after": os.getloadavg()[0],
            })  # fmt: skip
            print(
                f"  repeat {repeat}: {mode.label}: extraction {extraction:.1f} s, "
                f"build {report.seconds:.1f} s, CPU {cpu.seconds:.1f} s, "
                f"load {load_before:.1f}",
                flush=True,
            )
            shutil.rmtree(index)
    summary = {}
    for mode in MODES:
        own = [r for r in runs if r["mode"] == mode.label]
        base = [r for r in runs if r["mode"] == BASELINES[mode.processes]]
        pairs = list(zip(own, base, strict=True))
        summary[mode.label] = {
            "extract_s": median(r["extract_s"] for r in own),
            "photos_per_s": count / median(r["extract_s"] for r in own),
            "build_s": median(r["build_s"] for r in own),
            "extract_ratio": median(o["extract_s"] / b["extract_s"] for o, b in pairs),
            "build_ratio": median(o["build_s"] / b["build_s"] for o, b in pairs),
            "cpu_s": median(r["cpu_s"] for r in own),
            "cpu_ratio": median(o["cpu_s"] / b["cpu_s"] for o, b in pairs),
        }
    return {"count": count, "repeats": repeats, "runs": runs, "summary": summary}


async def idle_cost(workers: int, seconds: float, *, quiet: bool) -> float:
    """CPU seconds that a LocalCluster of ``workers`` processes and a connected client use
    in ``seconds`` of doing nothing, with the settings ``local:N`` uses or Dask's own."""
    async with (
        local_cluster(workers, QUIET_CLUSTER_CONFIG if quiet else {}) as address,
        Client(address, asynchronous=True) as client,
    ):
        await client.wait_for_workers(workers)
        await asyncio.sleep(IDLE_SETTLE_S)  # past the workers' start
        with TreeCpu() as cpu:
            await asyncio.sleep(seconds)
    return cpu.seconds


# A worker process is still importing for a second or two after it has joined.
IDLE_SETTLE_S = 5.0


async def idle(repeats: int, seconds: float) -> dict[str, Any]:
    """:func:`idle_cost` of 1 and 2 workers, both settings interleaved, ``repeats`` times."""
    runs = []
    for repeat in range(repeats):
        for workers in (1, 2):
            for quiet in (False, True) if repeat % 2 == 0 else (True, False):
                cpu_s = await idle_cost(workers, seconds, quiet=quiet)
                runs.append({"repeat": repeat, "workers": workers, "quiet": quiet,
                             "cpu_s": cpu_s})  # fmt: skip
                print(
                    f"  idle repeat {repeat}: {workers} worker(s), "
                    f"{'quiet' if quiet else 'Dask default'} settings: {cpu_s:.2f} CPU s "
                    f"in {seconds:.0f} s",
                    flush=True,
                )
    summary = {
        f"{workers} worker(s), {'quiet' if quiet else 'Dask default'} settings": median(
            r["cpu_s"] for r in runs if (r["workers"], r["quiet"]) == (workers, quiet)
        )
        for workers in (1, 2)
        for quiet in (False, True)
    }
    return {"seconds": seconds, "runs": runs, "summary": summary}


class PeriodicSampler:
    """Calls :meth:`sample` every ``interval`` seconds on a thread while the block runs."""

    interval = 0.1

    def sample(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(self.interval):
                self.sample()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


class TreeCpu(PeriodicSampler):
    """CPU seconds (user + system) used by this process and every process it starts while
    the block runs: unlike wall time, barely changed by other work on a shared machine.
    Descendants are sampled every 0.1 s, so a process's last tenth of a second is missed.
    The sampling's own CPU (psutil walking the tree ten times a second) is left out: it
    grows with wall time, and would otherwise weigh most on the least busy process tree."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._last: dict[int, float] = {}
        self._sampling = 0.0
        self.seconds = 0.0

    def sample(self) -> None:
        started = time.thread_time()
        for child in self._me.children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.Error:
                continue
            self._last[child.pid] = times.user + times.system
        self._sampling += time.thread_time() - started

    def _own(self) -> float:
        times = self._me.cpu_times()
        return times.user + times.system

    def __enter__(self) -> Self:
        self._before = self._own()
        self.sample()
        self._before_children = dict(self._last)
        return super().__enter__()

    def __exit__(self, *_: object) -> None:
        super().__exit__()
        self.sample()
        children = sum(
            seconds - self._before_children.get(pid, 0.0) for pid, seconds in self._last.items()
        )
        self.seconds = self._own() - self._before + children - self._sampling


def descriptor_pool(photos: Sequence[Path], settings: EngineSettings) -> LocalFeatures:
    """Every kept keypoint of ``photos``, extracted as a build extracts them."""
    extracted = [analyze_bytes(p.read_bytes(), settings).features for p in photos]
    return LocalFeatures(
        points=np.concatenate([f.points for f in extracted]),
        descriptors=np.concatenate([f.descriptors for f in extracted]),
        width=640,
        height=480,
    )


def synthetic_images(pool: LocalFeatures, count: int, keypoints: int) -> Iterator[NewImage]:
    """Images of ``keypoints`` real descriptors drawn from ``pool``, with random hashes."""
    rng = np.random.default_rng(15)
    for number in range(count):
        chosen = rng.choice(len(pool), keypoints, replace=False)
        yield NewImage(
            content_hash=hashlib.sha256(number.to_bytes(8, "big")).hexdigest(),
            scope=GLOBAL_SCOPE,
            path=f"/synthetic/{number:07}.jpg",
            file_size=100_000,
            file_mtime_ns=number,
            width=640,
            height=480,
            features=LocalFeatures(
                points=pool.points[chosen], descriptors=pool.descriptors[chosen],
                width=pool.width, height=pool.height,
            ),
        )  # fmt: skip


async def writer(index: Path, pool: LocalFeatures, images: int) -> dict[str, Any]:
    """Images per second through Catalog.insert_images in COMMIT_EVERY-image transactions
    (the images are made before the clock starts)."""
    settings = EngineSettings()
    service = await SearchService.open(index, settings=settings, create=True)
    await service.close()
    seconds: list[float] = []
    unpickling = 0.0
    source = synthetic_images(pool, images, settings.max_keypoints)
    async with await Catalog.open(index / CATALOG_FILE) as catalog:
        while batch := [image for _, image in zip(range(COMMIT_EVERY), source, strict=False)]:
            # What else the client does per result: take the features out of a message.
            message = pickle.dumps(batch, protocol=5)
            started = time.perf_counter()
            pickle.loads(message)  # noqa: S301 - our own bytes
            unpickling += time.perf_counter() - started
            started = time.perf_counter()
            await catalog.insert_images(batch)
            seconds.append(time.perf_counter() - started)
    per_batch = np.array(seconds)
    return {
        "images": images,
        "batch": COMMIT_EVERY,
        "images_per_s": images / float(per_batch.sum()),
        "median_batch_s": float(np.median(per_batch)),
        "unpickled_images_per_s": images / unpickling,
        "catalog_bytes": (index / CATALOG_FILE).stat().st_size,
    }


class MemorySampler(PeriodicSampler):
    """Resident memory of this process every 20 ms, with the time of each sample."""

    interval = 0.02

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.samples: list[tuple[float, int]] = []

    def sample(self) -> None:
        self.samples.append((time.monotonic(), self._process.memory_info().rss))

    def peak(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)


class PhaseLog(logging.Handler):
    """The monotonic time at which each engine log line of interest was emitted."""

    MARKS: ClassVar[dict[str, str]] = {
        "trained a vocabulary": "vocabulary",
        "inverted file rebuilt": "inverted file",
        "trained a codebook": "codebook",
    }

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for prefix, name in self.MARKS.items():
            if message.startswith(prefix):
                self.times[name] = time.monotonic()


async def training(index: Path) -> dict[str, Any]:
    """Retrain on the writer's catalog, timing each phase from the engine's log lines."""
    handler = PhaseLog()
    engine_log = logging.getLogger("indexer")
    engine_log.addHandler(handler)
    engine_log.setLevel(logging.INFO)
    try:
        service = await SearchService.open(index)
        try:
            with MemorySampler() as memory:
                before = psutil.Process().memory_info().rss
                started = time.monotonic()
                await service.rebuild(retrain=True)
                ended = time.monotonic()
            stats = await service.stats()
        finally:
            await service.close()
    finally:
        engine_log.removeHandler(handler)
    marks = handler.times
    phases = {
        # Reading the 20,000-image sample by hash, then k-means on its descriptors.
        "vocabulary": (started, marks["vocabulary"]),
        # Assigning every image's descriptors to words, writing the segments (all 20,000
        # here; at 1M this part grows with the collection, unlike training).
        "postings": (marks["vocabulary"], marks["inverted file"]),
        # Reading the sample twice, k-means, 20,000 VLADs and their SVD.
        "codebook": (marks["inverted file"], marks["codebook"]),
        "vectors and Annoy": (marks["codebook"], ended),
    }
    settings = EngineSettings()
    return {
        "images": stats.images,
        "training_images": settings.training_images,
        "vocabulary_descriptors_per_image": max(
            8, settings.vocabulary_training_descriptors // settings.training_images
        ),
        "rss_before_mb": before / 2**20,
        "phases": {
            name: {"seconds": end - start, "peak_rss_mb": memory.peak(start, end) / 2**20}
            for name, (start, end) in phases.items()
        },
    }


def training_in_a_new_process(index: Path) -> dict[str, Any]:
    """:func:`training` in a fresh process: its memory is training's, not the builds' before."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as executor:
        return executor.submit(_run_training, index).result()


def _run_training(index: Path) -> dict[str, Any]:
    return asyncio.run(training(index))


def print_report(result: dict[str, Any]) -> None:
    if "idle" in result:
        for label, cpu_s in result["idle"]["summary"].items():
            print(f"idle {label}: {cpu_s:.2f} CPU s in {result['idle']['seconds']:.0f} s")
    if "throughput" in result:
        print_throughput(result["throughput"]["summary"])
    if "writer" in result:
        w = result["writer"]
        print(
            f"writer: {w['images_per_s']:.0f} images/s ({w['images']} images, "
            f"{w['batch']} a transaction), {w['catalog_bytes'] / 2**20:.0f} MiB catalog; "
            f"feeds {result.get('workers_fed', 0):.0f} worker processes; unpickling "
            f"{w['unpickled_images_per_s']:.0f} images/s"
        )
    if "training" in result:
        for name, phase in result["training"]["phases"].items():
            print(
                f"training {name}: {phase['seconds']:.1f} s, "
                f"peak RSS {phase['peak_rss_mb']:.0f} MiB"
            )


def print_throughput(summary: dict[str, Any]) -> None:
    rows = [
        [label, f"{s['photos_per_s']:.2f}", f"{s['extract_s']:.1f}", f"{s['extract_ratio']:.3f}",
         f"{s['build_s']:.1f}", f"{s['build_ratio']:.3f}", f"{s['cpu_s']:.1f}",
         f"{s['cpu_ratio']:.3f}"]
        for label, s in summary.items()
    ]  # fmt: skip
    print(markdown_table(
        ["mode", "photos/s", "extraction s", "vs local", "whole build s", "vs local",
         "CPU s", "vs local"], rows
    ))  # fmt: skip


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    photos = list_photos(arguments.photos)[: arguments.count]
    result: dict[str, Any] = {
        "machine": machine_info(),
        "command": arguments.command_line,
    }
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as scratch_name:
        scratch = Path(scratch_name)
        folder = linked_photos(photos, scratch / "photos")
        if arguments.idle_repeats:
            print(f"idle clusters, {arguments.idle_repeats} repeats", flush=True)
            result["idle"] = await idle(arguments.idle_repeats, arguments.idle_seconds)
        if arguments.repeats:
            print(f"throughput on {len(photos)} photos, {arguments.repeats} repeats", flush=True)
            result["throughput"] = await throughput(folder, len(photos), arguments.repeats, scratch)
        if arguments.writer_images:
            pool = descriptor_pool(photos[: arguments.pool_photos], EngineSettings())
            result["writer"] = await writer(scratch / "writer", pool, arguments.writer_images)
            if "throughput" in result:
                one_worker = result["throughput"]["summary"]["Dask local:1"]
                result["workers_fed"] = (
                    result["writer"]["images_per_s"] / one_worker["photos_per_s"]
                )
            print(f"writer: {result['writer']['images_per_s']:.0f} images/s", flush=True)
            if arguments.training:
                result["training"] = training_in_a_new_process(scratch / "writer")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--count", type=int, default=300, help="photos per build")
    parser.add_argument("--repeats", type=int, default=3, help="0: skip the throughput part")
    parser.add_argument(
        "--idle-repeats",
        type=int,
        default=3,
        help="repeats of the idle LocalCluster's cost (0: skip it)",
    )
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument(
        "--writer-images",
        type=int,
        default=20_000,
        help="images written by the writer part (0: skip it and training)",
    )
    parser.add_argument(
        "--pool-photos",
        type=int,
        default=100,
        help="photos whose descriptors the writer's images are drawn from",
    )
    parser.add_argument("--no-training", dest="training", action="store_false")
    parser.add_argument("--out", type=Path, default=Path("bench/out/cluster.json"))
    arguments = parser.parse_args(argv)
    arguments.command_line = " ".join(["python -m bench.cluster", *(argv or sys.argv[1:])])
    result = asyncio.run(run(arguments))
    write_json(arguments.out, result)
    print_report(result)


# The guard matters: a LocalCluster starts its workers by importing this module again.
if __name__ == "__main__":
    main()
