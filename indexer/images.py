"""Decoding whatever people send: bytes in, pixels out.

Everything that turns bytes into pixels goes through here, so the policy for
hostile and odd input lives in one place (the Pillow calls themselves are in
:mod:`indexer.pictures`):

* the format is sniffed from magic bytes and the decoder may only use that one
  plugin (no surprise EPS/Ghostscript, no guessing from file names);
* size limits are checked before decoding: bytes from the file size, pixels
  from the header, so a decompression bomb is refused without allocating;
* every exception the decoder raises on junk is turned into an
  :class:`~indexer.errors.ImageError` subclass, so callers handle one tree.

Two kinds of pixels come out: the grayscale working image the features are
extracted from, and upright RGB pictures for what is shown to people (the
bot's uploads, the contact sheet).

The public functions have no side effects beyond reading the given file, and
are safe to call from worker processes and from threads.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from indexer.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    SourceError,
    UnsupportedFormatError,
)
from indexer.pictures import Raster, Resampling, Transpose, open_encoded, pillow_errors
from indexer.regions import Region

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "ISO_IMAGE_BRANDS",
    "MIN_DESCRIBABLE_SIDE",
    "NEUTRAL_BACKGROUND",
    "SUPPORTED_FORMATS",
    "Picture",
    "WorkingImage",
    "decode_rgb",
    "image_format",
    "load_working_image",
    "open_picture",
    "read_image_file",
    "working_size",
]

DEFAULT_MAX_BYTES: Final = 50 * 2**20
DEFAULT_MAX_PIXELS: Final = 60_000_000

# Fewer pixels than this across (in the file or after scaling) carry no
# structure a local-feature detector can use.
MIN_DESCRIBABLE_SIDE: Final = 8

# Transparent areas are composited onto mid-grey: on black or white, the edge
# of a dark or light sticker would vanish and its keypoints with it.
NEUTRAL_BACKGROUND: Final = 128

SUPPORTED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

# Pillow's "thumbnail" default: JPEG DCT scaling may reduce to at least twice
# the target, which keeps the final resample close to a full decode.
_DRAFT_REDUCING_GAP: Final = 2

_HIGH_DEPTH_MODES: Final = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_EIGHT_BIT_MODES: Final = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
)

# EXIF orientation -> the transpose that shows the picture upright
# (EXIF 2.32, tag 0x0112).
_UPRIGHT_TRANSPOSE: Final[dict[int, Transpose]] = {
    2: "flip_left_right",
    3: "rotate_180",
    4: "flip_top_bottom",
    5: "transpose",
    6: "rotate_270",
    7: "transverse",
    8: "rotate_90",
}
_SIDEWAYS_ORIENTATIONS: Final = frozenset({5, 6, 7, 8})

# "BM" alone starts too much text; the DIB header size that follows the
# 14-byte file header is one of the few sizes the BMP versions define.
_BMP_HEADER_SIZES: Final = frozenset(
    size.to_bytes(4, "little") for size in (12, 16, 40, 52, 56, 64, 108, 124)
)

_HEIF_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
)
_AVIF_BRANDS: Final = frozenset({b"avif", b"avis"})
# ISO media files whose major brand says "still image": every other brand is a video.
ISO_IMAGE_BRANDS: Final = _HEIF_BRANDS | _AVIF_BRANDS

# Formats people actually send that we can name but not decode, by magic bytes.
_NAMED_UNSUPPORTED_PREFIXES: Final = (
    (b"%PDF-", "a PDF document"),
    (b"%!PS", "a PostScript file"),
    (b"8BPS", "a Photoshop document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
    (b"\xffO\xffQ", "a JPEG 2000 image"),
    # Telegram's animated stickers (.tgs) are gzipped Lottie drawings, not pictures.
    (b"\x1f\x8b", "a compressed file (an animated sticker is one: a drawing, not a picture)"),
)
_MARKUP_PREFIXES: Final = (
    (b"<!doctype html", "an HTML page"),
    (b"<html", "an HTML page"),
    (b"<svg", "an SVG drawing"),
    (b"<?xml", "an XML document"),
)

_ColourMode = Literal["L", "RGB"]


@dataclass(frozen=True, slots=True)
class WorkingImage:
    """A decoded picture ready for feature extraction.

    ``gray`` is 2-D, C-contiguous uint8, upright (EXIF orientation applied) and
    scaled to the working size; ``width`` and ``height`` are the original size
    after orientation; ``format`` is Pillow's format name ("JPEG", "PNG", ...);
    ``luma_table`` is a JPEG's luminance quantization table.
    """

    gray: npt.NDArray[np.uint8]
    width: int
    height: int
    format: str
    luma_table: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class CopyMaking:
    """How a copy of a picture was made, to make a part of another the same way.

    ``detail`` below 1 reduces the part to that share of its pixels a side, as a
    smaller copy shows it; ``luma_table`` then saves it as a JPEG with that
    luminance quantization table (a thumbnail's keypoints sit on its blocks);
    ``magnification`` then enlarges it by that factor, as the copy was brought
    to working size (at most twice the working side; working-image rules when None).
    """

    detail: float = 1.0
    luma_table: tuple[int, ...] | None = None
    magnification: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.detail <= 1:
            raise ValueError("detail must lie in (0, 1]")
        if self.magnification is not None and self.magnification <= 0:
            raise ValueError("magnification must be positive")


# A part made as a copy was is described at most this many working sides long.
MAX_MADE_AS_SIDES = 2


@dataclass(frozen=True, slots=True)
class Picture:
    """A picture's bytes, with what its header says; the pixels are decoded on demand
    by :func:`decode_rgb`. ``width`` and ``height`` are as stored (before EXIF orientation)."""

    data: bytes
    format: str
    width: int
    height: int


def image_format(data: bytes) -> str:
    """Return Pillow's name of the format of ``data``, sniffed from magic bytes.

    Raises EmptyImageError for zero bytes and UnsupportedFormatError for
    anything not in SUPPORTED_FORMATS (naming the format when it is a known
    one, such as HEIC).
    """
    if not data:
        raise EmptyImageError("The file is empty (0 bytes).")
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM") and data[14:18] in _BMP_HEADER_SIZES:
        return "BMP"
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    raise UnsupportedFormatError(user_message=_describe_unsupported(data))


def load_working_image(
    source: bytes | Path,
    *,
    working_side: int,
    min_side: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    crop: Region | None = None,
    made_as: CopyMaking | None = None,
) -> WorkingImage:
    """Decode ``source`` into an upright grayscale working image.

    The longest side of the result is ``working_side`` when the picture is
    larger, ``min_side`` when it is smaller than that (upscaled; 0 disables),
    and the original size otherwise.  Only the first frame or page is used.
    With ``crop`` (fractions of the upright picture), only that part is kept,
    and it is the part that is sized as above: a photo found inside a
    screenshot is described at the resolution the screenshot has for it.
    With ``made_as``, the crop is made as a copy of the picture was made (see
    :class:`CopyMaking`), to be described as that copy was.

    Raises ValueError for inconsistent arguments, and for the picture:
    SourceError (path missing, unreadable, not a regular file), EmptyImageError,
    UnsupportedFormatError, ImageTooLargeError (over ``max_bytes`` bytes or
    ``max_pixels`` pixels, checked before decoding), ImageTooSmallError (a side
    under MIN_DESCRIBABLE_SIDE in the file or after scaling) and
    CorruptImageError (truncated or damaged data).
    """
    if working_side < MIN_DESCRIBABLE_SIDE:
        raise ValueError(f"working_side must be at least {MIN_DESCRIBABLE_SIDE}")
    if not 0 <= min_side <= working_side:
        raise ValueError("min_side must lie between 0 and working_side")
    if max_pixels < 1:
        raise ValueError("max_pixels must be positive")
    if made_as is not None and crop is None:
        raise ValueError("made_as needs a crop")
    if crop is not None and not (
        0 <= crop.left < crop.right <= 1 and 0 <= crop.top < crop.bottom <= 1
    ):
        raise ValueError(f"{crop} is not a part of the picture")
    data = _read_source(source, max_bytes)
    picture_format = image_format(data)
    with pillow_errors(picture_format), _opened(data, picture_format, max_pixels) as picture:
        stored_width, stored_height = picture.size
        table = picture.luma_quantization()
        if crop is None:
            size = working_size(stored_width, stored_height, working_side, min_side)
            gray, orientation = _render(picture, size, "L")
        else:
            gray, orientation = _render_crop(
                picture, crop, working_side, min_side, made_as or CopyMaking()
            )
    if orientation in _SIDEWAYS_ORIENTATIONS:
        stored_width, stored_height = stored_height, stored_width
    return WorkingImage(
        gray=np.array(gray.to_array(), dtype=np.uint8, order="C"),
        width=stored_width,
        height=stored_height,
        format=picture_format,
        luma_table=table,
    )


def read_image_file(path: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file and its status, as one consistent read.

    Opened non-blocking (a FIFO would otherwise wait for a writer forever;
    regular files ignore the flag) and checked with fstat on the open
    descriptor, so the file cannot be swapped between check and read.

    Raises:
        SourceError: missing, unreadable, or not a regular file.
        ImageTooLargeError: more than ``max_bytes`` bytes.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise SourceError(f"Cannot open {path}: {error.strerror or error}.") from error
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise SourceError(f"{path} is not a regular file.")
        if status.st_size > max_bytes:
            raise ImageTooLargeError(
                f"{path.name} has {status.st_size} bytes; the limit is {max_bytes}."
            )
        with os.fdopen(descriptor, "rb", closefd=False) as stream:
            return stream.read(max_bytes + 1), status
    except OSError as error:
        raise SourceError(f"Cannot read {path}: {error.strerror or error}.") from error
    finally:
        os.close(descriptor)


def open_picture(source: bytes | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """Read ``source`` and its header, without decoding the pixels.

    Raises the errors of :func:`load_working_image` that the bytes and the
    header can reveal (with the default byte limit).
    """
    data = _read_source(source, DEFAULT_MAX_BYTES)
    picture_format = image_format(data)
    with pillow_errors(picture_format), _opened(data, picture_format, max_pixels) as picture:
        width, height = picture.size
    return Picture(data=data, format=picture_format, width=width, height=height)


def decode_rgb(picture: Picture, *, max_side: int | None = None) -> npt.NDArray[np.uint8]:
    """The upright RGB pixels (height x width x 3) of ``picture``, transparency on
    mid-grey, its longest side shrunk to ``max_side`` if it is longer (never enlarged).

    Raises:
        CorruptImageError: the data is damaged.
        ImageTooLargeError: decoding runs out of memory.
    """
    scale = 1.0 if max_side is None else min(1.0, max_side / max(picture.width, picture.height))
    size = (
        max(1, math.floor(picture.width * scale)),
        max(1, math.floor(picture.height * scale)),
    )
    with (
        pillow_errors(picture.format),
        _opened(picture.data, picture.format, DEFAULT_MAX_PIXELS) as opened,
    ):
        rgb, _ = _render(opened, size, "RGB")
        return np.array(rgb.to_array(), dtype=np.uint8, order="C")


# --- reading and sniffing -------------------------------------------------


def _read_source(source: bytes | Path, max_bytes: int) -> bytes:
    if max_bytes < 1:
        raise ValueError("max_bytes must be positive")
    if isinstance(source, Path):
        data, _ = read_image_file(source, max_bytes)
    elif isinstance(source, bytes):
        data = source
    else:
        raise TypeError(f"source must be bytes or a Path, not {type(source).__name__}")
    if not data:
        raise EmptyImageError("The file is empty (0 bytes).")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"The file has {len(data)} bytes; the limit is {max_bytes}.")
    return data


def _describe_unsupported(data: bytes) -> str:
    if data[4:8] == b"ftyp":
        major_brand = data[8:12]
        compatible_brands = {data[index : index + 4] for index in range(16, 64, 4)}
        if major_brand in _AVIF_BRANDS or (
            major_brand == b"mif1" and compatible_brands & _AVIF_BRANDS
        ):
            return "This is an AVIF image, which I cannot read; please send it as JPEG or PNG."
        if major_brand in _HEIF_BRANDS:
            return (
                "This is a HEIC/HEIF photo (the iPhone default), which I cannot read; "
                "please send it as JPEG (or as a photo rather than a file)."
            )
        return "This is a video or other ISO media file, not an image."
    for prefix, name in _NAMED_UNSUPPORTED_PREFIXES:
        if data.startswith(prefix):
            return f"This is {name}, not an image in a format I can read."
    opening = data[:256].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    for prefix, name in _MARKUP_PREFIXES:
        if opening.startswith(prefix):
            return f"This is {name}, not an image in a format I can read."
    return "This is not an image in a format I can read (JPEG, PNG, WebP, BMP, TIFF, GIF)."


# --- decoding -------------------------------------------------------------


@contextmanager
def _opened(data: bytes, picture_format: str, max_pixels: int) -> Iterator[Raster]:
    """Open the header only (the pixels are decoded lazily) and enforce the pixel budget."""
    with open_encoded(data, picture_format) as picture:
        width, height = picture.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"The image is {width}x{height} = {width * height} pixels; "
                f"the limit is {max_pixels}."
            )
        if width < 1 or height < 1:
            raise CorruptImageError(
                f"The {picture_format} header declares a {width}x{height} image."
            )
        yield picture


def working_size(width: int, height: int, working_side: int, min_side: int) -> tuple[int, int]:
    """The size a picture of ``width`` x ``height`` is described at (see
    :func:`load_working_image`).

    Raises:
        ImageTooSmallError: a side is too small to describe, before or after scaling.
    """
    longest = max(width, height)
    if longest > working_side:
        target = working_side
    elif longest < min_side:
        target = min_side
    else:
        target = longest
    scale = target / longest
    size = (
        target if width == longest else max(1, round(width * scale)),
        target if height == longest else max(1, round(height * scale)),
    )
    if min(width, height) < MIN_DESCRIBABLE_SIDE or min(size) < MIN_DESCRIBABLE_SIDE:
        raise ImageTooSmallError(
            f"The image is {width}x{height}, {size[0]}x{size[1]} at working size; "
            f"both sides must be at least {MIN_DESCRIBABLE_SIDE} pixels."
        )
    return size


def _render_crop(
    picture: Raster, crop: Region, working_side: int, min_side: int, made_as: CopyMaking
) -> tuple[Raster, int]:
    """Decode the ``crop`` part of ``picture`` upright, made as ``made_as`` says
    and sized like a working image (or as ``made_as`` says)."""
    width, height = picture.size
    # Read before decoding only to size the decode: should a format reveal its
    # orientation only after loading, the crop is still right, just less sharp.
    if _exif_orientation(picture) in _SIDEWAYS_ORIENTATIONS:
        width, height = height, width
    crop_width = max(1, round((crop.right - crop.left) * width))
    crop_height = max(1, round((crop.bottom - crop.top) * height))
    wanted = working_size(crop_width, crop_height, working_side, min_side)
    # Shrink the whole picture while decoding (cheap for JPEG), never enlarge it:
    # a small crop is enlarged alone afterwards.
    scale = min(1.0, wanted[0] / crop_width)
    whole = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    upright, orientation = _render(picture, whole, "L")
    box = (
        round(crop.left * upright.width),
        round(crop.top * upright.height),
        max(round(crop.right * upright.width), round(crop.left * upright.width) + 1),
        max(round(crop.bottom * upright.height), round(crop.top * upright.height) + 1),
    )
    part = upright.cropped(box)
    detail = made_as.detail
    reduced = (max(1, round(crop_width * detail)), max(1, round(crop_height * detail)))
    if reduced[0] < part.width and reduced[1] < part.height:
        part = part.resized(reduced, _resampling(enlarging=False))
    if made_as.luma_table is not None:
        part = part.jpeg_round_trip(made_as.luma_table)
    # Sized again from the pixels actually cut, which keeps the aspect exact.
    if made_as.magnification is None:
        size = working_size(part.width, part.height, working_side, min_side)
    else:
        longest = round(
            min(max(part.size) * made_as.magnification, MAX_MADE_AS_SIDES * working_side)
        )
        size = working_size(part.width, part.height, longest, longest)
    if part.size != size:
        part = part.resized(size, _resampling(enlarging=size[0] > part.width))
    return part, orientation


def _render(picture: Raster, size: tuple[int, int], mode: _ColourMode) -> tuple[Raster, int]:
    """Decode ``picture`` at ``size`` (given in stored orientation) as 8-bit
    ``mode``, then turn it upright; return it with the EXIF orientation used."""
    box: tuple[float, float, float, float] | None = None
    if size[0] < picture.width and size[1] < picture.height:
        # draft() only does something for JPEG: libjpeg scales by 1/2, 1/4 or
        # 1/8 while decoding, which is several times faster than a full decode.
        request = (size[0] * _DRAFT_REDUCING_GAP, size[1] * _DRAFT_REDUCING_GAP)
        box = picture.draft(mode, request)
    picture.load()
    orientation = _exif_orientation(picture)
    flat = _flattened(picture, mode)
    if flat.size != size or box is not None:
        flat = flat.resized(size, _resampling(enlarging=size[0] > flat.width), box=box)
    transpose = _UPRIGHT_TRANSPOSE.get(orientation)
    return (flat if transpose is None else flat.transposed(transpose)), orientation


def _resampling(*, enlarging: bool) -> Resampling:
    return "bicubic" if enlarging else "lanczos"


def _exif_orientation(picture: Raster) -> int:
    """The EXIF orientation (1 = upright) when it is one of those EXIF defines, else 1."""
    orientation = picture.exif_orientation()
    return orientation if orientation in _UPRIGHT_TRANSPOSE else 1


def _flattened(picture: Raster, mode: _ColourMode) -> Raster:
    """Return ``picture`` as 8-bit ``mode`` with transparency composited on mid-grey."""
    if picture.mode in _HIGH_DEPTH_MODES:
        gray = _high_depth_to_gray(picture)
        return gray if mode == "L" else gray.converted("RGB")
    if picture.mode not in _EIGHT_BIT_MODES:
        raise UnsupportedFormatError(
            user_message=f"Images in the {picture.mode} colour mode are not supported; "
            "please send an RGB or grayscale picture."
        )
    if picture.has_transparency:
        return picture.on_background(mode, NEUTRAL_BACKGROUND)
    return picture.converted(mode)


def _high_depth_to_gray(picture: Raster) -> Raster:
    # Pillow's convert("L") clips these modes at 255 instead of scaling.
    values = picture.to_array().astype(np.float64)
    if picture.mode in _SIXTEEN_BIT_MODES:
        scaled = values / 257.0
    else:
        # 32-bit integer and float images have no fixed white point, so they
        # are stretched over their own finite range.
        finite = values[np.isfinite(values)]
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 0.0
        if high > low:
            scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) * (
                255.0 / (high - low)
            )
        else:
            scaled = np.full(values.shape, float(NEUTRAL_BACKGROUND))
    eight_bit = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Raster.from_array(eight_bit)
