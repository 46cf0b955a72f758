"""A build's decode + extract map on the workers of a Dask cluster.

The only module that imports dask's ``distributed`` and ``fsspec``, and only a
build run with ``--dask`` imports it: the engine works without the optional
extra. Everything else of the build stays on the client, in :mod:`indexer.build`:
the scan, the single catalog writer, vocabulary and codebook training, and the
index. A task analyses a batch of photos with the very functions of a local
build (:mod:`indexer.analysis`), so the same photos give the same catalog.

Failures: a task is a pure function of its photos, and its results reach the
catalog only through the client, once, when the client receives them. When a
worker dies the scheduler runs its tasks again elsewhere (up to
``distributed.scheduler.allowed-failures`` times), so nothing is lost and
nothing is stored twice; when the client dies, what it committed is kept and a
rerun extracts only the rest (the build's own resumption).

Memory: at most :data:`IN_FLIGHT_PER_THREAD` batches per worker thread are
submitted at once, so a fast cluster cannot flood the client (or, with
``send_bytes``, the scheduler) with results or photo bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.config
import fsspec
from distributed import Client, Future, LocalCluster, as_completed
from distributed.client import FutureCancelledError
from distributed.scheduler import KilledWorker

from indexer.analysis import (
    FileAnalysis,
    ReadFile,
    analyze_folder_file,
    analyze_read_file,
    read_folder_file,
)
from indexer.build import DaskOptions, FoundFile, is_image_name, scan_folder
from indexer.errors import ClusterError, ImageTooLargeError, IndexerError, SourceError
from indexer.features import limit_threads
from indexer.settings import EngineSettings

log = logging.getLogger(__name__)

LOCAL_CLUSTER_PREFIX = "local:"
# Batches submitted per worker thread: one computing and one waiting, so that a
# worker finishing a batch starts the next at once, without the client's round trip.
IN_FLIGHT_PER_THREAD = 2
# How often the window follows workers that joined or left (a scheduler round trip).
WINDOW_REFRESH_S = 2.0
# A scheduler without workers would leave the build waiting for ever.
WORKERS_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 30.0
# Dask's defaults suit an interactive cluster watched through its dashboard: every
# scheduler, nanny and worker checks its event loop every 20 ms and its process's CPU,
# memory and I/O every 0.5 s, the nanny and the worker check the worker's memory every
# 0.1 s, and the worker samples its threads' stacks every 10 ms. An idle LocalCluster of one
# worker spends 1.26 CPU seconds every 20 s on that, 0.26 with these settings; a build on
# `local:2` used 22% more CPU than a local build, and 2% more with them (bench/cluster.py,
# docs/BENCHMARKS.md). A build's tasks are alike and fed two per thread, so work stealing
# and the active memory manager have nothing to do. docs/CLUSTER.md gives the same
# settings for a scheduler and workers started by hand.
QUIET_CLUSTER_CONFIG: dict[str, object] = {
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.tick.cycle": "5s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.profile.enabled": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.scheduler.work-stealing": False,
    "distributed.scheduler.active-memory-manager.start": False,
}

# A task's item: a path or URL for the worker to read, or a file the client read.
Item = str | ReadFile


def is_url(source: str | Path) -> bool:
    """Whether a photo source is an fsspec URL (``s3://...``) rather than a local path."""
    return isinstance(source, str) and "://" in source


async def scan(photos: Path | str, errors: list[tuple[str, str]]) -> tuple[str, list[FoundFile]]:
    """The root the catalog knows the photos by, and the image files under it: a local
    (or NFS) folder as a local build scans it, or an fsspec URL listed through fsspec.

    Raises:
        SourceError: not a folder, or a URL that cannot be listed.
    """
    if not is_url(photos):
        return scan_folder(photos, errors)
    url = str(photos).rstrip("/")
    try:
        fs, root = fsspec.core.url_to_fs(url)
        listing: dict[str, dict[str, Any]] = await asyncio.to_thread(fs.find, root, detail=True)
    except (OSError, ValueError, ImportError) as error:
        raise SourceError(f"cannot list {url}: {error}") from error
    if not listing and not await asyncio.to_thread(fs.isdir, root):
        raise SourceError(f"{url} is not a folder")
    files = [
        FoundFile(fs.unstrip_protocol(path), int(info["size"]), _mtime_ns(info))
        for path, info in sorted(listing.items())
        if info.get("type") == "file" and is_image_name(path)
    ]
    return fs.unstrip_protocol(root), files


def _mtime_ns(info: dict[str, Any]) -> int:
    """A file's modification time from an fsspec listing, in nanoseconds (0 if none is
    given): local files have "mtime" in seconds, S3 objects "LastModified"."""
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, int | float):
            return int(value * 1e9)
    return 0


