"""Where CPU-heavy work runs: inline, or in a pool of worker processes.

KAZE costs ~0.15 s a photo: in the bot it must never run on the event loop,
and in a build it should use every core. A single CLI query runs inline,
because starting a worker would cost more than the query.

Work nobody waits on as closely as a query (adds, an import, a rebuild's
training) is started inside :func:`background_work`. A process pool runs it on
workers of its own that the scheduler serves only with CPU time no query
worker wants, so adds take little from the queries running beside them
(docs/BENCHMARKS.md, "Adds while querying").
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import ParamSpec, TypeVar

from indexer.features import limit_threads

P = ParamSpec("P")
T = TypeVar("T")


_in_background: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "in_background", default=False
)


@contextlib.contextmanager
def background_work() -> Iterator[None]:
    """Pool work started in this block, and in the tasks it starts, yields the CPU
    to all other pool work: an add waits for the queries, not the reverse."""
    token = _in_background.set(True)
    try:
        yield
    finally:
        _in_background.reset(token)


def _initialize_worker() -> None:
    # Each worker is one core: nested OpenCV threads would only fight over it. BLAS is
    # single-threaded already, by the environment indexer/__init__.py sets before numpy
    # is imported, which the workers inherit.
    limit_threads()


def _initialize_background_worker() -> None:
    _initialize_worker()
    # The scheduler runs an idle-class process only on a core that nothing else wants, and
    # takes the core back at once when a query's worker wakes up; where there is no such
    # class, the lowest priority is the next best.
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(19)


class CpuPool:
    """Runs functions inline or in worker processes, behind one async interface."""

    def __init__(
        self, executor: Executor | None, workers: int = 1, *, background: Executor | None = None
    ) -> None:
        self._executor = executor
        self._background = background
        self.workers = workers

    @classmethod
    def inline(cls) -> CpuPool:
        """Run on the calling thread (blocks the event loop: for CLI use only)."""
        return cls(None)

    @classmethod
    def processes(cls, workers: int | None = None) -> CpuPool:
        """A pool of ``workers`` processes (default: one per core), and as many more
        for :func:`background_work`, at the idle scheduling class.

        Workers are started with ``forkserver``: forking a process that already
        runs threads (aiosqlite, the asyncio loop) can deadlock in the child.
        """
        context = multiprocessing.get_context("forkserver")
        count = workers or os.cpu_count() or 1
        executor = ProcessPoolExecutor(
            max_workers=count, mp_context=context, initializer=_initialize_worker
        )
        # Its workers start on first use, as every forkserver pool's do.
        background = ProcessPoolExecutor(
            max_workers=count, mp_context=context, initializer=_initialize_background_worker
        )
        return cls(executor, count, background=background)

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        executor = self._executor
        if self._background is not None and _in_background.get():
            executor = self._background
        if executor is None:
            return function(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, functools.partial(function, *args, **kwargs))

    def shutdown(self, *, cancel_pending: bool = False) -> None:
        for executor in (self._executor, self._background):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=cancel_pending)
