"""The benchmark's edit kinds: valid, deterministic, and each one really edits the photo."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from bench.edits import EDIT_KINDS, EditKind, apply_edit, encode_jpeg

# Edits that involve no randomness: the seed is accepted and ignored.
SEEDLESS = {"hflip", "grayscale", "downscale_jpeg15"}
SEEDS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    # Not square, so that a quarter turn is visible in the shape.
    image = data.astronaut()[40:440]
    assert image.shape == (400, 512, 3)
    return np.ascontiguousarray(image)


def _changed_share(before: np.ndarray, after: np.ndarray) -> float:
    return float(np.any(before != after, axis=2).mean())


@pytest.mark.parametrize("kind", EDIT_KINDS, ids=lambda kind: kind.name)
def test_returns_a_valid_image_of_sane_size(kind: EditKind, photo: np.ndarray) -> None:
    edited = kind.apply(photo, 7)
    assert edited.dtype == np.uint8
    assert edited.ndim == 3
    assert edited.shape[2] == 3
    height, width = edited.shape[:2]
    assert min(height, width) >= min(photo.shape[:2]) // 8
    assert max(height, width) <= 2.5 * max(photo.shape[:2])
    decoded = Image.open(io.BytesIO(encode_jpeg(edited, kind.jpeg_quality)))
    assert decoded.size == (width, height)


@pytest.mark.parametrize("kind", EDIT_KINDS, ids=lambda kind: kind.name)
def test_is_deterministic_for_a_seed(kind: EditKind, photo: np.ndarray) -> None:
    np.testing.assert_array_equal(kind.apply(photo, 123), kind.apply(photo, 123))


@pytest.mark.parametrize(
    "kind", [k for k in EDIT_KINDS if k.name not in SEEDLESS], ids=lambda kind: kind.name
)
def test_seed_changes_the_edit(kind: EditKind, photo: np.ndarray) -> None:
    results = [kind.apply(photo, seed) for seed in SEEDS]
    assert any(
        result.shape != results[0].shape or not np.array_equal(result, results[0])
        for result in results[1:]
    )


@pytest.mark.parametrize("kind", EDIT_KINDS, ids=lambda kind: kind.name)
def test_changes_the_image(kind: EditKind, photo: np.ndarray) -> None:
    edited = kind.apply(photo, 7)
    if edited.shape == photo.shape:
        mean_difference = np.abs(edited.astype(np.int16) - photo.astype(np.int16)).mean()
        assert mean_difference > 5
    else:
        assert edited.shape != photo.shape


@pytest.mark.parametrize("kind", EDIT_KINDS, ids=lambda kind: kind.name)
def test_leaves_the_input_untouched(kind: EditKind, photo: np.ndarray) -> None:
    before = photo.copy()
    kind.apply(photo, 7)
    np.testing.assert_array_equal(photo, before)


@pytest.mark.parametrize("kind", EDIT_KINDS, ids=lambda kind: kind.name)
def test_handles_the_smallest_photos(kind: EditKind, photo: np.ndarray) -> None:
    # The benchmark's photo set goes down to 75 px on the longer side.
    tiny = np.asarray(Image.fromarray(photo).resize((75, 59)))
    edited = kind.apply(tiny, 3)
    assert edited.dtype == np.uint8
    assert edited.shape[2] == 3
    assert min(edited.shape[:2]) >= 8


def test_kind_names_are_unique() -> None:
    names = [kind.name for kind in EDIT_KINDS]
    assert len(set(names)) == len(names)


def test_unknown_kind_is_refused(photo: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown edit kind"):
        apply_edit("sepia", photo, 0)


def test_non_rgb_input_is_refused(photo: np.ndarray) -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        apply_edit("crop", photo[:, :, 0], 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_crop_keeps_40_to_60_percent(photo: np.ndarray, seed: int) -> None:
    edited = apply_edit("crop", photo, seed)
    share = edited.shape[0] * edited.shape[1] / (photo.shape[0] * photo.shape[1])
    assert 0.39 <= share <= 0.61


@pytest.mark.parametrize("seed", SEEDS)
def test_deep_crop_keeps_15_to_25_percent(photo: np.ndarray, seed: int) -> None:
    edited = apply_edit("crop_deep", photo, seed)
    share = edited.shape[0] * edited.shape[1] / (photo.shape[0] * photo.shape[1])
    assert 0.14 <= share <= 0.26


def test_rot90_is_a_quarter_turn(photo: np.ndarray) -> None:
    edited = apply_edit("rot90", photo, 0)
    assert any(np.array_equal(edited, np.rot90(photo, turns)) for turns in (1, 3))


def test_rotate_expands_the_canvas(photo: np.ndarray) -> None:
    edited = apply_edit("rotate", photo, 0)
    assert edited.shape[0] > photo.shape[0]
    assert edited.shape[1] > photo.shape[1]


def test_hflip_mirrors(photo: np.ndarray) -> None:
    np.testing.assert_array_equal(apply_edit("hflip", photo, 0), photo[:, ::-1])


def test_downscale_is_a_quarter_and_lossy(photo: np.ndarray) -> None:
    edited = apply_edit("downscale_jpeg15", photo, 0)
    assert edited.shape[:2] == (100, 128)
    kind = next(k for k in EDIT_KINDS if k.name == "downscale_jpeg15")
    assert kind.jpeg_quality == 15
    assert len(encode_jpeg(edited, 15)) < len(encode_jpeg(edited, 90))


def test_grayscale_has_equal_channels(photo: np.ndarray) -> None:
    edited = apply_edit("grayscale", photo, 0)
    np.testing.assert_array_equal(edited[:, :, 0], edited[:, :, 1])
    np.testing.assert_array_equal(edited[:, :, 1], edited[:, :, 2])


def test_border_frames_the_whole_photo(photo: np.ndarray) -> None:
    edited = apply_edit("border", photo, 0)
    thickness = (edited.shape[0] - photo.shape[0]) // 2
    assert thickness >= 0.08 * min(photo.shape[:2]) - 1
    assert edited.shape[1] - photo.shape[1] == 2 * thickness
    np.testing.assert_array_equal(edited[thickness:-thickness, thickness:-thickness], photo)
    frame = np.concatenate([edited[:thickness].reshape(-1, 3), edited[-thickness:].reshape(-1, 3)])
    assert len(np.unique(frame, axis=0)) == 1


def test_caption_bar_covers_a_fifth(photo: np.ndarray) -> None:
    edited = apply_edit("caption", photo, 0)
    assert 0.15 <= _changed_share(photo, edited) <= 0.26


def test_occlusion_hides_45_percent(photo: np.ndarray) -> None:
    edited = apply_edit("occlusion45", photo, 0)
    assert 0.40 <= _changed_share(photo, edited) <= 0.46


def test_screenshot_is_phone_shaped(photo: np.ndarray) -> None:
    edited = apply_edit("screenshot", photo, 0)
    height, width = edited.shape[:2]
    assert height / width >= 2.1
    # The photo is shown at about half its size, filling most of the screen's width.
    assert 0.45 * photo.shape[1] <= width <= 0.65 * photo.shape[1]


def test_brightness_contrast_moves_levels(photo: np.ndarray) -> None:
    edited = apply_edit("brightness_contrast", photo, 0)
    assert abs(float(edited.mean()) - float(photo.mean())) > 5 or (
        abs(float(edited.std()) - float(photo.std())) > 5
    )
