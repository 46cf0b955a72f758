"""Find photos shown inside a larger picture: a phone screenshot, a meme with
caption bars, a picture with a border, a page of text, a collage.

Such a query describes its frame (status bar, user names, captions) as much as
the photo, so its global vector lands far from the original's.  The photo is a
filled rectangle of "content" pixels on a flat background, with only sparse
text around it; cropping to that rectangle and searching the crop on its own
finds the original where the whole query does not.

It runs on the grey working image the extraction already has, in a
millisecond or two for 640 px.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from indexer.features import connected_groups
from indexer.regions import Region

# Grey levels within this distance of the background count as background: JPEG
# ringing around flat areas stays inside it, photo texture mostly does not.
BACKGROUND_TOLERANCE = 10
# The share of the image's outermost pixels that must be background for it to
# have a frame at all; a photo's own edges are rarely this uniform.
MIN_FLAT_BORDER = 0.5
# A row (or column) belongs to the photo when at least this share of it is
# content. Text lines stay below it: glyphs cover a small part of a row.
MIN_CONTENT_SHARE = 0.5
# Rows of background inside the photo (a white sky on a white page) shorter than
# this share of the image do not split it in two.
MAX_GAP_SHARE = 0.03
# The framed photo must be this large a share of each side, and leave at least
# this share of the image's area to the frame.
MIN_SIDE_SHARE = 0.15
MAX_AREA_SHARE = 0.9
MIN_SIDE_PIXELS = 48


# Most photos inside one query that are searched apart (a 3x3 collage has nine):
# each costs an extraction, and only while nothing has verified.
MAX_INNER_PHOTOS = 9
# An embedded picture this close to the framed photo (intersection over union) is the same one.
SAME_REGION_IOU = 0.7


def find_inner_photos(gray: npt.NDArray[np.uint8], framed: Region | None) -> list[Region]:
    """Photos shown inside ``gray``, the likeliest first: ``framed``, the framed
    photo :func:`find_framed_photo` found, then pictures on a page or in a
    collage (see :func:`find_embedded_photos`). Empty for most photos."""
    embedded = find_embedded_photos(gray, limit=MAX_INNER_PHOTOS)
    # The "framed photo" of a collage may be a block of its cells on the gutters'
    # colour; searched as one photo it finds nothing its cells would not.
    found = [] if framed is None or _holds_several(framed, embedded) else [framed]
    for region in embedded:
        if all(region.overlap(other) < SAME_REGION_IOU for other in found):
            found.append(region)
    return found[:MAX_INNER_PHOTOS]


def find_framed_photo(gray: npt.NDArray[np.uint8]) -> Region | None:
    """The rectangle of a photo framed inside ``gray``, or ``None`` when it has no frame.

    ``None`` is the common answer, not an error: most photos are not framed.
    """
    background = _frame_background(gray)
    if background is None:
        return None
    height, width = gray.shape
    content = np.abs(gray.astype(np.int16) - background) > BACKGROUND_TOLERANCE

    top, bottom = _longest_run(content.mean(axis=1), max_gap=_gap(height))
    if bottom - top < max(MIN_SIDE_SHARE * height, MIN_SIDE_PIXELS):
        return None
    left, right = _longest_run(content[top:bottom].mean(axis=0), max_gap=_gap(width))
    if right - left < max(MIN_SIDE_SHARE * width, MIN_SIDE_PIXELS):
        return None
    if (bottom - top) * (right - left) > MAX_AREA_SHARE * height * width:
        return None
    return Region(left / width, top / height, right / width, bottom / height)


def _frame_background(gray: npt.NDArray[np.uint8]) -> int | None:
    """The grey level of the flat border a framed photo lies on, or ``None``
    when the image's outermost pixels are not flat enough to be a frame."""
    if gray.ndim != 2 or min(gray.shape) < MIN_SIDE_PIXELS:
        return None
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]).astype(np.int16)
    levels, counts = np.unique(border, return_counts=True)
    background = int(levels[np.argmax(counts)])
    if np.mean(np.abs(border - background) <= BACKGROUND_TOLERANCE) < MIN_FLAT_BORDER:
        return None
    return background


# A keypoint outside the framed photo is one of the frame's marks (a status bar's
# clock, a user name, an icon) when at least this share of the square around it
# is the frame's background: marks are sparse. The square's side is this share of
# the image's shorter side, a few lines of an app's interface.
MIN_BACKGROUND_AROUND_MARK = 0.5
MARK_SURROUNDINGS_SHARE = 0.2


