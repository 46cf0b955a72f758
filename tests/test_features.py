"""Tests of indexer.features: KAZE extraction, the mirror trick, compact storage
of descriptors and homography fitting."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from conftest import photo_array
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from indexer.errors import NoFeaturesError
from indexer.features import (
    DESCRIPTOR_SIZE,
    MIN_KEYPOINTS,
    KazeParams,
    LocalFeatures,
    dequantize_descriptors,
    extract_features,
    find_homography,
    pack_features,
    quantize_descriptors,
    spread_selection,
    unpack_features,
)

Gray = npt.NDArray[np.uint8]
BYTES_PER_KEYPOINT = DESCRIPTOR_SIZE + 4  # int8 descriptor + two float16 coordinates
WORKING_SIDE = 640


def working_gray(name: str) -> Gray:
    """A photo as the engine sees it: grey, longest side WORKING_SIDE."""
    gray = cv2.cvtColor(photo_array(name), cv2.COLOR_RGB2GRAY)
    height, width = gray.shape
    scale = WORKING_SIDE / max(height, width)
    size = (round(width * scale), round(height * scale))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def astronaut_features() -> LocalFeatures:
    return extract_features(working_gray("astronaut"), max_keypoints=500)


# --- extraction ------------------------------------------------------------------------


def test_extraction_keeps_at_most_the_asked_number_of_unit_descriptors(
    astronaut_features: LocalFeatures,
) -> None:
    gray = working_gray("astronaut")
    few = extract_features(gray, max_keypoints=50)

    assert len(astronaut_features) == 500
    assert len(few) == 50
    assert astronaut_features.descriptors.shape == (500, DESCRIPTOR_SIZE)
    assert astronaut_features.descriptors.dtype == np.float32
    norms = np.linalg.norm(astronaut_features.descriptors, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)
    assert (astronaut_features.width, astronaut_features.height) == (gray.shape[1], gray.shape[0])


def test_extraction_keeps_the_strongest_keypoints_first(astronaut_features: LocalFeatures) -> None:
    """Adds store the first ``max_keypoints`` of a query's features, so a short
    extraction must be exactly the head of a long one."""
    few = extract_features(working_gray("astronaut"), max_keypoints=100)

    np.testing.assert_array_equal(few.points, astronaut_features.points[:100])
    np.testing.assert_array_equal(few.descriptors, astronaut_features.descriptors[:100])


def test_keypoints_lie_inside_the_image(astronaut_features: LocalFeatures) -> None:
    points = astronaut_features.points
    assert points.min() >= 0
    assert points[:, 0].max() < astronaut_features.width
    assert points[:, 1].max() < astronaut_features.height


def test_a_flat_image_has_no_features() -> None:
    flat = np.full((300, 400), 128, dtype=np.uint8)

    with pytest.raises(NoFeaturesError):
        extract_features(flat, max_keypoints=500)


def test_an_image_with_too_few_keypoints_has_no_features() -> None:
    """One small soft dot gives a couple of keypoints: too few to fit a homography."""
    dot = np.zeros((300, 400), dtype=np.uint8)
    cv2.circle(dot, (200, 150), 4, 255, -1)
    dot = cv2.GaussianBlur(dot, (0, 0), 2)

    with pytest.raises(NoFeaturesError, match=f"need {MIN_KEYPOINTS}"):
        extract_features(dot, max_keypoints=500)


# --- the mirror trick ----------------------------------------------------------------------


def counterpart_agreement(
    predicted: LocalFeatures, extracted: LocalFeatures, *, radius: float = 1.0
) -> tuple[float, float]:
    """How well ``predicted`` features describe the ``extracted`` ones.

    Returns the share of predicted keypoints that have an extracted keypoint at
    the same place, and among those, the share whose descriptor's nearest
    neighbour among all extracted descriptors is that very keypoint.
    """
    distances = np.linalg.norm(predicted.points[:, None, :] - extracted.points[None], axis=2)
    counterpart = distances.argmin(axis=1)
    located = distances.min(axis=1) < radius
    nearest = (predicted.descriptors @ extracted.descriptors.T).argmax(axis=1)
    return float(located.mean()), float((nearest == counterpart)[located].mean())


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea"])
def test_mirrored_features_match_those_of_the_flipped_image(photo: str) -> None:
    gray = working_gray(photo)
    original = extract_features(gray, max_keypoints=500)
    of_flipped = extract_features(np.ascontiguousarray(gray[:, ::-1]), max_keypoints=500)

    located, nearest_is_counterpart = counterpart_agreement(original.mirrored(), of_flipped)

    assert located > 0.95  # KAZE finds the same places in the flipped picture
    assert nearest_is_counterpart > 0.85


def test_without_the_mirror_trick_flipped_descriptors_do_not_match(
    astronaut_features: LocalFeatures,
) -> None:
    """The control: only the points mirrored, descriptors left alone. If this
    matched too, the test above would prove nothing about the descriptor trick."""
    gray = working_gray("astronaut")
    of_flipped = extract_features(np.ascontiguousarray(gray[:, ::-1]), max_keypoints=500)
    mirrored = astronaut_features.mirrored()
    points_only = LocalFeatures(
        points=mirrored.points,
        descriptors=astronaut_features.descriptors,
        width=mirrored.width,
        height=mirrored.height,
    )

    _, nearest_is_counterpart = counterpart_agreement(points_only, of_flipped)

    assert nearest_is_counterpart < 0.4


def test_mirroring_twice_gives_the_original_features(astronaut_features: LocalFeatures) -> None:
    twice = astronaut_features.mirrored().mirrored()

    np.testing.assert_allclose(twice.points, astronaut_features.points, atol=1e-4)
    np.testing.assert_array_equal(twice.descriptors, astronaut_features.descriptors)
    assert (twice.width, twice.height) == (astronaut_features.width, astronaut_features.height)


# --- compact storage ---------------------------------------------------------------------------

# Each stored component is off by at most half a step (0.5 / 200); over 64
# components and a renormalisation, a unit descriptor moves by less than this.
MAX_DESCRIPTOR_ERROR = 0.04
# KAZE components stay below ~0.67 (see DESCRIPTOR_INT8_SCALE); storage may clip above.
MAX_KAZE_COMPONENT = 0.6


def unit_rows(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


nonzero_component = st.floats(-1.0, -0.01) | st.floats(0.01, 1.0)


def descriptor_arrays(max_rows: int) -> st.SearchStrategy[npt.NDArray[np.float64]]:
    return hnp.arrays(
        np.float64,
        st.tuples(st.integers(2, max_rows), st.just(DESCRIPTOR_SIZE)),
        elements=nonzero_component,
    )


@settings(max_examples=60, deadline=None)
@given(stored_rows=descriptor_arrays(40), query_rows=descriptor_arrays(10), data=st.data())
def test_storage_preserves_nearest_neighbours(
    stored_rows: npt.NDArray[np.float64],
    query_rows: npt.NDArray[np.float64],
    data: st.DataObject,
) -> None:
    stored = unit_rows(stored_rows)
    assume(np.abs(stored).max() <= MAX_KAZE_COMPONENT)
    points = data.draw(
        hnp.arrays(
            np.float32,
            (len(stored), 2),
            elements=st.floats(0, WORKING_SIDE - 1, width=32),
        )
    )
    features = LocalFeatures(points=points, descriptors=stored, width=640, height=480)

    blob = pack_features(features)
    restored = unpack_features(blob, count=len(stored), width=640, height=480)

    assert len(blob) == BYTES_PER_KEYPOINT * len(stored)
    assert (restored.width, restored.height) == (640, 480)
    # float16 keeps coordinates below 1024 within a quarter of a pixel.
    np.testing.assert_allclose(restored.points, points, atol=0.25)
    errors = np.linalg.norm(restored.descriptors - stored, axis=1)
    assert errors.max() <= MAX_DESCRIPTOR_ERROR
    # Every query (the stored descriptors themselves, and others) whose nearest
    # neighbour wins by more than the storage error can shift two similarities
    # keeps that nearest neighbour.
    queries = np.concatenate([stored, unit_rows(query_rows)])
    before = queries @ stored.T
    after = queries @ restored.descriptors.T
    ranked = np.sort(before, axis=1)
    clear = ranked[:, -1] - ranked[:, -2] > 2 * MAX_DESCRIPTOR_ERROR
    note(f"{int(clear.sum())} of {len(queries)} queries have a clear nearest neighbour")
    np.testing.assert_array_equal(before.argmax(axis=1)[clear], after.argmax(axis=1)[clear])


def test_storage_preserves_neighbours_of_real_descriptors(
    astronaut_features: LocalFeatures,
) -> None:
    """The same property on KAZE's own descriptors: the flipped photo's descriptors
    find the same nearest neighbours among stored ones as among the originals."""
    mirrored = astronaut_features.mirrored()
    restored = unpack_features(
        pack_features(mirrored),
        count=len(mirrored),
        width=mirrored.width,
        height=mirrored.height,
    )
    gray = working_gray("astronaut")
    queries = extract_features(np.ascontiguousarray(gray[:, ::-1]), max_keypoints=500).descriptors

    before = (queries @ mirrored.descriptors.T).argmax(axis=1)
    after = (queries @ restored.descriptors.T).argmax(axis=1)

    assert (before == after).mean() > 0.98


def test_storage_clips_instead_of_wrapping_around() -> None:
    """A component beyond the int8 range must saturate: wrapping would flip its sign."""
    spiky = np.zeros((1, DESCRIPTOR_SIZE), dtype=np.float32)
    spiky[0, 0], spiky[0, 1] = 0.9, -0.43
    spiky /= np.linalg.norm(spiky)

    quantized = quantize_descriptors(spiky)
    restored = dequantize_descriptors(quantized)

    assert quantized[0, 0] == 127
    assert quantized[0, 1] < 0
    assert float(restored[0] @ spiky[0]) > 0.95  # bent a little, never turned around


def test_unpacking_a_blob_of_the_wrong_size_fails(astronaut_features: LocalFeatures) -> None:
    blob = pack_features(astronaut_features)

    with pytest.raises(ValueError, match="does not hold"):
        unpack_features(blob, count=len(astronaut_features) + 1, width=640, height=640)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_features(blob[:-1], count=len(astronaut_features), width=640, height=640)


# --- homographies ------------------------------------------------------------------------------


def test_a_known_homography_is_recovered_with_every_point_an_inlier() -> None:
    rng = np.random.default_rng(7)
    source = rng.uniform(0, 640, (60, 2)).astype(np.float32)
    truth = np.array([[0.9, -0.2, 30.0], [0.25, 0.85, -12.0], [1e-4, -5e-5, 1.0]])
    projected = cv2.perspectiveTransform(source[None], truth)[0].astype(np.float32)

    fit = find_homography(source, projected, reprojection_error=2.0)

    assert fit is not None
    matrix, inliers = fit
    np.testing.assert_allclose(matrix / matrix[2, 2], truth, rtol=1e-3, atol=1e-3)
    assert inliers.all()


def test_outliers_are_left_out_of_the_inliers() -> None:
    rng = np.random.default_rng(8)
    source = rng.uniform(0, 640, (80, 2)).astype(np.float32)
    target = source + np.float32([25.0, -40.0])
    target[60:] = rng.uniform(0, 640, (20, 2))  # a quarter of wrong matches

    fit = find_homography(source, target, reprojection_error=2.0)

    assert fit is not None
    _, inliers = fit
    assert inliers[:60].all()
    assert not inliers[60:].any()


def test_fewer_than_four_points_fit_no_homography() -> None:
    three = np.float32([[0, 0], [10, 0], [0, 10]])

    assert find_homography(three, three + 5, reprojection_error=2.0) is None


# --- keypoints spread over the photo ---------------------------------------------------------


def test_spread_keypoints_reach_every_textured_part_of_the_photo() -> None:
    gray = working_gray("astronaut")
    strongest = extract_features(gray, max_keypoints=200)
    spread = extract_features(gray, max_keypoints=200, params=KazeParams(grid=4))

    def cells_reached(features: LocalFeatures) -> int:
        columns = (features.points[:, 0] * 4 // features.width).astype(int)
        rows = (features.points[:, 1] * 4 // features.height).astype(int)
        return len(set(zip(columns.tolist(), rows.tolist(), strict=True)))

    assert len(spread) == 200
    assert cells_reached(spread) == 16
    assert cells_reached(spread) > cells_reached(strongest)


def test_a_crowded_cell_gives_way_to_the_others_but_its_strongest_stay() -> None:
    # 40 points crowd the top-left cell, one point sits in each other cell;
    # listed strongest first, the crowd first.
    crowd = np.column_stack([np.linspace(1, 20, 40), np.linspace(1, 20, 40)])
    others = np.array([[60 + 100 * (c % 4), 60 + 100 * (c // 4)] for c in range(1, 16)])
    points = np.vstack([crowd, others]).astype(np.float32)

    chosen = spread_selection(points, 400, 400, count=32, grid=4)

    assert len(chosen) == 32
    assert np.all(np.diff(chosen) > 0)  # still strongest first
    assert set(range(40, 55)) <= set(chosen.tolist())  # every other cell keeps its point
    assert chosen[:17].tolist() == list(range(17))  # the crowd keeps its strongest 17


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 120), st.just(2)),
               elements=st.floats(0, 99.5, width=32)),
    st.integers(1, 130),
    st.integers(1, 6),
)
def test_spread_selection_keeps_the_asked_number_in_order(
    points: npt.NDArray[np.float32], count: int, grid: int
) -> None:
    chosen = spread_selection(points, 100, 100, count=count, grid=grid)

    assert len(chosen) == min(count, len(points))
    assert np.all(np.diff(chosen) > 0)
    assert chosen.min() >= 0
    assert chosen.max() < len(points)


def test_keeping_fewer_spread_keypoints_keeps_strongest_first(
    astronaut_features: LocalFeatures,
) -> None:
    kept = astronaut_features.keep(100, grid=4)
    rows = [
        int(np.flatnonzero((astronaut_features.points == point).all(axis=1))[0])
        for point in kept.points
    ]

    assert len(kept) == 100
    assert rows == sorted(rows)
    assert astronaut_features.keep(100).points.tolist() == astronaut_features.points[:100].tolist()
