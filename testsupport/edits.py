"""The edits a user's copy of a photo may have gone through, as pure functions.

Every edit takes an RGB uint8 array of shape (height, width, 3) and a seed, and returns a
new RGB uint8 array; the same image and seed always give the same result. The composite
edits (a collage, a page) show the photo as one part of a larger picture and also take
``fillers``, other photos for the rest of the picture. ``EDIT_KINDS`` is the one list of
kinds: the quality benchmark and its tests iterate over it, through ``EditKind.edit``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_JPEG_QUALITY = 90

CAPTIONS = (
    "WHEN YOU SEE IT",
    "MONDAY MOOD",
    "NOBODY: ABSOLUTELY NOBODY:",
    "THIS IS FINE",
    "SEND THIS TO A FRIEND",
    "GUESS WHERE I AM",
)
USER_NAMES = ("travel.diaries", "nature_pics_daily", "dad_jokes_42", "best.of.the.web")


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array (h, w, 3), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 2:
        raise ValueError(f"image too small to edit: {image.shape[1]}x{image.shape[0]}")


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = (int(c) for c in rng.integers(0, 256, size=3))
    return red, green, blue


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font keeps the edits identical on every machine (no system fonts).
    return ImageFont.load_default(size=max(6, size))


def _fitting_font(draw: ImageDraw.ImageDraw, text: str, max_width: int,
                  max_height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    size = max_height
    while size > 6:
        font = _font(size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= max_width and bottom - top <= max_height:
            return font
        size = int(size * 0.9)
    return _font(6)


def _jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _rotate_expanded(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotates counter-clockwise by ``degrees`` on a canvas large enough to keep every pixel."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_width = math.ceil(height * sin + width * cos)
    new_height = math.ceil(height * cos + width * sin)
    matrix[0, 2] += new_width / 2 - width / 2
    matrix[1, 2] += new_height / 2 - height / 2
    return cv2.warpAffine(image, matrix, (new_width, new_height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def crop(image: np.ndarray, seed: int) -> np.ndarray:
    """Keeps a random window of 40-60% of the area, of roughly the same shape."""
    return _crop_window(image, seed, 0.40, 0.60)


def crop_deep(image: np.ndarray, seed: int) -> np.ndarray:
    """Keeps a random window of 15-25% of the area: a zoom on a detail, which the engine
    then sees at about twice the original's scale."""
    return _crop_window(image, seed, 0.15, 0.25)


def _crop_window(image: np.ndarray, seed: int, smallest: float, largest: float) -> np.ndarray:
    _check_rgb(image)
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    area = rng.uniform(smallest, largest)
    width_share = min(1.0, math.sqrt(area * rng.uniform(0.8, 1.25)))
    height_share = min(1.0, area / width_share)
    crop_width = max(1, round(width * width_share))
    crop_height = max(1, round(height * height_share))
    left = int(rng.integers(0, width - crop_width + 1))
    top = int(rng.integers(0, height - crop_height + 1))
    return image[top : top + crop_height, left : left + crop_width].copy()


def rotate(image: np.ndarray, seed: int) -> np.ndarray:
    """Rotates by 10-30 degrees either way; the canvas grows and the corners are black."""
    _check_rgb(image)
    rng = np.random.default_rng(seed)
    degrees = rng.uniform(10.0, 30.0) * rng.choice((-1.0, 1.0))
    return _rotate_expanded(image, degrees)


def rot90(image: np.ndarray, seed: int) -> np.ndarray:
    """A quarter turn, clockwise or counter-clockwise."""
    _check_rgb(image)
    quarter_turns = int(np.random.default_rng(seed).choice((1, 3)))
    return np.ascontiguousarray(np.rot90(image, quarter_turns))


def hflip(image: np.ndarray, seed: int) -> np.ndarray:
    """A mirror image; the seed is accepted for a uniform signature and has no effect."""
    _check_rgb(image)
    del seed
    return np.ascontiguousarray(image[:, ::-1])