def find_frame_marks(
    gray: npt.NDArray[np.uint8], points: npt.NDArray[np.float32], framed: Region | None
) -> npt.NDArray[np.bool_]:
    """Which ``points`` (x, y pixels of ``gray``) are marks on the frame around
    ``framed`` (see :func:`find_framed_photo`): outside the photo, and among
    mostly flat background. All false when nothing is framed.

    Telling the marks apart from the rest makes a wrong ``framed`` harmless: a
    plain photo whose flat sky or caption bar was taken for the photo's frame
    has its own texture around the keypoints outside ``framed``, not background.
    """
    marks = np.zeros(len(points), dtype=bool)
    background = _frame_background(gray)
    if framed is None or background is None or not len(points):
        return marks
    height, width = gray.shape
    x = np.clip(np.rint(points[:, 0]).astype(np.intp), 0, width - 1)
    y = np.clip(np.rint(points[:, 1]).astype(np.intp), 0, height - 1)
    outside = ~(
        (x >= framed.left * width)
        & (x < framed.right * width)
        & (y >= framed.top * height)
        & (y < framed.bottom * height)
    )
    flat = np.abs(gray.astype(np.int16) - background) <= BACKGROUND_TOLERANCE
    # Sums over any rectangle from one cumulative table, clipped at the image's edges.
    table = np.zeros((height + 1, width + 1), dtype=np.int64)
    table[1:, 1:] = flat.cumsum(axis=0).cumsum(axis=1)
    reach = max(1, round(MARK_SURROUNDINGS_SHARE * min(height, width) / 2))
    left, right = np.maximum(x - reach, 0), np.minimum(x + reach + 1, width)
    top, bottom = np.maximum(y - reach, 0), np.minimum(y + reach + 1, height)
    flat_around = table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]
    share = flat_around / ((right - left) * (bottom - top))
    marks[:] = outside & (share >= MIN_BACKGROUND_AROUND_MARK)
    return marks


def _gap(side: int) -> int:
    return max(1, int(MAX_GAP_SHARE * side))


def _longest_run(share: npt.NDArray[np.float64], *, max_gap: int) -> tuple[int, int]:
    """``[start, stop)`` of the longest stretch of indices whose share reaches
    MIN_CONTENT_SHARE, bridging steps of up to ``max_gap`` between them."""
    (hits,) = np.nonzero(share >= MIN_CONTENT_SHARE)
    runs = _runs(hits, max_gap=max_gap)
    if not runs:
        return 0, 0
    first, last = max(runs, key=lambda run: run[1] - run[0])
    return first, last + 1


def _runs(hits: npt.NDArray[np.int64], *, max_gap: int) -> list[tuple[int, int]]:
    """(first, last) of each run of ``hits`` (ascending indices), a new run
    starting wherever the step from the previous hit exceeds ``max_gap``."""
    if not len(hits):
        return []
    breaks = np.flatnonzero(np.diff(hits) > max_gap)
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks, [len(hits) - 1]])
    return [(int(hits[a]), int(hits[b])) for a, b in zip(starts, stops, strict=True)]


# -- photos embedded in a page or a collage ----------------------------------------------

# Cells of this share of the image's longer side are the unit of the layout:
# about 12 px at 640, wider than a collage's rule is thin.
CELL_SHARE = 0.012
# A cell is a picture's when at least this share of its pixels is content:
# nearly every pixel of a photo differs from the page, glyphs cover a third at most.
MIN_CELL_DENSITY = 0.85
# A straight line across a group of picture cells with at most this share of
# content is a collage's gutter (JPEG noise and a slight bleed stay under it).
MAX_GUTTER_CONTENT = 0.08
MAX_GUTTER_DEPTH = 4
# A group of picture cells must fill this share of its bounding box (a photo is
# a rectangle; a diagonal streak of dark headings is not).
MIN_FILL = 0.6
# Embedded pictures must be at least this share of the image's area, and at
# most this share: the whole image is what the first look already searched.
MIN_PICTURE_AREA = 0.02
MAX_PICTURE_AREA = 0.8
# ... and their shorter side at least this share of the image's shorter side:
# a web page's menu bar is dense but too thin to be a photo.
MIN_PICTURE_SIDE = 0.12
# A picture this much inside a larger block is one of the block's parts.
HELD_SHARE = 0.9


def find_embedded_photos(gray: npt.NDArray[np.uint8], *, limit: int = 2) -> list[Region]:
    """Rectangles of pictures laid out on a page or in a collage, largest first.

    The image is cut into small cells; a cell whose pixels nearly all differ
    from the background belongs to a picture, while text, which covers a
    fraction of its cells, does not. Each connected group of picture cells that
    fills its bounding box is a picture. Cells, not rows and columns, so that a
    page photographed at a slight tilt still works. The background is the
    commonest grey level of pixels whose neighbours share it (a page, a
    collage's rules), so a dark surround of a photographed page does not count.
    An empty list is the common answer.
    """
    if gray.ndim != 2 or min(gray.shape) < MIN_SIDE_PIXELS:
        return []
    found: list[tuple[float, Region]] = []
    for background in _background_levels(gray):
        for area, region in _pictures_on(gray, background):
            if all(region.overlap(other) < SAME_REGION_IOU for _, other in found):
                found.append((area, region))
    # A block holding two or more of the pictures found is their collage, seen
    # on a grey level that its gutters differ from: as the largest, it would
    # take the place of a real cell under the limit.
    pictures = [region for _, region in found]
    found = [(area, region) for area, region in found if not _holds_several(region, pictures)]
    found.sort(key=lambda item: item[0], reverse=True)
    return [region for _, region in found[:limit]]


