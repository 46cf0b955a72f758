"""Where CPU-heavy work runs: inline, or in a pool of worker processes.

KAZE costs ~0.15 s a photo: in the bot it must never run on the event loop,
and in a build it should use every core. A single CLI query runs inline,
because starting a worker would cost more than the query.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import ParamSpec, TypeVar

from indexer.features import limit_threads

P = ParamSpec("P")
T = TypeVar("T")


def _initialize_worker() -> None:
    # Each worker is one core: nested OpenCV threads would only fight over it. BLAS is
    # single-threaded already, by the environment indexer/__init__.py sets before numpy
    # is imported, which the workers inherit.
    limit_threads()


class CpuPool:
    """Runs functions inline or in worker processes, behind one async interface."""

    def __init__(self, executor: Executor | None, workers: int = 1) -> None:
        self._executor = executor
        self.workers = workers

    @classmethod
    def inline(cls) -> CpuPool:
        """Run on the calling thread (blocks the event loop: for CLI use only)."""
        return cls(None)

    @classmethod
    def processes(cls, workers: int | None = None) -> CpuPool:
        """A pool of ``workers`` processes (default: one per core).

        Workers are started with ``forkserver``: forking a process that already
        runs threads (aiosqlite, the asyncio loop) can deadlock in the child.
        """
        context = multiprocessing.get_context("forkserver")
        count = workers or os.cpu_count() or 1
        executor = ProcessPoolExecutor(
            max_workers=count, mp_context=context, initializer=_initialize_worker
        )
        return cls(executor, count)

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._executor is None:
            return function(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(function, *args, **kwargs)
        )

    def shutdown(self, *, cancel_pending: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel_pending)
