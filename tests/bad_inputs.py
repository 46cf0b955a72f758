"""A corpus of bad and odd inputs, generated from scratch, for any test to reuse.

``write_bad_inputs(folder)`` writes one file (or folder, FIFO, symlink) per case
and returns a :class:`BadInputCorpus` whose records say what the decoder must
do with each one: an ``indexer.errors`` class, or ``OK``.  The outcomes hold
for ``load_working_image(path, working_side=CORPUS_WORKING_SIDE)`` with
``min_side`` up to CORPUS_WORKING_SIDE and the default byte and pixel limits.

Whether a decodable picture should yield keypoints is the feature extractor's
business, so each record also says what to expect there
(``expected_features``).

Photos come from scikit-image's bundled CC0 samples, so nothing needs the
network.  A case this machine cannot produce faithfully (a file name the
filesystem refuses, an unreadable file when running as root) is left out of
``records`` and listed in ``skipped`` with the reason.

Layout notes for folder-walking tests: everything is at the top level except
``symlink_loop/``, which holds two symlinks pointing at each other, a symlink
to its own folder (a directory cycle) and one good photo.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image
from skimage import data as skimage_data

from indexer.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    IndexerError,
    SourceError,
    UnsupportedFormatError,
)

OK: Final = "ok"
Outcome = type[IndexerError] | Literal["ok"]
# "some": a real photo; "none": flat colour; "unstable": pure noise (keypoints
# exist but do not repeat); "n/a": the decoder refuses it first.
ExpectedFeatures = Literal["some", "none", "unstable", "n/a"]

CORPUS_WORKING_SIDE: Final = 1024

# The upright picture every EXIF-orientation case is derived from.
ORIENTATION_REFERENCE: Final = "exif_orientation_1"
ORIENTED_CASES: Final = {k: f"exif_orientation_{k}" for k in range(2, 9)}
# Width x height of the upright orientation pictures; multiples of 16 so that
# rotating them keeps JPEG blocks and chroma subsampling aligned.
ORIENTATION_SIZE: Final = (320, 224)

# Multi-frame cases: the first frame/page is this photo, later ones are others.
FIRST_FRAME_PHOTO: Final = "astronaut"
LATER_FRAME_PHOTO: Final = "coffee"

# Cases with a transparent left half, which must decode to NEUTRAL grey there.
TRANSPARENT_LEFT_HALF: Final = ("png_rgba", "png_la", "png_palette_transparency", "webp_alpha")

PHOTO_SIZE: Final = (384, 288)


@dataclass(frozen=True, slots=True)
class BadInput:
    """One generated input and the outcome the decoder must give for it."""

    name: str
    path: Path
    expected: Outcome
    description: str
    expected_features: ExpectedFeatures


@dataclass(slots=True)
class BadInputCorpus:
    """The records written, and the cases left out (name -> reason)."""

    records: list[BadInput]
    skipped: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[BadInput]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, name: str) -> BadInput:
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(name)


class CaseUnavailableError(Exception):
    """Raised by a case writer when this machine cannot produce the case faithfully."""


@dataclass(frozen=True, slots=True)
class _Case:
    name: str
    expected: Outcome
    description: str
    expected_features: ExpectedFeatures
    write: Callable[[Path], Path]


_CASES: list[_Case] = []


def _case(
    name: str,
    expected: Outcome,
    description: str,
    expected_features: ExpectedFeatures | None = None,
) -> Callable[[Callable[[Path], Path]], Callable[[Path], Path]]:
    features: ExpectedFeatures = expected_features or ("some" if expected == OK else "n/a")

    def register(write: Callable[[Path], Path]) -> Callable[[Path], Path]:
        _CASES.append(_Case(name, expected, description, features, write))
        return write

    return register


def write_bad_inputs(folder: Path) -> BadInputCorpus:
    """Write every case into ``folder`` (which must exist) and return the corpus."""
    corpus = BadInputCorpus(records=[])
    for case in _CASES:
        try:
            path = case.write(folder)
        except CaseUnavailableError as reason:
            corpus.skipped[case.name] = str(reason)
            continue
        corpus.records.append(
            BadInput(case.name, path, case.expected, case.description, case.expected_features)
        )
    return corpus


def case_names() -> tuple[str, ...]:
    """Names of all cases, known without writing anything (for parametrizing)."""
    return tuple(case.name for case in _CASES)


# --- pictures -------------------------------------------------------------------


def sample_photo(name: str = "astronaut", size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    """A CC0 scikit-image sample photo as RGB, resized to ``size`` (width, height).

    A fresh Image each call: Pillow's JPEG encoder leaves its settings on the
    Image it saved, which would break a later TIFF save of a shared object.
    """
    return Image.fromarray(_sample_pixels(name, size))


@cache
def _sample_pixels(name: str, size: tuple[int, int]) -> npt.NDArray[np.uint8]:
    pixels = getattr(skimage_data, name)()
    picture = Image.fromarray(pixels).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    return np.asarray(picture)


def encoded(picture: Image.Image, image_format: str, **options: object) -> bytes:
    """``picture`` saved in ``image_format`` with Pillow's ``options``."""
    if image_format == "PNG":
        # Fast deflate: the corpus is rewritten for every test session.
        options.setdefault("compress_level", 1)
    output = io.BytesIO()
    picture.save(output, image_format, **options)
    return output.getvalue()


