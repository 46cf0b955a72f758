"""Helpers shared by the benchmarks: photo listing, seeded sampling, timing, medians,
a description of the machine, and result tables.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageOps

T = TypeVar("T")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
DEFAULT_OUT_DIR = Path("bench/out")


def list_photos(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), in a stable order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"photo folder not found: {folder}")
    photos = sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    if not photos:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return photos


@dataclass(frozen=True)
class Split:
    """Photos that go into the searched collection, and held-out photos that do not."""

    collection: list[Path]
    unrelated: list[Path]


def split_photos(photos: Sequence[Path], collection_size: int, unrelated_size: int,
                 seed: int) -> Split:
    """A seeded split of ``photos`` into two disjoint sets of the requested sizes."""
    needed = collection_size + unrelated_size
    if collection_size < 1 or unrelated_size < 0:
        raise ValueError("the collection needs at least one photo; unrelated cannot be negative")
    if needed > len(photos):
        raise ValueError(
            f"{collection_size} collection + {unrelated_size} unrelated photos requested, "
            f"but the folder has only {len(photos)}"
        )
    shuffled = list(photos)
    random.Random(seed).shuffle(shuffled)
    return Split(
        collection=sorted(shuffled[:collection_size]),
        unrelated=sorted(shuffled[collection_size:needed]),
    )


def seeded_sample(items: Sequence[T], count: int, seed: int) -> list[T]:
    """``count`` items (all of them when fewer), chosen by ``seed``, in their original order."""
    if count >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), count))
    return [items[i] for i in chosen]


def derive_seed(*parts: object) -> int:
    """A seed that depends only on ``parts``; unlike ``hash()`` it is the same in every process."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_rgb(path: Path) -> np.ndarray:
    """The photo as a person sees it (EXIF orientation applied), as an RGB uint8 array."""
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
        return np.asarray(upright.convert("RGB"))


TELEGRAM_PHOTO_SIDE = 1280  # Telegram's largest rendition of a photo sent as a photo


def as_telegram_photo(
    image: np.ndarray, *, side: int = TELEGRAM_PHOTO_SIDE, quality: int = 87
) -> bytes:
    """The JPEG Telegram would store of ``image``: its longest side at most ``side`` px."""
    picture = Image.fromarray(image)
    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def timed(function: Callable[[], T]) -> tuple[T, float]:
    """The result of ``function()`` and the wall-clock seconds it took."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def median(values: Iterable[float]) -> float:
    collected = list(values)
    if not collected:
        raise ValueError("median of no values")
    return float(statistics.median(collected))


def default_workers() -> int:
    return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: they only compare within one run on one machine."""
    import cv2
    import PIL

    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "--:" for i in range(len(headers))) + "|",
    ]
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def percent(value: float | None) -> str:
    """A rate as a table cell; ``None`` means the method did not run, shown as a dash."""
    return "-" if value is None else f"{100 * value:.0f}%"


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
