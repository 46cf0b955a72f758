"""Tests of indexer.framing: finding photos shown inside a frame, a page or a collage."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from conftest import jpeg_bytes, photo_array
from engine_fixtures import QUERY_PHOTOS, bordered, captioned, screenshot_box, screenshotted
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from indexer.features import extract_features
from indexer.framing import (
    MAX_AREA_SHARE,
    MAX_PICTURE_AREA,
    MIN_PICTURE_AREA,
    find_embedded_photos,
    find_frame_marks,
    find_framed_photo,
    find_inner_photos,
)
from indexer.images import load_working_image
from indexer.regions import Region
from indexer.verify import verify_candidates
from testsupport.edits import compose_collage, compose_page

Gray = npt.NDArray[np.uint8]
# Small pictures of a few grey levels: flat areas, hard edges, every size down to a pixel.
FEW_LEVEL_PICTURES = hnp.arrays(
    np.uint8,
    st.tuples(st.integers(1, 160), st.integers(1, 160)),
    elements=st.sampled_from([0, 16, 128, 250, 255]),
)
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


# -- marks on a frame: a status bar, an app's icons ---------------------------------------


def keypoints_of(gray: Gray) -> npt.NDArray[np.float32]:
    return extract_features(gray, max_keypoints=1000).points


def test_the_marks_on_a_screenshots_frame_are_its_keypoints_outside_the_photo() -> None:
    gray = working_gray(screenshotted(photo_array("coffee")))
    framed = find_framed_photo(gray)
    assert framed is not None
    points = keypoints_of(gray)

    marks = find_frame_marks(gray, points, framed)

    height, width = gray.shape
    x, y = points[:, 0] / width, points[:, 1] / height
    in_photo = (x >= framed.left) & (x < framed.right) & (y >= framed.top) & (y < framed.bottom)
    assert not marks[in_photo].any()
    # The clock, the user name, the icons and the caption: nearly all that lies around the photo.
    assert marks[~in_photo].mean() > 0.8, marks[~in_photo].mean()


def test_a_photo_taken_for_the_frame_keeps_its_verdict() -> None:
    # Two photos on white, the lower one taller: the lower one is taken for the framed
    # photo, and the upper one, outside it, is mostly texture, not marks.
    upper = working_gray(photo_array("astronaut"))[100:260, 100:420]
    page = np.full((600, 400), 250, np.uint8)
    page[40:200, 40:360] = upper
    page[260:560, 40:360] = working_gray(photo_array("coffee"))[50:350, 100:420]
    framed = find_framed_photo(page)
    assert framed is not None
    assert framed.top > 0.4
    query = extract_features(page, max_keypoints=1000)
    marks = find_frame_marks(page, query.points, framed)
    assert marks.any()  # only near the upper photo's edges, where the page shows around them

    verdicts = verify_candidates(
        query, [extract_features(upper, max_keypoints=1000)], frame_marks=marks
    )

    assert verdicts[0].verified


def test_without_a_framed_photo_nothing_is_a_mark() -> None:
    gray = working_gray(photo_array("rocket"))

    assert not find_frame_marks(gray, keypoints_of(gray), None).any()


@settings(max_examples=60, deadline=None)
@given(FEW_LEVEL_PICTURES)
def test_any_frame_found_is_a_large_part_inside_the_picture(gray: Gray) -> None:
    frame = find_framed_photo(gray)
    if frame is None:
        return
    assert 0 <= frame.left < frame.right <= 1
    assert 0 <= frame.top < frame.bottom <= 1
    assert (frame.right - frame.left) * (frame.bottom - frame.top) <= MAX_AREA_SHARE


# -- pictures on a page or in a collage ------------------------------------------------


def flat_box(box: tuple[int, int, int, int], picture: npt.NDArray[np.uint8]) -> Region:
    """A composite's box (pixels of the picture) as a region."""
    height, width = picture.shape[:2]
    left, top, right, bottom = box
    return Region(left / width, top / height, right / width, bottom / height)


def seeds_without_tilt(compose: object, count: int) -> list[int]:
    """Seeds whose page or collage is laid out flat, so that its box is exact."""
    image = photo_array("coffee")
    flat = []
    for seed in range(200):
        composite = compose(image, seed, [photo_array("rocket")])  # type: ignore[operator]
        if np.allclose(composite.homography, np.eye(3)):
            flat.append(seed)
        if len(flat) == count:
            break
    return flat


@pytest.mark.parametrize("photo", QUERY_PHOTOS)
@pytest.mark.parametrize("seed", seeds_without_tilt(compose_page, 2))
def test_a_photo_on_a_page_of_text_is_found(photo: str, seed: int) -> None:
    page = compose_page(photo_array(photo), seed, [photo_array("brick")])

    found = find_embedded_photos(working_gray(page.image), limit=4)

    target = flat_box(page.box, page.image)
    assert max((region.overlap(target) for region in found), default=0.0) > 0.8, found


def test_a_photo_on_a_tilted_page_is_found() -> None:
    seed = next(
        s
        for s in range(200)
        if not np.allclose(compose_page(photo_array("coffee"), s).homography, np.eye(3))
    )
    page = compose_page(photo_array("coffee"), seed)
    corners = np.array(
        [[page.box[0], page.box[1]], [page.box[2], page.box[1]],
         [page.box[2], page.box[3]], [page.box[0], page.box[3]]], dtype=np.float64,
    )
    moved = transformed(corners, page.homography)
    height, width = page.image.shape[:2]
    target = Region(
        moved[:, 0].min() / width, moved[:, 1].min() / height,
        moved[:, 0].max() / width, moved[:, 1].max() / height,
    )

    gray = working_gray(page.image)
    found = find_inner_photos(gray, find_framed_photo(gray))

    assert max((region.overlap(target) for region in found), default=0.0) > 0.7, found


