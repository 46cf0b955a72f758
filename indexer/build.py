"""The offline pipeline: scan a folder, extract what is new, catalog it, index it.

Extraction runs in a process pool, or on the workers of a Dask cluster
(:mod:`indexer.distributed`), with a bounded number of files in flight; results
are committed to the catalog here, by this one process, in small batches, so
Ctrl-C or a crash loses at most one batch, and a rerun only extracts what is not
yet there. Vocabulary and codebook training and index building run here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from indexer.analysis import FileAnalysis, analyze_folder_file
from indexer.catalog import GLOBAL_SCOPE, Catalog, NewFrame, NewImage, RemovedSource
from indexer.errors import IndexerError, SourceError
from indexer.progress import progress_bar
from indexer.search import SearchService
from indexer.settings import EngineSettings
from indexer.workers import CpuPool

log = logging.getLogger(__name__)

COMMIT_EVERY = 64  # files per catalog transaction: what a crash can cost at most
IMAGE_SUFFIXES = frozenset(
    # HEIC and AVIF are listed so that they are reported as unsupported, not ignored.
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
     ".heic", ".heif", ".avif",
     # Videos and animations, searched by a few of their frames (indexer/moving.py).
     ".mp4", ".m4v", ".mov", ".webm"}
)


@dataclass(slots=True)
class BuildReport:
    """What a build did."""

    scanned: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    held_removed: int = 0  # removed on purpose earlier, and unchanged since: not added back
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    still_failing: int = 0  # unchanged files that failed before (not retried)
    images: int = 0
    generation: str | None = None
    seconds: float = 0.0
    # Where the time went, by phase ("extraction", which includes "commit", and "rebuild"):
    # wall seconds, and CPU seconds of this process (not the workers'); for benchmarks.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    phase_cpu_seconds: dict[str, float] = field(default_factory=dict)
    commits: int = 0

    @contextlib.contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        """Add the wall and CPU time of the block to ``phase``."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.phase_seconds[phase] = (
                self.phase_seconds.get(phase, 0.0) + time.perf_counter() - wall
            )
            self.phase_cpu_seconds[phase] = (
                self.phase_cpu_seconds.get(phase, 0.0) + time.process_time() - cpu
            )


