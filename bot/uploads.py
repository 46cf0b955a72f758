"""Photos Telegram accepts as uploads: within its byte, size and aspect limits.

Results are files of the collection, which may be larger, longer or in formats
Telegram does not take as photos. The engine decodes them (it is the one place
that handles untrusted image files); this module decides the size and encodes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from indexer import ImageTooLargeError, Picture, decode_rgb, encode_jpeg, open_picture

# sendPhoto's limits (https://core.telegram.org/bots/api#sendphoto).
TELEGRAM_MAX_BYTES: Final = 10 * 2**20
TELEGRAM_MAX_DIMENSION_SUM: Final = 10_000
TELEGRAM_MAX_ASPECT_RATIO: Final = 20.0
# Each retry shrinks the picture this much, so about a dozen retries cover any
# size a 60-megapixel source can produce.
_SHRINK: Final = 0.75
_QUALITIES: Final = (90, 75)
# Fewer pixels across than this are not worth sending.
_SMALLEST_SIDE: Final = 8
# Padding is mid-grey, like transparency in the engine's decoding: it reads as
# "no picture here" on both light and dark chat themes.
_PADDING_GREY: Final = 128

RgbArray = npt.NDArray[np.uint8]


def fit_for_telegram(
    source: bytes | Path,
    *,
    max_bytes: int = TELEGRAM_MAX_BYTES,
    max_dimension_sum: int = TELEGRAM_MAX_DIMENSION_SUM,
    max_aspect_ratio: float = TELEGRAM_MAX_ASPECT_RATIO,
) -> bytes:
    """Return bytes Telegram accepts as a photo.

    A JPEG or PNG already within the limits comes back untouched.  Anything
    else is decoded (first frame, upright, transparency on mid-grey), scaled so
    that width + height <= ``max_dimension_sum``, padded with mid-grey so that
    the long side is at most ``max_aspect_ratio`` times the short one, and
    encoded as JPEG, shrinking further until it is at most ``max_bytes``.

    Raises:
        ImageError: the source is not a usable image (the engine's decoding limits).
        ImageTooLargeError: no size fits ``max_bytes``.
        SourceError: the file cannot be read.
    """
    if max_bytes < 1 or max_dimension_sum < 2 * _SMALLEST_SIDE or max_aspect_ratio < 1:
        raise ValueError("Telegram limits must be positive and allow a small square")
    picture = open_picture(source)
    if _already_fits(picture, max_bytes, max_dimension_sum, max_aspect_ratio):
        return picture.data
    longest = max(picture.width, picture.height)
    scale = _scale(picture.width, picture.height, max_dimension_sum, max_aspect_ratio)
    side = max(1, math.floor(longest * scale))
    while side >= _SMALLEST_SIDE:
        padded = _pad_to_aspect(decode_rgb(picture, max_side=side), max_aspect_ratio)
        for quality in _QUALITIES:
            encoded = encode_jpeg(padded, quality=quality)
            if len(encoded) <= max_bytes:
                return encoded
        side = math.floor(side * _SHRINK)
    raise ImageTooLargeError(f"No size of this image fits in {max_bytes} bytes as a JPEG.")


def _already_fits(
    picture: Picture, max_bytes: int, max_dimension_sum: int, max_aspect_ratio: float
) -> bool:
    width, height = picture.width, picture.height
    return (
        picture.format in {"JPEG", "PNG"}
        and len(picture.data) <= max_bytes
        and width + height <= max_dimension_sum
        and max(width, height) <= max_aspect_ratio * min(width, height)
    )


def _scale(width: int, height: int, max_dimension_sum: int, max_aspect_ratio: float) -> float:
    """The downscale factor after which the picture, padded to the aspect
    limit, has width + height <= max_dimension_sum (1.0 if it already has)."""
    longest, shortest = max(width, height), min(width, height)
    padded_shortest = max(float(shortest), longest / max_aspect_ratio)
    # Two pixels of slack absorb the rounding of the content and the padding.
    return min(1.0, (max_dimension_sum - 2) / (longest + padded_shortest))


def _pad_to_aspect(rgb: RgbArray, max_aspect_ratio: float) -> RgbArray:
    height, width = rgb.shape[:2]
    canvas_width = max(width, math.ceil(height / max_aspect_ratio))
    canvas_height = max(height, math.ceil(width / max_aspect_ratio))
    if (canvas_width, canvas_height) == (width, height):
        return rgb
    canvas = np.full((canvas_height, canvas_width, 3), _PADDING_GREY, dtype=np.uint8)
    top, left = (canvas_height - height) // 2, (canvas_width - width) // 2
    canvas[top : top + height, left : left + width] = rgb
    return canvas
