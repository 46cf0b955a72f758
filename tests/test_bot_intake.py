"""Tests of bot.intake: when Telegram may be told that updates arrived."""

from __future__ import annotations

import asyncio

from bot.intake import UpdateIntake


async def test_an_offset_waits_for_the_updates_below_it_and_no_others() -> None:
    intake = UpdateIntake(max_wait_s=10.0)
    intake.fetched([5, 6, 9])
    waiting = asyncio.create_task(intake.wait_before_acknowledging(7))
    intake.settled(9)  # above the offset: not waited for
    intake.settled(5)
    await asyncio.sleep(0.05)
    assert not waiting.done()

    intake.settled(6)

    await asyncio.wait_for(waiting, 1.0)
    assert intake.overruns == 0
    assert intake.unsettled_below(100) == []


async def test_an_update_never_settled_is_acknowledged_after_the_bound() -> None:
    intake = UpdateIntake(max_wait_s=0.05)
    intake.fetched([5])

    await asyncio.wait_for(intake.wait_before_acknowledging(6), 1.0)

    assert intake.overruns == 1
    assert intake.unsettled_below(6) == [5]
