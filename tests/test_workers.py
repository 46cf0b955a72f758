"""Tests of indexer.workers: where pool work runs, and at what priority."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from indexer.workers import CpuPool, background_work


def thread_name() -> str:
    return threading.current_thread().name


def scheduling_class() -> int:
    return os.sched_getscheduler(0)


async def test_work_started_in_the_background_block_runs_on_the_background_executor() -> None:
    pool = CpuPool(
        ThreadPoolExecutor(1, thread_name_prefix="interactive"),
        background=ThreadPoolExecutor(1, thread_name_prefix="background"),
    )
    try:
        before = await pool.run(thread_name)
        with background_work():
            inside = await pool.run(thread_name)
            # A task started in the block (as asyncio.gather starts them) inherits it.
            in_a_task = await asyncio.create_task(pool.run(thread_name))
        after = await pool.run(thread_name)
    finally:
        pool.shutdown()

    assert [name.split("_")[0] for name in (before, inside, in_a_task, after)] == [
        "interactive",
        "background",
        "background",
        "interactive",
    ]


async def test_a_pool_without_a_background_executor_runs_background_work_as_any_other() -> None:
    pool = CpuPool(ThreadPoolExecutor(1, thread_name_prefix="interactive"))
    try:
        with background_work():
            name = await pool.run(thread_name)
    finally:
        pool.shutdown()

    assert name.startswith("interactive")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
@pytest.mark.timeout(120)
async def test_background_worker_processes_run_only_on_cores_nothing_else_wants() -> None:
    pool = CpuPool.processes(1)
    try:
        interactive = await pool.run(scheduling_class)
        with background_work():
            background = await pool.run(scheduling_class)
    finally:
        pool.shutdown()

    assert (interactive, background) == (os.SCHED_OTHER, os.SCHED_IDLE)
