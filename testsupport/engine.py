"""Helpers for driving the engine that the tests and the benchmarks share."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from indexer import BuildReport, CpuPool, EngineSettings, SearchService, build_index

BUILD_WORKERS = 2


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


def build_folder(
    photos: Path, index: Path, *, settings: EngineSettings, retrain: bool = False
) -> BuildReport:
    """Build (or update) ``index`` from the folder ``photos``, outside any event loop."""
    return asyncio.run(
        build_index(
            photos,
            index,
            workers=BUILD_WORKERS,
            progress=False,
            settings=settings,
            retrain=retrain,
        )
    )


def build_collection(
    photos: Iterable[Path],
    index: Path,
    *,
    settings: EngineSettings,
    saved_as: Callable[[Path], str] = lambda photo: photo.name,
) -> Path:
    """An index of ``photos``, each copied first (as ``saved_as(photo)``) into a folder of
    its own beside ``index``; returns ``index``."""
    folder = index.parent / f"{index.name}-photos"
    folder.mkdir(parents=True)
    for photo in photos:
        shutil.copyfile(photo, folder / saved_as(photo))
    build_folder(folder, index, settings=settings)
    return index


def copy_index(source: Path, target: Path) -> Path:
    """A private copy of a closed index folder (catalog, generations, originals)."""
    shutil.copytree(source, target)
    return target


def percentile(values: Sequence[float], share: float) -> float:
    """The ``share`` (0..1) percentile of ``values``, interpolated; NaN for none."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), share * 100.0))
