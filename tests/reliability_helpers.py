"""Helpers of the reliability and security suites (test_reliability_*.py, test_security.py).

* engine settings that keep KAZE cheap enough for hundreds of queries on two cores;
* a catalog health check (duplicates, orphans, SQLite's own integrity check) that reads the
  database with the standard library, independently of the engine;
* the real entry points as processes (``python -m indexer``, ``python -m bot``) started in their
  own process group, so a SIGKILL takes the whole application (workers included) down at once;
* a worker process that runs calls which might crash the interpreter (a segfault in a native
  library) or hang, and reports that as an outcome instead of taking pytest down;
* measuring: latency percentiles, the worst event-loop stall, resident memory;
* the Bot API emulator in a process of its own, so the bot's process holds only the bot;
* ``report_figures``: one line of figures per run for docs/RELIABILITY.md (printed, and appended
  as JSON to the file named by $RELIABILITY_FIGURES when it is set).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sqlite3
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from http import HTTPStatus
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final, TypeVar

import psutil

from indexer.errors import IndexerError
from indexer.search import CATALOG_FILE, GENERATIONS_DIR, ORIGINALS_DIR, SearchService
from indexer.settings import EngineSettings
from indexer.workers import CpuPool
from testsupport.engine import build_collection, percentile
from testsupport.telegram_emulator import SentMessage, TelegramEmulator

T = TypeVar("T")

REPOSITORY: Final = Path(__file__).resolve().parent.parent

# A smaller working image (320 px) and fewer keypoints make KAZE about four times cheaper than the
# product defaults, and a 16-centroid codebook suits collections of a few dozen to a few hundred
# images. Verification still finds every edited original (checked by the tests that use it).
FAST_ENGINE: Final = EngineSettings(
    working_side=320,
    min_side=200,
    max_keypoints=300,
    query_keypoints=400,
    centroids=16,
    dimensions=32,
)

# Only ends a hung test: a normal step takes seconds.
PROCESS_DEADLINE_S: Final = 120.0

# Text that must never reach a user: tracebacks, exception names, source locations.
LEAK_MARKERS: Final = ("Traceback", 'File "', "Exception", "Error:", ".py", "sqlite", "errno")


def report_figures(name: str, **figures: object) -> None:
    """Print one line of figures; also append it as JSON to $RELIABILITY_FIGURES if set."""
    line = json.dumps({"run": name, **figures}, sort_keys=True, default=str)
    print(f"RELIABILITY-FIGURES {line}")
    target = os.environ.get("RELIABILITY_FIGURES")
    if target:
        with Path(target).open("a", encoding="utf-8") as stream:
            stream.write(line + "\n")


def leaks(text: str | None, *extra: str) -> list[str]:
    """The leak markers (and ``extra`` strings, such as server paths) found in ``text``."""
    return [marker for marker in (*LEAK_MARKERS, *extra) if marker and marker in (text or "")]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- indexes -------------------------------------------------------------------------------------


async def create_empty_index(index_dir: Path, settings: EngineSettings = FAST_ENGINE) -> None:
    """An index folder whose catalog holds ``settings``: later builds and the bot keep them."""
    service = await SearchService.open(index_dir, settings=settings, create=True)
    await service.close()


def build_template_index(
    photos_dir: Path,
    root: Path,
    names: Iterable[str],
    saved_as: Callable[[str], str] = lambda name: name,
) -> Path:
    """An index under ``root`` of the named photos of ``photos_dir``, built once per module;
    each is copied to the file name ``saved_as(name)`` (a caption shows it)."""
    return build_collection(
        [photos_dir / f"{name}.jpg" for name in names],
        root / "index",
        settings=FAST_ENGINE,
        saved_as=lambda photo: f"{saved_as(photo.stem)}.jpg",
    )


@contextlib.asynccontextmanager
async def service_of(
    index_dir: Path,
    *,
    settings: EngineSettings = FAST_ENGINE,
    threads: int = 0,
    max_catalog_bytes: int | None = None,
) -> AsyncIterator[SearchService]:
    """The search service of ``index_dir``: inline, or on ``threads`` threads (KAZE and
    OpenCV release the GIL, so threads do run in parallel)."""
    executor = concurrent.futures.ThreadPoolExecutor(threads) if threads else None
    pool = CpuPool(executor, threads or 1)
    service = await SearchService.open(
        index_dir, settings=settings, pool=pool, max_catalog_bytes=max_catalog_bytes
    )
    try:
        yield service
    finally:
        await service.close()
        pool.shutdown()


# --- catalog health ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CatalogHealth:
    """What a reader of the catalog file finds, the engine aside."""

    images: int
    integrity: str  # "ok" from PRAGMA integrity_check
    duplicate_paths: list[tuple[int, str]]  # (scope, path) held by more than one image
    features_without_image: int
    vectors_without_image: int
    images_without_features: int
    original_paths: frozenset[str]  # paths of stored originals (relative to the index folder)
    content_hashes: frozenset[str]

    @property
    def problems(self) -> list[str]:
        found = []
        if self.integrity != "ok":
            found.append(f"integrity_check: {self.integrity}")
        if self.duplicate_paths:
            found.append(f"duplicate paths: {self.duplicate_paths[:5]}")
        for label, count in (
            ("features rows without an image", self.features_without_image),
            ("vectors rows without an image", self.vectors_without_image),
            ("images without features", self.images_without_features),
        ):
            if count:
                found.append(f"{count} {label}")
        return found


def catalog_health(index_dir: Path) -> CatalogHealth:
    """Read the catalog of ``index_dir`` with the standard library (and let SQLite recover a
    journal a killed writer left, as any next opener does)."""
    connection = sqlite3.connect(index_dir / CATALOG_FILE, timeout=30)
    try:

        def scalar(sql: str) -> Any:
            return connection.execute(sql).fetchone()[0]

        return CatalogHealth(
            images=int(scalar("SELECT count(*) FROM images WHERE video_id IS NULL")),  # not frames
            integrity=str(scalar("PRAGMA integrity_check")),
            duplicate_paths=[
                (int(scope), str(path))
                for scope, path in connection.execute(
                    "SELECT scope, path FROM images GROUP BY scope, path HAVING count(*) > 1"
                )
            ],
            features_without_image=int(
                scalar(
                    "SELECT count(*) FROM features WHERE image_id NOT IN (SELECT id FROM images)"
                )
            ),
            vectors_without_image=int(
                scalar("SELECT count(*) FROM vectors WHERE image_id NOT IN (SELECT id FROM images)")
            ),
            images_without_features=int(
                scalar(
                    "SELECT count(*) FROM images WHERE id NOT IN (SELECT image_id FROM features)"
                )
            ),
            original_paths=frozenset(
                str(row[0])
                for row in connection.execute(
                    "SELECT path FROM images WHERE path LIKE ?", (f"{ORIGINALS_DIR}/%",)
                )
            ),
            content_hashes=frozenset(
                str(row[0]) for row in connection.execute("SELECT content_hash FROM images")
            ),
        )
    finally:
        connection.close()


def images_with_hash(index_dir: Path, content_hash: str) -> list[tuple[int, int, str]]:
    """(id, scope, path) of the catalog's images with these bytes."""
    connection = sqlite3.connect(index_dir / CATALOG_FILE, timeout=30)
    try:
        rows = connection.execute(
            "SELECT id, scope, path FROM images WHERE content_hash = ? ORDER BY id",
            (content_hash,),
        ).fetchall()
    finally:
        connection.close()
    return [(int(i), int(scope), str(path)) for i, scope, path in rows]