def _holds_several(region: Region, pictures: Sequence[Region]) -> bool:
    """Whether ``region`` holds two or more of the other ``pictures``."""
    held = (
        other is not region and region.share_inside(other) >= HELD_SHARE for other in pictures
    )
    return sum(held) >= 2


def _pictures_on(gray: npt.NDArray[np.uint8], background: int) -> list[tuple[float, Region]]:
    """(share of the area, region) of each picture on a background of grey level ``background``."""
    height, width = gray.shape
    cell = max(4, round(CELL_SHARE * max(height, width)))
    rows, columns = height // cell, width // cell
    content = np.abs(gray[: rows * cell, : columns * cell].astype(np.int16) - background)
    mask = content > BACKGROUND_TOLERANCE
    density = mask.reshape(rows, cell, columns, cell).mean(axis=(1, 3))
    pictures = []
    for top, left, bottom, right, cells in connected_groups(density >= MIN_CELL_DENSITY):
        if cells < MIN_FILL * (bottom - top) * (right - left):
            continue
        box = (top * cell, left * cell, bottom * cell, right * cell)
        for block_top, block_left, block_bottom, block_right in _split_at_gutters(mask, box):
            block_height, block_width = block_bottom - block_top, block_right - block_left
            area = block_height * block_width / (height * width)
            if not MIN_PICTURE_AREA <= area <= MAX_PICTURE_AREA:
                continue
            if min(block_height, block_width) < MIN_PICTURE_SIDE * min(height, width):
                continue
            region = Region(
                block_left / width,
                block_top / height,
                min(block_right / width, 1.0),
                min(block_bottom / height, 1.0),
            )
            pictures.append((area, region))
    return pictures


Box = tuple[int, int, int, int]  # top, left, bottom, right in pixels


def _split_at_gutters(mask: npt.NDArray[np.bool_], box: Box, depth: int = 0) -> list[Box]:
    """``box`` cut along the straight lines of background crossing it: the
    gutters of a collage, thinner than a cell, that joined its photos into one
    group. A box no line crosses is returned whole."""
    top, left, bottom, right = box
    part = mask[top:bottom, left:right]
    if depth >= MAX_GUTTER_DEPTH or part.size == 0:
        return [box]
    for axis in (0, 1):
        # The share of content along each row (axis 0) or column (axis 1) of the box.
        share = part.mean(axis=1 - axis)
        lines = np.flatnonzero(share <= MAX_GUTTER_CONTENT)
        start = top if axis == 0 else left
        length = len(share)
        inner = lines[(lines > 0) & (lines < length - 1)]  # a box's own edge is no gutter
        if not len(inner):
            continue
        # Pieces between gutters (runs of adjacent lines); each is split again the other way.
        pieces, previous = [], 0
        for gutter_first, gutter_last in _runs(inner, max_gap=1):
            pieces.append((previous, gutter_first))
            previous = gutter_last + 1
        pieces.append((previous, length))
        boxes = []
        for low, high in pieces:
            if high - low < 2:
                continue
            child = (
                (start + low, left, start + high, right)
                if axis == 0
                else (top, start + low, bottom, start + high)
            )
            boxes.extend(_split_at_gutters(mask, child, depth + 1))
        return boxes
    return [box]


def _background_levels(gray: npt.NDArray[np.uint8]) -> list[int]:
    """The grey levels a page or a collage may lie on: the commonest level of
    flat pixels (equal to their right and lower neighbours) over the whole
    image, which is a page's colour even under a dark surround, and over its
    border, which is a collage's gutters even when its photos hold more flat
    white than the gutters do. None when too little is flat."""
    flat = (gray[:-1, :-1] == gray[1:, :-1]) & (gray[:-1, :-1] == gray[:-1, 1:])
    levels = []
    border = np.zeros_like(flat)
    border[[0, -1], :] = border[:, [0, -1]] = True
    for where, least in ((flat, 0.05 * gray.size), (flat & border, 0.25 * border.sum())):
        values = gray[:-1, :-1][where]
        if len(values) >= least:
            level = int(np.argmax(np.bincount(values, minlength=256)))
            if level not in levels:
                levels.append(level)
    return levels
