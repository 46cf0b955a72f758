"""Decoding whatever people send, and the Pillow-side picture work.

This is the only module of the product that imports Pillow.  Everything that
turns bytes into pixels (or pixels back into bytes for Telegram) goes through
here, so the policy for hostile and odd input lives in one place:

* the format is sniffed from magic bytes and Pillow may only use that one
  plugin (no surprise EPS/Ghostscript, no guessing from file names);
* size limits are checked before decoding: bytes from the file size, pixels
  from the header, so a decompression bomb is refused without allocating;
* every exception Pillow raises on junk is turned into an
  :class:`~indexer.errors.ImageError` subclass, so callers handle one tree.

The public functions have no side effects beyond reading the given file, and
are safe to call from worker processes and from threads.
"""

from __future__ import annotations

import io
import math
import os
import stat
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, ImageDraw, ImageFile, ImageFont

from indexer.encoding import Region
from indexer.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    IndexerError,
    SourceError,
    UnsupportedFormatError,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "MIN_DESCRIBABLE_SIDE",
    "NEUTRAL_BACKGROUND",
    "SUPPORTED_FORMATS",
    "SheetEntry",
    "WorkingImage",
    "fit_for_telegram",
    "image_format",
    "load_working_image",
    "render_contact_sheet",
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

# Pillow reports damaged EXIF/TIFF tags, malformed MPO indexes, bad APNG
# chunks and (between 1x and 2x its own limit) large pixel counts as warnings
# while reading headers, and carries on.  Whether such a warning then became an
# exception would depend on the process's warning filters (the test suite makes
# them errors), so header and metadata reads run with warnings silenced and the
# checks that matter are made here.  catch_warnings swaps process-wide state,
# hence the lock; pixel decoding never runs under it.
_PILLOW_WARNINGS_LOCK: Final = threading.Lock()

_TELEGRAM_MAX_BYTES: Final = 10 * 2**20
_TELEGRAM_MAX_DIMENSION_SUM: Final = 10_000
_TELEGRAM_MAX_ASPECT_RATIO: Final = 20.0
# Each retry of fit_for_telegram shrinks the picture this much, so about a
# dozen retries cover any size a 60-megapixel source can produce.
_TELEGRAM_SHRINK: Final = 0.75
_TELEGRAM_QUALITIES: Final = (90, 75)

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
_UPRIGHT_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
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
)
_MARKUP_PREFIXES: Final = (
    (b"<!doctype html", "an HTML page"),
    (b"<html", "an HTML page"),
    (b"<svg", "an SVG drawing"),
    (b"<?xml", "an XML document"),
)

_SHEET_COLUMNS: Final = 4
_SHEET_PADDING: Final = 12
_SHEET_LABEL_LINES: Final = 2
_SHEET_FRAME_WIDTH: Final = 5
_SHEET_BACKGROUND: Final = (250, 250, 250)
_SHEET_TEXT: Final = (20, 20, 20)
_SHEET_HIGHLIGHT: Final = (30, 150, 60)
_SHEET_QUERY_FRAME: Final = (40, 90, 200)
_SHEET_PLACEHOLDER: Final = (200, 200, 200)
_SHEET_QUERY_LABEL: Final = "query"
_SHEET_UNAVAILABLE_LABEL: Final = "(image unavailable)"
# DejaVu covers Cyrillic, Greek and most accented Latin file names; Pillow's
# built-in fallback font only covers ASCII.
_SHEET_FONT_FILE: Final = "DejaVuSans.ttf"

_ColourMode = Literal["L", "RGB"]
_CellKind = Literal["query", "highlighted", "plain"]


@dataclass(frozen=True, slots=True)
class WorkingImage:
    """A decoded picture ready for feature extraction.

    ``gray`` is 2-D, C-contiguous uint8, upright (EXIF orientation applied) and
    scaled to the working size; ``width`` and ``height`` are the original size
    after orientation; ``format`` is Pillow's format name ("JPEG", "PNG", ...).
    """

    gray: npt.NDArray[np.uint8]
    width: int
    height: int
    format: str


@dataclass(frozen=True, slots=True)
class SheetEntry:
    """One result cell of a contact sheet: the picture, its caption (lines
    separated by ``\\n``) and whether to mark it (e.g. geometrically verified)."""

    image: Path
    label: str
    highlighted: bool


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
    raise UnsupportedFormatError(_describe_unsupported(data))


