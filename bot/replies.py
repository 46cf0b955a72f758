"""Every sentence and caption the bot shows, in HTML (the bot's default parse mode).

Anything that comes from users or files (names, file names) is escaped here. The image ids the
bot prints ("#12") are also read back here (:func:`image_id_in`), so that a user can answer
``/remove`` to any of the bot's messages about an image.
"""

from __future__ import annotations

import datetime as dtm
import re
from collections.abc import Sequence
from html import escape
from pathlib import PurePath
from typing import TYPE_CHECKING, Final

from bot.errors import (
    FileTooBigError,
    MissingImageError,
    NotAllowedError,
    RateLimitedError,
    RefusedError,
)
from indexer import GLOBAL_SCOPE, ImageRecord, IndexerError, IndexStats, Match, message_link

if TYPE_CHECKING:
    from bot.watch import FirstSeen

_LONGEST_SHOWN_NAME: Final = 120
# The id is always on the first line, which never holds user-provided text.
_IMAGE_ID = re.compile(r"#(\d{1,18})\b")

COMMANDS: Final[tuple[tuple[str, str], ...]] = (
    ("search", "Find photos like the photo you reply to"),
    ("add", "Add the photo you reply to (or send with /add) to this chat's collection"),
    ("remove", "Remove a photo: reply to it or to a result, or /remove ID"),
    ("stats", "Collection size and index age"),
    ("watch", "Groups: /watch on or /watch off, to answer reposts (admins)"),
    ("settings", "Groups: the repost watch's settings (admins)"),
    ("forget", "Reply to your own photo to remove it from this chat's history"),
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
        "<b>Repost watch (groups)</b>\n"
        "• <code>/watch on</code> (admins): every photo posted here is checked, and a photo "
        "that is the same picture as an earlier post gets a link to it. "
        "<code>/watch off</code> stops it; /settings has the options.\n"
        "• Reply <code>/forget</code> to your own photo to remove it from this chat's history."
        "\n\n"
        "<b>Other commands</b>\n"
        "• /stats: how many photos, how fresh the index is.\n\n"
        f"In groups, commands may be addressed to me: <code>/search@{name}</code>."
    )


# -- search results -----------------------------------------------------------------------------


def result_caption(rank: int, match: Match) -> str:
    """Caption of one result: rank, score, verdict, id (and for a video, the time of the frame
    that matched); then where it comes from."""
    if match.verified:
        verdict = "✅ <b>same picture</b>" + (" (mirrored)" if match.mirrored else "")
    else:
        verdict = "similar"
    # A video found: where in it the matching frame is.
    at = "" if match.frame_seconds is None else f" · at {_clock(match.frame_seconds)}"
    return (
        f"{rank}. {verdict} · {match.score:.0%} · #{match.image.id}{at}\n"
        f"{_origin(match.image)}"
    )


