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