def read_url_file(url: str, max_bytes: int) -> ReadFile | FileAnalysis:
    """The bytes of a photo behind an fsspec URL, or the failure to read them."""
    size = mtime_ns = 0
    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
        size, mtime_ns = int(info["size"]), _mtime_ns(info)
        if size > max_bytes:
            raise ImageTooLargeError(f"{url} has {size} bytes, the limit is {max_bytes}")
        with fs.open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except IndexerError as error:
        return FileAnalysis(url, size, mtime_ns, None, str(error))
    except OSError as error:
        return FileAnalysis(url, size, mtime_ns, None, f"cannot read: {error}")
    return ReadFile(url, size, mtime_ns, data)


def read_item(path: str, settings: EngineSettings) -> ReadFile | FileAnalysis:
    """Read one photo (path or URL) as a task would: the bytes, or why not."""
    if is_url(path):
        return read_url_file(path, settings.max_file_bytes)
    return read_folder_file(path, settings.max_file_bytes)


def analyze_batch(items: Sequence[Item], root: str, settings: EngineSettings) -> list[FileAnalysis]:
    """Runs on a worker: analyse a batch of photos, read there or sent by the client.

    Raises:
        ClusterError: a photo could not be read and this worker cannot see ``root`` at
            all: its files would otherwise be recorded as failures, and not retried.
    """
    limit_threads()
    results = []
    for item in items:
        if isinstance(item, ReadFile):
            results.append(analyze_read_file(item, settings))
        elif is_url(item):
            read = read_url_file(item, settings.max_file_bytes)
            analyzed = read if isinstance(read, FileAnalysis) else analyze_read_file(read, settings)
            results.append(analyzed)
        else:
            results.append(analyze_folder_file(item, settings))
    if any(result.analysis is None for result in results) and not _can_see(root):
        raise ClusterError(
            f"a Dask worker cannot read the photos at {root}: mount them at the same path on "
            "every worker, or build with --dask-send-bytes"
        )
    return results


def _can_see(root: str) -> bool:
    if not is_url(root):
        return Path(root).is_dir()
    try:
        fs, path = fsspec.core.url_to_fs(root)
        return bool(fs.isdir(path))
    except (OSError, ValueError, ImportError):
        return False


