"""Who may do what: adding and removing photos, and how often a user may query.

Bot admins (``[access] admins``) may do everything everywhere. A chat's administrators (in a
private chat: its user) may remove the photos added in their chat, and add photos when the
policy is ``chat_admins``. The offline collection is changed by bot admins only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Final

from telegram import Chat, User
from telegram.constants import ChatMemberStatus, ChatType

from bot.errors import NotAllowedError, RateLimitedError
from bot.settings import AccessSettings, AddPolicy
from indexer import GLOBAL_SCOPE, ImageRecord, NotFoundError

QUERY_WINDOW_S: Final = 60.0
_CHAT_ADMIN_STATUSES: Final = frozenset({ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER})
# Past this many tracked keys, keys with no recent use are forgotten, so memory stays bounded.
_SWEEP_ABOVE_KEYS: Final = 10_000


class SlidingWindowLimiter:
    """At most ``limit`` events per key in any ``window_s`` seconds."""

    def __init__(
        self, limit: int, window_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("a limiter needs a positive limit and window")
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._events: dict[Hashable, deque[float]] = {}

    def acquire(self, key: Hashable) -> float:
        """Record one event for ``key`` if the window has room.

        Returns 0.0 when the event was admitted, otherwise the seconds until it would be
        (and nothing is recorded).
        """
        now = self._clock()
        if len(self._events) > _SWEEP_ABOVE_KEYS:
            self._forget_idle(now)
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self._window_s:
            events.popleft()
        if len(events) >= self._limit:
            return events[0] + self._window_s - now
        events.append(now)
        return 0.0

    def _forget_idle(self, now: float) -> None:
        idle = [key for key, events in self._events.items() if events[-1] <= now - self._window_s]
        for key in idle:
            del self._events[key]


class AccessPolicy:
    """The checks handlers make before doing anything on a user's behalf."""

    def __init__(
        self, settings: AccessSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._queries = (
            SlidingWindowLimiter(settings.queries_per_minute, QUERY_WINDOW_S, clock=clock)
            if settings.queries_per_minute > 0
            else None
        )

    def is_admin(self, user: User) -> bool:
        return user.id in self._settings.admins

    def check_query(self, user: User) -> None:
        """Count one query (search or add) of ``user``; bot admins are not limited.

        Raises:
            RateLimitedError: the user has used up their queries for the current minute.
        """
        if self._queries is None or self.is_admin(user):
            return
        wait_s = self._queries.acquire(user.id)
        if wait_s > 0:
            raise RateLimitedError(user.id, wait_s)

    @property
    def add_policy(self) -> AddPolicy:
        """Who may /add where a chat did not choose otherwise."""
        return self._settings.add_policy

    async def check_may_add(
        self, chat: Chat, user: User, *, chat_policy: AddPolicy | None = None
    ) -> None:
        """Raises NotAllowedError unless ``user`` may add photos to ``chat``'s collection
        (under the chat's own policy, if it chose one in /settings)."""
        policy = chat_policy or self._settings.add_policy
        if policy == "everyone" or self.is_admin(user):
            return
        if policy == "chat_admins" and await self._is_chat_admin(chat, user):
            return
        raise NotAllowedError("add", user.id, chat.id)

    async def check_may_remove(self, chat: Chat, user: User, image: ImageRecord | None) -> None:
        """The rules of /remove, all of them: in ``chat``, an image may be removed if it is the
        chat's own (by its admins) or from the offline collection (by bot admins only). An
        image of another chat is not even there: it cannot be named from here.

        With ``image`` None, checks that ``user`` may remove anything here at all, so that a
        /remove is refused before any download or search.

        Raises:
            NotFoundError: ``image`` belongs to another chat.
            NotAllowedError: ``user`` may not remove it.
        """
        scope = chat.id if image is None else image.scope
        if scope not in {GLOBAL_SCOPE, chat.id}:
            raise NotFoundError(f"image #{image.id if image else '?'} belongs to another chat")
        if self.is_admin(user):
            return
        if scope != GLOBAL_SCOPE and await self._is_chat_admin(chat, user):
            return
        raise NotAllowedError("remove", user.id, chat.id)

    async def may_manage(self, chat: Chat, user: User) -> bool:
        """Whether ``user`` may change how ``chat`` is watched: its admins and bot admins."""
        return self.is_admin(user) or await self._is_chat_admin(chat, user)

    async def _is_chat_admin(self, chat: Chat, user: User) -> bool:
        if chat.type == ChatType.PRIVATE:
            return chat.id == user.id
        member = await chat.get_member(user.id)
        return member.status in _CHAT_ADMIN_STATUSES