def photo_jpeg(size: tuple[int, int]) -> bytes:
    """A detailed CC0 photo of ``size`` (width, height) as a JPEG."""
    return encoded(sample_photo("coffee", size), "JPEG", quality=92)


def correlation(first: npt.ArrayLike, second: npt.ArrayLike) -> float:
    """Pearson correlation of two equally shaped pixel arrays."""
    a, b = np.asarray(first, float).ravel(), np.asarray(second, float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def stored_for_orientation(upright: npt.NDArray[np.uint8], orientation: int) -> npt.NDArray:
    """The pixel array a camera stores so that EXIF ``orientation`` shows ``upright``.

    Written from the EXIF definitions of where row 0 and column 0 of the
    stored image lie in the visual picture, independently of Pillow's tables.
    """
    stored_by_orientation = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # row 0 = top, column 0 = right
        3: lambda a: a[::-1, ::-1],  # row 0 = bottom, column 0 = right
        4: lambda a: a[::-1, :],  # row 0 = bottom, column 0 = left
        5: lambda a: a.swapaxes(0, 1),  # row 0 = left, column 0 = top
        6: lambda a: np.rot90(a, 1),  # row 0 = right, column 0 = top
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # row 0 = right, column 0 = bottom
        8: lambda a: np.rot90(a, -1),  # row 0 = left, column 0 = bottom
    }
    return np.ascontiguousarray(stored_by_orientation[orientation](upright))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny valid-looking 8-bit grey PNG that claims ``width`` x ``height``.

    Only a few rows of pixel data follow, so nothing is allocated to build it;
    a decoder that trusts the header and starts decoding would allocate
    ``width * height`` bytes.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    few_rows = zlib.compress(bytes((width + 1) * 4))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", few_rows)
        + png_chunk(b"IEND", b"")
    )


def _photo_jpeg(**options: object) -> bytes:
    return encoded(sample_photo(), "JPEG", quality=90, **options)


