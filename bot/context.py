"""What every handler shares (``bot_data``), and the typed context handlers receive.

Its own module so that the wiring (``bot.app``) and the callbacks (``bot.handlers``,
``bot.watching``) can both import it without importing each other.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

from telegram.ext import CallbackContext, ExtBot

from bot.access import AccessPolicy, SlidingWindowLimiter
from bot.settings import BotSettings
from bot.watch import RepostWatch
from indexer import CpuPool, SearchService

ADMIN_ALERTS_PER_HOUR: Final = 6

T = TypeVar("T")


class BotData:
    """PTB's ``bot_data``: what all handlers share. Read it through :class:`BotContext`."""

    def __init__(self) -> None:
        self.settings: BotSettings | None = None  # set by build_application
        self.access: AccessPolicy | None = None  # set by build_application
        self.pool: CpuPool | None = None  # the bot's worker processes, made in post_init
        self.service: SearchService | None = None  # open between post_init and post_shutdown
        self.watch: RepostWatch | None = None  # runs between post_init and post_shutdown
        self.admin_alerts = SlidingWindowLimiter(ADMIN_ALERTS_PER_HOUR, 3600.0)


class BotContext(CallbackContext[ExtBot[int], dict[Any, Any], dict[Any, Any], BotData]):
    """The context handlers receive, with typed access to the bot's services."""

    @property
    def settings(self) -> BotSettings:
        return required(self.bot_data.settings, "settings")

    @property
    def access(self) -> AccessPolicy:
        return required(self.bot_data.access, "access policy")

    @property
    def service(self) -> SearchService:
        return required(self.bot_data.service, "search service")

    @property
    def watch(self) -> RepostWatch:
        return required(self.bot_data.watch, "repost watch")

    @property
    def admin_alerts(self) -> SlidingWindowLimiter:
        """How often the admins may be told about failures."""
        return self.bot_data.admin_alerts


def required(value: T | None, what: str) -> T:
    """``value``, which the bot's start-up sets; a clear error if it did not."""
    if value is None:
        raise RuntimeError(f"the bot's {what} is not set up: build it with build_application()")
    return value
