"""Helpers shared by the engine's tests: settings for tiny collections, photo
edits, one built index per session that modules copy, and a FIFO watchdog.

The 12-photo index costs a few seconds of KAZE, so it is built once per test
session and every module works on its own copy (the catalog points at the
session's ``photos_dir``, which nobody changes).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from conftest import CC0_PHOTOS, jpeg_bytes, photo_array
from PIL import Image, ImageDraw, ImageFont

from indexer.build import BuildReport
from indexer.search import Match
from indexer.settings import EngineSettings
from testsupport.engine import build_folder, copy_index

Rgb = npt.NDArray[np.uint8]

# A dozen images cannot train 256 whitening dimensions; 16 asks for 32 training
# images, so these collections keep the exact, un-projected VLAD.
TEST_SETTINGS = EngineSettings(dimensions=16)

INDEXED_PHOTOS = CC0_PHOTOS[:12]
# Photographs with structure; brick, grass and gravel are textures, and page and
# text are scans, so they make poor "original" photos for edit tests.
QUERY_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")
# CC0 photos that are not in ``photos_dir``: never the same picture as an indexed one.
UNINDEXED_PHOTOS = CC0_PHOTOS[12:]

# A verified match scores above this; unverified ones stay below it.
VERIFIED_SCORE = 0.5


def run_build(photos: Path, index: Path, *, retrain: bool = False) -> BuildReport:
    """Build (or update) ``index`` from ``photos`` with the test settings."""
    return build_folder(photos, index, settings=TEST_SETTINGS, retrain=retrain)


_SESSION_INDEXES: dict[Path, Path] = {}


def shared_index(tmp_path_factory: pytest.TempPathFactory, photos_dir: Path) -> Path:
    """The index of ``photos_dir``, built once per session. Read it through a copy."""
    if photos_dir not in _SESSION_INDEXES:
        index = tmp_path_factory.mktemp("shared-index") / "index"
        report = run_build(photos_dir, index)
        assert report.failed == []
        assert report.added == len(INDEXED_PHOTOS)
        _SESSION_INDEXES[photos_dir] = index
    return _SESSION_INDEXES[photos_dir]


def copy_of_shared_index(
    tmp_path_factory: pytest.TempPathFactory, photos_dir: Path, name: str
) -> Path:
    return copy_index(
        shared_index(tmp_path_factory, photos_dir), tmp_path_factory.mktemp(name) / "index"
    )


def stem(match: Match) -> str:
    """The photo name a match refers to (``astronaut`` for ``.../astronaut.jpg``)."""
    return Path(match.image.path).stem


# --- edits of real photos -----------------------------------------------------------


def cropped(image: Rgb) -> Rgb:
    """The central part: a quarter of each side cut away horizontally, an eighth vertically."""
    height, width = image.shape[:2]
    return np.ascontiguousarray(image[height // 8 : height * 7 // 8, width // 4 : width * 3 // 4])


def rotated(image: Rgb, degrees: float = 15.0) -> Rgb:
    """Turned about its centre on a black canvas of the same size (corners lost)."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_CONSTANT)


def quarter_turned(image: Rgb) -> Rgb:
    return np.ascontiguousarray(np.rot90(image))


def flipped(image: Rgb) -> Rgb:
    return np.ascontiguousarray(image[:, ::-1])