class ClusterSession:
    """A connected client: runs a build's extraction on the cluster."""

    def __init__(self, client: Client, options: DaskOptions, root: str) -> None:
        self._client = client
        self._options = options
        self._root = root

    async def extract(
        self, files: Sequence[FoundFile], settings: EngineSettings
    ) -> AsyncGenerator[FileAnalysis, None]:
        """Analyse ``files`` on the workers, yielding each outcome as its batch returns.

        Raises:
            ClusterError: a batch failed on every worker it was tried on, or a worker
                cannot read the photos.
        """
        batch_size = max(1, self._options.batch)
        batches = (
            [item.path for item in files[start : start + batch_size]]
            for start in range(0, len(files), batch_size)
        )
        pending: set[Future[list[FileAnalysis]]] = set()
        completed = as_completed()
        window = await self._window()
        window_at = time.monotonic()
        read_failures: list[FileAnalysis] = []
        try:
            while True:
                if time.monotonic() - window_at > WINDOW_REFRESH_S:
                    window, window_at = await self._window(), time.monotonic()
                while len(pending) < window:
                    paths = next(batches, None)
                    if paths is None:
                        break
                    items, failed = await self._items(paths, settings)
                    read_failures.extend(failed)
                    if items:
                        future = self._client.submit(
                            analyze_batch, items, self._root, settings, pure=False
                        )
                        pending.add(future)
                        completed.add(future)
                for failure in read_failures:
                    yield failure
                read_failures.clear()
                if not pending:
                    return
                future = await anext(completed)
                pending.discard(future)
                for result in await self._result(future):
                    yield result
        finally:
            if pending:
                await self._client.cancel(list(pending))

    async def _window(self) -> int:
        """Batches to keep submitted: IN_FLIGHT_PER_THREAD per worker thread."""
        threads: dict[str, int] = await self._client.nthreads()
        return max(2, IN_FLIGHT_PER_THREAD * sum(threads.values()))

    async def _items(
        self, paths: list[str], settings: EngineSettings
    ) -> tuple[list[Item], list[FileAnalysis]]:
        """A batch's items: the paths, or with ``send_bytes`` the files read here
        (and the failures to read some, which need no worker)."""
        if not self._options.send_bytes:
            return list(paths), []

        def read_all() -> list[ReadFile | FileAnalysis]:
            return [read_item(path, settings) for path in paths]

        read = await asyncio.to_thread(read_all)
        return (
            [r for r in read if isinstance(r, ReadFile)],
            [r for r in read if isinstance(r, FileAnalysis)],
        )

    async def _result(self, future: Future[list[FileAnalysis]]) -> list[FileAnalysis]:
        try:
            results: list[FileAnalysis] = await future
        except IndexerError:
            raise
        except KilledWorker as error:
            raise ClusterError(
                f"a batch of photos was running on every worker that died ({error}); "
                "what was committed is kept, run the build again to resume"
            ) from error
        except FutureCancelledError as error:
            # An asyncio.CancelledError, but not this build being cancelled: the scheduler
            # dropped the task (it was lost, or restarted).
            raise ClusterError(
                f"the Dask scheduler dropped a batch of photos ({error.reason}); what was "
                "committed is kept, run the build again to resume"
            ) from error
        except Exception as error:  # anything a worker raised: a worker without the package
            raise ClusterError(f"the cluster failed a batch of photos: {error!r}") from error
        finally:
            future.release()
        return results


@contextlib.asynccontextmanager
async def connect(options: DaskOptions, root: str) -> AsyncIterator[ClusterSession]:
    """A session on the scheduler at ``options.address`` (``tcp://host:port``), or on a
    LocalCluster of N single-threaded processes started here (``local:N``).

    Raises:
        ClusterError: a malformed address, an unreachable scheduler, or no workers.
    """
    address = options.address
    async with contextlib.AsyncExitStack() as stack:
        if address.startswith(LOCAL_CLUSTER_PREFIX):
            address = await stack.enter_async_context(local_cluster(_local_workers(address)))
        elif "://" not in address:
            raise ClusterError(
                f"--dask {address!r}: give a scheduler as tcp://HOST:PORT, or local:N"
            )
        try:
            client = await stack.enter_async_context(
                Client(address, asynchronous=True, timeout=CONNECT_TIMEOUT_S)
            )
        except (OSError, TimeoutError) as error:
            raise ClusterError(f"cannot reach the Dask scheduler at {address}: {error}") from error
        try:
            await client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
        except TimeoutError as error:
            raise ClusterError(
                f"no Dask worker joined the scheduler at {address} in {WORKERS_TIMEOUT_S:.0f} s"
            ) from error
        log.info("extracting on %d Dask workers at %s", len(await client.nthreads()), address)
        yield ClusterSession(client, options, root)


@contextlib.asynccontextmanager
async def local_cluster(
    workers: int, config: Mapping[str, object] = QUIET_CLUSTER_CONFIG
) -> AsyncIterator[str]:
    """A LocalCluster of ``workers`` single-threaded processes on loopback, run with
    ``config`` (Dask's own settings where it is empty); yields its scheduler's address."""
    # Read when the scheduler, the nannies and the workers start; the nannies pass them on
    # to the worker processes they start, again after a worker dies.
    with dask.config.set(config):
        async with LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",
            asynchronous=True,
        ) as cluster:
            yield cluster.scheduler_address


def _local_workers(address: str) -> int:
    count = address.removeprefix(LOCAL_CLUSTER_PREFIX)
    if not count.isdigit() or int(count) < 1:
        raise ClusterError(f"--dask {address!r}: local:N needs a number of processes N >= 1")
    return int(count)
