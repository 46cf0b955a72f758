"""Load through the Bot API emulator on loopback: simulated users searching and adding photos
at once while the emulator answers a share of the bot's calls with 429 (flood control).

Every request must be answered exactly once, nothing lost, every added photo found again
afterwards; the run reports latency percentiles (request queued -> first reply received), the
worst event-loop stall of the bot, and resident memory. The full run (50 users, 500 searches,
100 adds, 1000 requests in all) is marked slow; a small one (10 users, 30 searches) keeps the
path exercised by ``make test``.

The emulator runs in a process of its own (``EmulatorProcess``): the process and the event loop
measured are the bot's (the users are coroutines on that loop, which only send and wait), and the
emulator's records of every message do not count as the bot's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bot_fixtures import bot_settings, edited_photo, running
from engine_fixtures import shapes_jpeg
from PIL import Image
from reliability_helpers import (
    FAST_ENGINE,
    EmulatorProcess,
    LoopStallMonitor,
    Reply,
    build_template_index,
    catalog_health,
    deliveries,
    latency_summary,
    leaks,
    original_files,
    report_figures,
    resident_memory,
)

from bot.app import build_application
from testsupport.telegram_emulator import EmulatedChat, EmulatedUser

COLLECTION = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick")
FLOODED_METHODS = ("sendMessage", "sendPhoto", "sendMediaGroup", "sendChatAction", "getFile")
ADDED_AS = re.compile(r"^(?:✅ Added as|☑️ Already in this chat's collection as) #(\d+)\.")
REPLY_DEADLINE_S = 600.0  # ends a hung run; a loaded two-core machine answers in seconds


def query_pool() -> dict[str, list[bytes]]:
    """Two different edits (crop, turn, recompression) of each collection photo."""
    return {
        name: [edited_photo(name), edited_photo(name, angle=-3.0, keep=0.7, quality=75)]
        for name in COLLECTION
    }


def drawing(seed: int) -> bytes:
    return shapes_jpeg(seed, (240, 180))


def cropped(data: bytes) -> bytes:
    """The picture with a border cut off and recompressed: the same picture, another file."""
    picture = Image.open(io.BytesIO(data)).convert("RGB").crop((10, 8, 230, 172))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def template_index(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_template_index(photos_dir, tmp_path_factory.mktemp("load"), COLLECTION)


# --- the users' side --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    kind: str  # "search", "add" or "find-added"
    expected: str  # the photo name a search must find first, or the drawing's seed
    data: bytes


@dataclass(slots=True)
class Answer:
    request: Request
    chat_id: int
    message_id: int
    sent_at: float


class ReplyCollector:
    """Fetches the bot's new messages from the emulator every few milliseconds and hands each
    reply to the request it answers. (Latency is taken from the emulator's own clock, so the
    polling adds nothing to it.)"""

    POLL_S = 0.02

    def __init__(self, emulator: EmulatorProcess) -> None:
        self._emulator = emulator
        self._cursor = 0
        self.replies: dict[tuple[int, int], list[Reply]] = {}
        self._waiting: dict[tuple[int, int], asyncio.Future[None]] = {}
        self.answered = 0
        self.on_answer: list[Callable[[int], None]] = []  # run with the count answered

    async def run(self) -> None:
        while True:
            await self.collect()
            await asyncio.sleep(self.POLL_S)

    async def collect(self) -> None:
        fresh, self._cursor = await self._emulator.command("replies_since", self._cursor)
        for reply in fresh:
            if reply.reply_to_message_id is None:
                continue
            key = (reply.chat_id, reply.reply_to_message_id)
            first = key not in self.replies
            self.replies.setdefault(key, []).append(reply)
            if first:
                self.answered += 1
                for callback in self.on_answer:
                    callback(self.answered)
            waiter = self._waiting.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def wait(self, key: tuple[int, int]) -> None:
        if key in self.replies:
            return
        waiter = self._waiting.setdefault(key, asyncio.get_running_loop().create_future())
        await asyncio.wait_for(waiter, REPLY_DEADLINE_S)


async def user_session(
    emulator: EmulatorProcess,
    collector: ReplyCollector,
    *,
    chat: EmulatedChat,
    user: EmulatedUser,
    requests: list[Request],
    answers: list[Answer],
    rng: random.Random,
    think_s: tuple[float, float],
) -> None:
    """One user: send a request, wait for its answer, think a moment, send the next."""
    for request in requests:
        caption = "/add" if request.kind == "add" else None
        sent_at, message_id = await emulator.command(
            "user_sends_photo", chat, user, request.data, caption
        )
        answers.append(Answer(request, chat.id, message_id, sent_at))
        await collector.wait((chat.id, message_id))
        if think_s[1]:
            await asyncio.sleep(rng.uniform(*think_s))


# --- one load run -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadPlan:
    users: int
    searches: int
    adds: int
    extra_searches: int  # after the adds were checked, to reach the request count for memory
    think_s: tuple[float, float]  # each user pauses this long (uniformly) between requests
    flood_share: float
    rebuild_after_fresh: int
    memory_from: int | None = None  # measure resident memory growth from this answer count
    seed: int = 0


@dataclass(slots=True)
class LoadOutcome:
    answers: list[Answer]
    replies: dict[tuple[int, int], list[Reply]]
    worst_stall_s: float
    memory: dict[int, dict[str, int]]
    floods: int
    seconds: float
    rebuilds: int


def spread(requests: list[Request], users: int, rng: random.Random) -> list[list[Request]]:
    rng.shuffle(requests)
    return [requests[number::users] for number in range(users)]


async def run_load(template: Path, tmp_path: Path, plan: LoadPlan) -> LoadOutcome:
    index = Path(shutil.copytree(template, tmp_path / "index"))
    rng = random.Random(plan.seed)
    pool = query_pool()
    searches = [
        Request("search", name, pool[name][number % 2])
        for number, name in enumerate(rng.choices(COLLECTION, k=plan.searches))
    ]
    adds = [Request("add", str(seed), drawing(1000 + seed)) for seed in range(plan.adds)]
    answers: list[Answer] = []
    memory: dict[int, dict[str, int]] = {}
    engine = dataclasses.replace(FAST_ENGINE, rebuild_after_fresh=plan.rebuild_after_fresh)

    async with EmulatorProcess() as emulator:
        users = [await emulator.command("create_user", f"User {n}") for n in range(plan.users)]
        chats = [await emulator.command("private_chat", user) for user in users]
        for number, method in enumerate(FLOODED_METHODS):
            await emulator.command(
                "flood_random_share", method, plan.flood_share, plan.seed + number
            )
        settings = bot_settings(emulator, index, search={"top_n": 3})  # duck-typed: token, URLs
        collector = ReplyCollector(emulator)
        total = plan.searches + 2 * plan.adds + plan.extra_searches

        generations: set[str | None] = set()

        def sample(answered: int) -> None:
            if answered in {plan.memory_from, total}:
                memory[answered] = resident_memory(exclude=[emulator.pid])
            if application.bot_data.service is not None:
                generations.add(application.bot_data.service.generation_name)

        collector.on_answer.append(sample)
        application = build_application(settings, engine_settings=engine)
        started = time.monotonic()
        async with running(application), LoopStallMonitor() as monitor:
            watcher = asyncio.create_task(collector.run())
            try:

                async def phase(requests: list[Request], think_s: tuple[float, float]) -> None:
                    per_user = spread(requests, plan.users, rng)
                    await asyncio.gather(
                        *(
                            user_session(
                                emulator, collector, chat=chat, user=user, requests=mine,
                                answers=answers, rng=random.Random(rng.random()),
                                think_s=think_s,
                            )
                            for chat, user, mine in zip(chats, users, per_user, strict=True)
                        )
                    )  # fmt: skip

                # Phase 1: searches and adds mixed. Each add is made by one user, in their chat.
                await phase(searches + adds, plan.think_s)
                # Phase 2: every added drawing is searched for (with another file) where added.
                added_in = {
                    a.request.expected: a.chat_id for a in answers if a.request.kind == "add"
                }
                finds = [
                    Request("find-added", seed, cropped(drawing(1000 + int(seed))))
                    for seed in sorted(added_in, key=int)
                ]
                await asyncio.gather(
                    *(
                        user_session(
                            emulator, collector, chat=chat, user=user,
                            requests=[f for f in finds if added_in[f.expected] == chat.id],
                            answers=answers, rng=rng, think_s=(0.0, 0.0),
                        )
                        for chat, user in zip(chats, users, strict=True)
                    )
                )  # fmt: skip
                # Phase 3: more searches, for the memory figure.
                extra = rng.choices(COLLECTION, k=plan.extra_searches)
                await phase(
                    [Request("search", name, pool[name][0]) for name in extra], plan.think_s
                )
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        seconds = time.monotonic() - started
        await collector.collect()  # replies sent while the bot finished its last updates
        floods = await emulator.command("refused_calls")
    assert catalog_health(index).problems == []
    assert original_files(index) == catalog_health(index).original_paths
    rebuilds = len(generations) - 1  # generations served while answering, the first aside
    return LoadOutcome(
        answers, collector.replies, monitor.worst_s, memory, floods, seconds, rebuilds
    )


def check_outcome(plan: LoadPlan, outcome: LoadOutcome) -> dict[str, Any]:
    """Assert that nothing was lost or doubled and every answer is right; return the figures."""
    problems: list[str] = []
    added_ids: dict[str, str] = {}
    latencies = []
    by_kind: dict[str, list[float]] = {}
    for answer in outcome.answers:
        replies = outcome.replies.get((answer.chat_id, answer.message_id), [])
        label = f"{answer.request.kind} {answer.request.expected} in {answer.chat_id}"
        if not replies:
            problems.append(f"{label}: never answered")
            continue
        if deliveries(replies) != 1:
            problems.append(f"{label}: answered {deliveries(replies)} times")
        latencies.append(min(reply.received_at for reply in replies) - answer.sent_at)
        by_kind.setdefault(answer.request.kind, []).append(latencies[-1])
        first = replies[0].text
        if leaks(first):
            problems.append(f"{label}: {first!r}")
        if answer.request.kind == "add":
            found = ADDED_AS.match(first)
            if found is None:
                problems.append(f"{label}: {first!r}")
            else:
                added_ids[answer.request.expected] = found.group(1)
        elif answer.request.kind == "search":
            if not first.startswith("1. ✅ same picture") or not first.endswith(
                f"{answer.request.expected}.jpg"
            ):
                problems.append(f"{label}: {first!r}")
        elif not first.startswith("1. ✅ same picture") or (
            f"#{added_ids.get(answer.request.expected)}\n" not in first
        ):
            problems.append(
                f"{label}: added as #{added_ids.get(answer.request.expected)}, {first!r}"
            )
    expected_requests = plan.searches + 2 * plan.adds + plan.extra_searches
    assert problems == [], problems[:20]
    assert len(outcome.answers) == expected_requests
    assert len(added_ids) == plan.adds
    if plan.flood_share:
        assert outcome.floods > 0  # flood control did bite
    return {
        "users": plan.users,
        "requests": len(outcome.answers),
        "answered": len(latencies),
        "answered_twice": 0,
        "lost": expected_requests - len(latencies),
        "adds_found_again": len(added_ids),
        "flood_429s": outcome.floods,
        "background_rebuilds": outcome.rebuilds,
        "latency": latency_summary(latencies),
        "latency_by_kind": {kind: latency_summary(values) for kind, values in by_kind.items()},
        "worst_loop_stall_s": round(outcome.worst_stall_s, 3),
        "seconds": round(outcome.seconds, 1),
    }


async def test_ten_users_are_all_answered_once_under_flood_control(
    template_index: Path, tmp_path: Path
) -> None:
    plan = LoadPlan(
        users=10, searches=30, adds=6, extra_searches=0, think_s=(0.0, 0.0), flood_share=0.05,
        rebuild_after_fresh=4, seed=11,
    )  # fmt: skip
    outcome = await run_load(template_index, tmp_path, plan)
    figures = check_outcome(plan, outcome)
    report_figures("load-small", **figures)


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_fifty_users_500_searches_100_adds_nothing_lost_and_memory_flat(
    template_index: Path, tmp_path: Path
) -> None:
    plan = LoadPlan(
        users=50, searches=500, adds=100, extra_searches=300, think_s=(10.0, 30.0),
        flood_share=0.05, rebuild_after_fresh=40, memory_from=200, seed=12,
    )  # fmt: skip
    outcome = await run_load(template_index, tmp_path, plan)
    figures = check_outcome(plan, outcome)
    start, end = outcome.memory[200], outcome.memory[1000]
    growth = end["main"] / start["main"] - 1
    figures["memory_mb_at_200_and_1000"] = {
        part: (round(start[part] / 2**20), round(end[part] / 2**20)) for part in start
    }
    figures["main_memory_growth"] = round(growth, 4)
    report_figures("load-full", **figures)

    assert growth < 0.10
    assert end["workers"] < 1.10 * start["workers"]
