"""Helpers of the reliability and security suites (test_reliability_*.py, test_security.py).

* engine settings that keep KAZE cheap enough for hundreds of queries on two cores;
* a catalog health check (duplicates, orphans, SQLite's own integrity check) that reads the
  database with the standard library, independently of the engine;
* the real entry points as processes (``python -m indexer``, ``python -m bot``) started in their
  own process group, so a SIGKILL takes the whole application (workers included) down at once;
* a worker process that runs calls which might crash the interpreter (a segfault in a native
  library) or hang, and reports that as an outcome instead of taking pytest down;
* measuring: latency percentiles, the worst event-loop stall, resident memory;
* the Bot API emulator on a thread of its own, so the bot's event loop carries only the bot;
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
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import psutil
from telegram_emulator import TelegramEmulator

from indexer.errors import IndexerError
from indexer.search import CATALOG_FILE, GENERATIONS_DIR, ORIGINALS_DIR, SearchService
from indexer.settings import EngineSettings
from indexer.workers import CpuPool

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


async def build_with(photos: Path, index_dir: Path, settings: EngineSettings = FAST_ENGINE) -> None:
    """Build ``index_dir`` from ``photos`` in this process with two workers."""
    from indexer.build import build_index

    await build_index(photos, index_dir, workers=2, progress=False, settings=settings)


@contextlib.asynccontextmanager
async def service_of(
    index_dir: Path, *, settings: EngineSettings = FAST_ENGINE, threads: int = 0
) -> AsyncIterator[SearchService]:
    """The search service of ``index_dir``: inline, or on ``threads`` threads (KAZE and
    OpenCV release the GIL, so threads do run in parallel)."""
    executor = concurrent.futures.ThreadPoolExecutor(threads) if threads else None
    pool = CpuPool(executor, threads or 1)
    service = await SearchService.open(index_dir, settings=settings, pool=pool)
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
            images=int(scalar("SELECT count(*) FROM images")),
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


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in 0..1) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


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


def resident_memory() -> dict[str, int]:
    """Resident set sizes in bytes: this process, and its worker processes together."""
    me = psutil.Process()
    children = 0
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            children += child.memory_info().rss
    return {"main": me.memory_info().rss, "workers": children}


# --- the emulator on a thread of its own ---------------------------------------------------------


class EmulatorThread:
    """A :class:`TelegramEmulator` served by an event loop on its own thread.

    The bot under test then has the test's event loop to itself, so a stall measured there is
    the bot's. Every use of the emulator goes through :meth:`call` (a function run on the
    emulator's loop) or :meth:`wait` (a coroutine run there), as the emulator requires.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emulator", daemon=True)
        self._emulator: TelegramEmulator | None = None

    async def __aenter__(self) -> EmulatorThread:
        self._thread.start()

        async def start() -> TelegramEmulator:
            emulator = TelegramEmulator(**self._options)
            await emulator.start()
            return emulator

        self._emulator = await self.wait(start())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._emulator is not None:
                await self.wait(self._emulator.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 10)
            self._loop.close()

    @property
    def emu(self) -> TelegramEmulator:
        """The emulator: read its constant attributes (token, urls) directly, nothing else."""
        if self._emulator is None:
            raise RuntimeError("the emulator thread is not running")
        return self._emulator

    async def call(self, function: Callable[..., T], *arguments: Any, **options: Any) -> T:
        """``function(*arguments, **options)`` run on the emulator's loop."""

        async def run() -> T:
            return function(*arguments, **options)

        return await self.wait(run())

    async def wait(self, coroutine: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return await asyncio.wrap_future(future)


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
    return len({id(message.call) for message in messages})


def sent_time(message: Any) -> float:
    return float(message.call.received_at)


def now() -> float:
    return time.monotonic()
