"""Load: a watched group posts one photo a second for ten minutes (``make test-slow``).

Every photo must be checked and recorded (none lost), the watch's memory queue must stay within
its bound (the admins are told when it backs up), and a repost's answer must come, at the
median, within the engine's own time plus 150 ms. A third of the photos are reposts (an edited
copy of an earlier post); the others are new drawings. The watch must answer exactly the
reposts the engine verified as their source (a copy the engine misses is a new picture to it).
The figures are printed as RELIABILITY-FIGURES lines.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import pytest
from bot_fixtures import bot_settings, build_test_index, edited_photo, make_bot, running
from engine_fixtures import shapes_jpeg
from reliability_helpers import report_figures

from bot.watch import RepostWatch
from testsupport.telegram_emulator import TelegramEmulator

# Ten minutes at one photo a second, as the issue states; WATCH_LOAD_SECONDS shortens a
# local trial run.
SECONDS = int(os.environ.get("WATCH_LOAD_SECONDS", "600"))
QUEUE_SIZE = 50
REPOST_EVERY = 3
ANSWER_MARGIN_S = 0.150
REPOST_SOURCES = ("horse", "moon", "coins", "rocket", "camera", "brick", "chelsea", "coffee")


@pytest.fixture(scope="module")
def template_index(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("watch-load")
    return build_test_index([photos_dir / "astronaut.jpg"], folder / "index")


@pytest.mark.slow
@pytest.mark.timeout(SECONDS * 3 + 300)
async def test_one_photo_a_second_for_ten_minutes_is_all_checked_with_answers_on_time(
    template_index: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    index.mkdir()
    for path in template_index.rglob("*"):
        target = index / path.relative_to(template_index)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.write_bytes(path.read_bytes())
    async with TelegramEmulator(group_privacy=False) as emu:
        operator = emu.create_user("Operator")
        operator_chat = emu.private_chat(operator)
        poster = emu.create_user("Poster")
        group = emu.create_group("Busy club", [operator, poster], chat_type="supergroup")
        emu.set_member_status(group, operator, "administrator")
        settings = bot_settings(
            emu,
            index,
            index={"workers": 1},  # two cores: one worker process, one core for the bot
            watch={"queue_size": QUEUE_SIZE},
            access={"admins": [operator.id]},
        )
        posted_at: dict[int, float] = {}
        reposts: dict[int, str] = {}  # message id: the source it copies
        first_posts: dict[str, int] = {}
        async with running(make_bot(settings)) as application:
            watch = application.bot_data.watch
            assert isinstance(watch, RepostWatch)
            emu.user_sends_text(group, operator, "/watch on")
            await emu.wait_for_messages(group, 1, timeout=60)
            # The first post of each repost source, so later copies have an original.
            started = time.monotonic()
            for second in range(SECONDS):
                await asyncio.sleep(max(0.0, started + second - time.monotonic()))
                if second % REPOST_EVERY == 2 and second >= len(REPOST_SOURCES) * REPOST_EVERY:
                    name = REPOST_SOURCES[second % len(REPOST_SOURCES)]
                    data = edited_photo(name, angle=(second % 9) - 4.0, keep=0.75)
                elif second % REPOST_EVERY == 2:
                    data = edited_photo(REPOST_SOURCES[second // REPOST_EVERY], angle=0.0)
                else:
                    data = shapes_jpeg(10_000 + second)
                message = emu.user_sends_photo(group, poster, data)
                posted_at[message["message_id"]] = time.monotonic()
                if second % REPOST_EVERY == 2 and second >= len(REPOST_SOURCES) * REPOST_EVERY:
                    reposts[message["message_id"]] = name
                elif second % REPOST_EVERY == 2:
                    first_posts[REPOST_SOURCES[second // REPOST_EVERY]] = message["message_id"]
            deadline = time.monotonic() + 300
            # The inbox lives in SQLite: there is no event to wait on, so poll it.
            while (watch.backlog or await watch.records.inbox_count()) and (  # noqa: ASYNC110
                time.monotonic() < deadline
            ):
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            sightings = {m: await watch.sighting(group.id, m) for m in posted_at}
            figures = watch.figures
            left_in_inbox = await watch.records.inbox_count()

    answers = {
        message.reply_to_message_id: message.call.received_at
        for message in emu.messages_sent(group)
        if message.reply_to_message_id in posted_at
    }
    recorded = [sighting for sighting in sightings.values() if sighting is not None]
    original_image = {
        name: sighting.image_id
        for name, m in first_posts.items()
        if (sighting := sightings[m]) is not None
    }
    # Reposts the engine verified as their source: the watch must answer exactly these.
    verified = {
        m
        for m, name in reposts.items()
        if (sighting := sightings[m]) is not None and sighting.image_id == original_image[name]
    }
    latencies = [answers[m] - posted_at[m] for m in sorted(verified) if m in answers]
    reply_p50 = statistics.median(latencies)
    engine_p50 = statistics.median(figures.engine_s)
    alerts = emu.messages_sent(operator_chat)
    report_figures(
        "watch-load",
        seconds=SECONDS,
        photos=len(posted_at),
        checked=figures.checked,
        recorded=len(recorded),
        reposts_posted=len(reposts),
        reposts_verified=len(verified),
        reposts_answered=len({m for m in reposts if m in answers}),
        engine_p50_ms=round(engine_p50 * 1000),
        engine_p90_ms=round(statistics.quantiles(figures.engine_s, n=10)[-1] * 1000),
        reply_p50_ms=round(reply_p50 * 1000),
        reply_p90_ms=round(statistics.quantiles(latencies, n=10)[-1] * 1000),
        largest_backlog=figures.largest_backlog,
        queue_size=QUEUE_SIZE,
        backlog_alerts=len(alerts),
        cpus=os.cpu_count(),
    )
    assert left_in_inbox == 0
    assert figures.checked == len(posted_at)
    assert len(recorded) == len(posted_at)
    assert {m for m in reposts if m in answers} == verified
    assert not {m for m in posted_at if m in answers} - set(reposts)  # drawings: no answer
    assert len(verified) >= 0.9 * len(reposts)  # the engine's recall, not the watch's job
    assert figures.largest_backlog <= QUEUE_SIZE
    if figures.largest_backlog >= QUEUE_SIZE // 2:
        assert alerts
    assert reply_p50 <= engine_p50 + ANSWER_MARGIN_S
