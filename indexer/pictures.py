"""Pillow behind the few operations the engine uses: open, decode, encode and draw.

This is the only module that imports Pillow, so an upgrade or a change of library
touches one file. It holds mechanics, not policy: which formats are accepted, the
size limits, what EXIF orientation means and how decoded pixels are sized are
:mod:`indexer.images`' decisions; the layout of a contact sheet is
:mod:`indexer.contact_sheet`'s. Whatever Pillow raises on hostile input is
translated here into the :mod:`indexer.errors` tree by :func:`pillow_errors`.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, ImageDraw, ImageFont

from indexer.errors import CorruptImageError, ImageTooLargeError, IndexerError

__all__ = [
    "Canvas",
    "Font",
    "Raster",
    "Resampling",
    "Transpose",
    "encode_jpeg",
    "open_encoded",
    "pillow_errors",
]

Resampling = Literal["bicubic", "lanczos"]
Transpose = Literal[
    "flip_left_right",
    "flip_top_bottom",
    "rotate_90",
    "rotate_180",
    "rotate_270",
    "transpose",
    "transverse",
]
Rgb = tuple[int, int, int]

_RESAMPLING: Final = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
_TRANSPOSE: Final = {
    "flip_left_right": Image.Transpose.FLIP_LEFT_RIGHT,
    "flip_top_bottom": Image.Transpose.FLIP_TOP_BOTTOM,
    "rotate_90": Image.Transpose.ROTATE_90,
    "rotate_180": Image.Transpose.ROTATE_180,
    "rotate_270": Image.Transpose.ROTATE_270,
    "transpose": Image.Transpose.TRANSPOSE,
    "transverse": Image.Transpose.TRANSVERSE,
}

# Pillow reports damaged EXIF/TIFF tags, malformed MPO indexes, bad APNG
# chunks and (between 1x and 2x its own limit) large pixel counts as warnings
# while reading headers, and carries on.  Whether such a warning then became an
# exception would depend on the process's warning filters (the test suite makes
# them errors), so header and metadata reads run with warnings silenced and the
# checks that matter are made by the caller.  catch_warnings swaps process-wide
# state, hence the lock; pixel decoding never runs under it.
_PILLOW_WARNINGS_LOCK: Final = threading.Lock()


@contextmanager
def pillow_errors(picture_format: str) -> Iterator[None]:
    """Translate whatever Pillow raises on hostile input into the error tree.

    Raises ImageTooLargeError for a decompression bomb or running out of memory,
    CorruptImageError for anything else not already an IndexerError.
    """
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


class Raster:
    """Pixels in one of Pillow's modes ("L", "RGB", "I;16", ...), possibly not
    decoded yet when it comes from :func:`open_encoded`."""

    __slots__ = ("_image",)

    def __init__(self, image: Image.Image) -> None:
        self._image = image

    @classmethod
    def from_array(cls, pixels: npt.NDArray[np.uint8]) -> Raster:
        """2-D pixels as mode "L", height x width x 3 as "RGB"."""
        return cls(Image.fromarray(pixels))

    def to_array(self) -> npt.NDArray[np.generic]:
        """The pixels as an array of the mode's own type (uint16 for "I;16", ...)."""
        return np.asarray(self._image)

    @property
    def width(self) -> int:
        return self._image.width

    @property
    def height(self) -> int:
        return self._image.height

    @property
    def size(self) -> tuple[int, int]:
        return self._image.size

    @property
    def mode(self) -> str:
        return self._image.mode

    @property
    def has_transparency(self) -> bool:
        return self._image.has_transparency_data

    def exif_orientation(self) -> int:
        """The EXIF orientation tag's value, 1 when it is missing or unreadable.

        A damaged maker note or EXIF block is common in real phone photos; it
        must not make the picture itself unusable, so it counts as "upright".
        """
        try:
            with _silenced_pillow_warnings():
                value = self._image.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:
            return 1
        return value if isinstance(value, int) else 1

    def luma_quantization(self) -> tuple[int, ...] | None:
        """A JPEG's luminance quantization table (64 steps), None for other formats."""
        tables = getattr(self._image, "quantization", None)
        return tuple(tables[0]) if tables and 0 in tables else None

    def jpeg_round_trip(self, luma_table: Sequence[int]) -> Raster:
        """This grey picture saved as a JPEG with ``luma_table`` and decoded again:
        with the blocks a JPEG copy made with that table has."""
        output = io.BytesIO()
        self._image.convert("L").save(output, "JPEG", qtables=[list(luma_table)])
        output.seek(0)
        return Raster(Image.open(output, formats=["JPEG"]).convert("L"))

    def draft(self, mode: str, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """Ask the decoder to decode no larger than needed for ``size`` (only JPEG can,
        by 1/2, 1/4 or 1/8); return the part of the reduced picture the stored
        picture maps to, to pass as ``box`` to :meth:`resized`, or None if nothing changed."""
        drafted = self._image.draft(mode, size)
        return None if drafted is None else drafted[1]

    def load(self) -> None:
        """Decode the pixels now."""
        self._image.load()

    def converted(self, mode: str) -> Raster:
        return Raster(self._image.convert(mode))

    def resized(
        self,
        size: tuple[int, int],
        resampling: Resampling,
        *,
        box: tuple[float, float, float, float] | None = None,
    ) -> Raster:
        return Raster(self._image.resize(size, _RESAMPLING[resampling], box=box))

    def transposed(self, how: Transpose) -> Raster:
        return Raster(self._image.transpose(_TRANSPOSE[how]))

    def cropped(self, box: tuple[int, int, int, int]) -> Raster:
        """The part ``box`` (left, top, right, bottom; right and bottom excluded)."""
        return Raster(self._image.crop(box))

    def on_background(self, mode: Literal["L", "RGB"], background: int) -> Raster:
        """This picture in ``mode`` with its transparency composited over the flat
        grey level ``background``."""
        # TIFF's premultiplied grey+alpha has no direct conversion to RGBA.
        straight = self._image.convert("LA") if self._image.mode == "La" else self._image
        with_alpha = straight.convert("RGBA")
        colour = background if mode == "L" else (background,) * 3
        canvas = Image.new(mode, self._image.size, colour)
        canvas.paste(with_alpha.convert(mode), mask=with_alpha.getchannel("A"))
        return Raster(canvas)


@contextmanager
def open_encoded(data: bytes, picture_format: str) -> Iterator[Raster]:
    """Open ``data`` as ``picture_format`` only, reading the header (the pixels are
    decoded lazily), and close it on leaving.

    Raises what Pillow raises on damaged data; wrap the call in :func:`pillow_errors`.
    """
    with _silenced_pillow_warnings():
        opened = Image.open(io.BytesIO(data), formats=[picture_format])
    with opened as image:
        yield Raster(image)


def encode_jpeg(rgb: npt.NDArray[np.uint8], *, quality: int) -> bytes:
    """``rgb`` (height x width x 3) as JPEG bytes."""
    output = io.BytesIO()
    Image.fromarray(rgb).save(output, "JPEG", quality=quality, optimize=True)
    return output.getvalue()


class Font:
    """A font to draw text with, and its measurements."""

    __slots__ = ("_font",)

    def __init__(self, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> None:
        self._font = font

    @classmethod
    def named(cls, file_name: str, size: int) -> Font:
        """The TrueType font ``file_name`` (searched in the system's font folders) at
        ``size`` pixels, or Pillow's built-in font at that size if it is not found."""
        try:
            return cls(ImageFont.truetype(file_name, size))
        except OSError:
            return cls(ImageFont.load_default(size))

    def bounding_box(self, text: str) -> tuple[float, float, float, float]:
        """Left, top, right, bottom of ``text`` drawn at the origin."""
        return self._font.getbbox(text)

    def length(self, text: str) -> float:
        """How far ``text`` advances along its line, in pixels."""
        return self._font.getlength(text)


class Canvas:
    """An RGB picture to draw on, encoded as PNG at the end."""

    __slots__ = ("_draw", "_image")

    def __init__(self, size: tuple[int, int], background: Rgb) -> None:
        self._image = Image.new("RGB", size, background)
        self._draw = ImageDraw.Draw(self._image)

    def paste(self, rgb: npt.NDArray[np.uint8], origin: tuple[int, int]) -> None:
        """Copy ``rgb`` (height x width x 3) with its top-left corner at ``origin``."""
        self._image.paste(Image.fromarray(rgb), origin)

    def rectangle(
        self,
        box: tuple[int, int, int, int],
        *,
        fill: Rgb | None = None,
        outline: Rgb | None = None,
        width: int = 1,
    ) -> None:
        """Fill and/or outline ``box`` (left, top, right, bottom; all included)."""
        self._draw.rectangle(box, fill=fill, outline=outline, width=width)

    def ellipse(self, box: tuple[int, int, int, int], *, fill: Rgb) -> None:
        self._draw.ellipse(box, fill=fill)

    def line(self, points: Sequence[tuple[float, float]], *, fill: Rgb, width: int) -> None:
        self._draw.line(list(points), fill=fill, width=width)

    def text(self, origin: tuple[int, int], text: str, *, font: Font, fill: Rgb) -> None:
        self._draw.text(origin, text, font=font._font, fill=fill)

    def png(self) -> bytes:
        output = io.BytesIO()
        self._image.save(output, "PNG")
        return output.getvalue()