def _clock(seconds: float) -> str:
    """A time into a video as a player shows it: 0:07, 12:34."""
    whole = int(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


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
    return None if message_id is None else message_link(chat_id, None, message_id)


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


def refusal(error: RefusedError | IndexerError) -> str:  # noqa: PLR0911 - one per kind
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
        if error.action == "watch":
            return only_admins_here()
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


# -- repost watch -------------------------------------------------------------------------------

NOT_A_REPOST_BUTTON: Final = "🙅 Not a repost"
DELETE_REPOST_BUTTON: Final = "🗑 Delete repost"
_STYLE_NAMES: Final = {"reply": "a reply", "reaction": "a reaction only", "silent": "silent (log)"}
_POLICY_NAMES: Final = {
    "everyone": "everyone",
    "chat_admins": "chat admins",
    "admins": "bot admins only",
}


def seen_before(reposts: Sequence[tuple[FirstSeen, int]]) -> str:
    """The answer to a repost (or to an album with reposts): where each was seen first."""
    if len(reposts) == 1:
        [(first, times)] = reposts
        return f"🔁 <b>Seen before</b>: {_first_seen(first)}. Seen {_times(times)}."
    lines = [f"🔁 <b>Seen before</b>: {len(reposts)} photos of this album."]
    lines += [
        f"{number}. {_first_seen(first)}. Seen {_times(times)}."
        for number, (first, times) in enumerate(reposts, start=1)
    ]
    return "\n".join(lines)


def _first_seen(first: FirstSeen) -> str:
    if first.who is None:
        return "this picture is in the offline collection"
    posted = "first posted"
    if first.link is not None:
        posted = f'<a href="{escape(first.link, quote=True)}">first posted</a>'
    when = "" if first.when is None else f" on {_moment(first.when)}"
    return f"{posted} by {escape(_shortened(first.who))}{when}"


def _times(count: int) -> str:
    return "twice" if count == 2 else f"{count} times"


def _moment(timestamp: float) -> str:
    return f"{dtm.datetime.fromtimestamp(timestamp, dtm.UTC):%d %b %Y %H:%M} UTC"


def watch_usage(on: bool) -> str:
    state = "on" if on else "off"
    return (
        f"👁 The repost watch is <b>{state}</b> here. Send <code>/watch on</code> or "
        "<code>/watch off</code> (admins), or use /settings."
    )


def watch_only_in_groups() -> str:
    return "👁 The repost watch works in groups: add me to one and send /watch on there."


def watch_switched(on: bool) -> str:
    if on:
        return (
            "👁 Repost watch is <b>on</b>: every photo posted here is checked, and one that is "
            "the same picture as an earlier post gets a link to it. /settings has the options."
        )
    return "💤 Repost watch is <b>off</b>. Photos posted here are no longer checked."


def watch_cannot_see(bot_username: str) -> str:
    """/watch on in a group where privacy mode hides the photos from the bot."""
    return (
        "⚠️ I cannot see the photos posted here yet: my privacy mode is on and I am not an "
        "admin of this group. Change one of these:\n"
        "• make me an <b>admin</b> of this group (with the <i>Delete messages</i> right, so "
        "the <i>Delete repost</i> button works too), or\n"
        f"• in @BotFather send <code>/setprivacy</code>, choose @{escape(bot_username)} and "
        "<b>Disable</b>; then remove me from this group and add me again (Telegram applies "
        "the change only when I join)."
    )


def settings_title() -> str:
    return "⚙️ <b>Repost watch settings</b> for this chat. Tap a button to change it."


def setting_watch(on: bool) -> str:
    return f"👁 Watch: {'on' if on else 'off'}"


def setting_style(style: str) -> str:
    return f"↩️ Answer: {_STYLE_NAMES.get(style, style)}"


def setting_global(counts: bool) -> str:
    return f"📁 Offline collection counts: {'yes' if counts else 'no'}"


def setting_retention(days: int) -> str:
    return "🗓 Forget photos: never" if days == 0 else f"🗓 Forget photos after {days} days"


def setting_add(policy: str) -> str:
    return f"✋ Who may /add: {_POLICY_NAMES.get(policy, policy)}"


def setting_changed() -> str:
    return "Saved."


def settings_only_in_groups() -> str:
    return "⚙️ /settings is for groups: send it in a group where I am a member."


def only_admins_here() -> str:
    return "🔒 Only this chat's admins can do that."


def only_admins_or_poster() -> str:
    return "🔒 Only the admins or the person who posted it can say that."


def button_expired() -> str:
    return "This button is no longer current."


def not_a_repost_noted() -> str:
    return "Noted: I will not call this pair a repost again."


def repost_deleted() -> str:
    return "Deleted."


def cannot_delete() -> str:
    return (
        "I cannot delete messages here: make me an admin with the \"Delete messages\" right."
    )


def forget_usage() -> str:
    return "Reply <code>/forget</code> to a photo you posted here to remove it from my memory."


def forget_not_known() -> str:
    return "🤷 I do not keep that photo: it was posted before the watch was on, or forgotten."


def forget_not_yours() -> str:
    return "🔒 You can only make me forget photos you posted yourself."


def forgotten() -> str:
    return "🧹 Forgotten: that photo is no longer part of this chat's history."


def watch_behind(waiting: int) -> str:
    """To the bot admins: the watch cannot keep up (the photos are kept, and checked later)."""
    return (
        f"⏳ The repost watch is behind: {waiting} photos wait to be checked. None is lost; "
        "answers come late until it catches up. More [index] workers would help."
    )


def watch_gave_up(chat_id: int, message_id: int, error: BaseException) -> str:
    detail = escape(_shortened(f"{type(error).__name__}: {error}", 400))
    return (
        f"🚨 The repost watch gave up on message {message_id} in chat {chat_id} after "
        f"several tries:\n<code>{detail}</code>"
    )
