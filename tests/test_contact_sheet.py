"""The contact sheet the CLI draws (indexer/contact_sheet.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from bad_inputs import (
    CORPUS_WORKING_SIDE,
    ORIENTATION_REFERENCE,
    ORIENTED_CASES,
    BadInputCorpus,
    correlation,
    encoded,
    photo_jpeg,
    sample_photo,
)
from PIL import Image

from indexer.contact_sheet import SheetEntry, render_contact_sheet
from indexer.errors import CorruptImageError, EmptyImageError
from indexer.images import image_format, load_working_image
from testsupport.videos import MP4_CODEC, WEBM_CODEC, gif_bytes, truncated, video_bytes


def solid_png(tmp_path: Path, name: str, colour: tuple[int, int, int]) -> Path:
    path = tmp_path / f"{name}.png"
    path.write_bytes(encoded(Image.new("RGB", (300, 200), colour), "PNG"))
    return path


def pixels_of(sheet: npt.NDArray[np.uint8], colour: tuple[int, int, int]) -> npt.NDArray:
    return np.argwhere(np.all(sheet == np.array(colour, dtype=np.uint8), axis=2))


def test_contact_sheet_shows_query_then_results_in_order(tmp_path: Path) -> None:
    red, blue, yellow = (220, 20, 20), (20, 20, 220), (230, 220, 10)
    query = solid_png(tmp_path, "query", red).read_bytes()
    entries = [
        SheetEntry(solid_png(tmp_path, "blue", blue), "1. blue.png 91%", highlighted=True),
        SheetEntry(solid_png(tmp_path, "yellow", yellow), "2. yellow.png 40%", highlighted=False),
    ]
    sheet_png = render_contact_sheet(query, entries, thumb_side=128)

    assert image_format(sheet_png) == "PNG"
    with Image.open(io.BytesIO(sheet_png)) as decoded:
        sheet = np.asarray(decoded.convert("RGB"))
    centres = []
    for colour in (red, blue, yellow):
        where = pixels_of(sheet, colour)
        # A 300x200 picture fits a 128 box as 128x85; frames may cover its rim.
        assert len(where) > 0.8 * 128 * 85, colour
        centres.append(where.mean(axis=0))
    (red_y, red_x), (blue_y, blue_x), (yellow_y, yellow_x) = centres
    assert red_x < blue_x < yellow_x
    assert abs(red_y - blue_y) < 5
    assert abs(blue_y - yellow_y) < 5


def test_highlight_changes_only_its_own_cell(tmp_path: Path) -> None:
    query = solid_png(tmp_path, "query", (200, 200, 200))
    first, second = solid_png(tmp_path, "a", (10, 10, 10)), solid_png(tmp_path, "b", (90, 9, 9))

    def sheet(highlight_first: bool) -> npt.NDArray[np.uint8]:
        entries = [
            SheetEntry(first, "1. a.png", highlighted=highlight_first),
            SheetEntry(second, "2. b.png", highlighted=False),
        ]
        with Image.open(io.BytesIO(render_contact_sheet(query, entries))) as decoded:
            return np.asarray(decoded.convert("RGB"))

    plain, highlighted = sheet(False), sheet(True)
    assert plain.shape == highlighted.shape
    changed_columns = np.flatnonzero(np.any(plain != highlighted, axis=(0, 2)))
    assert changed_columns.size > 0
    width = plain.shape[1]
    # Cells run query | a | b from left to right: only the middle third changes.
    assert changed_columns.min() > width / 4
    assert changed_columns.max() < width * 3 / 4


def test_contact_sheet_survives_missing_results_and_odd_labels(tmp_path: Path) -> None:
    query = tmp_path / "query.jpg"
    query.write_bytes(photo_jpeg((400, 300)))
    entries = [
        SheetEntry(tmp_path / "deleted.jpg", "1. deleted.jpg 99%", highlighted=True),
        # Cyrillic "photo", a tab, a NUL, an emoji and far too much text.
        SheetEntry(
            query,
            "2. \u0444\u043e\u0442\u043e\t\x00 🐈 " + "very long name " * 20,
            highlighted=False,
        ),
        SheetEntry(query, "3. line\nbreak\nand a third line", highlighted=False),
    ]
    with Image.open(io.BytesIO(render_contact_sheet(query, entries, thumb_side=96))) as decoded:
        decoded.load()
        assert decoded.width >= 4 * 96
        assert decoded.height >= 96


def test_contact_sheet_of_an_unusable_query_raises() -> None:
    with pytest.raises(EmptyImageError):
        render_contact_sheet(b"", [])


def test_contact_sheet_thumbnails_are_upright(corpus: BadInputCorpus) -> None:
    sideways = corpus[ORIENTED_CASES[8]].path
    with Image.open(io.BytesIO(render_contact_sheet(sideways, [], thumb_side=128))) as decoded:
        sheet = np.asarray(decoded.convert("L"), dtype=float)
    upright = np.asarray(sample_photo("astronaut", (128, 90)).convert("L"), dtype=float)
    # Find the lone query cell by correlation over the possible offsets rather
    # than assuming the layout; a sideways thumbnail would not fit the window.
    windows = (sheet[top : top + 90, left : left + 128] for top in range(64) for left in range(32))
    best = max(
        correlation(window, upright)
        for window in windows
        if window.shape == upright.shape and window.std() > 0
    )
    assert best > 0.9


def test_corrupt_result_is_drawn_as_a_placeholder_not_raised(corpus: BadInputCorpus) -> None:
    query = corpus[ORIENTATION_REFERENCE].path
    broken = SheetEntry(corpus["jpeg_truncated"].path, "1. truncated.jpg", highlighted=False)
    healthy = SheetEntry(query, "2. reference.jpg", highlighted=False)
    sheet_png = render_contact_sheet(query, [broken, healthy], thumb_side=64)
    with Image.open(io.BytesIO(sheet_png)) as decoded:
        assert decoded.format == "PNG"
    with pytest.raises(CorruptImageError):
        load_working_image(broken.image, working_side=CORPUS_WORKING_SIDE)


# --- moving pictures: one frame, and its time ----------------------------------------------------

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)
VIDEO_FPS = 12.0
THUMB = 96
PADDING = 12  # around each cell (contact_sheet's _SHEET_PADDING)


def striped_video(kind: str = "mp4") -> bytes:
    """24 frames of 160 x 120 at 12 fps: red for the first 8 (to 0.58 s), green, then blue
    (from 1.33 s); a white dot moves along the top so that no frame repeats the last."""
    frames = []
    for index in range(24):
        frame = np.full((120, 160, 3), (RED, GREEN, BLUE)[index // 8], dtype=np.uint8)
        frame[2:6, 6 * index : 6 * index + 4] = 255
        frames.append(frame)
    if kind == "gif":
        return gif_bytes(frames, frame_ms=round(1000 / VIDEO_FPS))
    return video_bytes(frames, fps=VIDEO_FPS, codec=WEBM_CODEC if kind == "webm" else MP4_CODEC)


def decoded_sheet(sheet_png: bytes) -> npt.NDArray[np.uint8]:
    with Image.open(io.BytesIO(sheet_png)) as decoded:
        assert decoded.format == "PNG"
        return np.asarray(decoded.convert("RGB"))


def cell_colour(sheet: npt.NDArray[np.uint8], cell: int) -> tuple[int, int, int]:
    """The median colour of the middle of cell ``cell`` (row-major) of a THUMB-pixel sheet."""
    left = PADDING + cell * (THUMB + PADDING)
    middle = sheet[PADDING + THUMB // 4 : PADDING + 3 * THUMB // 4, left + THUMB // 4 :
                   left + 3 * THUMB // 4]
    red, green, blue = np.median(middle.reshape(-1, 3), axis=0)
    return int(red), int(green), int(blue)


def distance(first: tuple[int, int, int], second: tuple[int, int, int]) -> int:
    """The largest difference of one channel."""
    return max(abs(a - b) for a, b in zip(first, second, strict=True))


def nearest(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return min((RED, GREEN, BLUE), key=lambda stripe: distance(stripe, colour))


@pytest.mark.parametrize("kind", ["mp4", "webm", "gif"])
def test_a_moving_query_and_moving_results_show_the_frame_at_their_time(
    tmp_path: Path, kind: str
) -> None:
    video = tmp_path / f"clip.{kind}"
    video.write_bytes(striped_video(kind))
    entries = [
        SheetEntry(video, "1. clip 90%", highlighted=True, seconds=0.9),  # frame 11: green
        SheetEntry(video, "2. clip 30%", highlighted=False, seconds=0.0),  # frame 0: red
        SheetEntry(video, "3. clip 20%", highlighted=False, seconds=99.0),  # past the end: blue
    ]

    sheet = decoded_sheet(
        render_contact_sheet(video.read_bytes(), entries, query_seconds=1.5, thumb_side=THUMB)
    )

    # Four cells in one row, each showing one frame.
    assert sheet.shape[1] == 4 * (THUMB + PADDING) + PADDING
    assert [nearest(cell_colour(sheet, cell)) for cell in range(4)] == [BLUE, GREEN, RED, BLUE]
    for cell in range(4):
        colour = cell_colour(sheet, cell)
        assert distance(colour, nearest(colour)) < 25, colour


def test_a_moving_query_without_a_time_shows_the_first_frame_a_query_describes() -> None:
    # Of three query frames of 24, the first is frame 4 (see indexer.moving.frame_indices).
    sheet = decoded_sheet(render_contact_sheet(striped_video(), [], thumb_side=THUMB))

    assert nearest(cell_colour(sheet, 0)) == RED


def test_the_time_of_the_frame_shown_is_written_under_it(tmp_path: Path) -> None:
    video = striped_video()
    still = solid_png(tmp_path, "still", RED).read_bytes()

    def label_rows(query: bytes, seconds: float | None) -> npt.NDArray[np.uint8]:
        sheet = decoded_sheet(render_contact_sheet(query, [], query_seconds=seconds,
                                                   thumb_side=THUMB))
        return sheet[PADDING + THUMB :]

    # Both frames are red: only the label can tell them apart.
    early, later = label_rows(video, 0.1), label_rows(video, 0.5)
    assert early.shape == later.shape
    assert np.any(early != later)
    # A still picture has no time: the one given is not written.
    assert np.array_equal(label_rows(still, 0.1), label_rows(still, 0.5))


def test_a_damaged_video_result_is_a_placeholder_and_a_damaged_video_query_raises(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "cut-short.mp4"
    broken.write_bytes(truncated(striped_video()))
    query = solid_png(tmp_path, "query", GREEN)

    sheet = decoded_sheet(render_contact_sheet(
        query, [SheetEntry(broken, "1. cut-short.mp4", highlighted=False, seconds=1.0)],
        thumb_side=THUMB,
    ))
    placeholder = (200, 200, 200)  # contact_sheet's grey for what cannot be drawn
    assert cell_colour(sheet, 1) == placeholder
    with pytest.raises(CorruptImageError):
        render_contact_sheet(broken, [], thumb_side=THUMB)
