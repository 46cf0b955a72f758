"""The edits a user's copy of a photo may have gone through, as pure functions.

Every edit takes an RGB uint8 array of shape (height, width, 3) and a seed, and returns a
new RGB uint8 array; the same image and seed always give the same result. ``EDIT_KINDS``
is the one list of kinds: the quality benchmark and its tests iterate over it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
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


@dataclass(frozen=True)
class EditKind:
    name: str  # stable identifier, used in file names and in the JSON output
    label: str  # for result tables
    apply: Callable[[np.ndarray, int], np.ndarray]
    jpeg_quality: int = DEFAULT_JPEG_QUALITY  # when the edited query is written as a file


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
)
EDITS_BY_NAME: dict[str, EditKind] = {kind.name: kind for kind in EDIT_KINDS}


def apply_edit(kind_name: str, image: np.ndarray, seed: int) -> np.ndarray:
    try:
        kind = EDITS_BY_NAME[kind_name]
    except KeyError:
        known = ", ".join(EDITS_BY_NAME)
        raise ValueError(f"unknown edit kind {kind_name!r}; known: {known}") from None
    return kind.apply(image, seed)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """The bytes of a baseline JPEG file of ``image``, as a query file is written."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