def files_under(folder: Path) -> set[str]:
    """Every file below ``folder`` (hidden and temporary ones too), relative to ``folder``."""
    if not folder.exists():
        return set()
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir()}


def original_files(index_dir: Path) -> set[str]:
    """Files under originals/, as paths relative to the index folder (like the catalog's)."""
    return {f"{ORIGINALS_DIR}/{name}" for name in files_under(index_dir / ORIGINALS_DIR)}


def generation_leftovers(index_dir: Path) -> list[str]:
    """Half-written generation folders (``.building-*``) in the index."""
    root = index_dir / GENERATIONS_DIR
    if not root.exists():
        return []
    return sorted(entry.name for entry in root.iterdir() if entry.name.startswith("."))


# --- processes -----------------------------------------------------------------------------------


def subprocess_environment(**extra: str) -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")])
    )
    environment.update(extra)
    return environment


def kill_group(process_id: int) -> None:
    """SIGKILL the process group a test started (``start_new_session=True``): the program and
    its worker processes die together, as in a power cut or an OOM kill of the service."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process_id, signal.SIGKILL)


async def started_script(
    script: str, *arguments: str | Path | int
) -> tuple[asyncio.subprocess.Process, bytes]:
    """Start ``python -c script *arguments`` in its own process group and wait for the line
    it prints when it is ready (starting with "ready"): the process (its stdout still
    readable) and that line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *map(str, arguments),
        env=subprocess_environment(),
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    ready = await asyncio.wait_for(process.stdout.readline(), PROCESS_DEADLINE_S)
    assert ready.startswith(b"ready"), ready
    return process, ready


