"""Every sentence and caption the bot shows, in HTML (the bot's default parse mode).

Anything that comes from users or files (names, file names) is escaped here. The image ids the
bot prints ("#12") are also read back here (:func:`image_id_in`), so that a user can answer
``/remove`` to any of the bot's messages about an image.
"""

from __future__ import annotations

import datetime as dtm
import re
from html import escape
from pathlib import PurePath
from typing import Final

from bot.errors import (
    FileTooBigError,
    MissingImageError,
    NotAllowedError,
    RateLimitedError,
    RefusedError,
)
from indexer.catalog import GLOBAL_SCOPE, ImageRecord
from indexer.errors import IndexerError
from indexer.search import IndexStats, Match

# A supergroup's chat id is -100 followed by the id its t.me/c/ links use.
_SUPERGROUP_ID_OFFSET: Final = 1_000_000_000_000
_LONGEST_SHOWN_NAME: Final = 120
# The id is always on the first line, which never holds user-provided text.
_IMAGE_ID = re.compile(r"#(\d{1,18})\b")

COMMANDS: Final[tuple[tuple[str, str], ...]] = (
    ("search", "Find photos like the photo you reply to"),
    ("add", "Add the photo you reply to (or send with /add) to this chat's collection"),
    ("remove", "Remove a photo: reply to it or to a result, or /remove ID"),
    ("stats", "Collection size and index age"),
    ("help", "How to use this bot, with examples"),
    ("start", "What this bot does"),
)


# -- welcome and help ---------------------------------------------------------------------------


def start(bot_username: str) -> str:
    return (
        "👋 Send me a photo and I will find the most similar ones in the collection.\n"
        "Photos work as pictures or as files. In a group, reply <code>/search</code> to a photo "
        f"or mention @{escape(bot_username)} in its caption.\n"
        "More in /help."
    )


def help_text(bot_username: str) -> str:
    name = escape(bot_username)
    return (
        "<b>Find similar photos</b>\n"
        "• In this private chat: just send a photo (or an image file).\n"
        "• In a group: reply <code>/search</code> to a photo, send a photo with the caption "
        f"<code>/search</code>, or mention @{name} in the caption.\n"
        "Each result says how close it is; <b>✅ same picture</b> means the same photo, "
        "even cropped, rotated or recompressed.\n\n"
        "<b>Grow the collection</b>\n"
        "• Send a photo with the caption <code>/add</code>, or reply <code>/add</code> to one. "
        "Photos added in a chat are found only in that chat.\n"
        "• <code>/remove 12</code> removes the photo numbered 12 in my replies; or reply "
        "<code>/remove</code> to a photo or to one of my results (chat admins).\n\n"
        "<b>Other commands</b>\n"
        "• /stats: how many photos, how fresh the index is.\n\n"
        f"In groups, commands may be addressed to me: <code>/search@{name}</code>."
    )


# -- search results -----------------------------------------------------------------------------


def result_caption(rank: int, match: Match) -> str:
    """Caption of one result photo: rank, score, verdict, id; then where it comes from."""
    if match.verified:
        verdict = "✅ <b>same picture</b>" + (" (mirrored)" if match.mirrored else "")
    else:
        verdict = "similar"
    return f"{rank}. {verdict} · {match.score:.0%} · #{match.image.id}\n{_origin(match.image)}"


def no_results() -> str:
    return "🔍 Nothing in the collection looks like this photo."


def _origin(record: ImageRecord) -> str:
    if record.origin_chat_id is None:
        return f"📁 {escape(_shortened(PurePath(record.path).name))}"
    who = escape(_shortened(record.added_by or "someone"))
    origin = f"👤 added by {who} on {_day(record.added_at)}"
    link = _message_link(record.origin_chat_id, record.origin_message_id)
    return origin if link is None else f'{origin} · <a href="{link}">message</a>'


def _message_link(chat_id: int, message_id: int | None) -> str | None:
    """A t.me link to a message: only supergroup messages have one (for their members)."""
    if message_id is None or chat_id >= -_SUPERGROUP_ID_OFFSET:
        return None
    return f"https://t.me/c/{-chat_id - _SUPERGROUP_ID_OFFSET}/{message_id}"


