"""The bot's pure parts: captions and replies, the rate limiter, the caption-command filter."""

from __future__ import annotations

import datetime as dtm
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from telegram import Bot, Message

from bot import replies
from bot.access import SlidingWindowLimiter
from bot.errors import FileTooBigError, MissingImageError, NotAllowedError, RateLimitedError
from bot.incoming import CaptionCommand, MentionsThisBot
from indexer.catalog import GLOBAL_SCOPE, ImageRecord
from indexer.errors import CorruptImageError
from indexer.search import IndexStats, Match
from testsupport.telegram_emulator import TelegramEmulator, detect_entities, parse_formatted_text

ADDED_AT = dtm.datetime(2025, 3, 14, 15, 9, tzinfo=dtm.UTC).timestamp()
SUPERGROUP = -1001234567890


def record(**changes: Any) -> ImageRecord:
    values: dict[str, Any] = {
        "id": 42,
        "content_hash": "ab" * 32,
        "scope": GLOBAL_SCOPE,
        "path": "/photos/holiday/beach.jpg",
        "file_size": 1000,
        "width": 640,
        "height": 480,
        "added_at": ADDED_AT,
        "added_by": None,
        "origin_chat_id": None,
        "origin_message_id": None,
        "telegram_file_id": None,
    }
    values.update(changes)
    return ImageRecord(**values)


def match(image: ImageRecord, *, verified: bool, score: float, mirrored: bool = False) -> Match:
    return Match(
        image=image,
        path=Path(image.path),
        score=score,
        verified=verified,
        inliers=40 if verified else 3,
        mirrored=mirrored,
        similarity=0.5,
    )


def visible(html: str) -> str:
    """What a Telegram client shows for an HTML message (and proof that it parses)."""
    text, _ = parse_formatted_text(html, "HTML")
    return text


def test_a_verified_result_from_the_offline_collection() -> None:
    caption = replies.result_caption(1, match(record(), verified=True, score=0.93))

    assert visible(caption) == "1. ✅ same picture · 93% · #42\n📁 beach.jpg"


def test_an_unverified_mirrored_flag_and_a_chat_added_result_with_a_link() -> None:
    added = record(
        id=7,
        scope=SUPERGROUP,
        path="originals/ab/abab.jpg",
        added_by="Eve <script> & co",
        origin_chat_id=SUPERGROUP,
        origin_message_id=314,
    )

    mirrored = replies.result_caption(1, match(added, verified=True, score=0.8, mirrored=True))
    similar = replies.result_caption(2, match(added, verified=False, score=0.21))

    assert visible(mirrored).startswith("1. ✅ same picture (mirrored) · 80% · #7\n")
    assert visible(similar) == (
        "2. similar · 21% · #7\n👤 added by Eve <script> & co on 14 Mar 2025 · message"
    )
    assert '<a href="https://t.me/c/1234567890/314">message</a>' in similar


@pytest.mark.parametrize("chat_id", [123456789, -4000000001])
def test_private_chats_and_basic_groups_get_no_message_link(chat_id: int) -> None:
    added = record(scope=chat_id, added_by="Bo", origin_chat_id=chat_id, origin_message_id=5)

    caption = replies.result_caption(1, match(added, verified=False, score=0.3))

    assert "href" not in caption
    assert visible(caption).endswith("added by Bo on 14 Mar 2025")


@given(st.text(min_size=1, max_size=300))
def test_any_name_or_file_name_is_escaped(name: str) -> None:
    added = record(added_by=name, origin_chat_id=SUPERGROUP, origin_message_id=1)
    from_folder = record(path=f"/photos/{name.replace('/', '_')}")

    for caption in (
        replies.result_caption(3, match(added, verified=False, score=0.2)),
        replies.result_caption(3, match(from_folder, verified=True, score=0.9)),
    ):
        shown = visible(caption)  # the emulator refuses what Telegram would refuse
        assert replies.image_id_in(shown) == 42
        assert len(shown) <= 1024