def load_working_image(
    source: bytes | Path,
    *,
    working_side: int,
    min_side: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    crop: Region | None = None,
) -> WorkingImage:
    """Decode ``source`` into an upright grayscale working image.

    The longest side of the result is ``working_side`` when the picture is
    larger, ``min_side`` when it is smaller than that (upscaled; 0 disables),
    and the original size otherwise.  Only the first frame or page is used.
    With ``crop`` (fractions of the upright picture), only that part is kept,
    and it is the part that is sized as above: a photo found inside a
    screenshot is described at the resolution the screenshot has for it.

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
    if crop is not None and not (
        0 <= crop.left < crop.right <= 1 and 0 <= crop.top < crop.bottom <= 1
    ):
        raise ValueError(f"{crop} is not a part of the picture")
    data = _read_source(source, max_bytes)
    picture_format = image_format(data)
    with _decoding_errors(picture_format), _opened(data, picture_format, max_pixels) as picture:
        stored_width, stored_height = picture.size
        if crop is None:
            size = _working_size(stored_width, stored_height, working_side, min_side)
            gray, orientation = _render(picture, size, "L")
        else:
            gray, orientation = _render_crop(picture, crop, working_side, min_side)
    if orientation in _SIDEWAYS_ORIENTATIONS:
        stored_width, stored_height = stored_height, stored_width
    return WorkingImage(
        gray=np.array(gray, dtype=np.uint8, order="C"),
        width=stored_width,
        height=stored_height,
        format=picture_format,
    )


def fit_for_telegram(
    source: bytes | Path,
    *,
    max_bytes: int = _TELEGRAM_MAX_BYTES,
    max_dimension_sum: int = _TELEGRAM_MAX_DIMENSION_SUM,
    max_aspect_ratio: float = _TELEGRAM_MAX_ASPECT_RATIO,
) -> bytes:
    """Return bytes Telegram accepts as a photo.

    A JPEG or PNG already within the limits comes back untouched.  Anything
    else is decoded (first frame, upright, transparency on mid-grey), scaled so
    that width + height <= ``max_dimension_sum``, padded with mid-grey so that
    the long side is at most ``max_aspect_ratio`` times the short one, and
    encoded as JPEG, shrinking further until it is at most ``max_bytes``.

    Raises the errors of load_working_image for an unusable source (with the
    default byte and pixel limits), and ImageTooLargeError if no size fits
    ``max_bytes``.
    """
    if max_bytes < 1 or max_dimension_sum < 2 * MIN_DESCRIBABLE_SIDE or max_aspect_ratio < 1:
        raise ValueError("Telegram limits must be positive and allow a small square")
    data = _read_source(source, DEFAULT_MAX_BYTES)
    picture_format = image_format(data)
    with (
        _decoding_errors(picture_format),
        _opened(data, picture_format, DEFAULT_MAX_PIXELS) as picture,
    ):
        width, height = picture.size
        already_fits = (
            picture_format in {"JPEG", "PNG"}
            and len(data) <= max_bytes
            and width + height <= max_dimension_sum
            and max(width, height) <= max_aspect_ratio * min(width, height)
        )
        if already_fits:
            return data
        scale = _telegram_scale(width, height, max_dimension_sum, max_aspect_ratio)
        content_size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
        content, _ = _render(picture, content_size, "RGB")
        return _encode_within(content, max_bytes, max_aspect_ratio)


def render_contact_sheet(
    query: Path | bytes, results: Sequence[SheetEntry], *, thumb_side: int = 256
) -> bytes:
    """Draw the query and its results as a grid of labelled thumbnails; return PNG bytes.

    The query comes first, framed in blue; highlighted results get a green
    frame and a tick.  A result that cannot be decoded any more (deleted,
    damaged) is drawn as a labelled grey placeholder rather than failing the
    whole sheet.

    Raises the errors of load_working_image when the query itself cannot be
    used, and ValueError when ``thumb_side`` is too small to draw.
    """
    if thumb_side < 4 * MIN_DESCRIBABLE_SIDE:
        raise ValueError(f"thumb_side must be at least {4 * MIN_DESCRIBABLE_SIDE}")
    font = _sheet_font(max(11, thumb_side // 18))
    line_height = _line_height(font)
    cells: list[tuple[Image.Image | None, str, _CellKind]] = [
        (_thumbnail(query, thumb_side), _SHEET_QUERY_LABEL, "query")
    ]
    for entry in results:
        try:
            thumbnail: Image.Image | None = _thumbnail(entry.image, thumb_side)
        except IndexerError:
            thumbnail = None
        cells.append((thumbnail, entry.label, "highlighted" if entry.highlighted else "plain"))

    columns = min(_SHEET_COLUMNS, len(cells))
    rows = math.ceil(len(cells) / columns)
    cell_width = thumb_side + _SHEET_PADDING
    cell_height = thumb_side + _SHEET_PADDING + _SHEET_LABEL_LINES * line_height
    sheet = Image.new(
        "RGB",
        (columns * cell_width + _SHEET_PADDING, rows * cell_height + _SHEET_PADDING),
        _SHEET_BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    for index, (thumbnail, label, kind) in enumerate(cells):
        left = _SHEET_PADDING + (index % columns) * cell_width
        top = _SHEET_PADDING + (index // columns) * cell_height
        _draw_cell(draw, sheet, origin=(left, top), side=thumb_side, thumbnail=thumbnail, kind=kind)
        lines = label.splitlines()
        if thumbnail is None:
            lines = [*lines[: _SHEET_LABEL_LINES - 1], _SHEET_UNAVAILABLE_LABEL]
        for number, line in enumerate(lines[:_SHEET_LABEL_LINES]):
            text = _fit_text(_printable(line), font, thumb_side)
            draw.text(
                (left, top + thumb_side + 4 + number * line_height),
                text,
                font=font,
                fill=_SHEET_TEXT,
            )
    output = io.BytesIO()
    sheet.save(output, "PNG")
    return output.getvalue()


# --- reading and sniffing -------------------------------------------------


def _read_source(source: bytes | Path, max_bytes: int) -> bytes:
    if max_bytes < 1:
        raise ValueError("max_bytes must be positive")
    if isinstance(source, Path):
        data = _read_file(source, max_bytes)
    elif isinstance(source, bytes):
        data = source
    else:
        raise TypeError(f"source must be bytes or a Path, not {type(source).__name__}")
    if not data:
        raise EmptyImageError("The file is empty (0 bytes).")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"The file has {len(data)} bytes; the limit is {max_bytes}.")
    return data


def _read_file(path: Path, max_bytes: int) -> bytes:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
    # forever; regular files ignore the flag.  The checks use fstat on the open
    # descriptor, so the file cannot be swapped between check and read.
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
                f"{path} has {status.st_size} bytes; the limit is {max_bytes}."
            )
        with os.fdopen(descriptor, "rb", closefd=False) as stream:
            return stream.read(max_bytes + 1)
    except OSError as error:
        raise SourceError(f"Cannot read {path}: {error.strerror or error}.") from error
    finally:
        os.close(descriptor)


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
def _decoding_errors(picture_format: str) -> Iterator[None]:
    """Translate whatever Pillow raises on hostile input into the error tree."""
    try:
        yield
    except IndexerError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError) as error:
        raise ImageTooLargeError(f"The {picture_format} image is too large: {error}") from error
    # Pillow's plugins raise OSError, ValueError, SyntaxError, struct.error,
    # EOFError, IndexError, KeyError, TypeError, ZeroDivisionError and more on
    # malformed data, and the set changes between releases.  This handler only
    # wraps Pillow calls, so anything else it sees is the file's fault.
    except Exception as error:
        raise CorruptImageError(
            f"The {picture_format} data is damaged: {type(error).__name__}: {error}"
        ) from error


@contextmanager
def _silenced_pillow_warnings() -> Iterator[None]:
    with _PILLOW_WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _opened(data: bytes, picture_format: str, max_pixels: int) -> Iterator[ImageFile.ImageFile]:
    """Open the header only (Pillow decodes lazily) and enforce the pixel budget."""
    with _silenced_pillow_warnings():
        opened = Image.open(io.BytesIO(data), formats=[picture_format])
    with opened as picture:
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


def _working_size(width: int, height: int, working_side: int, min_side: int) -> tuple[int, int]:
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
    picture: ImageFile.ImageFile, crop: Region, working_side: int, min_side: int
) -> tuple[Image.Image, int]:
    """Decode the ``crop`` part of ``picture`` upright, sized like a working image."""
    width, height = picture.size
    # Read before decoding only to size the decode: should a format reveal its
    # orientation only after loading, the crop is still right, just less sharp.
    if _exif_orientation(picture) in _SIDEWAYS_ORIENTATIONS:
        width, height = height, width
    crop_width = max(1, round((crop.right - crop.left) * width))
    crop_height = max(1, round((crop.bottom - crop.top) * height))
    wanted = _working_size(crop_width, crop_height, working_side, min_side)
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
    part = upright.crop(box)
    # Sized again from the pixels actually cut, which keeps the aspect exact.
    size = _working_size(part.width, part.height, working_side, min_side)
    if part.size != size:
        resample = Image.Resampling.BICUBIC if size[0] > part.width else Image.Resampling.LANCZOS
        part = part.resize(size, resample)
    return part, orientation


def _render(
    picture: ImageFile.ImageFile, size: tuple[int, int], mode: _ColourMode
) -> tuple[Image.Image, int]:
    """Decode ``picture`` at ``size`` (given in stored orientation) as 8-bit
    ``mode``, then turn it upright; return it with the EXIF orientation used."""
    box: tuple[float, float, float, float] | None = None
    if size[0] < picture.width and size[1] < picture.height:
        # draft() only does something for JPEG: libjpeg scales by 1/2, 1/4 or
        # 1/8 while decoding, which is several times faster than a full decode.
        request = (size[0] * _DRAFT_REDUCING_GAP, size[1] * _DRAFT_REDUCING_GAP)
        drafted = picture.draft(mode, request)
        if drafted is not None:
            box = drafted[1]
    picture.load()
    orientation = _exif_orientation(picture)
    flat = _flattened(picture, mode)
    if flat.size != size or box is not None:
        upscaling = size[0] > flat.width
        resample = Image.Resampling.BICUBIC if upscaling else Image.Resampling.LANCZOS
        flat = flat.resize(size, resample, box=box)
    transpose = _UPRIGHT_TRANSPOSE.get(orientation)
    return (flat if transpose is None else flat.transpose(transpose)), orientation


def _exif_orientation(picture: Image.Image) -> int:
    # A damaged maker note or EXIF block is common in real phone photos; it
    # must not make the picture itself unusable, so it counts as "upright".
    try:
        with _silenced_pillow_warnings():
            value = picture.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT_TRANSPOSE else 1


def _flattened(picture: Image.Image, mode: _ColourMode) -> Image.Image:
    """Return ``picture`` as 8-bit ``mode`` with transparency composited on mid-grey."""
    if picture.mode in _HIGH_DEPTH_MODES:
        gray = _high_depth_to_gray(picture)
        return gray if mode == "L" else gray.convert("RGB")
    if picture.mode not in _EIGHT_BIT_MODES:
        raise UnsupportedFormatError(
            f"Images in the {picture.mode} colour mode are not supported; "
            "please send an RGB or grayscale picture."
        )
    if picture.has_transparency_data:
        # TIFF's premultiplied grey+alpha has no direct conversion to RGBA.
        straight = picture.convert("LA") if picture.mode == "La" else picture
        with_alpha = straight.convert("RGBA")
        background = NEUTRAL_BACKGROUND if mode == "L" else (NEUTRAL_BACKGROUND,) * 3
        canvas = Image.new(mode, picture.size, background)
        canvas.paste(with_alpha.convert(mode), mask=with_alpha.getchannel("A"))
        return canvas
    return picture.convert(mode)


def _high_depth_to_gray(picture: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips these modes at 255 instead of scaling.
    values = np.asarray(picture).astype(np.float64)
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
    return Image.fromarray(eight_bit)


# --- Telegram -----------------------------------------------------------------


def _telegram_scale(
    width: int, height: int, max_dimension_sum: int, max_aspect_ratio: float
) -> float:
    """The downscale factor after which the picture, padded to the aspect
    limit, has width + height <= max_dimension_sum (1.0 if it already has)."""
    longest, shortest = max(width, height), min(width, height)
    padded_shortest = max(float(shortest), longest / max_aspect_ratio)
    # Two pixels of slack absorb the rounding of the content and the padding.
    return min(1.0, (max_dimension_sum - 2) / (longest + padded_shortest))


def _pad_to_aspect(picture: Image.Image, max_aspect_ratio: float) -> Image.Image:
    width, height = picture.size
    canvas_size = (
        max(width, math.ceil(height / max_aspect_ratio)),
        max(height, math.ceil(width / max_aspect_ratio)),
    )
    if canvas_size == picture.size:
        return picture
    canvas = Image.new("RGB", canvas_size, (NEUTRAL_BACKGROUND,) * 3)
    canvas.paste(picture, ((canvas_size[0] - width) // 2, (canvas_size[1] - height) // 2))
    return canvas


def _encode_within(content: Image.Image, max_bytes: int, max_aspect_ratio: float) -> bytes:
    while max(content.size) >= MIN_DESCRIBABLE_SIDE:
        padded = _pad_to_aspect(content, max_aspect_ratio)
        for quality in _TELEGRAM_QUALITIES:
            encoded = _jpeg_bytes(padded, quality)
            if len(encoded) <= max_bytes:
                return encoded
        smaller = (
            max(1, math.floor(content.width * _TELEGRAM_SHRINK)),
            max(1, math.floor(content.height * _TELEGRAM_SHRINK)),
        )
        content = content.resize(smaller, Image.Resampling.LANCZOS)
    raise ImageTooLargeError(f"No size of this image fits in {max_bytes} bytes as a JPEG.")


def _jpeg_bytes(picture: Image.Image, quality: int) -> bytes:
    output = io.BytesIO()
    picture.save(output, "JPEG", quality=quality, optimize=True)
    return output.getvalue()


# --- contact sheet ----------------------------------------------------------


def _thumbnail(source: Path | bytes, side: int) -> Image.Image:
    """Upright RGB picture fitting in side x side (never enlarged)."""
    data = _read_source(source, DEFAULT_MAX_BYTES)
    picture_format = image_format(data)
    with (
        _decoding_errors(picture_format),
        _opened(data, picture_format, DEFAULT_MAX_PIXELS) as picture,
    ):
        width, height = picture.size
        scale = min(1.0, side / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        thumbnail, _ = _render(picture, size, "RGB")
        return thumbnail


def _draw_cell(
    draw: ImageDraw.ImageDraw,
    sheet: Image.Image,
    *,
    origin: tuple[int, int],
    side: int,
    thumbnail: Image.Image | None,
    kind: _CellKind,
) -> None:
    left, top = origin
    if thumbnail is None:
        draw.rectangle((left, top, left + side - 1, top + side - 1), fill=_SHEET_PLACEHOLDER)
    else:
        sheet.paste(
            thumbnail,
            (left + (side - thumbnail.width) // 2, top + (side - thumbnail.height) // 2),
        )
    if kind == "plain":
        return
    inset = _SHEET_FRAME_WIDTH // 2
    draw.rectangle(
        (left - inset, top - inset, left + side - 1 + inset, top + side - 1 + inset),
        outline=_SHEET_QUERY_FRAME if kind == "query" else _SHEET_HIGHLIGHT,
        width=_SHEET_FRAME_WIDTH,
    )
    if kind == "highlighted":
        _draw_tick(draw, (left + side - 1, top), max(16, side // 8))


def _draw_tick(draw: ImageDraw.ImageDraw, corner: tuple[int, int], size: int) -> None:
    # Drawn, not typed: the fallback font has no tick glyph.
    right, top = corner
    left = right - size
    draw.ellipse((left, top, right, top + size), fill=_SHEET_HIGHLIGHT)
    draw.line(
        [
            (left + size * 0.25, top + size * 0.52),
            (left + size * 0.43, top + size * 0.70),
            (left + size * 0.76, top + size * 0.32),
        ],
        fill=(255, 255, 255),
        width=max(2, size // 7),
    )


_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@cache
def _sheet_font(size: int) -> _Font:
    try:
        return ImageFont.truetype(_SHEET_FONT_FILE, size)
    except OSError:
        return ImageFont.load_default(size)


def _line_height(font: _Font) -> int:
    _, top, _, bottom = font.getbbox("Hgjy")
    return int(bottom - top) + 4


def _printable(text: str) -> str:
    # File names may contain control characters; they would draw as boxes or
    # break the layout.
    return "".join(character if character.isprintable() else "?" for character in text)


def _fit_text(text: str, font: _Font, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    ellipsis = "..."
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(text[:middle] + ellipsis) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low] + ellipsis