def transformed(points: npt.NDArray[np.float64], homography: npt.NDArray[np.float64]
                       ) -> npt.NDArray[np.float64]:
    """``points`` (n, 2) moved by ``homography``."""
    lifted = np.hstack([points, np.ones((len(points), 1))]) @ homography.T
    return lifted[:, :2] / lifted[:, 2:]


def test_the_cells_of_a_collage_are_found() -> None:
    fillers = [photo_array(name) for name in ("astronaut", "rocket", "chelsea")]
    seed = seeds_without_tilt(compose_collage, 1)[0]
    collage = compose_collage(photo_array("coffee"), seed, fillers)

    found = find_embedded_photos(working_gray(collage.image), limit=8)

    target = flat_box(collage.box, collage.image)
    assert max((region.overlap(target) for region in found), default=0.0) > 0.8, found


# Not "rocket": its flat sky is a page to this finder, with the launch pad a dense
# block on it. That costs one more extraction, and only when the whole photo verifies nothing.
@pytest.mark.parametrize("gutter_colour", [0, 255])
def test_every_cell_of_a_grid_with_thin_gutters_is_found_apart(gutter_colour: int) -> None:
    # Gutters thinner than the finder's cells join the photos into one dense group;
    # only the straight background lines crossing it tell them apart.
    cell_width, cell_height, gutter = 200, 150, 4
    grid = np.full((3 * cell_height + 4 * gutter, 3 * cell_width + 4 * gutter, 3),
                   gutter_colour, np.uint8)
    cells = []
    # Not hubble_deep_field: a black photo on black gutters is not a picture to anyone.
    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "coins", "horse",
             "clock")
    for number, name in enumerate(names):
        row, column = divmod(number, 3)
        top, left = gutter + row * (cell_height + gutter), gutter + column * (cell_width + gutter)
        grid[top : top + cell_height, left : left + cell_width] = np.asarray(
            Image.fromarray(photo_array(name)).convert("RGB").resize((cell_width, cell_height))
        )
        cells.append(flat_box((left, top, left + cell_width, top + cell_height), grid))

    found = find_embedded_photos(working_gray(grid), limit=9)

    # A photo with an edge of the gutter's colour (the horse's white ground on white
    # gutters) may come out a little smaller than its cell.
    matched = [max((region.overlap(cell) for region in found), default=0.0) for cell in cells]
    assert sum(share > 0.8 for share in matched) >= 8, matched
    assert len(found) <= 9


def test_a_block_of_collage_cells_does_not_crowd_out_a_cell() -> None:
    # Narrow photos in the top row leave its rows mostly gutter, so the lower two
    # rows look like one photo on a black frame. Searched as a photo it would find
    # nothing its cells do not, and it took the place of the smallest cell.
    cell_width, cell_height, gutter = 200, 150, 4
    grid = np.zeros((3 * cell_height + 4 * gutter, 3 * cell_width + 4 * gutter, 3), np.uint8)
    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "coins", "grass",
             "clock")
    cells = []
    for number, name in enumerate(names):
        row, column = divmod(number, 3)
        width = 80 if row == 0 else 120 if number == 8 else cell_width
        top = gutter + row * (cell_height + gutter)
        left = gutter + column * (cell_width + gutter) + (cell_width - width) // 2
        grid[top : top + cell_height, left : left + width] = np.asarray(
            Image.fromarray(photo_array(name)).convert("RGB").resize((width, cell_height))
        )
        cells.append(flat_box((left, top, left + width, top + cell_height), grid))
    gray = working_gray(grid)
    block = find_framed_photo(gray)
    assert block is not None
    assert block.share_inside(cells[4]) > 0.9  # the block this test is about

    found = find_inner_photos(gray, block)

    matched = [max((region.overlap(cell) for region in found), default=0.0) for cell in cells]
    assert all(share > 0.8 for share in matched), matched  # the smallest cell too
    assert all(region.overlap(block) < 0.7 for region in found)


@pytest.mark.parametrize("photo", [p for p in QUERY_PHOTOS if p != "rocket"])
def test_a_photo_alone_has_no_embedded_pictures(photo: str) -> None:
    assert find_embedded_photos(working_gray(photo_array(photo))) == []


def test_text_alone_has_no_embedded_pictures() -> None:
    page = np.full((600, 400), 250, np.uint8)
    for top in range(40, 560, 30):
        page[top : top + 12, 20:380:9] = 20
    page[5:25, :] = 90  # a menu bar: dense, but far too thin for a photo
    assert find_embedded_photos(page) == []


@settings(max_examples=60, deadline=None)
@given(FEW_LEVEL_PICTURES)
def test_any_embedded_picture_is_a_bounded_part_of_the_picture(gray: Gray) -> None:
    for region in find_embedded_photos(gray, limit=5):
        assert 0 <= region.left < region.right <= 1
        assert 0 <= region.top < region.bottom <= 1
        area = (region.right - region.left) * (region.bottom - region.top)
        assert MIN_PICTURE_AREA <= area <= MAX_PICTURE_AREA