def test_every_reply_about_an_image_names_it_for_a_later_remove() -> None:
    image = record(id=1234)

    for text in (replies.added(image), replies.already_added(image), replies.removed(image)):
        assert replies.image_id_in(visible(text)) == 1234
    for text in (replies.no_results(), replies.refusal(MissingImageError("remove"))):
        assert replies.image_id_in(visible(text)) is None


def test_refusals_read_as_sentences() -> None:
    assert visible(replies.refusal(CorruptImageError("truncated at byte 10"))) == (
        f"⚠️ {CorruptImageError.user_message}"
    )
    assert "20 MB" in visible(replies.refusal(FileTooBigError(25 * 2**20, 20 * 2**20)))
    assert visible(replies.refusal(RateLimitedError(1, 12.4))).endswith("try again in 12 s.")
    assert visible(replies.refusal(NotAllowedError("add", 1, 2))) == (
        "🔒 Only the admins can add photos here."
    )
    assert "/search" in visible(replies.refusal(MissingImageError("search")))


def test_stats_report_size_age_and_pending_adds() -> None:
    stats = IndexStats(
        images=1003,
        indexed=1000,
        fresh=3,
        generation="g1",
        built_at=ADDED_AT,
        dimensions=256,
        codebook_trained_on=1000,
        failures=0,
        bytes_per_image={},
    )
    now = dtm.datetime.fromtimestamp(ADDED_AT, dtm.UTC) + dtm.timedelta(hours=5, minutes=3)

    text = visible(replies.stats(stats, in_collection=1000, in_chat=1, now=now))

    assert "1,000 photos in the offline collection" in text
    assert "1 photo added in this chat" in text
    assert "built 5 hours ago (14 Mar 2025 15:09 UTC)" in text
    assert "Pending adds: 3 photos" in text


def test_the_limiter_admits_up_to_its_limit_then_says_how_long_to_wait() -> None:
    now = [1000.0]
    limiter = SlidingWindowLimiter(2, 60.0, clock=lambda: now[0])

    assert limiter.acquire(1) == 0.0
    now[0] += 10
    assert limiter.acquire(1) == 0.0
    assert limiter.acquire(1) == pytest.approx(50.0)
    assert limiter.acquire(2) == 0.0  # other users are not affected
    now[0] += 50
    assert limiter.acquire(1) == 0.0
    assert limiter.acquire(1) == pytest.approx(10.0)


def _message(caption: str, bot: Bot) -> Message:
    message = Message.de_json(
        {
            "message_id": 1,
            "date": 0,
            "chat": {"id": -5, "type": "group", "title": "g"},
            "photo": [{"file_id": "x", "file_unique_id": "y", "width": 1, "height": 1}],
            "caption": caption,
            "caption_entities": detect_entities(caption),
        },
        bot,
    )
    assert message is not None
    return message


@pytest.fixture
async def bot() -> AsyncIterator[Bot]:
    """A real Bot that learnt its username from the emulator (getMe), as the filters need."""
    async with (
        TelegramEmulator() as emu,
        Bot(emu.token, base_url=emu.api_base_url, base_file_url=emu.file_base_url) as initialized,
    ):
        yield initialized


@pytest.mark.parametrize(
    ("caption", "matches"),
    [
        ("/add", True),
        ("/ADD please", True),
        ("/add@imgsearch_test_bot", True),
        ("/add@other_bot", False),
        ("/addition", False),
        ("please /add", False),
        ("/search", False),
    ],
)
async def test_caption_commands_are_recognised_only_when_meant_for_this_bot(
    bot: Bot, caption: str, matches: bool
) -> None:
    assert CaptionCommand("add").filter(_message(caption, bot)) is matches


async def test_mentions_of_this_bot_are_recognised(bot: Bot) -> None:
    assert MentionsThisBot().filter(_message("look @ImgSearch_Test_Bot", bot))
    assert not MentionsThisBot().filter(_message("look @other_bot", bot))
