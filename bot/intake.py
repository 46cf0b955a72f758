"""Telegram is told an update arrived only once the bot has taken it in.

With long polling, Telegram forgets an update when the bot asks for the next ones with a higher
``offset``. PTB's ``Updater`` asks again as soon as it has queued the updates it got, before any
handler ran: a watched photo killed (SIGKILL) between that request and its row in the watch's
inbox would be lost, and Telegram would not send it again.

So the request that carries the offset waits: :class:`AcknowledgingRequest`, the request object
PTB's builder takes for ``getUpdates`` alone, holds it until every update below the offset is
*settled*. An update is settled as soon as its processing starts, unless one of the handlers
whose work must be durable first (the watch's intake) will take it; those are settled when
their processing ends. Other updates, a slow search among them, never hold the next fetch up.

The wait is bounded (:data:`MAX_ACK_WAIT_S`): a handler stuck for longer must not stop the bot
from receiving anything else. Past it the offset goes out anyway and the overrun is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable
from typing import Any, Final

from telegram.request import BaseRequest, RequestData

log = logging.getLogger(__name__)

# Taking a watched photo in is one small catalog write; SQLite's own busy timeout is 10 s.
MAX_ACK_WAIT_S: Final = 30.0


class UpdateIntake:
    """The updates fetched from Telegram and not yet settled (see the module's docstring)."""

    def __init__(self, *, max_wait_s: float = MAX_ACK_WAIT_S) -> None:
        self._pending: set[int] = set()
        self._max_wait_s = max_wait_s
        self._change = asyncio.Event()
        self.overruns = 0  # offsets sent before the updates below them were settled

    def fetched(self, update_ids: Iterable[int]) -> None:
        self._pending.update(update_ids)

    def settled(self, update_id: int) -> None:
        if update_id in self._pending:
            self._pending.discard(update_id)
            self._change.set()

    def unsettled_below(self, offset: int) -> list[int]:
        return sorted(u for u in self._pending if u < offset)

    async def wait_before_acknowledging(self, offset: int) -> None:
        """Return once every update below ``offset`` is settled, or after the bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait_s
        while waiting := self.unsettled_below(offset):
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.overruns += 1
                log.warning(
                    "updates %s were not taken in after %.0f s: acknowledging them anyway",
                    waiting,
                    self._max_wait_s,
                )
                return
            self._change.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._change.wait(), remaining)


class AcknowledgingRequest(BaseRequest):
    """The ``getUpdates`` request object: sends an offset only once the updates below it are
    settled, and tells the intake which updates each answer brought."""

    def __init__(self, inner: BaseRequest, intake: UpdateIntake) -> None:
        self._inner = inner
        self._intake = intake

    @property
    def read_timeout(self) -> float | None:
        return self._inner.read_timeout

    async def initialize(self) -> None:
        await self._inner.initialize()

    async def shutdown(self) -> None:
        await self._inner.shutdown()

    async def do_request(  # noqa: PLR0917 - BaseRequest's signature
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = BaseRequest.DEFAULT_NONE,
        write_timeout: Any = BaseRequest.DEFAULT_NONE,
        connect_timeout: Any = BaseRequest.DEFAULT_NONE,
        pool_timeout: Any = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        offset = request_data.parameters.get("offset") if request_data is not None else None
        if isinstance(offset, int) and offset > 0:
            await self._intake.wait_before_acknowledging(offset)
        status, payload = await self._inner.do_request(
            url,
            method,
            request_data,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            connect_timeout=connect_timeout,
            pool_timeout=pool_timeout,
        )
        if status == 200:  # PTB sends this object getUpdates calls only
            self._intake.fetched(_update_ids(payload))
        return status, payload


def _update_ids(payload: bytes) -> list[int]:
    """The ids of the updates in a getUpdates answer (none if it is not one)."""
    try:
        result = json.loads(payload).get("result")
    except (ValueError, AttributeError):
        return []
    if not isinstance(result, list):
        return []
    return [u["update_id"] for u in result if isinstance(u, dict) and "update_id" in u]
