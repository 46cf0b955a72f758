"""Tests of indexer.images: decoding hostile and odd input, working sizes,
EXIF orientation, Telegram-ready photos and contact sheets."""

from __future__ import annotations

import functools
import io
import multiprocessing
import resource
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from bad_inputs import (
    CORPUS_WORKING_SIDE,
    FIRST_FRAME_PHOTO,
    LATER_FRAME_PHOTO,
    OK,
    ORIENTATION_REFERENCE,
    ORIENTED_CASES,
    TRANSPARENT_LEFT_HALF,
    BadInput,
    BadInputCorpus,
    case_names,
    correlation,
    encoded,
    photo_jpeg,
    png_header_only,
    sample_photo,
    stored_for_orientation,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from indexer.errors import (
    EmptyImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    IndexerError,
    SourceError,
    UnsupportedFormatError,
)
from indexer.images import (
    MIN_DESCRIBABLE_SIDE,
    NEUTRAL_BACKGROUND,
    CopyMaking,
    WorkingImage,
    image_format,
    load_working_image,
)
from indexer.regions import Region

Gray = npt.NDArray[np.uint8]


def record_or_skip(corpus: BadInputCorpus, name: str) -> BadInput:
    if name in corpus.skipped:
        pytest.skip(f"{name}: {corpus.skipped[name]}")
    return corpus[name]


def decode(source: bytes | Path, **options: int) -> WorkingImage:
    options.setdefault("working_side", CORPUS_WORKING_SIDE)
    return load_working_image(source, **options)


def assert_valid(result: WorkingImage) -> None:
    assert isinstance(result, WorkingImage)
    assert result.gray.dtype == np.uint8
    assert result.gray.ndim == 2
    assert result.gray.flags.c_contiguous
    assert min(result.gray.shape) >= MIN_DESCRIBABLE_SIDE
    assert result.width >= 1
    assert result.height >= 1
    assert result.format in {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"}


def luma(picture: Image.Image) -> npt.NDArray[np.float64]:
    """ITU-R 601 luma computed here, not by the code under test."""
    rgb = np.asarray(picture.convert("RGB"), dtype=np.float64)
    return rgb @ np.array([0.299, 0.587, 0.114])


def mean_abs_diff(first: npt.ArrayLike, second: npt.ArrayLike) -> float:
    return float(np.mean(np.abs(np.asarray(first, float) - np.asarray(second, float))))


# --- the corpus ---------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("min_side", [0, 256])
@pytest.mark.parametrize("name", case_names())
def test_every_corpus_case_gives_exactly_its_outcome(
    corpus: BadInputCorpus, name: str, min_side: int
) -> None:
    record = record_or_skip(corpus, name)
    if record.expected == OK:
        assert_valid(decode(record.path, min_side=min_side))
        return
    with pytest.raises(IndexerError) as raised:
        decode(record.path, min_side=min_side)
    assert type(raised.value) is record.expected, record.description


@pytest.mark.parametrize("name", case_names())
def test_corpus_files_give_the_same_outcome_from_bytes(corpus: BadInputCorpus, name: str) -> None:
    record = record_or_skip(corpus, name)
    if record.expected is SourceError:
        pytest.skip("not a readable file, so there are no bytes to pass")
    payload = record.path.read_bytes()
    if record.expected == OK:
        from_bytes, from_path = decode(payload), decode(record.path)
        assert np.array_equal(from_bytes.gray, from_path.gray)
        assert (from_bytes.width, from_bytes.height) == (from_path.width, from_path.height)
        return
    with pytest.raises(IndexerError) as raised:
        decode(payload)
    assert type(raised.value) is record.expected, record.description


def test_flat_and_noisy_pictures_decode_as_flat_and_noisy(
    corpus: BadInputCorpus,
) -> None:
    solid, noise = corpus["solid_colour"], corpus["pure_noise"]
    assert np.ptp(decode(solid.path).gray) <= 2
    assert np.std(decode(noise.path).gray) > 20


def test_unreadable_file_is_a_source_error(corpus: BadInputCorpus) -> None:
    record = record_or_skip(corpus, "unreadable_file")
    with pytest.raises(SourceError):
        decode(record.path)


# --- orientation ----------------------------------------------------------------------


def dihedral_variants(gray: Gray) -> dict[str, Gray]:
    return {
        "identity": gray,
        "mirror": gray[:, ::-1],
        "flip": gray[::-1, :],
        "rotate 180": gray[::-1, ::-1],
        "transpose": gray.T,
        "rotate 90": np.rot90(gray, 1),
        "rotate 270": np.rot90(gray, -1),
        "transverse": gray[::-1, ::-1].T,
    }


@pytest.mark.parametrize("orientation", sorted(ORIENTED_CASES))
def test_exif_orientation_gives_the_upright_pixels(
    corpus: BadInputCorpus, orientation: int
) -> None:
    reference = decode(corpus[ORIENTATION_REFERENCE].path)
    oriented = decode(corpus[ORIENTED_CASES[orientation]].path)

    assert (oriented.width, oriented.height) == (reference.width, reference.height)
    assert oriented.gray.shape == reference.gray.shape
    distances = {
        name: mean_abs_diff(oriented.gray, variant)
        for name, variant in dihedral_variants(reference.gray).items()
        if variant.shape == oriented.gray.shape
    }
    assert distances["identity"] < 3.0, distances
    assert min(distances, key=distances.__getitem__) == "identity", distances


def test_exif_orientation_in_a_png_is_honoured(corpus: BadInputCorpus) -> None:
    reference = decode(corpus[ORIENTATION_REFERENCE].path)
    oriented = decode(corpus["png_exif_orientation_6"].path)
    assert (oriented.width, oriented.height) == (reference.width, reference.height)
    assert mean_abs_diff(oriented.gray, reference.gray) < 3.0


def test_orientation_applies_after_downscaling(corpus: BadInputCorpus) -> None:
    oriented = decode(corpus[ORIENTED_CASES[6]].path, working_side=160)
    reference = decode(corpus[ORIENTATION_REFERENCE].path, working_side=160)
    assert oriented.gray.shape == reference.gray.shape == (112, 160)
    assert mean_abs_diff(oriented.gray, reference.gray) < 3.0


def test_corrupt_exif_is_ignored_not_fatal(corpus: BadInputCorpus) -> None:
    damaged = decode(corpus["corrupt_exif"].path)
    assert (damaged.width, damaged.height) == sample_photo().size


# --- modes, depths, transparency, frames ---------------------------------------------


@pytest.mark.parametrize("name", ["png_16bit_gray", "tiff_16bit_gray"])
def test_sixteen_bit_is_scaled_not_clipped(corpus: BadInputCorpus, name: str) -> None:
    expected = np.asarray(sample_photo().convert("L"))
    decoded = decode(corpus[name].path).gray
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("name", ["tiff_float", "tiff_int32"])
def test_float_and_int32_are_stretched_to_their_range(corpus: BadInputCorpus, name: str) -> None:
    gray = np.asarray(sample_photo().convert("L"), dtype=float)
    stretched = (gray - gray.min()) * 255 / (gray.max() - gray.min())
    decoded = decode(corpus[name].path).gray
    assert np.abs(decoded - stretched).max() <= 1


@pytest.mark.parametrize("name", TRANSPARENT_LEFT_HALF)
def test_transparency_is_composited_on_neutral_grey(corpus: BadInputCorpus, name: str) -> None:
    decoded = decode(corpus[name].path).gray.astype(int)
    half = decoded.shape[1] // 2
    assert np.all(decoded[:, :half] == NEUTRAL_BACKGROUND)
    photo = luma(sample_photo())
    assert correlation(decoded[:, half:], photo[:, half:]) > 0.95


def test_cmyk_jpeg_looks_like_the_photo(corpus: BadInputCorpus) -> None:
    decoded = decode(corpus["jpeg_cmyk"].path).gray
    assert correlation(decoded, luma(sample_photo())) > 0.95


@pytest.mark.parametrize(
    "name", ["gif_animated", "png_animated", "webp_animated", "tiff_multipage", "mpo_two_frames"]
)
def test_only_the_first_frame_is_used(corpus: BadInputCorpus, name: str) -> None:
    decoded = decode(corpus[name].path).gray
    first = correlation(decoded, luma(sample_photo(FIRST_FRAME_PHOTO)))
    later = correlation(decoded, luma(sample_photo(LATER_FRAME_PHOTO)))
    assert first > 0.9
    assert first > later + 0.3


def test_lossless_gray_is_returned_unchanged() -> None:
    gray = sample_photo().convert("L")
    decoded = load_working_image(encoded(gray, "PNG"), working_side=512)
    assert np.array_equal(decoded.gray, np.asarray(gray))


# --- sizes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "working_side", "min_side", "expected_shape"),
    [
        ((1200, 900), 512, 0, (384, 512)),  # downscaled: longest side = working_side
        ((900, 1200), 512, 0, (512, 384)),  # portrait
        ((384, 288), 512, 256, (288, 384)),  # between min_side and working_side: kept
        ((96, 72), 512, 256, (192, 256)),  # below min_side: upscaled
        ((96, 72), 512, 0, (72, 96)),  # min_side 0 disables upscaling
        ((512, 384), 512, 512, (384, 512)),  # exactly working_side
    ],
)
def test_working_size_rules(
    size: tuple[int, int], working_side: int, min_side: int, expected_shape: tuple[int, int]
) -> None:
    result = load_working_image(photo_jpeg(size), working_side=working_side, min_side=min_side)
    assert result.gray.shape == expected_shape
    assert (result.width, result.height) == size
    assert result.format == "JPEG"


def test_upscaled_thumbnail_keeps_the_picture() -> None:
    thumbnail = sample_photo("coffee", (96, 72))
    result = load_working_image(encoded(thumbnail, "PNG"), working_side=512, min_side=256)
    enlarged = luma(sample_photo("coffee", (256, 192)))
    assert correlation(result.gray, enlarged) > 0.95


def test_shorter_side_under_eight_pixels_after_scaling_is_too_small() -> None:
    strip = encoded(sample_photo("coffee", (2000, 16)), "PNG")
    # 16 * 938 / 2000 = 7.50 rounds to 8 rows; 16 * 937 / 2000 = 7.49 rounds to 7.
    assert load_working_image(strip, working_side=938).gray.shape == (8, 938)
    with pytest.raises(ImageTooSmallError):
        load_working_image(strip, working_side=937)


def test_jpeg_draft_downscale_is_close_to_a_full_decode() -> None:
    large = encoded(sample_photo("astronaut", (2400, 2400)), "JPEG", quality=92)
    result = load_working_image(large, working_side=300)
    with Image.open(io.BytesIO(large)) as full:
        reference = full.convert("L").resize((300, 300), Image.Resampling.LANCZOS)
    assert result.gray.shape == (300, 300)
    assert mean_abs_diff(result.gray, reference) < 1.0


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"working_side": 0}, "working_side"),
        ({"working_side": 512, "min_side": 600}, "min_side"),
        ({"working_side": 512, "min_side": -1}, "min_side"),
        ({"working_side": 512, "max_bytes": 0}, "max_bytes"),
        ({"working_side": 512, "max_pixels": 0}, "max_pixels"),
    ],
)
def test_inconsistent_arguments_are_refused(options: dict[str, int], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        load_working_image(photo_jpeg((64, 48)), **options)


# --- limits ------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("width", "height"), [(30_000, 30_000), (10_000, 10_000), (8_000, 8_000)])
def test_pixel_bombs_are_refused_from_the_header(width: int, height: int) -> None:
    bomb = png_header_only(width, height)
    assert len(bomb) < 1000
    peak_before = peak_rss_bytes()
    with pytest.raises(ImageTooLargeError):
        load_working_image(bomb, working_side=512)
    assert peak_rss_bytes() - peak_before < 50 * 2**20


def test_pixel_budget_is_exact() -> None:
    picture = encoded(sample_photo("coffee", (100, 80)), "PNG")
    assert_valid(load_working_image(picture, working_side=512, max_pixels=8000))
    with pytest.raises(ImageTooLargeError):
        load_working_image(picture, working_side=512, max_pixels=7999)


def test_byte_budget_is_exact_for_bytes_and_files(tmp_path: Path) -> None:
    picture = photo_jpeg((100, 80))
    path = tmp_path / "photo.jpg"
    path.write_bytes(picture)
    for source in (picture, path):
        assert_valid(load_working_image(source, working_side=512, max_bytes=len(picture)))
        with pytest.raises(ImageTooLargeError):
            load_working_image(source, working_side=512, max_bytes=len(picture) - 1)


def test_empty_bytes_are_an_empty_image() -> None:
    with pytest.raises(EmptyImageError):
        load_working_image(b"", working_side=512)


# --- sniffing ------------------------------------------------------------------------------


@pytest.mark.parametrize("image_format_name", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_image_format_names_each_supported_format(image_format_name: str) -> None:
    assert image_format(encoded(sample_photo(), image_format_name)) == image_format_name


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64), "AVIF"),
        (b"%PDF-1.4\n", "PDF"),
        (b"  <!DOCTYPE html><html></html>", "HTML"),
        (b"BMW 3 series brochure", "not an image"),
        (b"\x00" * 64, "not an image"),
    ],
)
def test_unsupported_formats_are_named(payload: bytes, named: str) -> None:
    with pytest.raises(UnsupportedFormatError, match=named):
        image_format(payload)


