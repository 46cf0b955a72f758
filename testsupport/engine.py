"""Helpers for driving the engine that the tests and the benchmarks share."""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np

from indexer import CpuPool, EngineSettings, SearchService


@contextlib.asynccontextmanager
async def opened_service(
    index: Path,
    *,
    settings: EngineSettings | None = None,
    pool: CpuPool | None = None,
    create: bool = False,
) -> AsyncIterator[SearchService]:
    """The search service of ``index`` (work inline unless a pool is given), closed after.

    ``settings`` define a new index (``create``); an existing one keeps its own stored
    settings and takes only the query-time ones.
    """
    service = await SearchService.open(
        index, settings=settings, pool=pool or CpuPool.inline(), create=create
    )
    try:
        yield service
    finally:
        await service.close()


def copy_index(source: Path, target: Path) -> Path:
    """A private copy of a closed index folder (catalog, generations, originals)."""
    shutil.copytree(source, target)
    return target


def percentile(values: Sequence[float], share: float) -> float:
    """The ``share`` (0..1) percentile of ``values``, interpolated; NaN for none."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), share * 100.0))
