"""What checking a 20 MB video costs, against a photo query measured in the same run.

    .venv/bin/python -m bench.moving --photos ../shared/photos --indexed 40 --repeats 5

Issue 13's bound: "checking a 20 MB video costs at most 3x a photo query".

Set-up: an index of the first ``--indexed`` photos of the folder (sorted by name), built with
the default engine settings but 32 dimensions (a few dozen photos cannot train 256), queried
through ``SearchService.query`` on an inline pool, as the CLI does. Two pairs of queries,
taken in turns ``--repeats`` times because the machine is shared and absolute times drift:

* found: a JPEG crop of the first indexed photo, and an MP4 of 1280 x 720 frames panning and
  zooming over it, written at 30 fps with as many frames as make it at least 20 MB;
* not found: the same of a photo outside the index (every frame of the video is tried).

Reported: the median seconds of each query and the ratio video / photo per pair.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from indexer import EngineSettings
from testsupport.engine import build_folder, opened_service
from testsupport.videos import pan_and_zoom, video_bytes

TARGET_BYTES = 20 * 2**20
SIZE = (1280, 720)
FPS = 30.0


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _photo_query(rgb: np.ndarray) -> bytes:
    height, width = rgb.shape[:2]
    crop = rgb[height // 10 : height - height // 10, width // 10 : width - width // 10]
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _video_of_at_least(rgb: np.ndarray, target: int) -> bytes:
    # Bytes a frame costs, from a short sample; then enough frames for the target.
    sample = video_bytes(pan_and_zoom(rgb, frames=30, size=SIZE), fps=FPS)
    frames = max(30, int(30 * target / len(sample) * 1.1))
    data = video_bytes(pan_and_zoom(rgb, frames=frames, size=SIZE), fps=FPS)
    while len(data) < target:
        frames = int(frames * 1.3)
        data = video_bytes(pan_and_zoom(rgb, frames=frames, size=SIZE), fps=FPS)
    return data


async def _timed(index: Path, queries: dict[str, bytes], repeats: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {name: [] for name in queries}
    verified: dict[str, bool] = {}
    async with opened_service(index) as service:
        for _ in range(repeats):
            for name, data in queries.items():
                started = time.perf_counter()
                matches = await service.query(data, top=5)
                seconds[name].append(time.perf_counter() - started)
                verified[name] = bool(matches) and matches[0].verified
    print("first result verified:", verified)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--indexed", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    photos = sorted(
        p for p in arguments.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"}
    )
    indexed, outside = photos[: arguments.indexed], photos[arguments.indexed]
    with tempfile.TemporaryDirectory() as folder:
        collection = Path(folder) / "photos"
        collection.mkdir()
        for photo in indexed:
            (collection / photo.name).symlink_to(photo.absolute())
        index = Path(folder) / "index"
        build_folder(collection, index, settings=EngineSettings(dimensions=32))
        found, missing = _rgb(indexed[0]), _rgb(outside)
        queries = {
            "photo, found": _photo_query(found),
            "video, found": _video_of_at_least(found, TARGET_BYTES),
            "photo, not found": _photo_query(missing),
            "video, not found": _video_of_at_least(missing, TARGET_BYTES),
        }
        for name, data in queries.items():
            print(f"{name}: {len(data) / 2**20:.1f} MB")
        seconds = asyncio.run(_timed(index, queries, arguments.repeats))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, values in seconds.items():
        print(f"{name}: median {medians[name]:.3f} s of {[round(v, 3) for v in values]}")
    for case in ("found", "not found"):
        ratio = medians[f"video, {case}"] / medians[f"photo, {case}"]
        print(f"{case}: video / photo = {ratio:.2f}x")


if __name__ == "__main__":
    main()
