"""The bot's latency and throughput over HTTP, against the engine's own query time in the same run.

    .venv/bin/python -m bench.bot_latency --photos ../shared/photos --collection 200 --count 60

An index of ``--collection`` photos is built, then ``--count`` edited copies of collection
photos (as Telegram delivers photos: at most 1280 px) are searched three ways:

1. the engine alone: ``SearchService.query`` in this process, one query at a time;
2. the bot, one query at a time: the time from the moment a user's photo update is queued in
   the Bot API emulator to the moment the bot's album reaches it (long poll, download, query,
   upload or file_id, sendMediaGroup); each bot query runs right after the engine query on
   the same photo, so both see the same load from other programs;
3. the bot under load: 20 users send all the photos at once; throughput is compared with
   ``cores x`` the engine's single-query rate.

The emulator runs on its own thread and event loop, so that its work (thumbnails of the
users' photos) is not charged to the bot's loop. A watchdog task on the bot's loop sleeps
10 ms at a time and records its worst overshoot: the longest the loop was blocked.

Held-out photos (not in the collection) are also searched by the engine, to show how high an
unverified score gets for a photo that has no match: ``[search] min_score`` should sit above it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from bench.common import (
    DEFAULT_OUT_DIR,
    as_telegram_photo,
    default_workers,
    derive_seed,
    list_photos,
    load_rgb,
    machine_info,
    markdown_table,
    median,
    split_photos,
    write_json,
)
from bot.app import BotApplication, build_application
from bot.settings import parse_settings
from indexer import GLOBAL_SCOPE, CpuPool, SearchService, build_index
from testsupport.edits import apply_edit
from testsupport.engine import percentile
from testsupport.telegram_emulator import EmulatedChat, EmulatedUser, TelegramEmulator, polling

T = TypeVar("T")

SEED = 20_241_124
EDITS = ("crop", "rotate", "caption", "border", "brightness_contrast", "perspective")
TOP_N = 5
CONCURRENT_USERS = 20
WATCHDOG_SLEEP_S = 0.010
STALL_LIMIT_S = 0.100
# Phases whose stalls are the bot's: start-up (TLS context, forkserver) and the engine run
# alone in this process are reported but not held to the limit.
STARTUP = "start-up and warm-up"
ENGINE_ALONE = "engine alone (svc.query)"
BOT_SEQUENTIAL = "bot, one query at a time"
BOT_LOADED = f"bot, {CONCURRENT_USERS} users at once"
BOT_PHASES = (BOT_SEQUENTIAL, BOT_LOADED)
REPLY_DEADLINE_S = 300.0
SAMPLE_EVERY_S = 0.005
STALL_SAMPLE_AFTER_S = 0.050
OWN_PACKAGES = frozenset({"bot", "indexer", "bench", "telegram", "ext", "_utils", "request"})


class StallWatch:
    """The worst overshoot of a 10 ms sleep on the event loop, per phase, and what the loop's
    thread was running while it was late (sampled every few ms by a separate thread)."""

    def __init__(self) -> None:
        self.worst_s: dict[str, float] = {}
        self.culprits: dict[str, Counter[str]] = defaultdict(Counter)
        self.phase = STARTUP
        self._heartbeat = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="stall-sampler", daemon=True)

    async def run(self) -> None:
        self._sampler.start()
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                self._heartbeat = time.monotonic()
                await asyncio.sleep(WATCHDOG_SLEEP_S)
                self._heartbeat = time.monotonic()
                overshoot = loop.time() - started - WATCHDOG_SLEEP_S
                self.worst_s[self.phase] = max(self.worst_s.get(self.phase, 0.0), overshoot)
        finally:
            self._stop.set()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            if time.monotonic() - self._heartbeat > STALL_SAMPLE_AFTER_S:
                frame = sys._current_frames().get(self._loop_thread)
                self.culprits[self.phase][_innermost_own_frame(frame)] += 1


def _innermost_own_frame(frame: FrameType | None) -> str:
    """Where in this project's code (or a library it calls) the loop's thread is."""
    if frame is not None and Path(frame.f_code.co_filename).name == "selectors.py":
        # The loop has nothing to run: its thread is waiting for a core (or the GIL).
        return "idle in select(), waiting for a core or the GIL"
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.parent.name in OWN_PACKAGES:
            return f"{path.parent.name}/{path.name}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "outside the project"


class EmulatorThread:
    """A Bot API emulator on its own thread and event loop; call into it from the bot's loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emulator", daemon=True)
        self._emu: TelegramEmulator | None = None

    @property
    def emu(self) -> TelegramEmulator:
        if self._emu is None:
            raise RuntimeError("the emulator thread is not started")
        return self._emu

    async def __aenter__(self) -> EmulatorThread:
        self._thread.start()

        async def start() -> TelegramEmulator:
            emulator = TelegramEmulator()
            await emulator.start()
            return emulator

        self._emu = await self.run(start())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._emu is not None:
            await self.run(self._emu.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await ``coroutine`` on the emulator's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    async def call(self, function: Callable[[], T]) -> T:
        """Call ``function`` on the emulator's loop (its methods must run there)."""

        async def invoke() -> T:
            return function()

        return await self.run(invoke())


@contextlib.asynccontextmanager
async def running_bot(application: BotApplication) -> AsyncIterator[None]:
    """The run_polling sequence: initialize, post_init, poll ... stop, shutdown, post_shutdown."""
    async with application:
        if application.post_init is not None:
            await application.post_init(application)
        try:
            async with polling(application):
                yield
        finally:
            if application.post_shutdown is not None:
                await application.post_shutdown(application)


def telegram_photo(path: Path, edit: str, seed: int) -> bytes:
    """An edited copy of the photo, scaled as Telegram delivers photos, as JPEG bytes."""
    return as_telegram_photo(apply_edit(edit, load_rgb(path), seed))


def plain_photo(path: Path) -> bytes:
    return as_telegram_photo(load_rgb(path))


async def timed(action: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    started = time.perf_counter()
    result = await action()
    return result, time.perf_counter() - started


async def bot_round_trip(
    emulator: EmulatorThread, chat: EmulatedChat, user: EmulatedUser, photo: bytes
) -> float:
    """Seconds from the photo update being queued to the album reaching the emulator."""
    emu = emulator.emu

    async def scenario() -> float:
        emu.user_sends_photo(chat, user, photo)
        queued = time.monotonic()
        album = await emu.wait_for_messages(chat, TOP_N, timeout=REPLY_DEADLINE_S)
        return album[0].call.received_at - queued

    return await emulator.run(scenario())


async def flood_of_users(emulator: EmulatorThread, photos: Sequence[bytes]) -> float:
    """Seconds for CONCURRENT_USERS users, sending all ``photos`` at once, to get every album."""
    emu = emulator.emu

    async def scenario() -> float:
        users = [emu.create_user(f"Load {number}") for number in range(CONCURRENT_USERS)]
        chats = [emu.private_chat(user) for user in users]
        sent: dict[int, int] = {}
        started = time.monotonic()
        for number, photo in enumerate(photos):
            user, chat = users[number % len(users)], chats[number % len(users)]
            emu.user_sends_photo(chat, user, photo)
            sent[chat.id] = sent.get(chat.id, 0) + 1
        last = started
        for chat_id, count in sent.items():
            albums = await emu.wait_for_messages(chat_id, count * TOP_N, timeout=REPLY_DEADLINE_S)
            last = max([last, *(message.call.received_at for message in albums)])
        return last - started

    return await emulator.run(scenario())


async def measure(arguments: argparse.Namespace, index_dir: Path) -> dict[str, Any]:
    photos = list_photos(arguments.photos)
    split = split_photos(photos, arguments.collection, arguments.unrelated, SEED)
    query_sources = [split.collection[i % len(split.collection)] for i in range(arguments.count)]
    queries = [
        telegram_photo(path, EDITS[number % len(EDITS)], derive_seed(SEED, number))
        for number, path in enumerate(query_sources)
    ]
    unrelated = [plain_photo(path) for path in split.unrelated]

    folder = _collection_folder(split.collection, index_dir.parent / "photos")
    build_report, build_s = await timed(
        lambda: build_index(folder, index_dir, workers=arguments.workers, progress=False)
    )
    print(f"indexed {build_report.images} photos in {build_s:.1f} s", flush=True)

    watch = StallWatch()
    watchdog = asyncio.create_task(watch.run())
    engine_s: list[float] = []
    bot_s: list[float] = []
    found_first: list[bool] = []
    unrelated_best: list[float] = []
    pool = CpuPool.processes(arguments.workers)
    service = await SearchService.open(index_dir, pool=pool)
    try:
        async with EmulatorThread() as emulator:
            emu = emulator.emu
            settings = parse_settings(
                {
                    "telegram": {
                        "token": emu.token,
                        "api_base_url": emu.api_base_url,
                        "api_file_url": emu.file_base_url,
                    },
                    "index": {"dir": str(index_dir), "workers": arguments.workers},
                    "search": {"top_n": TOP_N, "min_score": 0.0},
                    "access": {"queries_per_minute": 0},
                    "runtime": {"concurrent_updates": 16, "notify_admins_on_error": False},
                },
                environ={},
                base_dir=index_dir.parent,
            )
            async with running_bot(build_application(settings)):
                user = await emulator.call(lambda: emu.create_user("Bench"))
                chat = await emulator.call(lambda: emu.private_chat(user))
                # Warm-up: workers import OpenCV on their first task.
                await service.query(queries[0], scope=GLOBAL_SCOPE, top=TOP_N)
                await bot_round_trip(emulator, chat, user, queries[0])
                for number, (source, photo) in enumerate(zip(query_sources, queries, strict=True)):
                    watch.phase = ENGINE_ALONE
                    matches, seconds = await timed(
                        lambda photo=photo: service.query(photo, scope=GLOBAL_SCOPE, top=TOP_N)
                    )
                    engine_s.append(seconds)
                    found_first.append(bool(matches) and Path(matches[0].path).name == source.name)
                    watch.phase = BOT_SEQUENTIAL
                    bot_s.append(await bot_round_trip(emulator, chat, user, photo))
                    if (number + 1) % 10 == 0:
                        print(f"  {number + 1}/{len(queries)} queries", flush=True)
                watch.phase = ENGINE_ALONE
                for photo in unrelated:
                    matches = await service.query(photo, scope=GLOBAL_SCOPE, top=TOP_N)
                    unverified = [match.score for match in matches if not match.verified]
                    unrelated_best.append(max(unverified, default=0.0))
                watch.phase = BOT_LOADED
                flood_s = await flood_of_users(emulator, queries)
    finally:
        await service.close()
        pool.shutdown()
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog

    workers = arguments.workers
    engine_median = median(engine_s)
    throughput = len(queries) / flood_s
    ideal = workers / engine_median
    return {
        "machine": machine_info(),
        "collection": build_report.images,
        "queries": len(queries),
        "workers": workers,
        "engine_s": {"p50": engine_median, "p95": percentile(engine_s, 0.95)},
        "bot_s": {"p50": median(bot_s), "p95": percentile(bot_s, 0.95)},
        "bot_over_engine_p50": median(bot_s) / engine_median,
        "bot_minus_engine_p50_s": median(b - e for b, e in zip(bot_s, engine_s, strict=True)),
        "first_result_is_the_original": sum(found_first) / len(found_first),
        "throughput_per_s": throughput,
        "ideal_per_s": ideal,
        "throughput_over_ideal": throughput / ideal,
        "flood_seconds": flood_s,
        "worst_loop_stall_s": watch.worst_s,
        "stall_culprits_ms": {
            phase: {
                where: round(samples * SAMPLE_EVERY_S * 1000)
                for where, samples in counter.most_common(5)
            }
            for phase, counter in watch.culprits.items()
        },
        "unrelated_best_unverified_score": {
            "p50": median(unrelated_best) if unrelated_best else None,
            "p95": percentile(unrelated_best, 0.95) if unrelated_best else None,
            "max": max(unrelated_best, default=None),
        },
        "raw": {"engine_s": engine_s, "bot_s": bot_s},
    }


def _collection_folder(photos: Sequence[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        target = folder / photo.name
        if not target.exists():
            target.symlink_to(photo.resolve())
    return folder


def report(results: dict[str, Any]) -> str:
    stalls = results["worst_loop_stall_s"]
    rows = [
        (
            "engine query (svc.query)",
            f"{results['engine_s']['p50']:.3f}",
            f"{results['engine_s']['p95']:.3f}",
            "1.00",
        ),
        (
            "bot: photo update to album",
            f"{results['bot_s']['p50']:.3f}",
            f"{results['bot_s']['p95']:.3f}",
            f"{results['bot_over_engine_p50']:.2f}",
        ),
    ]
    lines = [
        f"{results['collection']} photos, {results['queries']} queries, "
        f"{results['workers']} workers; original first in "
        f"{100 * results['first_result_is_the_original']:.0f}% of queries",
        "",
        markdown_table(("latency", "p50 s", "p95 s", "p50 / engine p50"), rows),
        "",
        markdown_table(
            ("throughput", "queries/s", "share of ideal"),
            [
                (
                    f"{CONCURRENT_USERS} users at once",
                    f"{results['throughput_per_s']:.2f}",
                    f"{100 * results['throughput_over_ideal']:.0f}%",
                ),
                (
                    f"ideal: {results['workers']} x 1 / engine p50",
                    f"{results['ideal_per_s']:.2f}",
                    "100%",
                ),
            ],
        ),
        "",
        markdown_table(
            ("event loop", "worst stall ms", f"under {STALL_LIMIT_S * 1000:.0f} ms"),
            [
                (
                    phase,
                    f"{1000 * value:.1f}",
                    ("yes" if value < STALL_LIMIT_S else "NO")
                    if phase in BOT_PHASES
                    else "(not held)",
                )
                for phase, value in stalls.items()
            ],
        ),
    ]
    for phase in BOT_PHASES:
        culprits = results["stall_culprits_ms"].get(phase, {})
        if culprits:
            lines += ["", f"while the loop was late ({phase}), its thread was in (ms sampled):"]
            lines += [f"  {ms:>6} ms  {where}" for where, ms in culprits.items()]
    unrelated = results["unrelated_best_unverified_score"]
    if unrelated["p50"] is not None:
        lines += [
            "",
            "best unverified score of photos not in the collection: "
            f"p50 {unrelated['p50']:.3f}, p95 {unrelated['p95']:.3f}, max {unrelated['max']:.3f}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--collection", type=int, default=200, help="photos in the index")
    parser.add_argument("--count", type=int, default=60, help="queries")
    parser.add_argument("--unrelated", type=int, default=20, help="held-out photos searched")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "bot_latency.json")
    arguments = parser.parse_args(argv)
    if arguments.count < CONCURRENT_USERS:
        parser.error(f"--count must be at least {CONCURRENT_USERS} (one photo per user)")
    workspace = Path(tempfile.mkdtemp(prefix="bot-latency-"))
    try:
        results = asyncio.run(measure(arguments, workspace / "index"))
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    write_json(arguments.out, results)
    print(report(results))
    print(f"\nwrote {arguments.out}")
    stalls = results["worst_loop_stall_s"]
    worst = max((stalls[phase] for phase in BOT_PHASES if phase in stalls), default=0.0)
    return 0 if worst < STALL_LIMIT_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