def hflip_rotate10(image: np.ndarray, seed: int) -> np.ndarray:
    """A mirror image, then a 10 degree rotation either way."""
    _check_rgb(image)
    direction = float(np.random.default_rng(seed).choice((-1.0, 1.0)))
    return _rotate_expanded(np.ascontiguousarray(image[:, ::-1]), 10.0 * direction)


def downscale_jpeg15(image: np.ndarray, seed: int) -> np.ndarray:
    """A quarter of the size, through JPEG at quality 15, as messengers' thumbnails are."""
    _check_rgb(image)
    del seed
    height, width = image.shape[:2]
    small = cv2.resize(image, (max(1, round(width * 0.25)), max(1, round(height * 0.25))),
                       interpolation=cv2.INTER_AREA)
    return _jpeg_roundtrip(small, quality=15)


def brightness_contrast(image: np.ndarray, seed: int) -> np.ndarray:
    """A clear change of contrast (lower or higher) together with a brightness shift."""
    _check_rgb(image)
    rng = np.random.default_rng(seed)
    contrast = rng.uniform(0.55, 0.75) if rng.random() < 0.5 else rng.uniform(1.3, 1.6)
    brightness = rng.uniform(25.0, 50.0) * rng.choice((-1.0, 1.0))
    adjusted = (image.astype(np.float32) - 128.0) * contrast + 128.0 + brightness
    return np.clip(np.rint(adjusted), 0, 255).astype(np.uint8)