async def run_process(
    *arguments: str | Path, cwd: Path = REPOSITORY, environment: Mapping[str, str] | None = None
) -> tuple[int, str, str]:
    """Run ``python *arguments`` to completion (its own process group); (status, out, err)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *map(str, arguments),
        cwd=cwd,
        env=dict(environment or subprocess_environment()),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), PROCESS_DEADLINE_S)
    except TimeoutError:
        kill_group(process.pid)
        await process.wait()
        raise
    return int(process.returncode or 0), out.decode(), err.decode()


def write_bot_config(
    path: Path,
    emu: TelegramEmulator,
    index_dir: Path,
    *,
    workers: int = 1,
    log_level: str = "INFO",
    access: str = "queries_per_minute = 0",
    notify_admins: bool = False,
) -> Path:
    """A config file for ``python -m bot`` against ``emu`` (the token goes in the environment)."""
    path.write_text(
        "[telegram]\n"
        f'api_base_url = "{emu.api_base_url}"\n'
        f'api_file_url = "{emu.file_base_url}"\n'
        "[index]\n"
        f'dir = "{index_dir}"\n'
        f"workers = {workers}\n"
        "[search]\n"
        "min_score = 0.0\n"
        "[access]\n"
        f"{access}\n"
        "[runtime]\n"
        f'log_level = "{log_level}"\n'
        f"notify_admins_on_error = {'true' if notify_admins else 'false'}\n",
        encoding="utf-8",
    )
    return path


@dataclass(slots=True)
class BotProcess:
    """``python -m bot`` running in its own process group, its stderr collected."""

    process: asyncio.subprocess.Process
    stderr: asyncio.Task[bytes]

    @classmethod
    async def start(cls, config: Path, token: str) -> BotProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "--config",
            str(config),
            cwd=REPOSITORY,
            env=subprocess_environment(TELEGRAM_BOT_TOKEN=token),
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert process.stderr is not None
        return cls(process, asyncio.create_task(process.stderr.read()))

    async def kill(self) -> str:
        """SIGKILL the bot and its workers; return what it logged."""
        kill_group(self.process.pid)
        await self.process.wait()
        return (await self.stderr).decode(errors="replace")

    async def stop(self) -> tuple[int, str]:
        """SIGTERM (a clean stop, as systemd does it); return the exit status and the log."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            status = await asyncio.wait_for(self.process.wait(), PROCESS_DEADLINE_S)
        except TimeoutError:
            kill_group(self.process.pid)
            status = await self.process.wait()
        # Workers the bot leaves behind would be a bug of their own; do not let them linger.
        kill_group(self.process.pid)
        return status, (await self.stderr).decode(errors="replace")


