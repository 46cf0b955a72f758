"""The contact sheet: a query and its results as one PNG of labelled thumbnails.

The CLI writes one with ``python -m indexer query --sheet``, to look at what a
search found. The pixels come from :mod:`indexer.images` (the one decoder of
untrusted files) and, for a video or an animation, from :mod:`indexer.moving`,
which reads the one frame the search matched; this module only lays them out and
draws frames and labels, on a :class:`~indexer.pictures.Canvas`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from indexer.errors import IndexerError
from indexer.images import MIN_DESCRIBABLE_SIDE, decode_rgb, open_picture, read_image_file
from indexer.moving import frame_indices, moving_format, open_moving, shown_frame
from indexer.pictures import Canvas, Font
from indexer.settings import EngineSettings

__all__ = ["SheetEntry", "render_contact_sheet"]

_SHEET_COLUMNS: Final = 4
_SHEET_PADDING: Final = 12
_SHEET_LABEL_LINES: Final = 2
_SHEET_FRAME_WIDTH: Final = 5
_SHEET_BACKGROUND: Final = (250, 250, 250)
_SHEET_TEXT: Final = (20, 20, 20)
_SHEET_HIGHLIGHT: Final = (30, 150, 60)
_SHEET_QUERY_FRAME: Final = (40, 90, 200)
_SHEET_PLACEHOLDER: Final = (200, 200, 200)
_SHEET_QUERY_LABEL: Final = "query"
_SHEET_UNAVAILABLE_LABEL: Final = "(image unavailable)"
# DejaVu covers Cyrillic, Greek and most accented Latin file names; the
# built-in fallback font only covers ASCII.
_SHEET_FONT_FILE: Final = "DejaVuSans.ttf"
_DEFAULT_SETTINGS: Final = EngineSettings()

_CellKind = Literal["query", "highlighted", "plain"]
_Thumbnail = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class SheetEntry:
    """One result cell of a contact sheet: the picture, its caption (lines
    separated by ``\\n``) and whether to mark it (e.g. geometrically verified).
    For a moving picture, ``seconds`` is the time of the frame to show (the one
    that matched); without it, the first frame a query looks at is shown."""

    image: Path
    label: str
    highlighted: bool
    seconds: float | None = None


def render_contact_sheet(
    query: Path | bytes,
    results: Sequence[SheetEntry],
    *,
    query_seconds: float | None = None,
    thumb_side: int = 256,
    settings: EngineSettings = _DEFAULT_SETTINGS,
) -> bytes:
    """Draw the query and its results as a grid of labelled thumbnails; return PNG bytes.

    The query comes first, framed in blue; highlighted results get a green
    frame and a tick.  A video or an animation is drawn as one of its frames,
    its time added to the label's last line: a result's at
    :attr:`SheetEntry.seconds`, the query's at ``query_seconds`` (the frame that
    found the first result), or else the first frame a query looks at.  A result
    that cannot be decoded any more (deleted, damaged) is drawn as a labelled grey
    placeholder rather than failing the whole sheet.  ``settings`` gives the
    limits files are read within.

    Raises the errors of :func:`indexer.images.open_picture` and
    :func:`indexer.moving.open_moving` when the query itself cannot be drawn, and
    ValueError when ``thumb_side`` is too small to draw.
    """
    if thumb_side < 4 * MIN_DESCRIBABLE_SIDE:
        raise ValueError(f"thumb_side must be at least {4 * MIN_DESCRIBABLE_SIDE}")
    font = _sheet_font(max(11, thumb_side // 18))
    line_height = _line_height(font)
    query_thumbnail, shown_seconds = _thumbnail(query, query_seconds, thumb_side, settings)
    cells: list[tuple[_Thumbnail | None, str, _CellKind]] = [
        (query_thumbnail, _timed(_SHEET_QUERY_LABEL, shown_seconds), "query")
    ]
    for entry in results:
        kind: _CellKind = "highlighted" if entry.highlighted else "plain"
        try:
            pixels, shown_seconds = _thumbnail(entry.image, entry.seconds, thumb_side, settings)
        except IndexerError:
            cells.append((None, entry.label, kind))
            continue
        cells.append((pixels, _timed(entry.label, shown_seconds), kind))

    columns = min(_SHEET_COLUMNS, len(cells))
    rows = math.ceil(len(cells) / columns)
    cell_width = thumb_side + _SHEET_PADDING
    cell_height = thumb_side + _SHEET_PADDING + _SHEET_LABEL_LINES * line_height
    sheet = Canvas(
        (columns * cell_width + _SHEET_PADDING, rows * cell_height + _SHEET_PADDING),
        _SHEET_BACKGROUND,
    )
    for index, (thumbnail, label, kind) in enumerate(cells):
        left = _SHEET_PADDING + (index % columns) * cell_width
        top = _SHEET_PADDING + (index // columns) * cell_height
        _draw_cell(sheet, origin=(left, top), side=thumb_side, thumbnail=thumbnail, kind=kind)
        lines = label.splitlines()
        if thumbnail is None:
            lines = [*lines[: _SHEET_LABEL_LINES - 1], _SHEET_UNAVAILABLE_LABEL]
        for number, line in enumerate(lines[:_SHEET_LABEL_LINES]):
            text = _fit_text(_printable(line), font, thumb_side)
            sheet.text(
                (left, top + thumb_side + 4 + number * line_height),
                text,
                font=font,
                fill=_SHEET_TEXT,
            )
    return sheet.png()


def _thumbnail(
    source: Path | bytes, seconds: float | None, side: int, settings: EngineSettings
) -> tuple[_Thumbnail, float | None]:
    """Upright RGB pixels fitting in side x side (never enlarged), and for a moving
    picture the time of the frame they show: the one nearest ``seconds``, or without
    it the first frame a query describes."""
    data = source if isinstance(source, bytes) else read_image_file(
        source, settings.max_file_bytes
    )[0]
    moving = moving_format(data)
    if moving is None:
        return decode_rgb(open_picture(data), max_side=side), None
    picture = open_moving(data, moving, settings.video_limits)
    if seconds is None:
        seconds = picture.time_of(frame_indices(picture, settings.query_video_frames)[0])
    return shown_frame(picture, seconds, max_side=side)


def _timed(label: str, seconds: float | None) -> str:
    """``label`` with the time of the frame shown added to its last line."""
    if seconds is None:
        return label
    return f"{label}, at {seconds:.2f} s"


def _draw_cell(
    sheet: Canvas,
    *,
    origin: tuple[int, int],
    side: int,
    thumbnail: _Thumbnail | None,
    kind: _CellKind,
) -> None:
    left, top = origin
    if thumbnail is None:
        sheet.rectangle((left, top, left + side - 1, top + side - 1), fill=_SHEET_PLACEHOLDER)
    else:
        height, width = thumbnail.shape[:2]
        sheet.paste(thumbnail, (left + (side - width) // 2, top + (side - height) // 2))
    if kind == "plain":
        return
    inset = _SHEET_FRAME_WIDTH // 2
    sheet.rectangle(
        (left - inset, top - inset, left + side - 1 + inset, top + side - 1 + inset),
        outline=_SHEET_QUERY_FRAME if kind == "query" else _SHEET_HIGHLIGHT,
        width=_SHEET_FRAME_WIDTH,
    )
    if kind == "highlighted":
        _draw_tick(sheet, (left + side - 1, top), max(16, side // 8))


def _draw_tick(sheet: Canvas, corner: tuple[int, int], size: int) -> None:
    # Drawn, not typed: the fallback font has no tick glyph.
    right, top = corner
    left = right - size
    sheet.ellipse((left, top, right, top + size), fill=_SHEET_HIGHLIGHT)
    sheet.line(
        [
            (left + size * 0.25, top + size * 0.52),
            (left + size * 0.43, top + size * 0.70),
            (left + size * 0.76, top + size * 0.32),
        ],
        fill=(255, 255, 255),
        width=max(2, size // 7),
    )


@cache
def _sheet_font(size: int) -> Font:
    return Font.named(_SHEET_FONT_FILE, size)


def _line_height(font: Font) -> int:
    _, top, _, bottom = font.bounding_box("Hgjy")
    return int(bottom - top) + 4


def _printable(text: str) -> str:
    # File names may contain control characters; they would draw as boxes or
    # break the layout.
    return "".join(character if character.isprintable() else "?" for character in text)


def _fit_text(text: str, font: Font, width: int) -> str:
    if font.length(text) <= width:
        return text
    ellipsis = "..."
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if font.length(text[:middle] + ellipsis) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low] + ellipsis
