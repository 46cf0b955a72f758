"""Repost watch: every photo posted in a watched group is checked, and a verified copy of an
earlier post is answered with a link to it.

A watched photo is first written to the catalog's inbox (so a kill loses none), then queued in
memory for the workers. The memory queue is bounded: when it is full, photos wait in the inbox
only and are taken from there in arrival order, and the bot admins are told that the watch is
behind. A chat's photos are checked one at a time, in the order they arrived, so the first
poster of a picture is always its original.

Each check is one engine call, ``SearchService.add`` into the chat's scope: it returns the
image the photo already is (same bytes, or a *verified* same picture) or a new one. The chat's
sightings of that image, kept in the catalog, say whether and where it was seen before. Items
of an album are answered once, together, after the album's last item is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Literal, TypeVar, cast, get_args

from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, ReactionTypeEmoji
from telegram.error import TelegramError

from bot import replies
from bot.errors import RefusedError
from bot.incoming import Attachment, download
from bot.settings import ADD_POLICIES, AddPolicy
from indexer import (
    GLOBAL_SCOPE,
    ImageError,
    ImageRecord,
    IndexerError,
    NotFoundError,
    SearchService,
    message_link,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

ReplyStyle = Literal["reply", "reaction", "silent"]
REPLY_STYLES: Final[tuple[ReplyStyle, ...]] = get_args(ReplyStyle)
RETENTION_CHOICES: Final = (0, 7, 30, 90, 365)  # days; 0 keeps photos forever
REPOST_REACTION: Final = "👀"  # one of the reactions bots may set
NOT_A_REPOST: Final = "watch:not"
DELETE_REPOST: Final = "watch:delete"
# A photo that keeps failing for reasons other than itself is given up after this many tries.
MAX_ATTEMPTS: Final = 3
_DAY_S: Final = 86_400.0


@dataclass(frozen=True, slots=True)
class ChatSettings:
    """How a chat wants its photos watched (the defaults: not at all)."""

    chat_id: int
    watch: bool = False
    reply_style: ReplyStyle = "reply"
    global_counts: bool = False  # whether the offline collection counts as "seen before"
    retention_days: int = 0  # forget photos older than this; 0 keeps them
    add_policy: AddPolicy | None = None  # who may /add here; None: the configured policy

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ChatSettings:
        return cls(
            chat_id=int(row["chat_id"]),
            watch=bool(row["watch"]),
            reply_style=cast(ReplyStyle, row["reply_style"]),
            global_counts=bool(row["global_counts"]),
            retention_days=int(row["retention_days"]),
            add_policy=cast(AddPolicy | None, row["add_policy"]),
        )


@dataclass(frozen=True, slots=True)
class Sighting:
    """One chat message showing a picture of the collection."""

    chat_id: int
    message_id: int
    image_id: int
    sender_id: int | None
    sender_name: str
    posted_at: float
    file_unique_id: str
    answer_message_id: int | None = None
    dismissed: bool = False

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Sighting:
        return cls(
            chat_id=int(row["chat_id"]),
            message_id=int(row["message_id"]),
            image_id=int(row["image_id"]),
            sender_id=None if row["sender_id"] is None else int(row["sender_id"]),
            sender_name=str(row["sender_name"]),
            posted_at=float(row["posted_at"]),
            file_unique_id=str(row["file_unique_id"]),
            answer_message_id=(
                None if row["answer_message_id"] is None else int(row["answer_message_id"])
            ),
            dismissed=bool(row["dismissed"]),
        )


@dataclass(frozen=True, slots=True)
class WatchedPhoto:
    """A photo posted in a watched chat, as kept in the inbox until it is checked."""

    chat_id: int
    chat_username: str | None  # a public group's @name, for t.me/<name>/<id> links
    message_id: int
    file_id: str
    file_unique_id: str
    file_size: int | None
    is_photo: bool
    sender_id: int | None
    sender_name: str
    posted_at: float  # the message's date, or its edit date
    media_group_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WatchedPhoto:
        return cls(**json.loads(text))


@dataclass(frozen=True, slots=True)
class FirstSeen:
    """Where a picture was first seen: a message of the chat, or the offline collection."""

    who: str | None  # None for the offline collection
    when: float | None
    link: str | None  # a t.me link to the first message, when the chat has links


@dataclass(frozen=True, slots=True)
class Repost:
    photo: WatchedPhoto
    first: FirstSeen
    times_seen: int  # in this chat, this post included


@dataclass(slots=True)
class WatchFigures:
    """What the watch measured since it started (read by the load test and /stats)."""

    checked: int = 0
    reposts: int = 0
    given_up: int = 0
    largest_backlog: int = 0
    backlog_alerts: int = 0
    engine_s: list[float] = field(default_factory=list)  # per check, last 10,000
    check_s: list[float] = field(default_factory=list)  # receive to answer decided, idem

    def add_time(self, series: list[float], seconds: float) -> None:
        series.append(seconds)
        if len(series) > 10_000:
            del series[:5_000]


def settings_keyboard(settings: ChatSettings, default_policy: AddPolicy) -> InlineKeyboardMarkup:
    """/settings: one button per setting; pressing one changes it to its next value."""
    rows = [
        (replies.setting_watch(settings.watch), "settings:watch"),
        (replies.setting_style(settings.reply_style), "settings:style"),
        (replies.setting_global(settings.global_counts), "settings:global"),
        (replies.setting_retention(settings.retention_days), "settings:keep"),
        (replies.setting_add(settings.add_policy or default_policy), "settings:add"),
    ]
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton(text, callback_data=data)] for text, data in rows]
    )


def repost_keyboard(first_message_id: int) -> InlineKeyboardMarkup:
    """The buttons under an answer. They name the (first) repost message, because a press can
    come before the answer's id is stored with the sightings."""
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(
                    replies.NOT_A_REPOST_BUTTON, callback_data=f"{NOT_A_REPOST}:{first_message_id}"
                ),
                InlineKeyboardButton(
                    replies.DELETE_REPOST_BUTTON,
                    callback_data=f"{DELETE_REPOST}:{first_message_id}",
                ),
            ]
        ]
    )


