"""Command line: ``python -m indexer {build,import-telegram-export,query,stats,remove}``
(also ``imgsearch-index``).

Only argument parsing, logging set-up, output and exit codes live here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from indexer.backfill import ImportReport, import_export
from indexer.build import BuildReport, DaskOptions, build_index
from indexer.catalog import GLOBAL_SCOPE
from indexer.contact_sheet import SheetEntry, render_contact_sheet
from indexer.errors import IndexerError
from indexer.search import Match, SearchService
from indexer.settings import EngineSettings
from indexer.telegram_ids import message_link

EXIT_OK = 0
EXIT_FAILURE = 1  # the command could not do its job
EXIT_PARTIAL = 3  # it ran, but some queries or files failed
EXAMPLES_SHOWN = 5  # of the messages an import could not take, the first few are named


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Dask logs every worker start and stop at INFO, and sets its level from its config when
    # a --dask build imports it (its workers read the same variable); the report says enough.
    if not arguments.verbose:
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    try:
        exit_code: int = asyncio.run(arguments.handler(arguments))
    except IndexerError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted: everything committed so far is kept; run again to resume",
              file=sys.stderr)
        return 130
    return exit_code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m indexer", description="Index a photo collection and find similar photos."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    build = commands.add_parser("build", help="index (or update the index of) a photo folder")
    # Kept as typed: with --dask it may be a URL (s3://bucket/photos), which Path would mangle.
    build.add_argument(
        "photos", help="folder of photos, searched recursively (with --dask also s3://... URLs)"
    )
    build.add_argument("--index", type=Path, required=True, help="index folder")
    build.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    build.add_argument("--retrain", action="store_true", help="retrain the codebook")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="extract on a Dask cluster: tcp://HOST:8786 (a running scheduler) or local:N "
        "(N local processes); needs imgsearch[dask], see docs/CLUSTER.md",
    )
    build.add_argument(
        "--dask-send-bytes",
        action="store_true",
        help="the Dask workers cannot see the photos: read them here and send them",
    )
    build.add_argument("--dask-batch", type=int, help="photos per Dask task (default 4)")
    build.set_defaults(handler=_build)

    backfill = commands.add_parser(
        "import-telegram-export",
        help="add a chat's photos from a Telegram Desktop export (JSON), with their messages",
        description="Add every photo and image file of a chat exported by Telegram Desktop "
        "(Export chat history, format JSON) to the chat's collection, with its message, "
        "sender and date, so that the repost watch links later reposts to it. Running it "
        "again imports only what is new.",
    )
    backfill.add_argument("export", type=Path, help="the export's folder (with result.json)")
    backfill.add_argument("--index", type=Path, required=True, help="index folder")
    backfill.add_argument(
        "--chat", type=int, help="the chat to import from a whole-account export (its id)"
    )
    backfill.add_argument(
        "--workers", type=int, default=None, help="processes (default: all cores)"
    )
    backfill.add_argument("--no-progress", action="store_true", help="no progress bar")
    backfill.set_defaults(handler=_import_telegram_export)

    query = commands.add_parser("query", help="find the photos most similar to some images")
    # Kept as typed: the JSON output echoes each query exactly as given.
    query.add_argument("images", nargs="+", help="query image, video or animation files")
    query.add_argument("--index", type=Path, required=True, help="index folder")
    query.add_argument("--top", type=int, default=5, help="results per query (default 5)")
    query.add_argument(
        "--chat",
        type=int,
        default=GLOBAL_SCOPE,
        help="search as from this chat (its Bot API id, as an import prints it): its own "
        "photos as well as the offline collection",
    )
    query.add_argument("--json", action="store_true", help="one JSON object per line")
    query.add_argument("--sheet", type=Path, help="write a contact sheet PNG (first query)")
    query.set_defaults(handler=_query)

    stats = commands.add_parser("stats", help="describe an index")
    stats.add_argument("--index", type=Path, required=True, help="index folder")
    stats.set_defaults(handler=_stats)

    remove = commands.add_parser("remove", help="remove a photo from the index")
    remove.add_argument("path", type=Path, help="path of the indexed photo")
    remove.add_argument("--index", type=Path, required=True, help="index folder")
    remove.set_defaults(handler=_remove)
    return parser


async def _build(arguments: argparse.Namespace) -> int:
    dask = None
    if arguments.dask is not None:
        if arguments.workers is not None:
            raise IndexerError("--workers is for a local build: with --dask, the cluster's "
                               "workers extract (local:N starts N processes)")
        dask = DaskOptions(arguments.dask, send_bytes=arguments.dask_send_bytes)
        if arguments.dask_batch is not None:
            if arguments.dask_batch < 1:
                raise IndexerError("--dask-batch must be at least 1")
            dask = replace(dask, batch=arguments.dask_batch)
    elif arguments.dask_send_bytes or arguments.dask_batch is not None:
        raise IndexerError("--dask-send-bytes and --dask-batch need --dask")
    report = await build_index(
        arguments.photos,
        arguments.index,
        workers=arguments.workers,
        progress=not arguments.no_progress,
        retrain=arguments.retrain,
        dask=dask,
    )
    _print_build_report(report)
    return EXIT_PARTIAL if report.failed else EXIT_OK


def _print_build_report(report: BuildReport) -> None:
    print(
        f"{report.scanned} files scanned: {report.added} added, {report.updated} updated, "
        f"{report.removed} removed, {report.unchanged} unchanged, {len(report.failed)} failed"
        + (f", {report.still_failing} still failing (unchanged)" if report.still_failing else "")
        + (f", {report.held_removed} removed earlier (not added back)"
           if report.held_removed else "")
    )
    print(f"{report.images} images in the index (generation {report.generation}), "
          f"{report.seconds:.1f} s")
    for path, reason in report.failed:
        print(f"  skipped {path!r}: {reason}")


async def _import_telegram_export(arguments: argparse.Namespace) -> int:
    report = await import_export(
        arguments.export,
        arguments.index,
        chat=arguments.chat,
        workers=arguments.workers,
        progress=not arguments.no_progress,
    )
    _print_import_report(report)
    return EXIT_PARTIAL if report.failed or report.missing else EXIT_OK


def _print_import_report(report: ImportReport) -> None:
    print(f"chat {report.chat_name!r} ({report.export_type}, chat id {report.chat_id}): "
          f"{report.messages} messages, {report.images} photos and image files")
    print(
        f"{report.imported} imported, {report.seen_before} already in the collection (their "
        f"messages recorded), {report.already_imported} imported before, "
        f"{len(report.missing)} missing, {len(report.failed)} failed"
        + (f", {report.still_failing} still failing (unchanged)" if report.still_failing else "")
        + (f", {report.too_old} older than the chat's retention" if report.too_old else "")
    )
    print(f"index generation {report.generation}, {report.seconds:.1f} s")
    if report.missing:
        print(f"{len(report.missing)} photos are not in the export: export again with photos "
              "and files ticked in Telegram Desktop's export settings to import them")
        _print_examples(report.missing)
    if report.failed:
        print(f"{len(report.failed)} files could not be imported:")
        _print_examples(report.failed)


def _print_examples(problems: list[tuple[int, str]]) -> None:
    for message_id, reason in problems[:EXAMPLES_SHOWN]:
        print(f"  message {message_id}: {reason}")
    if len(problems) > EXAMPLES_SHOWN:
        print(f"  ... and {len(problems) - EXAMPLES_SHOWN} more")


async def _query(arguments: argparse.Namespace) -> int:
    if arguments.top < 1:
        raise IndexerError("--top must be at least 1")
    service = await SearchService.open(arguments.index)
    failures = 0
    try:
        for position, image in enumerate(arguments.images):
            try:
                matches = await service.query(
                    Path(image), scope=arguments.chat, top=arguments.top
                )
            except IndexerError as error:
                failures += 1
                _print_query_error(image, error, as_json=arguments.json)
                continue
            _print_matches(image, matches, as_json=arguments.json)
            if arguments.sheet is not None and position == 0:
                _write_sheet(arguments.sheet, Path(image), matches, service.settings)
    finally:
        await service.close()
    return EXIT_PARTIAL if failures else EXIT_OK


def _print_query_error(query: str, error: IndexerError, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"query": query, "error": str(error)}), flush=True)
    else:
        print(f"{query}: {error}", file=sys.stderr)


def _print_matches(query: str, matches: list[Match], *, as_json: bool) -> None:
    if as_json:
        results = [
            {
                "path": str(m.path),
                "score": round(m.score, 4),
                "verified": m.verified,
                "inliers": m.inliers,
                **_times(m),
                **_origin(m),
            }
            for m in matches
        ]
        print(json.dumps({"query": query, "results": results}), flush=True)
        return
    print(query)
    if not matches:
        print("  (no similar photos)")
    for rank, m in enumerate(matches, start=1):
        mark = "same picture" + (", mirrored" if m.mirrored else "") if m.verified else ""
        times = _times(m)
        at = "".join(
            f"  ({label} {times[key]:.2f} s)"
            for key, label in (("frame_seconds", "at"), ("query_seconds", "query frame at"))
            if key in times
        )
        print(f"  {rank:>2}. {m.score * 100:5.1f}%  {m.inliers:>4} inliers  {mark:<22} "
              f"{m.path}{at}")
        link = _origin(m).get("link")
        if link is not None:
            print(f"      {link}")


def _times(match: Match) -> dict[str, float]:
    """Where in a moving picture found, and in a moving query, the matching frames are."""
    times = {"frame_seconds": match.frame_seconds, "query_seconds": match.query_seconds}
    return {key: round(value, 3) for key, value in times.items() if value is not None}


def _origin(match: Match) -> dict[str, int | str]:
    """The chat message a result was posted in, and a link to it, when they are known."""
    image = match.image
    if image.origin_chat_id is None or image.origin_message_id is None:
        return {}
    origin: dict[str, int | str] = {
        "chat_id": image.origin_chat_id,
        "message_id": image.origin_message_id,
    }
    link = message_link(image.origin_chat_id, None, image.origin_message_id)
    if link is not None:
        origin["link"] = link
    return origin


def _write_sheet(
    target: Path, query: Path, matches: list[Match], settings: EngineSettings
) -> None:
    entries = [
        SheetEntry(
            image=m.path,
            label=f"#{rank} {m.path.name}\n{m.score * 100:.0f}%" + (" same" if m.verified else ""),
            highlighted=m.verified,
            seconds=m.frame_seconds,
        )
        for rank, m in enumerate(matches, start=1)
    ]
    # A moving query is shown by the frame that found its first result.
    query_seconds = matches[0].query_seconds if matches else None
    sheet = render_contact_sheet(query, entries, query_seconds=query_seconds, settings=settings)
    try:
        target.write_bytes(sheet)
    except OSError as error:
        raise IndexerError(
            f"cannot write the contact sheet to {target}: {error.strerror or error}"
        ) from error
    print(f"contact sheet written to {target}", file=sys.stderr)


async def _stats(arguments: argparse.Namespace) -> int:
    service = await SearchService.open(arguments.index)
    try:
        stats = await service.stats()
    finally:
        await service.close()
    sizes = stats.bytes_per_image
    print(f"images:            {stats.images}")
    print(f"in Annoy index:    {stats.indexed} (generation {stats.generation})")
    print(f"fresh (exact):     {stats.fresh}")
    print(f"vector dimensions: {stats.dimensions} (codebook trained on "
          f"{stats.codebook_trained_on} images)")
    print(f"files that failed: {stats.failures}")
    print(f"stored per image:  {sizes['features']:.0f} B features ({sizes['keypoints']:.0f} "
          f"keypoints) + {sizes['vector']:.0f} B vector")
    return EXIT_OK


async def _remove(arguments: argparse.Namespace) -> int:
    service = await SearchService.open(arguments.index)
    try:
        removed = await service.remove_path(arguments.path)
    finally:
        await service.close()
    print(f"removed {len(removed)} image(s): " + ", ".join(f"#{r.id}" for r in removed))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