def caption(image: np.ndarray, seed: int) -> np.ndarray:
    """An opaque bar of 18-25% of the height across the whole width, with big meme text."""
    _check_rgb(image)
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    bar_height = max(2, round(height * rng.uniform(0.18, 0.25)))
    bar_top = int(rng.choice((0, (height - bar_height) // 2, height - bar_height)))
    dark_bar = bool(rng.random() < 0.5)
    bar_colour = (0, 0, 0) if dark_bar else (255, 255, 255)
    text_colour = (255, 255, 255) if dark_bar else (0, 0, 0)
    text = str(rng.choice(CAPTIONS))

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, bar_top, width - 1, bar_top + bar_height - 1), fill=bar_colour)
    font = _fitting_font(draw, text, max_width=int(width * 0.94), max_height=int(bar_height * 0.7))
    draw.text((width / 2, bar_top + bar_height / 2), text, fill=text_colour, font=font,
              anchor="mm")
    return np.asarray(canvas)


def border(image: np.ndarray, seed: int) -> np.ndarray:
    """A solid frame of a random colour, 8-15% of the shorter side thick, around the photo."""
    _check_rgb(image)
    rng = np.random.default_rng(seed)
    thickness = max(1, round(min(image.shape[:2]) * rng.uniform(0.08, 0.15)))
    return cv2.copyMakeBorder(image, thickness, thickness, thickness, thickness,
                              cv2.BORDER_CONSTANT, value=_random_colour(rng))


def perspective(image: np.ndarray, seed: int) -> np.ndarray:
    """A keystone warp: each corner moves inwards by 5-18% of the size, black outside."""
    _check_rgb(image)
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]],
                       dtype=np.float32)
    inwards = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float32)
    shift = rng.uniform(0.05, 0.18, size=(4, 2)) * np.array([width, height])
    target = (corners + inwards * shift).astype(np.float32)
    matrix = cv2.getPerspectiveTransform(corners, target)
    return cv2.warpPerspective(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def screenshot(image: np.ndarray, seed: int) -> np.ndarray:
    """The photo at 45-55% of its size in a phone-shaped screen of a social app.

    Above it: a status bar (time, battery) and a post header (avatar, user name); below it:
    action icons, a caption of two lines and a navigation bar.
    """
    _check_rgb(image)
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    scale = rng.uniform(0.45, 0.55)
    photo_width, photo_height = max(1, round(width * scale)), max(1, round(height * scale))
    photo = cv2.resize(image, (photo_width, photo_height), interpolation=cv2.INTER_AREA)

    margin = max(1, round(photo_width * 0.04))
    screen_width = photo_width + 2 * margin
    unit = max(4, round(screen_width / 12))  # the height of one line of the app's interface
    above = 3 * unit
    below = 5 * unit
    # Phones are about 9:19.5; a tall photo makes the screen taller still.
    screen_height = max(round(screen_width * 19.5 / 9), above + photo_height + below)
    dark_theme = bool(rng.random() < 0.5)
    background = (16, 16, 16) if dark_theme else (250, 250, 250)
    ink = (235, 235, 235) if dark_theme else (20, 20, 20)
    accent = _random_colour(rng)

    canvas = Image.new("RGB", (screen_width, screen_height), background)
    draw = ImageDraw.Draw(canvas)
    small = _font(round(unit * 0.55))
    # Status bar.
    draw.text((margin, unit // 2), f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}",
              fill=ink, font=small, anchor="lm")
    draw.rectangle((screen_width - margin - unit, unit // 4, screen_width - margin,
                    unit * 3 // 4), outline=ink, fill=ink)
    # Post header.
    avatar_box = (margin, unit * 3 // 2 - unit // 2, margin + unit, unit * 3 // 2 + unit // 2)
    draw.ellipse(avatar_box, fill=accent)
    draw.text((margin + unit * 3 // 2, unit * 3 // 2), str(rng.choice(USER_NAMES)), fill=ink,
              font=small, anchor="lm")
    # The photo sits between the header and the footer, centred in the free space.
    free_space = screen_height - above - below - photo_height
    photo_top = above + free_space // 2
    canvas.paste(Image.fromarray(photo), (margin, photo_top))
    # Footer: action icons, caption, navigation bar.
    icons_y = photo_top + photo_height + unit // 2
    for index in range(3):
        left = margin + index * unit * 3 // 2
        draw.ellipse((left, icons_y, left + unit * 3 // 4, icons_y + unit * 3 // 4), outline=ink,
                     width=max(1, unit // 10))
    caption_y = icons_y + unit * 3 // 2
    draw.text((margin, caption_y), f"{int(rng.integers(10, 9999))} likes", fill=ink, font=small,
              anchor="lm")
    draw.text((margin, caption_y + unit), str(rng.choice(CAPTIONS)).lower(), fill=ink,
              font=small, anchor="lm")
    draw.rectangle((0, screen_height - unit, screen_width - 1, screen_height - 1),
                   fill=tuple(max(0, channel - 12) for channel in background))
    return np.asarray(canvas)


def grayscale(image: np.ndarray, seed: int) -> np.ndarray:
    """Grey levels, kept in three equal channels; the seed has no effect."""
    _check_rgb(image)
    del seed
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)


def blur(image: np.ndarray, seed: int) -> np.ndarray:
    """A Gaussian blur of sigma 2-3.5 px per 500 px of the longer side."""
    _check_rgb(image)
    sigma = np.random.default_rng(seed).uniform(2.0, 3.5) * max(image.shape[:2]) / 500
    return cv2.GaussianBlur(image, (0, 0), sigmaX=max(0.5, sigma))


def occlusion45(image: np.ndarray, seed: int) -> np.ndarray:
    """A solid rectangle of a random colour hides 45% of the area, at a random place."""
    _check_rgb(image)
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    area = 0.45 * height * width
    block_width = min(width, math.sqrt(area * rng.uniform(0.6, 1.6)))
    block_height = min(height, area / block_width)
    block_width = min(width, area / block_height)  # widen again when the height was capped
    block_width, block_height = max(1, round(block_width)), max(1, round(block_height))
    left = int(rng.integers(0, width - block_width + 1))
    top = int(rng.integers(0, height - block_height + 1))
    occluded = image.copy()
    occluded[top : top + block_height, left : left + block_width] = _random_colour(rng)
    return occluded


# --- Composites: the photo as one part of a larger picture --------------------------------

# Rows x columns of a collage, and how often each is drawn: collage apps default to 2x2.
COLLAGE_GRIDS = ((2, 2), (1, 2), (3, 3))
COLLAGE_GRID_ODDS = (0.6, 0.2, 0.2)
COLLAGE_CELL_ASPECTS = (1.0, 0.75, 4 / 3)  # height / width: square, landscape, portrait
# A collage app crops a photo slightly to fill its cell; beyond this zoom past the fit, the
# rest of the mismatch is letterboxed, so that at most about 13% of a side is lost.
CELL_MAX_ZOOM = 1.15
COLLAGE_FILLERS = 8  # a 3x3 grid has eight cells besides the photo's
PAGE_FILLERS = 1

PAGE_WORDS = (
    "the", "of", "and", "a", "to", "in", "is", "for", "on", "with", "as", "by", "at", "from",
    "photo", "view", "city", "river", "morning", "light", "travel", "guide", "history",
    "museum", "season", "people", "market", "garden", "coast", "walk", "local", "report",
    "weather", "new", "old", "north", "south", "best", "time", "day", "year", "story",
    "update", "price", "review", "recipe", "animal", "nature", "forest", "island", "read",
)


@dataclass(frozen=True)
class Composite:
    """A composite edit's picture and where the photo sits in it: tests check the placement,
    and it helps to look at a miss."""

    image: np.ndarray
    # The part of the photo that is shown: left, top, right, bottom in the photo's pixels.
    shown: tuple[int, int, int, int]
    # Where that part lands in the picture before any perspective: left, top, right, bottom.
    box: tuple[int, int, int, int]
    # Maps the flat layout onto ``image`` (the identity when there is no perspective).
    homography: np.ndarray
    parts: int  # photos in the picture, this one included


def _check_fillers(fillers: Sequence[np.ndarray], kind: str) -> None:
    if not fillers:
        raise ValueError(f"a {kind} needs other photos to show beside this one: pass fillers")
    for filler in fillers:
        _check_rgb(filler)


def _resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height),
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _fit_into_cell(image: np.ndarray, width: int, height: int, background: tuple[int, int, int]
                   ) -> tuple[np.ndarray, tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The image in a cell of ``width`` x ``height``: centre-cropped a little, letterboxed for
    the rest. Returns the cell, the shown part of the image and where it sits in the cell."""
    image_height, image_width = image.shape[:2]
    fit = min(width / image_width, height / image_height)
    scale = min(max(width / image_width, height / image_height), fit * CELL_MAX_ZOOM)
    shown_width = min(image_width, max(1, round(width / scale)))
    shown_height = min(image_height, max(1, round(height / scale)))
    left, top = (image_width - shown_width) // 2, (image_height - shown_height) // 2
    placed_width = min(width, max(1, round(shown_width * scale)))
    placed_height = min(height, max(1, round(shown_height * scale)))
    cell = np.empty((height, width, 3), dtype=np.uint8)
    cell[:] = background
    x, y = (width - placed_width) // 2, (height - placed_height) // 2
    cell[y : y + placed_height, x : x + placed_width] = _resized(
        image[top : top + shown_height, left : left + shown_width], placed_width, placed_height)
    return (cell, (left, top, left + shown_width, top + shown_height),
            (x, y, x + placed_width, y + placed_height))


def compose_collage(image: np.ndarray, seed: int, fillers: Sequence[np.ndarray]) -> Composite:
    """The photo as one cell of a 2x2 grid (1x2 or 3x3 in a fifth of the seeds each) whose
    other cells show ``fillers``, reused in turn when there are fewer than cells.

    The collage is 1-1.5 times the photo's longer side wide; cells are square, 4:3 or 3:4,
    with gutters of 0.6-1.5% of the width in white, black or a pale colour.
    Raises ValueError without fillers.
    """
    _check_rgb(image)
    _check_fillers(fillers, "collage")
    rng = np.random.default_rng(seed)
    rows, columns = COLLAGE_GRIDS[int(rng.choice(len(COLLAGE_GRIDS), p=COLLAGE_GRID_ODDS))]
    cell_aspect = float(rng.choice(COLLAGE_CELL_ASPECTS))
    planned_width = max(image.shape[:2]) * rng.uniform(1.0, 1.5)
    gutter = max(1, round(planned_width * rng.uniform(0.006, 0.015)))
    cell_width = max(2, round((planned_width - (columns + 1) * gutter) / columns))
    cell_height = max(2, round(cell_width * cell_aspect))
    gutter_colour = ((255, 255, 255), (0, 0, 0),
                     tuple(int(c) for c in rng.integers(200, 256, size=3)))[int(rng.integers(3))]
    photo_cell = int(rng.integers(rows * columns))

    canvas = np.empty((rows * cell_height + (rows + 1) * gutter,
                       columns * cell_width + (columns + 1) * gutter, 3), dtype=np.uint8)
    canvas[:] = gutter_colour
    fillers_used = 0
    for cell in range(rows * columns):
        row, column = divmod(cell, columns)
        left = gutter + column * (cell_width + gutter)
        top = gutter + row * (cell_height + gutter)
        if cell == photo_cell:
            content = image
        else:
            content = fillers[fillers_used % len(fillers)]
            fillers_used += 1
        tile, shown, placed = _fit_into_cell(content, cell_width, cell_height, gutter_colour)
        canvas[top : top + cell_height, left : left + cell_width] = tile
        if cell == photo_cell:
            photo_shown = shown
            photo_box = (left + placed[0], top + placed[1], left + placed[2], top + placed[3])
    return Composite(canvas, photo_shown, photo_box, np.eye(3), rows * columns)


def collage(image: np.ndarray, seed: int, fillers: Sequence[np.ndarray] = ()) -> np.ndarray:
    """The photo as one cell of a collage of other photos; see ``compose_collage``."""
    return compose_collage(image, seed, fillers).image


@dataclass(frozen=True)
class _BodyText:
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    line_height: int
    ink: tuple[int, int, int]


def _paragraphs(draw: ImageDraw.ImageDraw, rng: np.random.Generator,
                box: tuple[int, int, int, int], text: _BodyText) -> None:
    """Fills ``box`` (left, top, right, bottom) with lines of words, in paragraphs of 2-6
    lines whose last line stops short, as body text does."""
    left, top, right, bottom = box
    font, line_height = text.font, text.line_height
    width = right - left
    y = top
    while y + line_height <= bottom and width > line_height:
        lines = int(rng.integers(2, 7))
        for line in range(lines):
            if y + line_height > bottom:
                break
            limit = width * (rng.uniform(0.3, 0.9) if line == lines - 1 else 1.0)
            words: list[str] = []
            while True:
                candidate = " ".join([*words, str(rng.choice(PAGE_WORDS))])
                if draw.textlength(candidate, font=font) > limit:
                    break
                words = candidate.split(" ")
            draw.text((left, y), " ".join(words), fill=text.ink, font=font)
            y += line_height
        y += line_height // 2


def compose_page(image: np.ndarray, seed: int, fillers: Sequence[np.ndarray] = ()) -> Composite:
    """The photo at 25-45% of the width of a light page of text, as a phone's photo of a
    document or web page shows it.

    The page is 1.3-1.8 times the photo's longer side wide and 0.75-1.3 times as high as wide
    (higher when the photo needs it): a title (under a coloured menu bar on web pages, half
    the seeds), the photo on the left or right with a caption and a column of text beside it,
    then full-width paragraphs. With fillers, 60% of the seeds add a smaller photo (15-22% of
    the width) beside the paragraphs. Half the seeds see the page in a modest perspective:
    each corner moves inwards by 1-6% of the size, over a dark surround.
    """
    _check_rgb(image)
    for filler in fillers:
        _check_rgb(filler)
    rng = np.random.default_rng(seed)
    image_height, image_width = image.shape[:2]
    page_width = max(16, round(max(image_height, image_width) * rng.uniform(1.3, 1.8)))
    photo_width = max(2, round(page_width * rng.uniform(0.25, 0.45)))
    photo_height = max(2, round(photo_width * image_height / image_width))
    margin = max(1, round(page_width * 0.05))
    gap = max(1, round(page_width * 0.03))
    unit = max(6, round(page_width / 48))  # the body text's size
    line_height = round(unit * 1.45)
    background = tuple(int(c) for c in rng.integers(236, 256, size=3))
    ink = (int(rng.integers(20, 70)),) * 3
    accent = _random_colour(rng)
    web_page = bool(rng.random() < 0.5)
    photo_on_left = bool(rng.random() < 0.5)
    # Drawn whether or not fillers are given, so that a seed lays out the same page either way.
    wants_filler = bool(rng.random() < 0.6)
    filler = fillers[0] if fillers and wants_filler else None
    filler_width = max(2, round(page_width * rng.uniform(0.15, 0.22)))
    filler_on_left = bool(rng.random() < 0.5)
    height_share = rng.uniform(0.75, 1.3)
    tilted = bool(rng.random() < 0.5)
    corner_shifts = rng.uniform(0.01, 0.06, size=(4, 2))

    # The layout from top to bottom, before anything is drawn, so that the page's height fits.
    menu_height = 2 * unit if web_page else 0
    title_top = menu_height + margin
    body_top = title_top + 3 * unit
    column_bottom = body_top + photo_height + 2 * unit  # room for the photo's caption
    lower_top = column_bottom + unit
    filler_height = 0
    if filler is not None:
        filler_height = max(2, round(filler_width * filler.shape[0] / filler.shape[1]))
    page_height = max(round(page_width * height_share),
                      lower_top + filler_height + 2 * line_height + margin)

    canvas = Image.new("RGB", (page_width, page_height), background)
    draw = ImageDraw.Draw(canvas)
    body = _BodyText(_font(unit), line_height, ink)
    title_font, small_font = _font(2 * unit), _font(round(unit * 0.8))
    if web_page:
        draw.rectangle((0, 0, page_width - 1, menu_height - 1), fill=accent)
        for index in range(4):
            draw.text((margin + index * 5 * unit, menu_height // 2),
                      str(rng.choice(PAGE_WORDS)), fill=background, font=small_font, anchor="lm")
    title = " ".join(str(word) for word in rng.choice(PAGE_WORDS, size=int(rng.integers(3, 7))))
    draw.text((margin, title_top), title.capitalize(), fill=ink, font=title_font)

    photo_left = margin if photo_on_left else page_width - margin - photo_width
    canvas.paste(Image.fromarray(_resized(image, photo_width, photo_height)),
                 (photo_left, body_top))
    draw.text((photo_left, body_top + photo_height + unit // 3),
              " ".join(str(word) for word in rng.choice(PAGE_WORDS, size=4)),
              fill=tuple(min(255, c + 90) for c in ink), font=small_font)
    column = ((photo_left + photo_width + gap, page_width - margin) if photo_on_left
              else (margin, photo_left - gap))
    _paragraphs(draw, rng, (column[0], body_top, column[1], column_bottom), body)

    text_top = lower_top
    if filler is not None:
        filler_left = margin if filler_on_left else page_width - margin - filler_width
        canvas.paste(Image.fromarray(_resized(filler, filler_width, filler_height)),
                     (filler_left, lower_top))
        beside = ((filler_left + filler_width + gap, page_width - margin) if filler_on_left
                  else (margin, filler_left - gap))
        _paragraphs(draw, rng, (beside[0], lower_top, beside[1], lower_top + filler_height),
                    body)
        text_top = lower_top + filler_height + unit
    _paragraphs(draw, rng, (margin, text_top, page_width - margin, page_height - margin), body)

    page = np.asarray(canvas)
    homography = np.eye(3)
    if tilted:
        corners = np.array([[0, 0], [page_width - 1, 0], [page_width - 1, page_height - 1],
                            [0, page_height - 1]], dtype=np.float32)
        inwards = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float32)
        target = corners + inwards * corner_shifts * np.array([page_width, page_height])
        homography = cv2.getPerspectiveTransform(corners, target.astype(np.float32))
        surround = (int(rng.integers(25, 60)),) * 3
        page = cv2.warpPerspective(page, homography, (page_width, page_height),
                                   flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=surround)
    return Composite(page, (0, 0, image_width, image_height),
                     (photo_left, body_top, photo_left + photo_width, body_top + photo_height),
                     homography, 1 if filler is None else 2)


def page(image: np.ndarray, seed: int, fillers: Sequence[np.ndarray] = ()) -> np.ndarray:
    """The photo on a page of text, with another photo when fillers are given; see
    ``compose_page``."""
    return compose_page(image, seed, fillers).image


@dataclass(frozen=True)
class EditKind:
    name: str  # stable identifier, used in file names and in the JSON output
    label: str  # for result tables
    # (image, seed) -> edited; a composite takes (image, seed, fillers): call ``edit``.
    apply: Callable[..., np.ndarray]
    jpeg_quality: int = DEFAULT_JPEG_QUALITY  # when the edited query is written as a file
    # Other photos a composite shows beside this one, at most; 0 for edits of the photo alone.
    fillers_wanted: int = 0

    def edit(self, image: np.ndarray, seed: int,
             fillers: Sequence[np.ndarray] = ()) -> np.ndarray:
        """The edited image; ``fillers`` go to composites only, and a collage refuses to go
        without them (ValueError)."""
        if self.fillers_wanted:
            return self.apply(image, seed, fillers)
        return self.apply(image, seed)


EDIT_KINDS: tuple[EditKind, ...] = (
    EditKind("crop", "crop to 40-60% of the area", crop),
    EditKind("crop_deep", "crop to 15-25% of the area", crop_deep),
    EditKind("rotate", "rotation 10-30°", rotate),
    EditKind("rot90", "rotation 90°", rot90),
    EditKind("hflip", "horizontal flip", hflip),
    EditKind("hflip_rotate10", "flip + rotation 10°", hflip_rotate10),
    EditKind("downscale_jpeg15", "0.25x + JPEG q15", downscale_jpeg15, jpeg_quality=15),
    EditKind("brightness_contrast", "brightness/contrast", brightness_contrast),
    EditKind("caption", "caption bar", caption),
    EditKind("border", "thick border", border),
    EditKind("perspective", "perspective warp", perspective),
    EditKind("screenshot", "phone screenshot", screenshot),
    EditKind("grayscale", "grayscale", grayscale),
    EditKind("blur", "blur", blur),
    EditKind("occlusion45", "45% occluded", occlusion45),
    EditKind("collage", "cell of a collage", collage, fillers_wanted=COLLAGE_FILLERS),
    EditKind("page", "photo on a page of text", page, fillers_wanted=PAGE_FILLERS),
)
EDITS_BY_NAME: dict[str, EditKind] = {kind.name: kind for kind in EDIT_KINDS}


def apply_edit(kind_name: str, image: np.ndarray, seed: int,
               fillers: Sequence[np.ndarray] = ()) -> np.ndarray:
    try:
        kind = EDITS_BY_NAME[kind_name]
    except KeyError:
        known = ", ".join(EDITS_BY_NAME)
        raise ValueError(f"unknown edit kind {kind_name!r}; known: {known}") from None
    return kind.edit(image, seed, fillers)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """The bytes of a baseline JPEG file of ``image``, as a query file is written."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
