"""Backfilling a chat's history from a Telegram Desktop export.

Each photo and image file of the chat goes through the same add as a photo the repost watch
checks: :meth:`SearchService.add` into the chat's scope, then a sighting of its message (chat
id, message id, sender, date). A later repost in the watched chat then finds the old message
as its first sighting, and links to it.

Photos are read and analysed a few ahead in the CPU pool, but added one at a time in message
order, so the first post of a picture is always its original. Each add and its sighting are
committed as they go: an interrupted import keeps what it did, and the next run skips every
message that has a sighting already, so it imports only what is new.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from indexer.analysis import Analysis
from indexer.build import offline_service
from indexer.errors import IndexerError
from indexer.images import read_image_file
from indexer.progress import progress_bar
from indexer.search import SearchService
from indexer.settings import EngineSettings
from indexer.telegram_export import ExportedChat, ExportedImage, read_export

log = logging.getLogger(__name__)

_DAY_S: Final = 86_400.0
# Imported messages have no Telegram file: nothing to compare a later edit's file with.
_NO_FILE_UNIQUE_ID: Final = ""


@dataclass(slots=True)
class ImportReport:
    """What an import did. Message ids are the chat's."""

    chat_name: str
    export_type: str
    chat_id: int  # the Bot API id: the scope the images went to
    messages: int = 0  # in the export, service messages included
    images: int = 0  # photos and image files among them
    imported: int = 0  # new pictures in the chat's history
    seen_before: int = 0  # pictures the collection had already: only their message is recorded
    already_imported: int = 0  # by an earlier run (or checked by the watch)
    too_old: int = 0  # older than the chat's retention
    missing: list[tuple[int, str]] = field(default_factory=list)  # (message id, why)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (message id, why), this run
    still_failing: int = 0  # failed in an earlier run and unchanged since (not retried)
    generation: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class _Prepared:
    """An exported image read and analysed, or why it could not be."""

    image: ExportedImage
    data: bytes = b""
    analysis: Analysis | None = None
    error: str | None = None
    file_size: int = 0
    file_mtime_ns: int = 0


async def import_export(
    export_dir: Path,
    index_dir: Path,
    *,
    chat: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    settings: EngineSettings | None = None,
) -> ImportReport:
    """Add the images of the chat exported in ``export_dir`` to the index in ``index_dir``
    (created if needed). ``chat`` picks a chat of a whole-account export.

    Raises:
        ExportError: ``export_dir`` is not a Telegram Desktop export, or a malformed one.
        StorageFullError: the disk is full (what was imported before stays).
    """
    started = time.perf_counter()
    exported = read_export(export_dir, chat=chat)
    report = ImportReport(
        chat_name=exported.name,
        export_type=exported.export_type,
        chat_id=exported.chat_id,
        messages=exported.messages,
        images=len(exported.images),
    )
    async with offline_service(index_dir, workers=workers, settings=settings) as service:
        plan = await _select(service, exported, report)
        await _import_all(service, exported, plan, report, progress=progress)
        if report.imported or service.generation_name is None:
            report.generation = await service.rebuild()
        else:
            report.generation = service.generation_name
    report.seconds = time.perf_counter() - started
    return report


@dataclass(frozen=True, slots=True)
class _Plan:
    todo: list[ExportedImage]
    retried: set[str]  # files that failed in an earlier run and changed since


async def _select(
    service: SearchService, exported: ExportedChat, report: ImportReport
) -> _Plan:
    """The images still to import; the others are counted in ``report``."""
    catalog = service.catalog
    done = await catalog.chats.sighted_messages(exported.chat_id)
    failed_before = {
        path: (state.file_size, state.file_mtime_ns)
        for path, state in (await catalog.sources_under(str(exported.folder))).items()
        if state.image_id is None
    }
    settings = await catalog.chats.chat_settings(exported.chat_id)
    retention_days = int(settings["retention_days"]) if settings else 0
    # The watch forgets photos older than the chat's retention: importing them would bring
    # back what the chat asked to forget.
    cutoff = time.time() - retention_days * _DAY_S if retention_days else None
    plan = _Plan([], set())
    for image in exported.images:
        if image.message_id in done:
            report.already_imported += 1
        elif cutoff is not None and image.posted_at < cutoff:
            report.too_old += 1
        elif image.path is None:
            report.missing.append((image.message_id, image.unavailable or "not exported"))
        else:
            try:
                status = image.path.stat()
            except OSError:
                report.missing.append((image.message_id, "its file is not in the export folder"))
                continue
            before = failed_before.get(str(image.path))
            if before == (status.st_size, status.st_mtime_ns):
                report.still_failing += 1
                continue
            if before is not None:
                plan.retried.add(str(image.path))
            plan.todo.append(image)
    return plan


async def _import_all(
    service: SearchService,
    exported: ExportedChat,
    plan: _Plan,
    report: ImportReport,
    *,
    progress: bool,
) -> None:
    queue = iter(plan.todo)
    ahead: deque[asyncio.Task[_Prepared]] = deque()
    in_flight = max(2, service.pool.workers * 2)
    bar = progress_bar(len(plan.todo), enabled=progress)
    try:
        while True:
            while len(ahead) < in_flight and (image := next(queue, None)) is not None:
                ahead.append(asyncio.create_task(_prepare(service, image)))
            if not ahead:
                break
            # The oldest first, whatever finished first: the first post stays the original.
            prepared = await ahead.popleft()
            await _add(service, exported, prepared, report, retried=plan.retried)
            bar.update(1)
    finally:
        for task in ahead:
            task.cancel()
        bar.close()


async def _prepare(service: SearchService, image: ExportedImage) -> _Prepared:
    assert image.path is not None  # noqa: S101 - _select keeps only images with a file
    try:
        data, status = read_image_file(image.path, service.settings.max_file_bytes)
    except IndexerError as error:
        return _Prepared(image, error=str(error))
    try:
        analysis = await service.analyze(data)
    except IndexerError as error:
        return _Prepared(
            image, error=str(error), file_size=status.st_size, file_mtime_ns=status.st_mtime_ns
        )
    return _Prepared(image, data, analysis)


async def _add(
    service: SearchService,
    exported: ExportedChat,
    prepared: _Prepared,
    report: ImportReport,
    *,
    retried: set[str],
) -> None:
    image = prepared.image
    assert image.path is not None  # noqa: S101 - _select keeps only images with a file
    if prepared.analysis is None:
        reason = prepared.error or "unknown"
        report.failed.append((image.message_id, reason))
        log.info("message %s not imported: %s", image.message_id, reason)
        await service.catalog.record_failures(
            [(str(image.path), prepared.file_size, prepared.file_mtime_ns, reason)]
        )
        return
    result = await service.add(
        prepared.data,
        scope=exported.chat_id,
        added_by=image.sender_name,
        origin_chat_id=exported.chat_id,
        origin_message_id=image.message_id,
        added_at=image.posted_at,
        analysis=prepared.analysis,
    )
    sighting: dict[str, Any] = {
        "chat_id": exported.chat_id,
        "message_id": image.message_id,
        "image_id": result.image.id,
        "sender_id": image.sender_id,
        "sender_name": image.sender_name,
        "posted_at": image.posted_at,
        "file_unique_id": _NO_FILE_UNIQUE_ID,
        "answer_message_id": None,
        "dismissed": False,
    }
    await service.chat_records.record_sighting(sighting, inbox_payload=None)
    if str(image.path) in retried:
        await service.catalog.forget_failures([str(image.path)])
    if result.created:
        report.imported += 1
    else:
        report.seen_before += 1
