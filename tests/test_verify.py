"""Tests of indexer.verify: tentative matches and the "same picture" verdict.

Most cases use synthetic features (random, well separated descriptors placed
at chosen points), so the geometry each verdict sees is exactly known; a few use
KAZE features of real photos.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from conftest import jpeg_bytes, photo_array
from engine_fixtures import rotated

from indexer.analysis import Analysis, analyze_bytes
from indexer.features import DESCRIPTOR_SIZE, LocalFeatures, extract_features
from indexer.regions import Region
from indexer.settings import EngineSettings
from indexer.verify import (
    Verification,
    VerifyParams,
    batched_mutual_ratio_matches,
    query_footprint,
    verify_candidates,
)
from testsupport.edits import EDITS_BY_NAME

FloatArray = npt.NDArray[np.float32]
WIDTH, HEIGHT = 640, 480
PARAMS = VerifyParams()


def unit_rows(rows: npt.NDArray[np.floating]) -> FloatArray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def synthetic_features(seed: int, count: int = 200) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    return LocalFeatures(
        points=rng.uniform([20, 20], [WIDTH - 20, HEIGHT - 20], size=(count, 2)).astype(
            np.float32
        ),
        descriptors=unit_rows(rng.normal(size=(count, DESCRIPTOR_SIZE))),
        width=WIDTH,
        height=HEIGHT,
    )


def moved(features: LocalFeatures, homography: npt.ArrayLike) -> LocalFeatures:
    """The same keypoints and descriptors, with the points mapped by ``homography``."""
    matrix = np.asarray(homography, dtype=np.float64)
    points = cv2.perspectiveTransform(features.points[None].astype(np.float64), matrix)[0]
    return LocalFeatures(
        points=points.astype(np.float32),
        descriptors=features.descriptors.copy(),
        width=features.width,
        height=features.height,
    )


def similarity(degrees: float, scale: float, shift: tuple[float, float]) -> npt.NDArray:
    matrix = np.eye(3)
    matrix[:2] = cv2.getRotationMatrix2D((WIDTH / 2, HEIGHT / 2), degrees, scale)
    matrix[:2, 2] += shift
    return matrix


def verdict_for(query: LocalFeatures, candidate: LocalFeatures) -> Verification:
    [verdict] = verify_candidates(query, [candidate], params=PARAMS)
    return verdict


# --- synthetic geometry ------------------------------------------------------------------


def test_a_rotated_scaled_shifted_copy_is_verified() -> None:
    query = synthetic_features(1)

    verdict = verdict_for(query, moved(query, similarity(20, 0.8, (15, -10))))

    assert verdict.verified
    assert not verdict.mirrored
    assert verdict.inliers >= 0.9 * len(query)


def test_a_copy_under_mild_perspective_is_verified() -> None:
    query = synthetic_features(2)
    perspective = [[1.0, 0.05, 10.0], [0.02, 0.95, 5.0], [2e-4, 1e-4, 1.0]]

    verdict = verdict_for(query, moved(query, perspective))

    assert verdict.verified
    assert verdict.inliers >= 0.9 * len(query)


def test_a_mirrored_copy_is_verified_through_the_mirrored_pass() -> None:
    query = synthetic_features(3)
    candidate = moved(query.mirrored(), similarity(-10, 1.1, (5, 5)))

    verdict = verdict_for(query, candidate)

    assert verdict.verified
    assert verdict.mirrored


@pytest.mark.parametrize(
    ("shared", "verified"),
    [(PARAMS.min_mirrored_inliers - 4, False), (PARAMS.min_mirrored_inliers + 4, True)],
)
def test_a_mirrored_match_needs_more_inliers_than_a_direct_one(
    shared: int, verified: bool
) -> None:
    """Enough for a direct verdict, but too few for a mirrored one: faces and other
    nearly symmetric things line up with their kind through a mirror."""
    query = synthetic_features(12)
    mirrored = moved(query.mirrored(), similarity(-10, 1.1, (5, 5)))
    unrelated = synthetic_features(13, count=shared)
    candidate = LocalFeatures(
        np.vstack([mirrored.points[:shared], unrelated.points]),
        np.vstack([mirrored.descriptors[:shared], unrelated.descriptors]),
        WIDTH,
        HEIGHT,
    )
    direct = LocalFeatures(
        np.vstack([query.points[:shared] + 5, unrelated.points]),
        np.vstack([query.descriptors[:shared], unrelated.descriptors]),
        WIDTH,
        HEIGHT,
    )

    verdict = verdict_for(query, candidate)

    assert verdict.mirrored
    assert verdict.verified is verified
    assert verdict_for(query, direct).verified  # the same count verifies unmirrored


def test_a_reflection_without_mirrored_descriptors_is_not_the_same_picture() -> None:
    """Descriptors unchanged but every point reflected: no real photo does that,
    and the direct pass must not accept a homography that reflects."""
    query = synthetic_features(4)
    reflection = [[-1.0, 0.0, WIDTH - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]

    verdict = verdict_for(query, moved(query, reflection))

    assert not verdict.verified


@pytest.mark.parametrize(
    ("case", "homography"),
    [
        ("shrunk_twentyfold", similarity(0, 0.05, (0, 0))),
        ("stretched_sixfold", [[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]]),
        ("strong_perspective", [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3e-3, 0.0, 1.0]]),
    ],
)
def test_an_implausible_geometry_is_not_the_same_picture(case: str, homography: object) -> None:
    query = synthetic_features(5)

    verdict = verdict_for(query, moved(query, homography))

    assert not verdict.verified, case
    assert verdict.inliers >= PARAMS.min_inliers  # the points do agree: geometry decides


def test_matches_bunched_on_one_small_detail_are_not_the_same_picture() -> None:
    """Every match inside a 20-pixel square in both pictures: a shared logo or
    word, not the same photo."""
    rng = np.random.default_rng(6)
    query = synthetic_features(6, count=60)
    bunched = LocalFeatures(
        points=rng.uniform([300, 200], [320, 220], size=(60, 2)).astype(np.float32),
        descriptors=query.descriptors,
        width=WIDTH,
        height=HEIGHT,
    )

    verdict = verdict_for(bunched, moved(bunched, similarity(0, 1.0, (40, 30))))

    assert not verdict.verified
    assert verdict.inliers >= PARAMS.min_inliers


def test_descriptors_that_agree_on_no_geometry_are_not_verified() -> None:
    query = synthetic_features(7)
    shuffled_points = query.points[np.random.default_rng(7).permutation(len(query))]
    scrambled = LocalFeatures(shuffled_points, query.descriptors.copy(), WIDTH, HEIGHT)

    verdict = verdict_for(query, scrambled)

    assert not verdict.verified
    assert verdict.inliers < PARAMS.min_inliers


@pytest.mark.parametrize(
    ("margin", "expected"),
    [(0.0, Region(0.25, 0.25, 0.75, 0.75)), (0.1, Region(0.2, 0.2, 0.8, 0.8))],
)
def test_a_query_s_footprint_is_the_part_of_the_candidate_it_shows(
    margin: float, expected: Region
) -> None:
    candidate = synthetic_features(7)
    # The middle of the candidate, twice as large: a crop to its central quarter.
    query = moved(candidate, similarity(0.0, 2.0, (0.0, 0.0)))

    verdict = verdict_for(query, candidate)
    footprint = query_footprint(verdict, query, candidate, margin=margin)

    assert verdict.verified
    assert footprint is not None
    for side in ("left", "top", "right", "bottom"):
        assert getattr(footprint.region, side) == pytest.approx(getattr(expected, side), abs=0.01)
    assert footprint.scale == pytest.approx(0.5, abs=0.01)  # candidate pixels per query pixel


def test_a_verdict_without_a_fit_has_no_footprint() -> None:
    features = synthetic_features(1)

    assert query_footprint(Verification.rejected(), features, features) is None


def test_too_few_matches_are_rejected_without_fitting() -> None:
    query = synthetic_features(8)
    few = PARAMS.min_matches - 1
    candidate = LocalFeatures(
        query.points[:few] + 5, query.descriptors[:few].copy(), WIDTH, HEIGHT
    )

    verdict = verdict_for(query, candidate)

    assert (verdict.verified, verdict.inliers) == (False, 0)


def test_verdicts_come_back_in_candidate_order_for_a_mixed_batch() -> None:
    query = synthetic_features(9)
    same = moved(query, similarity(5, 1.0, (3, 3)))
    unrelated = synthetic_features(10, count=350)  # longer: padding must not matter
    mirrored = query.mirrored()
    short_same = LocalFeatures(query.points[:40], query.descriptors[:40].copy(), WIDTH, HEIGHT)

    verdicts = verify_candidates(query, [same, unrelated, mirrored, short_same], params=PARAMS)

    assert [v.verified for v in verdicts] == [True, False, True, True]
    assert [v.mirrored for v in verdicts if v.verified] == [False, True, False]
    assert verdicts[3].inliers <= 40


def test_no_candidates_give_no_verdicts() -> None:
    assert verify_candidates(synthetic_features(11), []) == []


# --- tentative matches -----------------------------------------------------------------------


def test_identical_descriptor_sets_match_one_to_one() -> None:
    descriptors = synthetic_features(12, count=50).descriptors

    [[(query_index, candidate_index)]] = batched_mutual_ratio_matches(
        [descriptors], [descriptors], ratio=PARAMS.ratio
    )

    np.testing.assert_array_equal(query_index, np.arange(50))
    np.testing.assert_array_equal(candidate_index, np.arange(50))


def test_an_ambiguous_descriptor_fails_the_ratio_test() -> None:
    """A candidate holding the same descriptor twice (a picture tiled from one
    digital patch): the query's best and second best are equally good, so the
    match must not be trusted. Float rounding in the similarity product must not
    decide the tie: 1 - 1e-7 is a distance of 5e-4 after the square root."""
    descriptors = synthetic_features(13, count=20).descriptors
    candidate = np.concatenate([descriptors, descriptors[:1]])

    [[(query_index, _)]] = batched_mutual_ratio_matches(
        [descriptors], [candidate], ratio=PARAMS.ratio
    )

    assert 0 not in query_index.tolist()
    assert sorted(query_index.tolist()) == list(range(1, 20))


def test_padding_of_short_candidates_never_matches() -> None:
    descriptors = synthetic_features(14, count=30).descriptors
    short = descriptors[:3]
    other = synthetic_features(15, count=30).descriptors

    [[(_, long_index), (short_query, short_index)]] = batched_mutual_ratio_matches(
        [descriptors], [other, short], ratio=PARAMS.ratio
    )

    assert short_index.max() < 3
    assert sorted(short_query.tolist()) == [0, 1, 2]
    assert len(long_index) < 5  # unrelated random descriptors rarely pass


def test_each_query_set_gets_its_own_matches() -> None:
    features = synthetic_features(16, count=40)
    mirrored = features.mirrored()

    direct, flipped = batched_mutual_ratio_matches(
        [features.descriptors, mirrored.descriptors], [features.descriptors], ratio=PARAMS.ratio
    )

    assert len(direct[0][0]) == 40
    assert len(flipped[0][0]) < len(direct[0][0])


# --- real photos --------------------------------------------------------------------------------


def features_of(image: npt.NDArray[np.uint8], keypoints: int = 500) -> LocalFeatures:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    height, width = gray.shape
    scale = 640 / max(height, width)
    gray = cv2.resize(gray, (round(width * scale), round(height * scale)))
    return extract_features(gray, max_keypoints=keypoints)


@pytest.fixture(scope="module")
def astronaut() -> LocalFeatures:
    return features_of(photo_array("astronaut"))


def test_a_rotated_photo_is_verified_against_its_original(astronaut: LocalFeatures) -> None:
    query = features_of(rotated(photo_array("astronaut"), 15), keypoints=1000)

    verdict = verdict_for(query, astronaut)

    assert verdict.verified
    assert not verdict.mirrored
    assert verdict.inliers >= 50


def test_a_flipped_photo_is_verified_as_mirrored(astronaut: LocalFeatures) -> None:
    query = features_of(np.ascontiguousarray(photo_array("astronaut")[:, ::-1]), keypoints=1000)

    verdict = verdict_for(query, astronaut)

    assert verdict.verified
    assert verdict.mirrored


@pytest.mark.parametrize("other", ["coffee", "chelsea", "camera", "coins"])
def test_different_photos_are_not_verified(astronaut: LocalFeatures, other: str) -> None:
    verdict = verdict_for(features_of(photo_array(other), keypoints=1000), astronaut)

    assert not verdict.verified


# -- the frame around a photo --------------------------------------------------------------


def analysis_of(image: npt.NDArray[np.uint8], *, for_query: bool) -> Analysis:
    return analyze_bytes(jpeg_bytes(image, 90), EngineSettings(), for_query=for_query)


@pytest.mark.parametrize(("photo", "other"), [("astronaut", "coffee"), ("rocket", "chelsea")])
def test_screenshots_of_different_photos_are_not_the_same_picture(photo: str, other: str) -> None:
    screenshot = EDITS_BY_NAME["screenshot"]
    query = analysis_of(screenshot.edit(photo_array(photo), 1), for_query=True)

    def added(image: npt.NDArray[np.uint8]) -> LocalFeatures:
        """The features the bot stores of a photo it adds (a query's)."""
        return analysis_of(image, for_query=True).features

    # Seeds 1 and 4 draw the same phone: status bar, app bar and buttons alike.
    other_screenshot = added(screenshot.edit(photo_array(other), 4))
    copies = [added(screenshot.edit(photo_array(photo), 3)), added(photo_array(photo))]
    # Those alone make the two screenshots match: what the photo's frame must not decide.
    (by_the_frame,) = verify_candidates(query.features, [other_screenshot])
    assert by_the_frame.verified
    unchecked = verify_candidates(query.features, copies)
    assert unchecked[0].verified

    verdicts = verify_candidates(
        query.features, [other_screenshot, *copies], frame_marks=query.frame_marks
    )

    assert not verdicts[0].verified
    # What verifies on the photo itself still does.
    assert [v.verified for v in verdicts[1:]] == [v.verified for v in unchecked]