# --- calls that may crash or hang the interpreter ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one isolated call.

    ``kind`` is "returned", "raised", "crashed" (the worker process died) or "hung".
    """

    kind: str
    value: Any = None
    error_type: str | None = None
    indexer_error: bool = False
    user_message: str | None = None
    detail: str = ""

    def describe(self) -> str:
        return f"{self.kind}: {self.error_type or ''} {self.detail}".strip()


def _call_and_describe(function: Callable[..., Any], arguments: tuple[Any, ...]) -> Outcome:
    """Runs in the worker: turn whatever happens into plain, picklable data."""
    try:
        value = function(*arguments)
    except IndexerError as error:
        return Outcome(
            "raised",
            error_type=f"{type(error).__module__}.{type(error).__qualname__}",
            indexer_error=True,
            user_message=error.user_message,
            detail=str(error),
        )
    except Exception as error:  # the point: report any other exception type
        return Outcome(
            "raised",
            error_type=f"{type(error).__module__}.{type(error).__qualname__}",
            detail=f"{error} | {traceback.format_exc(limit=3)}",
        )
    return Outcome("returned", value=value)


class IsolatedCalls:
    """Runs module-level functions in one worker process and survives its death.

    A segfault or an abort in a native library (OpenCV, Pillow's decoders) kills the worker; the
    outcome is then "crashed" and the next call starts a fresh worker. A call that does not
    finish within ``timeout_s`` is "hung" and its worker is killed.
    """

    def __init__(self, timeout_s: float = 30.0) -> None:
        self._timeout_s = timeout_s
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.restarts = 0

    def __enter__(self) -> IsolatedCalls:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._discard(kill=False)

    def run(self, function: Callable[..., T], *arguments: Any) -> Outcome:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("forkserver")
            )
        future = self._pool.submit(_call_and_describe, function, arguments)
        try:
            return future.result(timeout=self._timeout_s)
        except BrokenProcessPool as error:
            self._discard(kill=True)
            return Outcome("crashed", detail=f"the worker process died: {error}")
        except TimeoutError:
            self._discard(kill=True)
            return Outcome("hung", detail=f"no answer within {self._timeout_s} s")

    def _discard(self, *, kill: bool) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if kill:
            self.restarts += 1
            # The executor keeps its processes privately; a hung one must be killed by pid.
            for process in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(ProcessLookupError, AttributeError):
                    os.kill(process.pid, signal.SIGKILL)
        pool.shutdown(wait=True, cancel_futures=True)


# --- measuring -----------------------------------------------------------------------------------


def latency_summary(seconds: Iterable[float]) -> dict[str, float]:
    values = list(seconds)
    return {
        "count": len(values),
        "p50_s": round(percentile(values, 0.50), 3),
        "p95_s": round(percentile(values, 0.95), 3),
        "p99_s": round(percentile(values, 0.99), 3),
        "max_s": round(max(values), 3) if values else math.nan,
    }


class LoopStallMonitor:
    """Measures how late the running event loop wakes a 10 ms sleeper: the worst value is the
    longest time the loop was blocked (plus scheduling noise)."""

    TICK_S: Final = 0.01

    def __init__(self) -> None:
        self.worst_s = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopStallMonitor:
        self._task = asyncio.create_task(self._watch(), name="loop-stall-monitor")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.TICK_S)
            self.worst_s = max(self.worst_s, loop.time() - started - self.TICK_S)
            self.ticks += 1


def resident_memory(exclude: Iterable[int] = ()) -> dict[str, int]:
    """Resident set sizes in bytes: this process, and its child processes (but ``exclude``,
    and their children) together."""
    me = psutil.Process()
    left_out = set(exclude)
    children = 0
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.pid in left_out or child.ppid() in left_out:
                continue
            children += child.memory_info().rss
    return {"main": me.memory_info().rss, "workers": children}


# --- the emulator in a process of its own ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A message the bot posted, reduced to what a load run checks (picklable, small)."""

    chat_id: int
    reply_to_message_id: int | None
    text: str
    received_at: float  # time.monotonic() of the emulator process: the clock is system-wide
    call: int  # which API call posted it (an album's messages share one)


def _emulator_command(emu: TelegramEmulator, command: str, arguments: tuple[Any, ...]) -> Any:
    """Runs in the emulator's process, on its event loop."""
    if command == "create_user":
        return emu.create_user(*arguments)
    if command == "private_chat":
        return emu.private_chat(*arguments)
    if command == "flood_random_share":
        method, share, seed = arguments
        return emu.flood_random_share(method, share, seed=seed)
    if command == "user_sends_photo":
        chat, user, data, caption = arguments
        message = emu.user_sends_photo(chat, user, data, caption=caption)
        return time.monotonic(), int(message["message_id"])
    if command == "replies_since":
        (start,) = arguments
        return (
            [
                Reply(
                    output.chat_id,
                    output.reply_to_message_id,
                    output.text or "",
                    output.call.received_at,
                    id(output.call),  # calls are kept for good: their ids stay unique
                )
                for output in emu.outbox[start:]
                if isinstance(output, SentMessage)
            ],
            len(emu.outbox),
        )
    if command == "refused_calls":
        return sum(1 for call in emu.calls if call.http_status == HTTPStatus.TOO_MANY_REQUESTS)
    raise ValueError(f"unknown emulator command {command!r}")


def _serve_emulator(connection: Connection) -> None:
    """The emulator process: start it, report its addresses, then obey commands until "stop"."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        async with TelegramEmulator() as emu:
            connection.send((emu.token, emu.api_base_url, emu.file_base_url))
            while True:
                command, arguments = await loop.run_in_executor(None, connection.recv)
                if command == "stop":
                    break
                try:
                    result: Any = _emulator_command(emu, command, arguments)
                except Exception as error:  # sent back and raised in the test
                    result = error
                connection.send(result)

    asyncio.run(serve())


class EmulatorProcess:
    """The Bot API emulator in a process of its own.

    The bot under test then has the test's process and event loop to itself: the resident memory
    and the event-loop stalls measured there are the bot's, not the emulator's, which keeps
    every message and upload it ever saw. The test drives it with :meth:`command`.
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("forkserver")
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_serve_emulator, args=(child,), name="emulator", daemon=True
        )
        self._lock = asyncio.Lock()
        self.token = self.api_base_url = self.file_base_url = ""

    async def __aenter__(self) -> EmulatorProcess:
        self._process.start()
        addresses = await asyncio.wait_for(
            asyncio.to_thread(self._connection.recv), PROCESS_DEADLINE_S
        )
        self.token, self.api_base_url, self.file_base_url = addresses
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self._connection.send(("stop", ()))
        await asyncio.to_thread(self._process.join, 10)
        if self._process.is_alive():
            self._process.kill()
            await asyncio.to_thread(self._process.join, 10)

    @property
    def pid(self) -> int:
        return int(self._process.pid or 0)

    async def command(self, command: str, *arguments: Any) -> Any:
        """Run one of :func:`_emulator_command`'s commands in the emulator's process."""
        async with self._lock:

            def exchange() -> Any:
                self._connection.send((command, arguments))
                return self._connection.recv()

            result = await asyncio.wait_for(asyncio.to_thread(exchange), PROCESS_DEADLINE_S)
        if isinstance(result, Exception):
            raise result
        return result


def replies_by_request(
    messages: Iterable[Any], chat_id: int | None = None
) -> dict[tuple[int, int], list[Any]]:
    """The bot's messages grouped by the (chat id, message id) they reply to."""
    grouped: dict[tuple[int, int], list[Any]] = {}
    for message in messages:
        if chat_id is not None and message.chat_id != chat_id:
            continue
        replied = message.reply_to_message_id
        if replied is not None:
            grouped.setdefault((message.chat_id, replied), []).append(message)
    return grouped


def deliveries(messages: Sequence[Any]) -> int:
    """How many API calls delivered these messages (an album is one call)."""
    return len({m.call if isinstance(m, Reply) else id(m.call) for m in messages})


def sent_time(message: Any) -> float:
    return float(message.call.received_at)


def now() -> float:
    return time.monotonic()