# -- the collection -----------------------------------------------------------------------------


def added(record: ImageRecord) -> str:
    return f"✅ Added as #{record.id}. It can be found in this chat from now on."


def already_added(record: ImageRecord) -> str:
    where = "the offline collection" if record.scope == GLOBAL_SCOPE else "this chat's collection"
    return f"☑️ Already in {where} as #{record.id}."


def removed(record: ImageRecord) -> str:
    return f"🗑 Removed #{record.id}."


def stats(stats: IndexStats, *, in_collection: int, in_chat: int, now: dtm.datetime) -> str:
    """/stats: what this chat can search, how fresh the index is, and what awaits a rebuild."""
    if stats.built_at is None:
        age = "not built yet: it is built with the first photo"
    else:
        built = dtm.datetime.fromtimestamp(stats.built_at, dtm.UTC)
        age = f"built {_ago(now - built)} ({built:%d %b %Y %H:%M} UTC)"
    return (
        "<b>Collection</b>\n"
        f"• {_photos(in_collection)} in the offline collection\n"
        f"• {_photos(in_chat)} added in this chat\n"
        f"<b>Index</b>: {age}\n"
        f"<b>Pending adds</b>: {_photos(stats.fresh)} searched exactly until the next rebuild"
    )


def image_id_in(text: str | None) -> int | None:
    """The image id ("#12") in the first line of one of the bot's messages, if it has one."""
    if not text:
        return None
    found = _IMAGE_ID.search(text.split("\n", 1)[0])
    return int(found.group(1)) if found else None


# -- refusals and failures ------------------------------------------------------------------------


def refusal(error: RefusedError | IndexerError) -> str:
    """Why a request was declined, for a refusal or an engine error caused by the input."""
    if isinstance(error, IndexerError):
        return f"⚠️ {escape(error.user_message)}"
    if isinstance(error, FileTooBigError):
        return (
            f"📦 This file is too big: bots can download at most {error.limit // 2**20} MB. "
            "Send it as a photo (Telegram compresses it) or make it smaller."
        )
    if isinstance(error, RateLimitedError):
        seconds = max(1, round(error.retry_after_s))
        return f"⏳ That was a lot of photos. Please try again in {seconds} s."
    if isinstance(error, NotAllowedError):
        return f"🔒 Only the admins can {error.action} photos here."
    if isinstance(error, MissingImageError):
        return _usage(error.command)
    return "⚠️ I cannot do that."


def failure(error: BaseException) -> str:
    """What the user sees when something broke on our side (the details go to the log)."""
    if isinstance(error, IndexerError):
        return f"😵 {escape(error.user_message)} The admins have been told."
    return "😵 Something went wrong on my side. Please try again later."


def chat_not_allowed() -> str:
    return "🔒 This bot is private. Ask its owner for access."


def admin_alert(error: BaseException, where: str) -> str:
    """A short note to the bot admins; the traceback is in the log."""
    detail = escape(_shortened(f"{type(error).__name__}: {error}", 600))
    return f"🚨 <b>Error</b> while handling {escape(where)}:\n<code>{detail}</code>\nSee the log."


def _usage(command: str) -> str:
    if command == "remove":
        return (
            "Reply <code>/remove</code> to a photo or to one of my results, "
            "or send <code>/remove ID</code> with the number my replies show after #."
        )
    return (
        f"Reply <code>/{command}</code> to a photo, or send a photo with the caption "
        f"<code>/{command}</code>."
    )


# -- formatting ---------------------------------------------------------------------------------


def _photos(count: int) -> str:
    return f"{count:,} photo" + ("" if count == 1 else "s")


def _day(timestamp: float) -> str:
    return f"{dtm.datetime.fromtimestamp(timestamp, dtm.UTC):%d %b %Y}"


def _ago(elapsed: dtm.timedelta) -> str:
    seconds = max(0, int(elapsed.total_seconds()))
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'} ago"
    return "just now"


def _shortened(text: str, limit: int = _LONGEST_SHOWN_NAME) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