def quartered(image: Rgb) -> Rgb:
    """Down to a quarter of each side, as a thumbnail."""
    height, width = image.shape[:2]
    return np.asarray(
        Image.fromarray(image).resize((width // 4, height // 4), Image.Resampling.LANCZOS)
    )


def brightened(image: Rgb) -> Rgb:
    """Much brighter and a little more contrasted (highlights clip)."""
    return np.clip(image.astype(np.float32) * 1.2 + 50, 0, 255).astype(np.uint8)


def captioned(image: Rgb) -> Rgb:
    """A meme-style caption: a black band over the bottom fifth with white text,
    and a line of text written straight over the top of the picture."""
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    font = ImageFont.load_default(size=max(12, height // 12))
    draw.rectangle((0, height * 4 // 5, width, height), fill=(0, 0, 0))
    draw.text((width // 20, height * 4 // 5 + height // 40), "WHEN THE BUILD", font=font,
              fill=(255, 255, 255))
    draw.text((width // 20, height // 20), "finally passes", font=font, fill=(255, 255, 0))
    return np.asarray(picture)


def bordered(image: Rgb) -> Rgb:
    """A white frame a tenth of the size on every side, as a shared post adds."""
    height, width = image.shape[:2]
    vertical, horizontal = height // 10, width // 10
    return cv2.copyMakeBorder(
        image, vertical, vertical, horizontal, horizontal, cv2.BORDER_CONSTANT,
        value=(255, 255, 255),
    )


def screenshotted(image: Rgb) -> Rgb:
    """The photo at 40% of its size on a phone screen of a social app: flat
    background, a header and a caption in text lines, a navigation bar.

    At that size, amid that much text, the whole screenshot describes its frame
    as much as the photo; see :func:`screenshot_box` for where the photo lies."""
    screen, (left, top, right, bottom) = _screenshot_layout(image)
    picture = Image.new("RGB", screen, (250, 250, 250))
    draw = ImageDraw.Draw(picture)
    unit = screen[0] // 12
    font = ImageFont.load_default(size=max(10, unit * 2 // 3))
    draw.text((unit // 2, unit // 4), "09:41", font=font, fill=(20, 20, 20))
    draw.ellipse((unit // 2, unit * 3 // 2, unit * 3 // 2, unit * 5 // 2), fill=(200, 60, 90))
    draw.text((unit * 2, unit * 3 // 2), "someone_with_a_camera", font=font, fill=(20, 20, 20))
    photo = Image.fromarray(image).resize((right - left, bottom - top), Image.Resampling.LANCZOS)
    picture.paste(photo, (left, top))
    for line, words in enumerate(("1,204 likes", "what a day it was", "view all comments")):
        draw.text((unit // 2, bottom + unit // 2 + line * unit), words, font=font,
                  fill=(20, 20, 20))
    draw.rectangle((0, screen[1] - unit, screen[0], screen[1]), fill=(238, 238, 238))
    return np.asarray(picture)


def screenshot_box(image: Rgb) -> tuple[float, float, float, float]:
    """Where :func:`screenshotted` puts the photo: left, top, right, bottom in
    fractions of the screen."""
    (width, height), (left, top, right, bottom) = _screenshot_layout(image)
    return left / width, top / height, right / width, bottom / height


def _screenshot_layout(image: Rgb) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    height, width = image.shape[:2]
    photo_width, photo_height = width * 2 // 5, height * 2 // 5
    margin = photo_width // 25
    screen_width = photo_width + 2 * margin
    screen_height = screen_width * 2
    top = screen_height // 4
    return (screen_width, screen_height), (margin, top, margin + photo_width, top + photo_height)


@dataclass(frozen=True, slots=True)
class Edit:
    transform: Callable[[Rgb], Rgb]
    jpeg_quality: int


EDITS: dict[str, Edit] = {
    "crop": Edit(cropped, 90),
    "rotate_15": Edit(rotated, 90),
    "rotate_90": Edit(quarter_turned, 90),
    "flip": Edit(flipped, 90),
    "quarter_size_jpeg_20": Edit(quartered, 20),
    "brighter": Edit(brightened, 90),
    "caption": Edit(captioned, 90),
    "border": Edit(bordered, 90),
    "screenshot": Edit(screenshotted, 90),
}


def edited_jpeg(photo: str, edit: str) -> bytes:
    chosen = EDITS[edit]
    return jpeg_bytes(chosen.transform(photo_array(photo)), chosen.jpeg_quality)


# --- pictures that are nobody's photo ----------------------------------------------------


def noise_jpeg(seed: int, size: tuple[int, int] = (480, 360)) -> bytes:
    """Uniform colour noise (width x height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return jpeg_bytes(pixels, 90)


def shapes_jpeg(seed: int, size: tuple[int, int] = (480, 360)) -> bytes:
    """A synthetic drawing: colour ramps with random rectangles and discs on top.
    Plenty of corners and edges, but no photo's content."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    ramps = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1)
    canvas = np.ascontiguousarray(ramps.astype(np.uint8))
    for _ in range(12):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        left, top = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        if rng.random() < 0.5:
            right, bottom = left + int(rng.integers(20, 120)), top + int(rng.integers(20, 120))
            cv2.rectangle(canvas, (left, top), (right, bottom), colour, -1)
        else:
            cv2.circle(canvas, (left + 20, top + 20), int(rng.integers(8, 50)), colour, -1)
    return jpeg_bytes(canvas, 90)


# --- FIFOs ----------------------------------------------------------------------------


class FifoWatchdog:
    """Releases anyone blocked opening ``fifo`` for reading, and counts how often.

    Opening a FIFO for reading waits for a writer forever; the engine must never
    do it. While the watchdog runs it keeps trying to open the write end without
    blocking, which only succeeds while a reader is waiting; it then closes it at
    once, so the reader sees an empty file instead of hanging the test. A
    ``released`` count above zero means something opened the FIFO blocking.
    """

    POLL_SECONDS = 0.1

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.released = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fifo-watchdog", daemon=True)

    def __enter__(self) -> FifoWatchdog:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.POLL_SECONDS):
            try:
                descriptor = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as error:
                if error.errno in (errno.ENXIO, errno.ENOENT):  # nobody is waiting
                    continue
                raise
            os.close(descriptor)
            self.released += 1