def _left_half_transparent_alpha(size: tuple[int, int]) -> Image.Image:
    alpha = np.full((size[1], size[0]), 255, dtype=np.uint8)
    alpha[:, : size[0] // 2] = 0
    return Image.fromarray(alpha)


def _write(folder: Path, file_name: str, payload: bytes) -> Path:
    path = folder / file_name
    path.write_bytes(payload)
    return path


# --- empty, not an image, unsupported -------------------------------------------


@_case("zero_bytes", EmptyImageError, "an empty file named .jpg")
def _zero_bytes(folder: Path) -> Path:
    return _write(folder, "zero_bytes.jpg", b"")


@_case("text_named_jpg", UnsupportedFormatError, "a plain text file named .jpg")
def _text(folder: Path) -> Path:
    return _write(folder, "notes.jpg", b"Shopping list:\n- milk\n- BMW brochure\n" * 20)


@_case("html_named_jpg", UnsupportedFormatError, "an HTML error page saved as .jpg")
def _html(folder: Path) -> Path:
    page = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body></body></html>"
    return _write(folder, "download.jpg", page)


@_case("heic_header", UnsupportedFormatError, "an iPhone HEIC file (ftyp box, brand heic)")
def _heic(folder: Path) -> Path:
    box = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic"
    return _write(folder, "IMG_0001.HEIC", box + bytes(range(256)) * 8)


@_case("pdf_named_png", UnsupportedFormatError, "a PDF document named .png")
def _pdf(folder: Path) -> Path:
    return _write(folder, "scan.png", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")


@_case("svg_drawing", UnsupportedFormatError, "an SVG drawing (vector, not decoded)")
def _svg(folder: Path) -> Path:
    drawing = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"></svg>'
    return _write(folder, "logo.svg", drawing)


# --- damaged -------------------------------------------------------------------


@_case("jpeg_truncated", CorruptImageError, "a JPEG cut off halfway through the scan")
def _jpeg_truncated(folder: Path) -> Path:
    jpeg = _photo_jpeg()
    return _write(folder, "truncated.jpg", jpeg[: len(jpeg) // 2])


@_case(
    "jpeg_corrupt_body",
    CorruptImageError,
    "a JPEG whose scan data is overwritten with noise and a stray frame marker",
)
def _jpeg_corrupt_body(folder: Path) -> Path:
    jpeg = bytearray(_photo_jpeg())
    scan_start = jpeg.index(b"\xff\xda")
    middle = (scan_start + len(jpeg)) // 2
    noise = np.random.default_rng(7).integers(0, 255, 512, dtype=np.uint8)
    # libjpeg only warns about bad Huffman codes and keeps going, and an 0xFF
    # in the noise could form an early end-of-image; a start-of-frame marker
    # inside the scan is a hard error in every libjpeg.
    noise[noise == 0xFF] = 0
    jpeg[middle : middle + 512] = noise.tobytes()
    jpeg[middle + 512 : middle + 516] = b"\xff\xc0\x00\x02"
    return _write(folder, "corrupt_body.jpg", bytes(jpeg))


@_case("png_bad_crc", CorruptImageError, "a PNG whose IHDR chunk fails its CRC")
def _png_bad_crc(folder: Path) -> Path:
    png = bytearray(encoded(sample_photo(), "PNG"))
    ihdr_crc_offset = 8 + 8 + 13
    png[ihdr_crc_offset] ^= 0xFF
    return _write(folder, "bad_crc.png", bytes(png))


@_case("png_corrupt_idat", CorruptImageError, "a PNG with damaged deflate data in IDAT")
def _png_corrupt_idat(folder: Path) -> Path:
    png = bytearray(encoded(sample_photo(), "PNG"))
    idat = png.index(b"IDAT")
    for offset in range(idat + 40, idat + 200, 7):
        png[offset] ^= 0x55
    return _write(folder, "corrupt_idat.png", bytes(png))


@_case("png_truncated", CorruptImageError, "a PNG cut off halfway through IDAT")
def _png_truncated(folder: Path) -> Path:
    png = encoded(sample_photo(), "PNG")
    return _write(folder, "truncated.png", png[: len(png) // 2])


@_case("png_zero_width", CorruptImageError, "a PNG whose header declares width 0")
def _png_zero_width(folder: Path) -> Path:
    header = struct.pack(">IIBBBBB", 0, 64, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")
    return _write(folder, "zero_width.png", png)


@_case("bmp_garbage", CorruptImageError, "a BMP signature and header size followed by junk")
def _bmp_garbage(folder: Path) -> Path:
    junk = bytes(np.random.default_rng(3).integers(0, 256, 200, dtype=np.uint8))
    header = b"BM" + struct.pack("<IHHI", 246, 0, 0, 54) + struct.pack("<I", 40)
    return _write(folder, "garbage.bmp", header + junk)


# --- too large / too small -----------------------------------------------------


@_case(
    "png_bomb_30000",
    ImageTooLargeError,
    "a 196-byte PNG whose header claims 30000x30000 (900 megapixels)",
)
def _png_bomb(folder: Path) -> Path:
    return _write(folder, "bomb_30000x30000.png", png_header_only(30_000, 30_000))


@_case(
    "png_header_100mp",
    ImageTooLargeError,
    "a small PNG claiming 10000x10000, where Pillow only warns instead of refusing",
)
def _png_100mp(folder: Path) -> Path:
    return _write(folder, "claims_10000x10000.png", png_header_only(10_000, 10_000))


@_case(
    "png_header_64mp",
    ImageTooLargeError,
    "a small PNG claiming 8000x8000, over the default budget but under Pillow's",
)
def _png_64mp(folder: Path) -> Path:
    return _write(folder, "claims_8000x8000.png", png_header_only(8_000, 8_000))


@_case(
    "oversized_sparse_file",
    ImageTooLargeError,
    "a sparse 51 MiB file starting like a JPEG: refused from its size, never read",
)
def _oversized(folder: Path) -> Path:
    path = _write(folder, "oversized.jpg", _photo_jpeg())
    with path.open("r+b") as stream:
        stream.truncate(51 * 2**20)
    return path


@_case("one_pixel", ImageTooSmallError, "a 1x1 PNG")
def _one_pixel(folder: Path) -> Path:
    return _write(folder, "pixel.png", encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"))


@_case("seven_pixels_high", ImageTooSmallError, "a 200x7 strip cut from a photo")
def _strip(folder: Path) -> Path:
    strip = sample_photo().crop((0, 100, 200, 107))
    return _write(folder, "strip_200x7.png", encoded(strip, "PNG"))


@_case(
    "extreme_aspect_wide",
    ImageTooSmallError,
    "a 10000x10 PNG: at working size it would be 1 pixel high",
)
def _extreme_wide(folder: Path) -> Path:
    stripes = np.tile(np.arange(10_000, dtype=np.uint16) % 256, (10, 1)).astype(np.uint8)
    return _write(folder, "panorama_10000x10.png", encoded(Image.fromarray(stripes), "PNG"))


@_case("extreme_aspect_tall", ImageTooSmallError, "a 10x10000 PNG")
def _extreme_tall(folder: Path) -> Path:
    stripes = np.tile((np.arange(10_000, dtype=np.uint16) % 256)[:, None], (1, 10))
    return _write(
        folder, "tower_10x10000.png", encoded(Image.fromarray(stripes.astype(np.uint8)), "PNG")
    )


@_case("tiny_16x16", OK, "a 16x16 icon-sized photo crop: small but usable", "some")
def _tiny(folder: Path) -> Path:
    return _write(folder, "icon_16.png", encoded(sample_photo().resize((16, 16)), "PNG"))


@_case("thumbnail_96x72", OK, "a 96x72 thumbnail JPEG (upscaled when min_side asks)")
def _thumbnail(folder: Path) -> Path:
    return _write(folder, "thumb.jpg", encoded(sample_photo().resize((96, 72)), "JPEG"))


# --- unusual but valid encodings -------------------------------------------------


@_case("png_16bit_gray", OK, "a 16-bit grayscale PNG using the full 0..65535 range")
def _png_16bit(folder: Path) -> Path:
    gray = np.asarray(sample_photo().convert("L"), dtype=np.uint16) * 257
    return _write(folder, "gray16.png", encoded(Image.fromarray(gray), "PNG"))


@_case("tiff_16bit_gray", OK, "a 16-bit grayscale TIFF")
def _tiff_16bit(folder: Path) -> Path:
    gray = np.asarray(sample_photo().convert("L"), dtype=np.uint16) * 257
    return _write(folder, "gray16.tif", encoded(Image.fromarray(gray), "TIFF"))


@_case("tiff_float", OK, "a 32-bit float TIFF with values from 0 to 1")
def _tiff_float(folder: Path) -> Path:
    gray = np.asarray(sample_photo().convert("L"), dtype=np.float32) / 255
    return _write(folder, "float32.tif", encoded(Image.fromarray(gray), "TIFF"))


@_case("tiff_int32", OK, "a 32-bit integer TIFF with values up to 255000")
def _tiff_int32(folder: Path) -> Path:
    gray = np.asarray(sample_photo().convert("L"), dtype=np.int32) * 1000
    return _write(folder, "int32.tif", encoded(Image.fromarray(gray), "TIFF"))


@_case("jpeg_cmyk", OK, "a CMYK JPEG (as printed matter is saved)")
def _jpeg_cmyk(folder: Path) -> Path:
    return _write(folder, "cmyk.jpg", encoded(sample_photo().convert("CMYK"), "JPEG", quality=90))


@_case("jpeg_grayscale", OK, "a grayscale JPEG")
def _jpeg_gray(folder: Path) -> Path:
    return _write(folder, "gray.jpg", encoded(sample_photo().convert("L"), "JPEG", quality=90))


@_case("jpeg_progressive", OK, "a progressive JPEG")
def _jpeg_progressive(folder: Path) -> Path:
    return _write(folder, "progressive.jpg", _photo_jpeg(progressive=True))


@_case("mpo_two_frames", OK, "a multi-picture JPEG (MPO) as cameras write")
def _mpo(folder: Path) -> Path:
    later = sample_photo(LATER_FRAME_PHOTO)
    mpo = encoded(sample_photo(FIRST_FRAME_PHOTO), "MPO", save_all=True, append_images=[later])
    return _write(folder, "camera.jpg", mpo)


@_case("png_rgba", OK, "an RGBA PNG, left half fully transparent")
def _png_rgba(folder: Path) -> Path:
    picture = sample_photo().convert("RGBA")
    picture.putalpha(_left_half_transparent_alpha(picture.size))
    return _write(folder, "rgba.png", encoded(picture, "PNG"))


@_case("png_la", OK, "a grayscale+alpha PNG, left half fully transparent")
def _png_la(folder: Path) -> Path:
    picture = sample_photo().convert("LA")
    picture.putalpha(_left_half_transparent_alpha(picture.size))
    return _write(folder, "gray_alpha.png", encoded(picture, "PNG"))


@_case("png_palette_transparency", OK, "a palette PNG whose left half is the transparent index")
def _png_palette(folder: Path) -> Path:
    palette_picture = sample_photo().quantize(colors=63, method=Image.Quantize.FASTOCTREE)
    indices = np.asarray(palette_picture).copy()
    indices[:, : indices.shape[1] // 2] = 63
    transparent = Image.fromarray(indices)
    palette = palette_picture.getpalette() or []
    transparent.putpalette([*palette[: 63 * 3], 255, 0, 255])
    return _write(folder, "palette.png", encoded(transparent, "PNG", transparency=63))


@_case("png_1bit", OK, "a 1-bit black-and-white PNG (a dithered photo)")
def _png_1bit(folder: Path) -> Path:
    return _write(folder, "bilevel.png", encoded(sample_photo().convert("1"), "PNG"))


@_case("png_animated", OK, "an APNG with two frames (the first one counts)")
def _apng(folder: Path) -> Path:
    later = sample_photo(LATER_FRAME_PHOTO)
    apng = encoded(sample_photo(FIRST_FRAME_PHOTO), "PNG", save_all=True, append_images=[later])
    return _write(folder, "animated.png", apng)


@_case("gif_animated", OK, "an animated GIF with two frames (a moving picture: both count)")
def _gif(folder: Path) -> Path:
    # Pillow's default median-cut quantizer takes a noticeable fraction of a second.
    first, later = (
        sample_photo(name).quantize(method=Image.Quantize.FASTOCTREE)
        for name in (FIRST_FRAME_PHOTO, LATER_FRAME_PHOTO)
    )
    gif = encoded(first, "GIF", save_all=True, append_images=[later], duration=100)
    return _write(folder, "animated.gif", gif)


@_case("webp_lossy", OK, "a lossy WebP")
def _webp(folder: Path) -> Path:
    return _write(folder, "photo.webp", encoded(sample_photo(), "WEBP", quality=85))


@_case("webp_alpha", OK, "a lossless WebP, left half fully transparent")
def _webp_alpha(folder: Path) -> Path:
    picture = sample_photo().convert("RGBA")
    picture.putalpha(_left_half_transparent_alpha(picture.size))
    return _write(folder, "sticker.webp", encoded(picture, "WEBP", lossless=True, method=0))


@_case("webp_animated", OK, "an animated WebP with two frames (the first one counts)")
def _webp_animated(folder: Path) -> Path:
    later = sample_photo(LATER_FRAME_PHOTO)
    webp = encoded(
        sample_photo(FIRST_FRAME_PHOTO), "WEBP", save_all=True, append_images=[later], duration=100
    )
    return _write(folder, "animated.webp", webp)


@_case("tiff_multipage", OK, "a two-page TIFF (the first page counts)")
def _tiff_pages(folder: Path) -> Path:
    later = sample_photo(LATER_FRAME_PHOTO)
    tiff = encoded(sample_photo(FIRST_FRAME_PHOTO), "TIFF", save_all=True, append_images=[later])
    return _write(folder, "pages.tif", tiff)


@_case("bmp", OK, "a 24-bit BMP")
def _bmp(folder: Path) -> Path:
    return _write(folder, "photo.bmp", encoded(sample_photo(), "BMP"))


@_case("solid_colour", OK, "a flat orange 400x300 JPEG", "none")
def _solid(folder: Path) -> Path:
    return _write(
        folder, "solid.jpg", encoded(Image.new("RGB", (400, 300), (230, 120, 20)), "JPEG")
    )


@_case("pure_noise", OK, "uniform RGB noise, 400x300 PNG", "unstable")
def _noise(folder: Path) -> Path:
    noise = np.random.default_rng(11).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    return _write(folder, "noise.png", encoded(Image.fromarray(noise), "PNG"))


# --- metadata ---------------------------------------------------------------------


def _orientation_jpeg(orientation: int) -> bytes:
    upright = np.asarray(sample_photo("astronaut", ORIENTATION_SIZE))
    stored = Image.fromarray(stored_for_orientation(upright, orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(stored, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())


@_case(ORIENTATION_REFERENCE, OK, "the upright reference JPEG (EXIF orientation 1)")
def _orientation_reference(folder: Path) -> Path:
    return _write(folder, f"{ORIENTATION_REFERENCE}.jpg", _orientation_jpeg(1))


def _orientation_writer(orientation: int) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        name = ORIENTED_CASES[orientation]
        return _write(folder, f"{name}.jpg", _orientation_jpeg(orientation))

    return write


for _orientation, _name in ORIENTED_CASES.items():
    _case(_name, OK, f"the reference stored rotated/mirrored, EXIF orientation {_orientation}")(
        _orientation_writer(_orientation)
    )


@_case("png_exif_orientation_6", OK, "a PNG with an eXIf chunk saying orientation 6")
def _png_orientation(folder: Path) -> Path:
    upright = np.asarray(sample_photo("astronaut", ORIENTATION_SIZE))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(stored_for_orientation(upright, 6))
    return _write(folder, "oriented_6.png", encoded(stored, "PNG", exif=exif.tobytes()))


@_case("huge_exif", OK, "a JPEG with a 60 KB EXIF description and a 60 KB comment")
def _huge_exif(folder: Path) -> Path:
    exif = Image.Exif()
    exif[0x010E] = "description " * 5000
    return _write(
        folder, "huge_exif.jpg", _photo_jpeg(exif=exif.tobytes(), comment=b"comment " * 7500)
    )


@_case("corrupt_exif", OK, "a JPEG whose EXIF block is garbage (orientation is ignored)")
def _corrupt_exif(folder: Path) -> Path:
    garbage = bytes(np.random.default_rng(5).integers(0, 256, 300, dtype=np.uint8))
    return _write(
        folder,
        "corrupt_exif.jpg",
        _photo_jpeg(exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08" + garbage),
    )


# --- awkward names ------------------------------------------------------------------


def _awkward_name_writer(file_name: str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        try:
            return _write(folder, file_name, _photo_jpeg())
        except (OSError, UnicodeEncodeError) as error:
            raise CaseUnavailableError(f"the filesystem refuses {file_name!r}: {error}") from error

    return write


_AWKWARD_NAMES: Final = {
    "name_backslash_traversal": "..\\..\\etc\\passwd.jpg",
    "name_percent_traversal": "..%2F..%2Fescape.jpg",
    "name_quotes": 'it\'s a "quoted" `name`.jpg',
    "name_newline": "line\nbreak.jpg",
    "name_unicode": "фото кота 🐈 café.jpg",
    "name_leading_dash": "-rf --help.jpg",
    "name_hidden": ".hidden.jpg",
}
for _name, _file_name in _AWKWARD_NAMES.items():
    _case(_name, OK, f"a normal JPEG named {_file_name!r}")(_awkward_name_writer(_file_name))


# --- things that are not readable files ------------------------------------------------


@_case("missing_file", SourceError, "a path that does not exist")
def _missing(folder: Path) -> Path:
    return folder / "no_such_photo.jpg"


@_case("directory_named_jpg", SourceError, "a directory named like a photo")
def _directory(folder: Path) -> Path:
    path = folder / "album.jpg"
    path.mkdir()
    return path


@_case("fifo", SourceError, "a named pipe with no writer (opening it must not hang)")
def _fifo(folder: Path) -> Path:
    path = folder / "pipe.jpg"
    try:
        os.mkfifo(path)
    except (AttributeError, OSError) as error:
        raise CaseUnavailableError(f"cannot make a FIFO here: {error}") from error
    return path


@_case("unreadable_file", SourceError, "a JPEG with permissions 000")
def _unreadable(folder: Path) -> Path:
    path = _write(folder, "locked.jpg", _photo_jpeg())
    path.chmod(0)
    try:
        with path.open("rb"):
            pass
    except PermissionError:
        return path
    path.unlink()
    raise CaseUnavailableError("chmod 000 does not stop reads here (running as root)")


def _loop_folder(folder: Path) -> Path:
    loop_folder = folder / "symlink_loop"
    if not loop_folder.exists():
        loop_folder.mkdir()
        try:
            (loop_folder / "a.jpg").symlink_to("b.jpg")
            (loop_folder / "b.jpg").symlink_to("a.jpg")
            (loop_folder / "cycle").symlink_to(".", target_is_directory=True)
        except OSError as error:
            raise CaseUnavailableError(f"cannot make symlinks here: {error}") from error
        _write(loop_folder, "photo.jpg", _photo_jpeg())
    return loop_folder


@_case("symlink_loop", SourceError, "a.jpg -> b.jpg -> a.jpg inside symlink_loop/")
def _symlink_loop(folder: Path) -> Path:
    return _loop_folder(folder) / "a.jpg"


@_case(
    "symlink_directory_cycle",
    SourceError,
    "symlink_loop/cycle -> . (a folder containing itself)",
)
def _symlink_cycle(folder: Path) -> Path:
    return _loop_folder(folder) / "cycle"


@_case("photo_inside_loop_folder", OK, "the one good photo inside symlink_loop/")
def _photo_in_loop(folder: Path) -> Path:
    return _loop_folder(folder) / "photo.jpg"