def next_value(values: Sequence[T], current: T) -> T:
    """The value after ``current`` in ``values``, cycling (the first if it is not there)."""
    try:
        return values[(list(values).index(current) + 1) % len(values)]
    except ValueError:
        return values[0]


class _Album:
    """The items of one album still being checked, and the reposts found among them."""

    def __init__(self) -> None:
        self.outstanding = 0
        self.reposts: list[Repost] = []
        self.timer: asyncio.TimerHandle | None = None


class RepostWatch:
    """The watch of every group: settings, the photo queue and its workers, and answers."""

    def __init__(
        self,
        service: SearchService,
        bot: Bot,
        *,
        queue_size: int,
        workers: int,
        album_wait_s: float,
        alert_admins: Callable[[str], Any],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.records = service.chat_records
        self.figures = WatchFigures()
        self._bot = bot
        self._queue_size = queue_size
        self._worker_count = workers
        self._album_wait_s = album_wait_s
        self._alert_admins = alert_admins
        self._clock = clock
        self._queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue(maxsize=queue_size)
        self._queued: set[tuple[int, int]] = set()  # in the memory queue or being checked
        self._received_at: dict[tuple[int, int], float] = {}
        # Photos that did not fit the memory queue wait in the inbox only.
        self._overflow = False
        self._refill_turn = asyncio.Lock()
        self._chat_turns: dict[int, asyncio.Lock] = {}
        self._settings: dict[int, ChatSettings] = {}
        self._albums: dict[tuple[int, str], _Album] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._answer_tasks: set[asyncio.Task[None]] = set()
        self._busy = 0
        self._idle = asyncio.Event()  # set while no photo is being checked
        self._idle.set()
        self._behind = False

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers, with every photo the inbox still holds (a restart's leftovers)."""
        left = await self.records.inbox_count()
        if left:
            log.info("checking %d watched photos left from the last run", left)
            self._overflow = True
            await self._refill()
        self._workers = [
            asyncio.create_task(self._work(), name=f"repost-watch-{number}")
            for number in range(self._worker_count)
        ]

    async def stop(self, *, grace_s: float = 10.0) -> None:
        """Let the photos being checked finish (for up to ``grace_s``), then stop. What is
        still waiting stays in the inbox for the next start."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        if self._answer_tasks:  # answers already decided are still sent
            await asyncio.wait(set(self._answer_tasks), timeout=grace_s)
        for album in self._albums.values():
            if album.timer is not None:
                album.timer.cancel()

    @property
    def backlog(self) -> int:
        """Photos received and not checked yet, as far as memory knows."""
        return len(self._queued)

    # -- settings ---------------------------------------------------------------------------

    async def settings(self, chat_id: int) -> ChatSettings:
        cached = self._settings.get(chat_id)
        if cached is None:
            row = await self.records.chat_settings(chat_id)
            cached = ChatSettings(chat_id) if row is None else ChatSettings.from_row(row)
            self._settings[chat_id] = cached
        return cached

    async def save_settings(self, settings: ChatSettings) -> None:
        await self.records.save_chat_settings(
            settings.chat_id,
            watch=settings.watch,
            reply_style=settings.reply_style,
            global_counts=settings.global_counts,
            retention_days=settings.retention_days,
            add_policy=settings.add_policy,
        )
        self._settings[settings.chat_id] = settings

    # -- intake -----------------------------------------------------------------------------

    async def needs_check(self, chat_id: int, message_id: int, file_unique_id: str) -> bool:
        """False for an edit that kept the photo (a caption edit): it was checked already."""
        row = await self.records.sighting(chat_id, message_id)
        return row is None or row["file_unique_id"] != file_unique_id

    async def receive(self, photo: WatchedPhoto) -> None:
        """Take a watched photo: stored in the inbox before anything else, then queued."""
        await self.records.inbox_put(photo.chat_id, photo.message_id, photo.to_json())
        key = (photo.chat_id, photo.message_id)
        if key in self._queued:
            return  # an edit of a photo still waiting: its turn reads the new version
        self._received_at[key] = time.perf_counter()
        if photo.media_group_id is not None:
            self._album(photo).outstanding += 1
        if self._overflow or self._queue.full():
            self._overflow = True
        else:
            self._queued.add(key)
            self._queue.put_nowait(key)
        await self._watch_backlog()

    async def _watch_backlog(self) -> None:
        waiting = await self.records.inbox_count() if self._overflow else len(self._queued)
        self.figures.largest_backlog = max(self.figures.largest_backlog, waiting)
        if waiting >= max(1, self._queue_size // 2):
            if not self._behind:
                self._behind = True
                self.figures.backlog_alerts += 1
                log.warning("the repost watch is behind: %d photos wait to be checked", waiting)
                await self._alert_admins(replies.watch_behind(waiting))
        elif waiting == 0:
            self._behind = False

    async def _refill(self) -> None:
        """Move photos waiting in the inbox only into the memory queue, oldest first."""
        async with self._refill_turn:
            room = self._queue.maxsize - self._queue.qsize()
            if room <= 0:
                return
            items = await self.records.inbox_items(limit=room + len(self._queued) + 1)
            fresh = [
                item for item in items if (item["chat_id"], item["message_id"]) not in self._queued
            ]
            for item in fresh[:room]:
                key = (int(item["chat_id"]), int(item["message_id"]))
                if key not in self._received_at:  # left from the last run
                    self._received_at[key] = time.perf_counter()
                    photo = WatchedPhoto.from_json(str(item["payload"]))
                    if photo.media_group_id is not None:
                        self._album(photo).outstanding += 1
                self._queued.add(key)
                self._queue.put_nowait(key)
            self._overflow = len(fresh) > room

    # -- checking ---------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._busy += 1
            self._idle.clear()
            try:
                await self._process(key)
            except Exception:
                # _process handles what it can; this keeps the worker alive whatever happens.
                log.exception("the repost watch failed on message %s of chat %s", key[1], key[0])
            finally:
                self._busy -= 1
                if self._busy == 0:
                    self._idle.set()
                self._queued.discard(key)
                self._queue.task_done()
            if self._overflow:
                await self._refill()
            await self._watch_backlog()

    def _chat_turn(self, chat_id: int) -> asyncio.Lock:
        return self._chat_turns.setdefault(chat_id, asyncio.Lock())

    async def _process(self, key: tuple[int, int]) -> None:
        chat_id, message_id = key
        # No await between taking the key from the queue and asking for the chat's turn:
        # asyncio locks are fair, so a chat's photos are checked in arrival order.
        async with self._chat_turn(chat_id):
            item = await self.records.inbox_item(chat_id, message_id)
            if item is None:
                return
            payload = str(item["payload"])
            photo = WatchedPhoto.from_json(payload)
            try:
                repost = await self.check(photo, payload)
            except (RefusedError, ImageError, NotFoundError) as error:
                log.info("watched message %s in %s not checked: %s", message_id, chat_id, error)
                await self.records.inbox_drop(chat_id, message_id, payload)
                repost = None
            except Exception as error:
                await self._failed(photo, payload, int(item["attempts"]) + 1, error)
                return
            finally:
                started = self._received_at.pop(key, None)
                if started is not None:
                    self.figures.add_time(self.figures.check_s, time.perf_counter() - started)
            if await self.records.inbox_item(chat_id, message_id) is not None:
                # Edited while it was checked: check the new version too.
                self._overflow = True
        await self._settle(photo, repost)

    async def _failed(
        self, photo: WatchedPhoto, payload: str, attempts: int, error: Exception
    ) -> None:
        where = f"watched message {photo.message_id} in {photo.chat_id}"
        if attempts >= MAX_ATTEMPTS:
            log.error("%s failed %d times; given up", where, attempts, exc_info=error)
            self.figures.given_up += 1
            await self.records.inbox_drop(photo.chat_id, photo.message_id, payload)
            await self._alert_admins(replies.watch_gave_up(photo.chat_id, photo.message_id, error))
            await self._settle(photo, None)
            return
        log.warning("%s failed (attempt %d), will retry: %s", where, attempts, error)
        await self.records.inbox_failed_attempt(photo.chat_id, photo.message_id)
        self._overflow = True  # it stays in the inbox; the next refill takes it again

    async def check(self, photo: WatchedPhoto, payload: str) -> Repost | None:
        """Add the photo to its chat's history; a Repost if the chat saw it before.

        Raises:
            RefusedError: the file is too big to download.
            ImageError: it is not a usable image.
            TelegramError, IndexerError: the download or the engine failed.
        """
        settings = await self.settings(photo.chat_id)
        data = await download(
            self._bot, Attachment(
                photo.file_id, photo.file_unique_id, photo.file_size, is_photo=photo.is_photo
            )
        )
        started = time.perf_counter()
        analysis = await self.service.analyze(data)
        result = await self.service.add(
            data,
            scope=photo.chat_id,
            added_by=photo.sender_name,
            origin_chat_id=photo.chat_id,
            origin_message_id=photo.message_id,
            telegram_file_id=photo.file_id if photo.is_photo else None,
            analysis=analysis,
            every_look=True,  # "Seen before" must not miss what a search would find
        )
        image = result.image
        apart = [] if result.created else await self.records.pictures_apart_from(
            photo.chat_id, image.id
        )
        if apart:
            # The chat said some photos taken for this picture are pictures of their own:
            # this photo is the one of them it shares the most with.
            closest = await self.service.closest_picture(analysis, [image.id, *apart])
            if closest is not None and closest != image.id:
                image = await self.service.get(closest)
        self.figures.add_time(self.figures.engine_s, time.perf_counter() - started)
        self.figures.checked += 1
        first, times_seen = await self._history(photo, image, settings)
        dismissed = first is not None and await self.records.is_dismissed(
            photo.chat_id, image.id, photo.file_unique_id
        )
        sighting = Sighting(
            chat_id=photo.chat_id,
            message_id=photo.message_id,
            image_id=image.id,
            sender_id=photo.sender_id,
            sender_name=photo.sender_name,
            posted_at=photo.posted_at,
            file_unique_id=photo.file_unique_id,
            dismissed=dismissed,
        )
        recorded = await self.records.record_sighting(asdict(sighting), inbox_payload=payload)
        if first is None or dismissed or not recorded:
            return None
        self.figures.reposts += 1
        return Repost(photo, first, times_seen)

    async def _history(
        self, photo: WatchedPhoto, image: ImageRecord, settings: ChatSettings
    ) -> tuple[FirstSeen | None, int]:
        """Where the chat first saw ``image`` before this photo, and how often it saw it."""
        others = [
            Sighting.from_row(row)
            for row in await self.records.sightings_of(photo.chat_id, image.id)
            if int(row["message_id"]) != photo.message_id
        ]
        earlier = [
            s for s in others if (s.posted_at, s.message_id) < (photo.posted_at, photo.message_id)
        ]
        seen_messages = {photo.message_id, *(s.message_id for s in others)}
        if earlier:
            first = earlier[0]
            link = message_link(photo.chat_id, photo.chat_username, first.message_id)
            return FirstSeen(first.sender_name, first.posted_at, link), len(others) + 1
        if (
            image.scope == photo.chat_id
            and image.origin_message_id is not None
            and image.origin_message_id not in seen_messages
        ):
            # Added with /add (or before the watch kept sightings): the image is the original.
            link = message_link(photo.chat_id, photo.chat_username, image.origin_message_id)
            return FirstSeen(image.added_by, image.added_at, link), len(others) + 2
        if image.scope == GLOBAL_SCOPE and settings.global_counts:
            return FirstSeen(None, None, None), len(others) + 1
        return None, len(others) + 1

    # -- answering --------------------------------------------------------------------------

    def _album(self, photo: WatchedPhoto) -> _Album:
        assert photo.media_group_id is not None  # noqa: S101 - callers check
        return self._albums.setdefault((photo.chat_id, photo.media_group_id), _Album())

    @property
    def answers_pending(self) -> int:
        """Answers decided and not sent yet (Telegram allows a group 20 messages a minute)."""
        return len(self._answer_tasks)

    def _send_answer(self, reposts: list[Repost]) -> None:
        """Answer in the background: a flood-limited reply must not hold up the next check."""
        task = asyncio.create_task(self._answer(reposts), name="repost-answer")
        self._answer_tasks.add(task)
        task.add_done_callback(self._answer_tasks.discard)

    async def _settle(self, photo: WatchedPhoto, repost: Repost | None) -> None:
        if photo.media_group_id is None:
            if repost is not None:
                self._send_answer([repost])
            return
        key = (photo.chat_id, photo.media_group_id)
        album = self._album(photo)
        album.outstanding = max(0, album.outstanding - 1)
        if repost is not None:
            album.reposts.append(repost)
        if album.timer is not None:
            album.timer.cancel()
            album.timer = None
        if album.outstanding == 0:
            # Album items arrive as separate updates, close together: wait a moment for more.
            album.timer = asyncio.get_running_loop().call_later(
                self._album_wait_s, lambda: asyncio.ensure_future(self._answer_album(key))
            )

    async def _answer_album(self, key: tuple[int, str]) -> None:
        album = self._albums.get(key)
        if album is None or album.outstanding > 0:
            return
        del self._albums[key]
        if album.reposts:
            self._send_answer(sorted(album.reposts, key=lambda r: r.photo.message_id))

    async def _answer(self, reposts: Sequence[Repost]) -> None:
        """One answer for one post (or one album): a reply, a reaction, or a log line."""
        try:
            await self._deliver(reposts)
        except Exception:
            # A background task: nobody else would see the failure.
            log.exception("could not answer a repost in chat %s", reposts[0].photo.chat_id)

    async def _deliver(self, reposts: Sequence[Repost]) -> None:
        first = reposts[0].photo
        settings = await self.settings(first.chat_id)
        log.info(
            "repost in chat %s: %s",
            first.chat_id,
            ", ".join(f"message {r.photo.message_id} seen {r.times_seen} times" for r in reposts),
        )
        try:
            if settings.reply_style == "silent":
                return
            if settings.reply_style == "reaction":
                await self._bot.set_message_reaction(
                    first.chat_id, first.message_id, ReactionTypeEmoji(REPOST_REACTION)
                )
                return
            answer = await self._bot.send_message(
                first.chat_id,
                replies.seen_before([(r.first, r.times_seen) for r in reposts]),
                reply_to_message_id=first.message_id,
                reply_markup=repost_keyboard(first.message_id),
            )
        except TelegramError as error:
            log.warning("could not answer a repost in chat %s: %s", first.chat_id, error)
            return
        await self.records.set_answer(
            first.chat_id, [r.photo.message_id for r in reposts], answer.message_id
        )

    # -- buttons, /forget and retention ------------------------------------------------------

    async def answered_by(
        self, chat_id: int, answer_message_id: int, first_message_id: int
    ) -> list[Sighting]:
        """The sightings an answer is about (its first repost alone, if its id is not stored
        yet); none once they were dismissed or deleted."""
        rows = await self.records.sightings_answered_by(chat_id, answer_message_id)
        if not rows:
            row = await self.records.sighting(chat_id, first_message_id)
            rows = [] if row is None or row["dismissed"] else [row]
        return [Sighting.from_row(row) for row in rows]

    async def dismiss(
        self, sightings: Sequence[Sighting], files: Mapping[int, Attachment]
    ) -> None:
        """ "Not a repost": each photo becomes a picture of its own, kept apart from the one
        it was taken for, so that neither it nor another copy of it is called a repost of that
        one again (a later copy of it is a repost of it). ``files`` are the photos at hand, by
        message id; a photo not among them, or that cannot be fetched again, is remembered by
        its file alone."""
        for sighting in sightings:
            file = files.get(sighting.message_id)
            own = None if file is None else await self._own_picture(sighting, file)
            if own is None:
                await self.records.dismiss(
                    sighting.chat_id,
                    [(sighting.message_id, sighting.image_id, sighting.file_unique_id)],
                )
            else:
                await self.records.keep_apart(
                    sighting.chat_id, sighting.message_id, sighting.image_id, own
                )

    async def _own_picture(self, sighting: Sighting, file: Attachment) -> int | None:
        """The photo of ``sighting`` added as a picture apart from the one it was taken for;
        None when it cannot be (a failed download, the very same bytes)."""
        try:
            data = await download(self._bot, file)
            result = await self.service.add(
                data,
                scope=sighting.chat_id,
                added_by=sighting.sender_name,
                origin_chat_id=sighting.chat_id,
                origin_message_id=sighting.message_id,
                added_at=sighting.posted_at,
                distinct_from=(sighting.image_id,),
            )
        except (RefusedError, TelegramError, IndexerError) as error:
            log.warning(
                "message %s in %s is remembered as not a repost by its file alone: %s",
                sighting.message_id,
                sighting.chat_id,
                error,
            )
            return None
        return None if result.image.id == sighting.image_id else result.image.id

    async def forget_deleted(self, chat_id: int, message_ids: Sequence[int]) -> None:
        await self.records.delete_sightings(chat_id, message_ids)

    async def sighting(self, chat_id: int, message_id: int) -> Sighting | None:
        row = await self.records.sighting(chat_id, message_id)
        return None if row is None else Sighting.from_row(row)

    async def forget(self, sighting: Sighting) -> None:
        """Remove a photo from its chat's history (and the picture, if it was the original)."""
        image = await self.service.get(sighting.image_id)
        if image.scope == sighting.chat_id and image.origin_message_id == sighting.message_id:
            await self.service.remove(image.id, scope=sighting.chat_id)  # sightings go with it
        else:
            await self.records.delete_sightings(sighting.chat_id, [sighting.message_id])

    async def apply_retention(self) -> int:
        """Forget, in every chat that asked for it, the photos older than its retention.
        Returns how many pictures were removed."""
        removed = 0
        for row in await self.records.chats_with_retention():
            settings = ChatSettings.from_row(row)
            cutoff = self._clock() - settings.retention_days * _DAY_S
            for image_id in await self.records.chat_images_before(settings.chat_id, cutoff):
                with contextlib.suppress(NotFoundError):  # removed meanwhile
                    await self.service.remove(image_id, scope=settings.chat_id)
                    removed += 1
            forgotten = await self.records.forget_sightings_before(settings.chat_id, cutoff)
            log.info(
                "retention in chat %s: %d photos and %d sightings older than %d days forgotten",
                settings.chat_id,
                removed,
                forgotten,
                settings.retention_days,
            )
        return removed


def with_change(settings: ChatSettings, what: str, default_policy: AddPolicy) -> ChatSettings:
    """The settings after pressing the /settings button ``what``.

    Raises:
        ValueError: for a button that does not exist.
    """
    if what == "watch":
        return replace(settings, watch=not settings.watch)
    if what == "style":
        return replace(settings, reply_style=next_value(REPLY_STYLES, settings.reply_style))
    if what == "global":
        return replace(settings, global_counts=not settings.global_counts)
    if what == "keep":
        days = next_value(RETENTION_CHOICES, settings.retention_days)
        return replace(settings, retention_days=days)
    if what == "add":
        policies = cast(tuple[AddPolicy, ...], ADD_POLICIES)
        current = settings.add_policy or default_policy
        return replace(settings, add_policy=next_value(policies, current))
    raise ValueError(f"no setting {what!r}")