@dataclass(frozen=True, slots=True)
class FoundFile:
    """A photo file the scan found, with the size and modification time it had."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class DaskOptions:
    """Extraction on a Dask cluster instead of local processes (docs/CLUSTER.md)."""

    # "tcp://host:8786" (a running scheduler) or "local:N" (a LocalCluster of N processes).
    address: str
    # The workers do not see the client's files: the client reads each photo and sends it.
    send_bytes: bool = False
    # Photos per task: one task costs the scheduler a few milliseconds, a photo ~0.1 s.
    batch: int = 4


async def build_index(
    photos_dir: Path | str,
    index_dir: Path,
    *,
    workers: int | None = None,
    progress: bool = True,
    settings: EngineSettings | None = None,
    retrain: bool = False,
    dask: DaskOptions | None = None,
) -> BuildReport:
    """Bring the index in ``index_dir`` up to date with the photos under ``photos_dir``:
    a folder, or with ``dask`` also an fsspec URL such as ``s3://bucket/photos``.

    Raises:
        SourceError: ``photos_dir`` is not a readable folder.
        ClusterError: the Dask cluster cannot be reached or cannot do the work.
    """
    started = time.perf_counter()
    report = BuildReport()
    errors: list[tuple[str, str]] = []
    source = _extraction_of(
        photos_dir, index_dir, errors, workers=workers, settings=settings, dask=dask
    )
    async with source as (root, found, extract, service):
        report.failed.extend(errors)
        report.scanned = len(found)
        known = await service.catalog.sources_under(root)
        vanished = [state for path, state in known.items() if path not in found]
        removed_ids = [s.image_id for s in vanished if s.image_id is not None]
        if removed_ids:
            await service.catalog.delete_images(removed_ids)
        await service.catalog.forget_failures(p for p in known if p not in found)
        report.removed = len(removed_ids)
        held = await service.catalog.removed_under(root)
        todo = []
        for path, item in found.items():
            if path in held and await _still_removed(service.catalog, item, held[path]):
                report.held_removed += 1
                continue
            state = known.get(path)
            if state and (state.file_size, state.file_mtime_ns) == (item.size, item.mtime_ns):
                if state.image_id is None:
                    report.still_failing += 1
                else:
                    report.unchanged += 1
                continue
            todo.append((item, state is not None and state.image_id is not None))
        with report.timing("extraction"):
            await _extract_all(service, extract, todo, report, progress=progress)
        if todo or removed_ids or retrain or service.generation_name is None:
            with report.timing("rebuild"):
                report.generation = await service.rebuild(retrain=retrain)
        else:
            report.generation = (await service.stats()).generation
        report.images = await service.catalog.count()
    report.seconds = time.perf_counter() - started
    return report


@contextlib.asynccontextmanager
async def offline_service(
    index_dir: Path, *, workers: int | None, settings: EngineSettings | None
) -> AsyncIterator[SearchService]:
    """The index in ``index_dir`` (created if needed) with a pool of ``workers`` processes,
    for an offline command; both are closed after it, work still queued cancelled."""
    pool = CpuPool.processes(workers)
    try:
        service = await SearchService.open(index_dir, settings=settings, pool=pool, create=True)
        try:
            yield service
        finally:
            await service.close()
    finally:
        pool.shutdown(cancel_pending=True)


class Extraction(Protocol):
    """Analyses files somewhere, yielding each outcome as it arrives (in any order), with
    a bounded number of files in flight; closing the generator cancels what is left."""

    def __call__(
        self, files: Sequence[FoundFile], settings: EngineSettings
    ) -> AsyncGenerator[FileAnalysis, None]: ...


@contextlib.asynccontextmanager
async def _extraction_of(
    photos_dir: Path | str,
    index_dir: Path,
    errors: list[tuple[str, str]],
    *,
    workers: int | None,
    settings: EngineSettings | None,
    dask: DaskOptions | None,
) -> AsyncIterator[tuple[str, dict[str, FoundFile], Extraction, SearchService]]:
    """The photos to build from (the root the catalog knows them by, and the files by path),
    where they are analysed (local processes, or with ``dask`` a Dask cluster: see
    :mod:`indexer.distributed`), and the opened index."""
    if dask is None:
        root, files = scan_folder(photos_dir, errors)
        async with offline_service(index_dir, workers=workers, settings=settings) as service:
            yield root, {f.path: f for f in files}, _pool_extraction(service.pool), service
        return
    try:
        # Imported here only: the engine runs without the optional extra.
        from indexer import distributed
    except ImportError as error:
        raise IndexerError(
            f"--dask needs the dask extra ({error.name} is missing): "
            "pip install 'imgsearch[dask]'"
        ) from error
    root, files = await distributed.scan(photos_dir, errors)
    async with distributed.connect(dask, root) as session:
        # Nothing CPU-heavy runs here but training, which runs in threads.
        service = await SearchService.open(
            index_dir, settings=settings, pool=CpuPool.inline(), create=True
        )
        try:
            yield root, {f.path: f for f in files}, session.extract, service
        finally:
            await service.close()


def _pool_extraction(pool: CpuPool) -> Extraction:
    async def extract(
        files: Sequence[FoundFile], settings: EngineSettings
    ) -> AsyncGenerator[FileAnalysis, None]:
        pending: set[asyncio.Future[FileAnalysis]] = set()
        queue = iter(files)
        in_flight = max(2, pool.workers * 4)
        try:
            while True:
                while len(pending) < in_flight:
                    item = next(queue, None)
                    if item is None:
                        break
                    pending.add(
                        asyncio.ensure_future(pool.run(analyze_folder_file, item.path, settings))
                    )
                if not pending:
                    return
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()

    return extract


async def _still_removed(catalog: Catalog, item: FoundFile, removed: RemovedSource) -> bool:
    """Whether a file whose image was removed on purpose is still the same file.

    The same size and time say so at once; otherwise its content decides (a copy
    or a touch does not bring a removed photo back, an edit does).
    """
    if (removed.file_size, removed.file_mtime_ns) == (item.size, item.mtime_ns):
        return True
    try:
        content_hash = await asyncio.to_thread(_file_sha256, item.path)
    except OSError:
        return True  # unreadable now: nothing to add anyway, and the removal holds
    if content_hash != removed.content_hash:
        await catalog.update_removed(item.path, None)
        return False
    await catalog.update_removed(
        item.path, RemovedSource(content_hash, item.size, item.mtime_ns)
    )
    return True


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


async def _extract_all(
    service: SearchService,
    extract: Extraction,
    todo: list[tuple[FoundFile, bool]],
    report: BuildReport,
    *,
    progress: bool,
) -> None:
    replacing = {item.path for item, was_indexed in todo if was_indexed}
    batch: list[FileAnalysis] = []
    bar = progress_bar(len(todo), enabled=progress)
    try:
        async with contextlib.aclosing(
            extract([item for item, _ in todo], service.settings)
        ) as results:
            async for result in results:
                batch.append(result)
                bar.update(1)
                if len(batch) >= COMMIT_EVERY:
                    await _commit(service, batch, replacing, report)
                    batch = []
        await _commit(service, batch, replacing, report)
    finally:
        bar.close()


async def _commit(
    service: SearchService, batch: list[FileAnalysis], replacing: set[str], report: BuildReport
) -> None:
    with report.timing("commit"):
        await _commit_batch(service, batch, replacing, report)
    report.commits += 1


async def _commit_batch(
    service: SearchService, batch: list[FileAnalysis], replacing: set[str], report: BuildReport
) -> None:
    failures = [
        (r.path, r.file_size, r.file_mtime_ns, r.error or "unknown")
        for r in batch
        if r.analysis is None
    ]
    images = [
        NewImage(
            content_hash=r.analysis.content_hash,
            scope=GLOBAL_SCOPE,
            path=r.path,
            file_size=r.file_size,
            file_mtime_ns=r.file_mtime_ns,
            width=r.analysis.width,
            height=r.analysis.height,
            features=r.analysis.features,
            frame_seconds=r.analysis.video_frames[0].seconds if r.analysis.moving else None,
            later_frames=[
                NewFrame(frame.seconds, frame.features) for frame in r.analysis.video_frames[1:]
            ],
        )
        for r in batch
        if r.analysis is not None
    ]
    if images:
        await service.catalog.insert_images(images)
    if failures:
        stale = [
            image.id
            for path, *_ in failures
            for image in await service.catalog.find_by_path(path)
        ]
        if stale:
            await service.catalog.delete_images(stale)
        await service.catalog.record_failures(failures)
    report.failed.extend((path, reason) for path, _, _, reason in failures)
    report.updated += sum(1 for image in images if image.path in replacing)
    report.added += sum(1 for image in images if image.path not in replacing)


def scan_folder(
    photos_dir: Path | str, errors: list[tuple[str, str]]
) -> tuple[str, list[FoundFile]]:
    """The folder's normalised path and the image files under it.

    Raises:
        SourceError: not a folder, or a URL (which only a Dask build reads).
    """
    if isinstance(photos_dir, str) and "://" in photos_dir:
        raise SourceError(f"{photos_dir} is a URL: only a build with --dask reads those")
    # Normalised, not resolved: stored paths must not hold "..", but symlinked
    # photo folders keep the names the user gave them.
    root = Path(os.path.normpath(Path(photos_dir).absolute()))
    if not root.is_dir():
        raise SourceError(f"{photos_dir} is not a folder")
    return str(root), list(scan(root, errors))


def is_image_name(name: str) -> bool:
    """Whether a build looks at a file of this name (by its suffix)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def scan(root: Path, errors: list[tuple[str, str]]) -> Iterator[FoundFile]:
    """Image files under ``root``. Symlinked folders are not followed (loops);
    symlinked files are, and a broken link is reported."""

    def on_error(error: OSError) -> None:
        errors.append((str(error.filename), f"cannot read folder: {error.strerror}"))

    for folder, subfolders, files in os.walk(root, onerror=on_error, followlinks=False):
        subfolders.sort()
        for name in sorted(files):
            if not is_image_name(name):
                continue
            path = os.path.join(folder, name)  # noqa: PTH118 - os.walk hands out strings
            try:
                status = os.stat(path)  # noqa: PTH116 - follows file symlinks on purpose
            except OSError as error:
                errors.append((path, f"cannot read: {error.strerror}"))
                continue
            yield FoundFile(path, status.st_size, status.st_mtime_ns)