def test_image_format_of_nothing_is_empty() -> None:
    with pytest.raises(EmptyImageError):
        image_format(b"")


# --- never anything but a WorkingImage or an IndexerError -----------------------------------


def small_encodings() -> dict[str, bytes]:
    photo = sample_photo("chelsea", (48, 40))
    return {name: encoded(photo, name) for name in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")}


SMALL_ENCODINGS = small_encodings()
FUZZ_SETTINGS = settings(
    max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow]
)


def decode_or_domain_error(payload: bytes) -> WorkingImage | IndexerError:
    try:
        return load_working_image(payload, working_side=64, min_side=16)
    except IndexerError as error:
        return error


@FUZZ_SETTINGS
@given(payload=st.binary(max_size=4096))
def test_arbitrary_bytes_never_escape_the_error_tree(payload: bytes) -> None:
    outcome = decode_or_domain_error(payload)
    if isinstance(outcome, WorkingImage):
        assert_valid(outcome)


@FUZZ_SETTINGS
@given(
    original=st.sampled_from(sorted(SMALL_ENCODINGS)),
    cut=st.integers(min_value=0, max_value=100),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), max_size=8),
)
def test_damaged_real_files_never_escape_the_error_tree(
    original: str, cut: int, flips: list[tuple[int, int]]
) -> None:
    payload = bytearray(SMALL_ENCODINGS[original])
    del payload[len(payload) * cut // 100 or 1 :]
    for position, mask in flips:
        payload[position % len(payload)] ^= mask
    outcome = decode_or_domain_error(bytes(payload))
    if isinstance(outcome, WorkingImage):
        assert_valid(outcome)


def pillow_encodable_arrays() -> st.SearchStrategy[npt.NDArray[np.generic]]:
    side = st.integers(min_value=1, max_value=40)
    gray_shapes = st.tuples(side, side)
    colour_shapes = st.tuples(side, side, st.sampled_from([2, 3, 4]))
    return st.one_of(
        hnp.arrays(np.uint8, st.one_of(gray_shapes, colour_shapes)),
        hnp.arrays(np.uint16, gray_shapes),
        hnp.arrays(np.bool_, gray_shapes),
        hnp.arrays(np.int32, gray_shapes),
        hnp.arrays(np.float32, gray_shapes),
    )


@FUZZ_SETTINGS
@given(array=pillow_encodable_arrays())
def test_arbitrary_arrays_decode_or_are_refused(array: npt.NDArray[np.generic]) -> None:
    picture = Image.fromarray(array)
    # PNG has no 32-bit modes; TIFF does.
    container = "TIFF" if picture.mode in {"I", "F"} else "PNG"
    outcome = decode_or_domain_error(encoded(picture, container))
    if min(array.shape[:2]) < MIN_DESCRIBABLE_SIDE:
        assert isinstance(outcome, ImageTooSmallError)
        return
    assert isinstance(outcome, WorkingImage), outcome
    assert_valid(outcome)
    assert (outcome.height, outcome.width) == array.shape[:2]
    longest = max(array.shape[:2])
    expected_longest = 64 if longest > 64 else max(longest, 16)
    assert max(outcome.gray.shape) == expected_longest


@FUZZ_SETTINGS
@given(array=hnp.arrays(np.uint8, st.tuples(st.integers(8, 48), st.integers(8, 48))))
def test_gray_png_within_the_working_size_round_trips_exactly(array: Gray) -> None:
    decoded = load_working_image(encoded(Image.fromarray(array), "PNG"), working_side=48)
    assert np.array_equal(decoded.gray, array)


@FUZZ_SETTINGS
@given(array=hnp.arrays(np.uint16, st.tuples(st.integers(8, 48), st.integers(8, 48))))
def test_sixteen_bit_png_scales_every_value(array: npt.NDArray[np.uint16]) -> None:
    decoded = load_working_image(encoded(Image.fromarray(array), "PNG"), working_side=48)
    assert np.array_equal(decoded.gray, np.rint(array / 257).astype(np.uint8))


# --- workers ----------------------------------------------------------------------------


def decodable_paths(corpus: BadInputCorpus) -> list[Path]:
    return [record.path for record in corpus if record.expected == OK]


def test_threads_decode_concurrently_and_leave_warning_filters_alone(
    corpus: BadInputCorpus,
) -> None:
    paths = decodable_paths(corpus) + [corpus["corrupt_exif"].path] * 8
    serial = [decode(path) for path in paths]
    filters_before = list(warnings.filters)
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(decode, paths))
    assert list(warnings.filters) == filters_before
    for alone, together in zip(serial, threaded, strict=True):
        assert np.array_equal(alone.gray, together.gray)


