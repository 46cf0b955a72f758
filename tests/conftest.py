"""Shared fixtures: small real photos (CC0, shipped with scikit-image) and a throwaway index."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import BadInputCorpus, write_bad_inputs
from hypothesis import settings as hypothesis_settings
from skimage import data as skimage_data

from testsupport.edits import encode_jpeg
from testsupport.telegram_emulator import TelegramEmulator

# PTB 22 warns that RetryAfter.retry_after becomes a timedelta; opting in now keeps
# warnings-as-errors from turning every flood-control test into a warning failure.
os.environ.setdefault("PTB_TIMEDELTA", "1")

# Property tests check what a function returns, not how fast: on a shared 2-core machine
# under load one example can take longer than Hypothesis's default 200 ms deadline, and a
# failure that says so would be about the machine, not the code.
hypothesis_settings.register_profile("shared-machine", deadline=None)
hypothesis_settings.load_profile("shared-machine")

# Distinct, detailed CC0 photos from scikit-image (no network needed: they ship in the wheel).
CC0_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick",
              "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "page", "text",
              "coins", "horse", "moon", "clock", "retina")


def photo_array(name: str) -> np.ndarray:
    """An RGB uint8 array of the named scikit-image sample photo."""
    image = getattr(skimage_data, name)()
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def jpeg_bytes(image: np.ndarray, quality: int = 92) -> bytes:
    """``image`` as a JPEG file, at the quality a phone camera saves."""
    return encode_jpeg(image, quality)


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of a dozen real photos as JPEG files (session-wide, do not modify)."""
    folder = tmp_path_factory.mktemp("photos")
    for name in CC0_PHOTOS[:12]:
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photo_array(name)))
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> BadInputCorpus:
    """Every hostile and odd input case of bad_inputs.py, written once (do not modify)."""
    return write_bad_inputs(tmp_path_factory.mktemp("bad-inputs"))


@pytest.fixture
def photos_copy(tmp_path: Path, photos_dir: Path) -> Path:
    """A private copy of ``photos_dir`` that a test may change."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for source in sorted(photos_dir.iterdir()):
        (folder / source.name).write_bytes(source.read_bytes())
    return folder


@pytest.fixture
async def emu() -> AsyncIterator[TelegramEmulator]:
    """A Telegram Bot API emulator on 127.0.0.1, fresh for each test."""
    async with TelegramEmulator() as emulator:
        yield emulator
