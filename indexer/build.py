"""The offline pipeline: scan a folder, extract what is new, catalog it, index it.

Extraction runs in a process pool with a bounded number of files in flight;
results are committed to the catalog in small batches, so Ctrl-C or a crash
loses at most one batch, and a rerun only extracts what is not yet there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from indexer.analysis import FileAnalysis, analyze_folder_file
from indexer.catalog import GLOBAL_SCOPE, Catalog, NewImage, RemovedSource
from indexer.errors import SourceError
from indexer.progress import progress_bar
from indexer.search import SearchService
from indexer.settings import EngineSettings
from indexer.workers import CpuPool

log = logging.getLogger(__name__)

COMMIT_EVERY = 64  # files per catalog transaction: what a crash can cost at most
IMAGE_SUFFIXES = frozenset(
    # HEIC and AVIF are listed so that they are reported as unsupported, not ignored.
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
     ".heic", ".heif", ".avif"}
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
class _Found:
    path: str
    size: int
    mtime_ns: int


async def build_index(
    photos_dir: Path,
    index_dir: Path,
    *,
    workers: int | None = None,
    progress: bool = True,
    settings: EngineSettings | None = None,
    retrain: bool = False,
) -> BuildReport:
    """Bring the index in ``index_dir`` up to date with the photos under ``photos_dir``.

    Raises:
        SourceError: ``photos_dir`` is not a readable folder.
    """
    started = time.perf_counter()
    # Normalised, not resolved: stored paths must not hold "..", but symlinked
    # photo folders keep the names the user gave them.
    root = Path(os.path.normpath(photos_dir.absolute()))
    if not root.is_dir():
        raise SourceError(f"{photos_dir} is not a folder")
    report = BuildReport()
    errors: list[tuple[str, str]] = []
    found = {f.path: f for f in _scan(root, errors)}
    report.failed.extend(errors)
    report.scanned = len(found)

    async with offline_service(index_dir, workers=workers, settings=settings) as service:
        known = await service.catalog.sources_under(str(root))
        vanished = [state for path, state in known.items() if path not in found]
        removed_ids = [s.image_id for s in vanished if s.image_id is not None]
        if removed_ids:
            await service.catalog.delete_images(removed_ids)
        await service.catalog.forget_failures(p for p in known if p not in found)
        report.removed = len(removed_ids)
        held = await service.catalog.removed_under(str(root))
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
            await _extract_all(service, todo, report, progress=progress)
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


async def _still_removed(catalog: Catalog, item: _Found, removed: RemovedSource) -> bool:
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
    todo: list[tuple[_Found, bool]],
    report: BuildReport,
    *,
    progress: bool,
) -> None:
    settings, pool = service.settings, service.pool
    replacing = {item.path for item, was_indexed in todo if was_indexed}
    pending: set[asyncio.Future[FileAnalysis]] = set()
    batch: list[FileAnalysis] = []
    queue = iter(todo)
    in_flight = max(2, pool.workers * 4)
    bar = progress_bar(len(todo), enabled=progress)
    try:
        while True:
            while len(pending) < in_flight:
                next_item = next(queue, None)
                if next_item is None:
                    break
                pending.add(
                    asyncio.ensure_future(
                        pool.run(analyze_folder_file, next_item[0].path, settings)
                    )
                )
            if not pending:
                break
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                batch.append(future.result())
                bar.update(1)
            if len(batch) >= COMMIT_EVERY:
                await _commit(service, batch, replacing, report)
                batch = []
        await _commit(service, batch, replacing, report)
    finally:
        for future in pending:
            future.cancel()
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


def _scan(root: Path, errors: list[tuple[str, str]]) -> Iterator[_Found]:
    """Image files under ``root``. Symlinked folders are not followed (loops);
    symlinked files are, and a broken link is reported."""

    def on_error(error: OSError) -> None:
        errors.append((str(error.filename), f"cannot read folder: {error.strerror}"))

    for folder, subfolders, files in os.walk(root, onerror=on_error, followlinks=False):
        subfolders.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = os.path.join(folder, name)  # noqa: PTH118 - os.walk hands out strings
            try:
                status = os.stat(path)  # noqa: PTH116 - follows file symlinks on purpose
            except OSError as error:
                errors.append((path, f"cannot read: {error.strerror}"))
                continue
            yield _Found(path, status.st_size, status.st_mtime_ns)