@pytest.mark.timeout(120)
def test_worker_processes_return_the_same_working_images(corpus: BadInputCorpus) -> None:
    paths = decodable_paths(corpus)[:6]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:
        in_workers = list(pool.map(functools.partial(load_working_image, working_side=256), paths))
    for path, result in zip(paths, in_workers, strict=True):
        here = load_working_image(path, working_side=256)
        assert np.array_equal(result.gray, here.gray)
        assert (result.width, result.height, result.format) == (
            here.width,
            here.height,
            here.format,
        )


# --- file sources ---------------------------------------------------------------------------


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no_such"):
        load_working_image(tmp_path / "no_such.jpg", working_side=512)


@pytest.mark.timeout(10)
def test_fifo_is_refused_without_waiting_for_a_writer(corpus: BadInputCorpus) -> None:
    record = record_or_skip(corpus, "fifo")
    with pytest.raises(SourceError, match="not a regular file"):
        decode(record.path)


def test_oversized_file_is_refused_from_its_size(corpus: BadInputCorpus) -> None:
    record = corpus["oversized_sparse_file"]
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode(record.path)


# --- decoding a part of the picture --------------------------------------------------------


def test_a_crop_is_the_same_part_of_the_picture_sized_like_a_working_image() -> None:
    picture = sample_photo("coffee", (2400, 1600))
    crop = Region(0.25, 0.5, 0.75, 1.0)  # 1200 x 800 of the original
    part = load_working_image(photo_jpeg_of(picture), working_side=600, min_side=300, crop=crop)

    assert part.gray.shape == (400, 600)
    assert (part.width, part.height) == (2400, 1600)  # the size of the whole picture
    expected = luma(picture.crop((600, 800, 1800, 1600)).resize((600, 400)))
    assert correlation(part.gray, expected) > 0.97


