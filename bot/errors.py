"""Refusals: the bot declines a request, and the user is told why (wording in replies.py).

    RefusedError               the request cannot be served as asked (not a bug)
    ├── MissingImageError      a command with no photo to work on (or no image id for /remove)
    ├── FileTooBigError        over the 20 MB a bot may download
    ├── NotAllowedError        the user may not do this here (add, remove, change the watch)
    └── RateLimitedError       the user asked too often; try again in a while

Handlers raise these; the global error handler answers them with a sentence from replies.py and
logs them without a traceback, because they are not bugs. Engine errors that are the input's
fault (``ImageError``, ``NotFoundError``) are treated the same way.
"""

from __future__ import annotations

from typing import Literal

Action = Literal["search", "add", "remove", "watch"]


class RefusedError(Exception):
    """Base class: the bot declines the request and says why."""


class MissingImageError(RefusedError):
    """A command came without the photo (or image id) it works on."""

    def __init__(self, command: Action) -> None:
        super().__init__(f"/{command} without a photo to work on")
        self.command = command


class FileTooBigError(RefusedError):
    """The file is larger than a bot may download."""

    def __init__(self, size: int | None, limit: int) -> None:
        super().__init__(f"file of {size if size is not None else 'unknown'} bytes over {limit}")
        self.size = size
        self.limit = limit


class NotAllowedError(RefusedError):
    """The user may not do this in this chat."""

    def __init__(self, action: Action, user_id: int, chat_id: int) -> None:
        super().__init__(f"user {user_id} may not {action} in chat {chat_id}")
        self.action = action


class RateLimitedError(RefusedError):
    """The user has used up their queries for now."""

    def __init__(self, user_id: int, retry_after_s: float) -> None:
        super().__init__(f"user {user_id} rate limited for {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s
