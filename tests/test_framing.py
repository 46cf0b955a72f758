"""Tests of indexer.framing: finding a photo shown inside a frame."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from conftest import jpeg_bytes, photo_array
from engine_fixtures import QUERY_PHOTOS, bordered, captioned, screenshot_box, screenshotted
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from indexer.framing import MAX_AREA_SHARE, find_framed_photo
from indexer.images import load_working_image

Gray = npt.NDArray[np.uint8]
# A frame edge may land a pixel or two off at working size (JPEG ringing, rounding).
EDGE_TOLERANCE = 0.02


def working_gray(rgb: npt.NDArray[np.uint8]) -> Gray:
    """The grey working image the engine would see for this picture, sent as a JPEG."""
    return load_working_image(jpeg_bytes(rgb, 90), working_side=640, min_side=400).gray


@pytest.mark.parametrize("photo", QUERY_PHOTOS)
def test_the_photo_inside_a_screenshot_is_found(photo: str) -> None:
    image = photo_array(photo)
    frame = find_framed_photo(working_gray(screenshotted(image)))

    assert frame is not None
    found = (frame.left, frame.top, frame.right, frame.bottom)
    assert found == pytest.approx(screenshot_box(image), abs=EDGE_TOLERANCE)


def test_the_photo_inside_a_border_is_found() -> None:
    image = photo_array("chelsea")
    frame = find_framed_photo(working_gray(bordered(image)))

    assert frame is not None
    # bordered() adds a tenth of each side on every side: the photo spans 1/12 to 11/12.
    found = (frame.left, frame.top, frame.right, frame.bottom)
    assert found == pytest.approx((1 / 12, 1 / 12, 11 / 12, 11 / 12), abs=EDGE_TOLERANCE)


@pytest.mark.parametrize("photo", QUERY_PHOTOS)
def test_an_unframed_photo_has_no_frame(photo: str) -> None:
    assert find_framed_photo(working_gray(photo_array(photo))) is None


def test_a_caption_written_over_the_photo_is_not_a_frame() -> None:
    # The band is black, the rest of the edge is photo: no uniform border.
    assert find_framed_photo(working_gray(captioned(photo_array("rocket")))) is None


@pytest.mark.parametrize(
    "gray",
    [
        np.full((300, 200), 255, np.uint8),  # one flat colour
        np.zeros((40, 40), np.uint8),  # smaller than any framed photo could be
        np.tile(np.arange(256, dtype=np.uint8), (200, 1)),  # a gradient: no flat border
    ],
    ids=["flat", "tiny", "gradient"],
)
def test_pictures_without_a_photo_in_them_have_no_frame(gray: Gray) -> None:
    assert find_framed_photo(gray) is None


def test_text_lines_on_a_page_are_not_a_photo() -> None:
    page = np.full((600, 300), 250, np.uint8)
    for top in range(40, 560, 30):  # lines of "glyphs": short dark dashes
        page[top : top + 12, 20:280:9] = 20
    assert find_framed_photo(page) is None


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        st.tuples(st.integers(1, 160), st.integers(1, 160)),
        elements=st.sampled_from([0, 16, 128, 250, 255]),
    )
)
def test_any_frame_found_is_a_large_part_inside_the_picture(gray: Gray) -> None:
    frame = find_framed_photo(gray)
    if frame is None:
        return
    assert 0 <= frame.left < frame.right <= 1
    assert 0 <= frame.top < frame.bottom <= 1
    assert (frame.right - frame.left) * (frame.bottom - frame.top) <= MAX_AREA_SHARE
