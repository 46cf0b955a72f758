"""Which part of a candidate a closer look describes, and how it is made, for the
fits a verification leaves: the rules of ``closer_look_part`` on synthetic fits.
The searches that take a closer look are in test_search.py."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from indexer.analysis import QuerySource
from indexer.catalog import ImageRecord
from indexer.features import DESCRIPTOR_SIZE, LocalFeatures
from indexer.querying import closer_look_part
from indexer.regions import Region
from indexer.verify import Verification

WORKING_SIDE = 640
LUMA_TABLE = tuple(range(1, 65))
WHOLE = Region(0.0, 0.0, 1.0, 1.0)
# Maps the right side of a query 400 px wide behind the horizon: no part to place.
DEGENERATE = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.01, 0.0, 1.0]])


def features(width: int, height: int) -> LocalFeatures:
    return LocalFeatures(
        points=np.zeros((8, 2), dtype=np.float32),
        descriptors=np.ones((8, DESCRIPTOR_SIZE), dtype=np.float32),
        width=width,
        height=height,
    )


def record(width: int, height: int) -> ImageRecord:
    return ImageRecord(
        id=1, content_hash="0" * 64, scope=0, path="photo.jpg", file_size=1, width=width,
        height=height, added_at=0.0, added_by=None, origin_chat_id=None,
        origin_message_id=None, telegram_file_id=None,
    )


def fitted(homography: npt.ArrayLike) -> Verification:
    return Verification(
        inliers=7, verified=False, mirrored=False,
        homography=np.asarray(homography, dtype=np.float64),
    )


def test_a_thumbnail_placed_over_the_whole_candidate_is_made_at_its_own_size() -> None:
    # A 42 px copy of a 168 px photo, both described 400 px wide.
    made = closer_look_part(
        fitted(np.eye(3)), features(400, 400), features(400, 400), record(168, 168),
        QuerySource(42, 42, LUMA_TABLE), working_side=WORKING_SIDE,
    )

    assert made is not None
    region, making = made
    assert region == WHOLE
    assert making.detail == pytest.approx(42 / 168)
    assert making.luma_table == LUMA_TABLE
    assert making.magnification == pytest.approx(400 / 42)


def test_a_crop_is_made_at_the_query_s_detail_from_its_part() -> None:
    # A 100 x 100 copy of the top left 200 x 200 px of a 640 x 640 photo: half its detail.
    made = closer_look_part(
        fitted(np.diag([0.5, 0.5, 1.0])), features(400, 400), features(640, 640),
        record(640, 640), QuerySource(100, 100), working_side=WORKING_SIDE,
    )

    assert made is not None
    region, making = made
    assert (region.left, region.top) == (0.0, 0.0)
    assert region.right == pytest.approx(200 * 1.05 / 640)
    assert making.detail == pytest.approx(0.5)  # 100 query pixels over 200 of the photo's
    assert making.magnification == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("query_size", "candidate_size", "expected"),
    [
        # The candidate's shape: taken for a smaller copy of the whole.
        ((42, 42), (168, 168), (WHOLE, 42 / 168)),
        # Another shape, a small candidate: taken for a crop at its own detail.
        ((44, 36), (95, 95), (WHOLE, 1.0)),
        # Another shape, a candidate too large to be enlarged whole.
        ((44, 36), (500, 375), None),
        # A query not enlarged 2x to be described: its fit would have placed it.
        ((300, 300), (168, 168), None),
    ],
)
def test_a_small_query_a_loose_fit_cannot_place_is_taken_for_a_copy_or_a_crop(
    query_size: tuple[int, int],
    candidate_size: tuple[int, int],
    expected: tuple[Region, float] | None,
) -> None:
    query_width, query_height = query_size
    scale = 400 / max(query_size)
    made = closer_look_part(
        fitted(DEGENERATE),
        features(round(query_width * scale), round(query_height * scale)),
        features(400, 400),
        record(*candidate_size),
        QuerySource(query_width, query_height, LUMA_TABLE),
        working_side=WORKING_SIDE,
    )

    if expected is None:
        assert made is None
        return
    assert made is not None
    region, making = made
    assert (region, making.detail) == (expected[0], pytest.approx(expected[1]))
    assert making.magnification == pytest.approx(scale)


def test_without_a_fit_or_a_source_there_is_no_part_to_make() -> None:
    assert closer_look_part(
        Verification.rejected(), features(400, 400), features(400, 400), record(168, 168),
        QuerySource(42, 42), working_side=WORKING_SIDE,
    ) is None
    made = closer_look_part(
        fitted(np.eye(3)), features(400, 400), features(400, 400), record(168, 168), None,
        working_side=WORKING_SIDE,
    )
    assert made is not None
    assert made[1].detail == 1.0  # described at the candidate's own detail
