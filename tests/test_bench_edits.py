"""The benchmark's edit kinds: valid, deterministic, and each one really edits the photo."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from testsupport.edits import (
    EDIT_KINDS,
    Composite,
    EditKind,
    apply_edit,
    compose_collage,
    compose_page,
    encode_jpeg,
)

# Edits that involve no randomness: the seed is accepted and ignored.
SEEDLESS = {"hflip", "grayscale", "downscale_jpeg15"}
SEEDS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    # Not square, so that a quarter turn is visible in the shape.
    image = data.astronaut()[40:440]
    assert image.shape == (400, 512, 3)
    return np.ascontiguousarray(image)


@pytest.fixture(scope="module")
def fillers() -> list[np.ndarray]:
    # Fewer than a 3x3 collage's eight other cells, so that reusing fillers is exercised too.
    return [data.chelsea(), data.coffee(), data.rocket()]


def _changed_share(before: np.ndarray, after: np.ndarray) -> float:
    return float(np.any(before != after, axis=2).mean())


@pytest.mark.parametrize("kind", EDIT_KINDS, ids=lambda kind: kind.name)
def test_returns_a_valid_image_of_sane_size(kind: EditKind, photo: np.ndarray,
                                            fillers: list[np.ndarray]) -> None:
    edited = kind.edit(photo, 7, fillers)
    assert edited.dtype == np.uint8
    assert edited.ndim == 3
    assert edited.shape[2] == 3
    height, width = edited.shape[:2]
    assert min(height, width) >= min(photo.shape[:2]) // 8
    assert max(height, width) <= 2.5 * max(photo.shape[:2])
    decoded = Image.open(io.BytesIO(encode_jpeg(edited, kind.jpeg_quality)))
    assert decoded.size == (width, height)


@pytest.mark.parametrize("kind", EDIT_KINDS, ids=lambda kind: kind.name)
def test_is_deterministic_for_a_seed(kind: EditKind, photo: np.ndarray,
                                     fillers: list[np.ndarray]) -> None:
    np.testing.assert_array_equal(kind.edit(photo, 123, fillers), kind.edit(photo, 123, fillers))


@pytest.mark.parametrize(
    "kind", [k for k in EDIT_KINDS if k.name not in SEEDLESS], ids=lambda kind: kind.name
)
def test_seed_changes_the_edit(kind: EditKind, photo: np.ndarray,
                               fillers: list[np.ndarray]) -> None:
    results = [kind.edit(photo, seed, fillers) for seed in SEEDS]
    assert any(
        result.shape != results[0].shape or not np.array_equal(result, results[0])
        for result in results[1:]
    )


@pytest.mark.parametrize("kind", EDIT_KINDS, ids=lambda kind: kind.name)
def test_changes_the_image(kind: EditKind, photo: np.ndarray,
                           fillers: list[np.ndarray]) -> None:
    edited = kind.edit(photo, 7, fillers)
    if edited.shape == photo.shape:
        mean_difference = np.abs(edited.astype(np.int16) - photo.astype(np.int16)).mean()
        assert mean_difference > 5
    else:
        assert edited.shape != photo.shape


@pytest.mark.parametrize("kind", EDIT_KINDS, ids=lambda kind: kind.name)
def test_leaves_the_input_untouched(kind: EditKind, photo: np.ndarray,
                                    fillers: list[np.ndarray]) -> None:
    before = photo.copy()
    fillers_before = [filler.copy() for filler in fillers]
    kind.edit(photo, 7, fillers)
    np.testing.assert_array_equal(photo, before)
    for filler, filler_before in zip(fillers, fillers_before, strict=True):
        np.testing.assert_array_equal(filler, filler_before)


@pytest.mark.parametrize("kind", EDIT_KINDS, ids=lambda kind: kind.name)
def test_handles_the_smallest_photos(kind: EditKind, photo: np.ndarray,
                                     fillers: list[np.ndarray]) -> None:
    # The benchmark's photo set goes down to 75 px on the longer side.
    tiny = np.asarray(Image.fromarray(photo).resize((75, 59)))
    edited = kind.edit(tiny, 3, fillers)
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


def _photo_as_placed(composite: Composite, photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The picture's pixels inside the photo's box (the perspective undone), and the shown
    part of the photo resized to that box, as int16 arrays to compare."""
    height, width = composite.image.shape[:2]
    flat = cv2.warpPerspective(composite.image, np.linalg.inv(composite.homography),
                               (width, height), flags=cv2.INTER_LINEAR)
    left, top, right, bottom = composite.box
    shown_left, shown_top, shown_right, shown_bottom = composite.shown
    expected = cv2.resize(photo[shown_top:shown_bottom, shown_left:shown_right],
                          (right - left, bottom - top), interpolation=cv2.INTER_AREA)
    return flat[top:bottom, left:right].astype(np.int16), expected.astype(np.int16)


