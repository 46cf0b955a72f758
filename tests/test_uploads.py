"""Photos fitted to Telegram's upload limits (bot/uploads.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from bad_inputs import (
    CORPUS_WORKING_SIDE,
    ORIENTED_CASES,
    BadInputCorpus,
    encoded,
    photo_jpeg,
    sample_photo,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.uploads import fit_for_telegram
from indexer.errors import ImageTooLargeError
from indexer.images import image_format, load_working_image


def telegram_limits_hold(
    photo: bytes, *, max_bytes: int = 10 * 2**20, max_dimension_sum: int = 10_000
) -> tuple[int, int]:
    assert len(photo) <= max_bytes
    with Image.open(io.BytesIO(photo)) as picture:
        assert picture.format in {"JPEG", "PNG"}
        width, height = picture.size
        picture.load()
    assert width + height <= max_dimension_sum
    assert max(width, height) <= 20 * min(width, height)
    return width, height


def test_very_wide_picture_is_scaled_and_padded_for_telegram() -> None:
    panorama = encoded(sample_photo("coffee", (12_000, 300)), "PNG")
    photo = fit_for_telegram(panorama)
    width, height = telegram_limits_hold(photo)
    assert width > 9000
    with Image.open(io.BytesIO(photo)) as decoded:
        middle_band = np.asarray(decoded.convert("L"))[height // 2 - 2 : height // 2 + 2]
    assert np.std(middle_band) > 20  # the panorama itself, not padding


def test_picture_over_ten_megabytes_is_recompressed() -> None:
    noise = np.random.default_rng(1).integers(0, 256, (1600, 2400, 3), dtype=np.uint8)
    heavy = encoded(Image.fromarray(noise), "PNG", compress_level=0)
    assert len(heavy) > 10 * 2**20
    photo = fit_for_telegram(heavy)
    assert telegram_limits_hold(photo) == (2400, 1600)


def test_byte_limit_is_met_by_shrinking() -> None:
    photo = fit_for_telegram(photo_jpeg((1600, 1200)), max_bytes=30_000)
    width, height = telegram_limits_hold(photo, max_bytes=30_000)
    assert abs(width / height - 4 / 3) < 0.02


def test_impossible_byte_limit_is_too_large() -> None:
    with pytest.raises(ImageTooLargeError):
        fit_for_telegram(photo_jpeg((320, 240)), max_bytes=100)


@pytest.mark.parametrize("image_format_name", ["JPEG", "PNG"])
def test_fitting_jpeg_or_png_is_returned_untouched(image_format_name: str) -> None:
    original = encoded(sample_photo(), image_format_name)
    assert fit_for_telegram(original) == original


def test_other_formats_become_jpeg(corpus: BadInputCorpus) -> None:
    photo = fit_for_telegram(corpus["webp_lossy"].path)
    assert image_format(photo) == "JPEG"
    telegram_limits_hold(photo)


def test_re_encoded_photo_is_upright(corpus: BadInputCorpus) -> None:
    sideways = corpus[ORIENTED_CASES[6]].path
    upright = load_working_image(sideways, working_side=CORPUS_WORKING_SIDE)
    upright_width, upright_height = upright.width, upright.height
    width, height = telegram_limits_hold(
        fit_for_telegram(sideways, max_dimension_sum=300), max_dimension_sum=300
    )
    assert (width > height) == (upright_width > upright_height)


@settings(max_examples=25, deadline=None)
@given(width=st.integers(1, 12_000), height=st.integers(1, 12_000))
def test_telegram_limits_hold_for_any_shape(width: int, height: int) -> None:
    assume(width * height <= 3_000_000)
    solid = encoded(Image.new("RGB", (width, height), (90, 140, 200)), "PNG")
    photo = fit_for_telegram(solid)
    telegram_limits_hold(photo)
    fits_already = width + height <= 10_000 and max(width, height) <= 20 * min(width, height)
    assert (photo == solid) == fits_already