def test_a_small_crop_is_enlarged_to_the_minimum_side() -> None:
    picture = sample_photo("coffee", (800, 600))
    crop = Region(0.0, 0.0, 0.25, 0.25)  # 200 x 150
    part = load_working_image(photo_jpeg_of(picture), working_side=640, min_side=400, crop=crop)

    assert part.gray.shape == (300, 400)
    expected = luma(picture.crop((0, 0, 200, 150)).resize((400, 300)))
    assert correlation(part.gray, expected) > 0.95


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_crop_is_taken_from_the_upright_picture(orientation: int) -> None:
    upright = sample_photo("coffee", (960, 640))
    stored = Image.fromarray(stored_for_orientation(np.asarray(upright), orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    oriented = encoded(stored, "JPEG", quality=92, exif=exif.tobytes())
    crop = Region(0.5, 0.0, 1.0, 0.5)  # the upper right quarter, as seen

    part = load_working_image(oriented, working_side=640, min_side=400, crop=crop)

    assert part.gray.shape == (320, 480)
    assert correlation(part.gray, luma(upright.crop((480, 0, 960, 320)))) > 0.97


def test_a_crop_at_a_quarter_of_the_detail_is_that_part_of_a_quarter_size_copy() -> None:
    picture = sample_photo("coffee", (800, 600))
    crop = Region(0.0, 0.0, 0.5, 0.5)  # 400 x 300, shown by a 200 x 150 copy as 100 x 75

    part = load_working_image(
        photo_jpeg_of(picture), working_side=640, min_side=400, crop=crop,
        made_as=CopyMaking(detail=0.25),
    )

    assert part.gray.shape == (300, 400)
    small_copy = picture.resize((200, 150), Image.Resampling.LANCZOS)
    blurred = luma(small_copy.crop((0, 0, 100, 75)).resize((400, 300), Image.Resampling.BICUBIC))
    sharp = luma(picture.crop((0, 0, 400, 300)))
    assert correlation(part.gray, blurred) > 0.98
    assert correlation(part.gray, blurred) > correlation(part.gray, sharp)


def test_a_jpeg_s_luminance_table_comes_with_its_working_image() -> None:
    picture = sample_photo("coffee", (400, 300))
    jpeg = load_working_image(encoded(picture, "JPEG", quality=15), working_side=640)
    png = load_working_image(encoded(picture, "PNG"), working_side=640)

    reopened = Image.open(io.BytesIO(encoded(picture, "JPEG", quality=15)))
    assert jpeg.luma_table == tuple(reopened.quantization[0])
    assert png.luma_table is None


def test_a_crop_made_with_a_jpeg_table_has_the_blocks_of_a_copy_made_with_it() -> None:
    picture = sample_photo("coffee", (400, 300))
    copy = Image.open(io.BytesIO(encoded(picture.resize((40, 30)), "JPEG", quality=15)))
    table = tuple(copy.quantization[0])

    made_alike = load_working_image(
        photo_jpeg_of(picture), working_side=640, min_side=400,
        crop=Region(0, 0, 1, 1), made_as=CopyMaking(detail=0.1, luma_table=table),
    )
    reduced_only = load_working_image(
        photo_jpeg_of(picture), working_side=640, min_side=400,
        crop=Region(0, 0, 1, 1), made_as=CopyMaking(detail=0.1),
    )

    described_copy = load_working_image(encoded(copy, "JPEG", quality=95), working_side=640,
                                        min_side=400)
    assert made_alike.gray.shape == described_copy.gray.shape == (300, 400)
    alike = correlation(made_alike.gray, described_copy.gray)
    assert alike > 0.97
    assert alike > correlation(reduced_only.gray, described_copy.gray)


@pytest.mark.parametrize(
    ("magnification", "shape"),
    [(None, (300, 400)), (3.0, (450, 600)), (0.5, (75, 100)), (20.0, (960, 1280))],
)
def test_a_part_made_as_a_copy_is_enlarged_as_the_copy_was(
    magnification: float | None, shape: tuple[int, int]
) -> None:
    picture = sample_photo("coffee", (800, 600))
    crop = Region(0.0, 0.0, 0.25, 0.25)  # 200 x 150

    part = load_working_image(
        photo_jpeg_of(picture), working_side=640, min_side=400, crop=crop,
        made_as=CopyMaking(magnification=magnification),
    )

    # None: sized as a working image; 20x: at most twice the working side.
    assert part.gray.shape == shape


@pytest.mark.parametrize(
    ("options", "words"),
    [({"detail": 0.0}, "detail"), ({"detail": 1.5}, "detail"), ({"magnification": 0}, "magn")],
)
def test_a_copy_making_out_of_range_is_refused(options: dict[str, float], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        CopyMaking(**options)


def test_a_copy_making_without_a_crop_is_refused() -> None:
    with pytest.raises(ValueError, match="crop"):
        load_working_image(photo_jpeg((400, 300)), working_side=640, made_as=CopyMaking())


def test_a_crop_outside_the_picture_is_refused() -> None:
    with pytest.raises(ValueError, match="not a part"):
        load_working_image(photo_jpeg((400, 300)), working_side=640, crop=Region(0.5, 0, 1.5, 1))


def photo_jpeg_of(picture: Image.Image) -> bytes:
    return encoded(picture, "JPEG", quality=95)