def _box_area(box: tuple[int, int, int, int]) -> int:
    left, top, right, bottom = box
    return (right - left) * (bottom - top)


@pytest.mark.parametrize("seed", range(12))
def test_collage_shows_the_photo_in_one_cell(photo: np.ndarray, fillers: list[np.ndarray],
                                             seed: int) -> None:
    composite = compose_collage(photo, seed, fillers)
    assert composite.parts in {2, 4, 9}
    # One cell of the grid, less the gutters and the letterbox of a cell of another shape.
    share = _box_area(composite.box) / (composite.image.shape[0] * composite.image.shape[1])
    assert 0.55 / composite.parts <= share <= 1 / composite.parts
    # Only slightly centre-cropped to fill the cell.
    assert _box_area(composite.shown) >= 0.85 * photo.shape[0] * photo.shape[1]
    placed, expected = _photo_as_placed(composite, photo)
    assert np.abs(placed - expected).mean() < 2


def test_collage_layouts_vary_with_the_seed(photo: np.ndarray, fillers: list[np.ndarray]) -> None:
    parts = [compose_collage(photo, seed, fillers).parts for seed in range(40)]
    assert set(parts) == {2, 4, 9}
    assert max(set(parts), key=parts.count) == 4


def test_collage_fills_the_other_cells_with_the_fillers(photo: np.ndarray,
                                                        fillers: list[np.ndarray]) -> None:
    composite = compose_collage(photo, 5, fillers)
    other = compose_collage(photo, 5, fillers[::-1])
    left, top, right, bottom = composite.box
    inside = (slice(top, bottom), slice(left, right))
    np.testing.assert_array_equal(composite.image[inside], other.image[inside])
    assert not np.array_equal(composite.image, other.image)


def test_collage_without_fillers_is_refused(photo: np.ndarray) -> None:
    with pytest.raises(ValueError, match="fillers"):
        apply_edit("collage", photo, 0)


@pytest.mark.parametrize("seed", range(12))
def test_page_shows_the_photo_at_a_quarter_to_45_percent_of_the_width(
        photo: np.ndarray, fillers: list[np.ndarray], seed: int) -> None:
    composite = compose_page(photo, seed, fillers)
    left, _, right, _ = composite.box
    assert 0.25 <= (right - left) / composite.image.shape[1] <= 0.45
    assert composite.shown == (0, 0, photo.shape[1], photo.shape[0])
    placed, expected = _photo_as_placed(composite, photo)
    # Looser than the collage's: undoing the perspective resamples the photo a second time.
    assert np.abs(placed - expected).mean() < 8


@pytest.mark.parametrize("seed", range(12))
def test_page_perspective_is_modest(photo: np.ndarray, fillers: list[np.ndarray],
                                    seed: int) -> None:
    composite = compose_page(photo, seed, fillers)
    height, width = composite.image.shape[:2]
    corners = np.array([[[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]],
                       dtype=np.float64)
    moved = cv2.perspectiveTransform(corners, composite.homography)[0]
    shift = np.abs(moved - corners[0]) / np.array([width, height])
    assert shift.max() <= 0.061


def test_page_is_tilted_and_shows_a_second_photo_in_some_seeds(
        photo: np.ndarray, fillers: list[np.ndarray]) -> None:
    pages = [compose_page(photo, seed, fillers) for seed in range(20)]
    assert {np.allclose(page.homography, np.eye(3)) for page in pages} == {True, False}
    assert {page.parts for page in pages} == {1, 2}
    assert {compose_page(photo, seed).parts for seed in range(20)} == {1}


def test_page_is_light_with_lines_of_text(photo: np.ndarray) -> None:
    # On a flat page, the text is what makes it a page rather than a border.
    composite = next(page for page in (compose_page(photo, seed) for seed in range(20))
                     if np.allclose(page.homography, np.eye(3)))
    grey = cv2.cvtColor(composite.image, cv2.COLOR_RGB2GRAY)
    left, top, right, bottom = composite.box
    outside = np.ones(grey.shape, dtype=bool)
    outside[top:bottom, left:right] = False
    assert np.median(grey[outside]) >= 230
    ink = (grey < 128) & outside
    assert 0.01 <= ink.mean() <= 0.3
    assert ink.any(axis=1).mean() >= 0.3  # lines run down most of the page
