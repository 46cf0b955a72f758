"""Moving pictures: which files are videos or animations, which of their frames are read,
and the limits that keep reading them bounded.

A moving picture (an MP4 or MOV video, a WebM sticker, an animated GIF) is searched as a
few of its frames. They are spread evenly over its length; for the index, twice as many
are looked at as are kept, and a frame too like the last one kept is skipped, so a static
animation costs one frame and a clip with cuts keeps one of each scene. The OpenCV calls
are in :class:`indexer.features.VideoFrames`; this module holds the policy.

Frames are decoded one at a time and only their grey working image leaves here: nothing
decoded outlives the frame being described. A video too long, too large or too slow to
read is refused with a sentence saying so, before or while its frames are read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from indexer.errors import CorruptImageError, EmptyImageError, ImageTooLargeError
from indexer.features import VideoFrames
from indexer.images import ISO_IMAGE_BRANDS, working_size

__all__ = [
    "MOVING_FORMATS",
    "MovingPicture",
    "VideoLimits",
    "frame_indices",
    "moving_format",
    "open_moving",
    "shown_frame",
    "working_frames",
]

MOVING_FORMATS: Final = ("MP4", "MOV", "WEBM", "GIF")

_EBML_MAGIC: Final = b"\x1a\x45\xdf\xa3"  # Matroska and WebM
_QUICKTIME_BRAND: Final = b"qt  "
# A frame is a new scene when its 16 x 16 thumbnail differs from the last kept
# one's by this many grey levels on average (a pan of a few percent stays below).
_THUMBNAIL_SIDE: Final = 16
_SCENE_CHANGE: Final = 12.0


@dataclass(frozen=True, slots=True)
class VideoLimits:
    """What a moving picture may be: longer, larger or slower to read ones are refused."""

    max_seconds: float
    max_pixels: int  # a frame's
    read_seconds: float  # wall-clock budget for reading and describing its frames


@dataclass(frozen=True, slots=True)
class MovingPicture:
    """A moving picture whose header has been read and checked against the limits."""

    data: bytes
    format: str
    width: int
    height: int
    frame_count: int
    fps: float

    @property
    def seconds(self) -> float:
        return self.frame_count / self.fps

    def time_of(self, index: int) -> float:
        """Seconds from the start to frame ``index``."""
        return index / self.fps


def moving_format(data: bytes) -> str | None:
    """The format of ``data`` if it is a moving picture (one of MOVING_FORMATS), else ``None``
    (a still image, including a GIF of one frame, or something else entirely)."""
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in ISO_IMAGE_BRANDS:
            return None
        return "MOV" if brand == _QUICKTIME_BRAND else "MP4"
    if data.startswith(_EBML_MAGIC):
        return "WEBM"
    if data.startswith((b"GIF87a", b"GIF89a")):
        with VideoFrames(data) as frames:
            if frames.opened and frames.header().frame_count > 1:
                return "GIF"
    return None


def open_moving(data: bytes, picture_format: str, limits: VideoLimits) -> MovingPicture:
    """Read the header of a moving picture and check it against ``limits``.

    Raises:
        EmptyImageError: it has no frames.
        CorruptImageError: FFmpeg cannot read it, or it does not say its frame rate.
        ImageTooLargeError: longer than ``limits.max_seconds``, or frames larger than
            ``limits.max_pixels``.
    """
    if not data:
        raise EmptyImageError("The file is empty (0 bytes).")
    name = _NAMES.get(picture_format, "video")
    with VideoFrames(data) as frames:
        if not frames.opened:
            raise CorruptImageError(
                f"FFmpeg cannot open this {picture_format}",
                user_message=f"This {name} cannot be read: it is damaged or incomplete.",
            )
        header = frames.header()
    if header.frame_count == 0:
        raise EmptyImageError(f"the {picture_format} has no frames",
                              user_message=f"This {name} has no frames.")
    if header.frame_count < 0 or not 0 < header.fps < 1000:
        raise CorruptImageError(
            f"the {picture_format} header gives {header.frame_count} frames at {header.fps} fps",
            user_message=f"This {name} does not say how long it is, so I cannot read it.",
        )
    if header.width * header.height > limits.max_pixels:
        raise ImageTooLargeError(
            f"{header.width}x{header.height} frames; the limit is {limits.max_pixels} pixels",
            user_message=f"This {name} is {header.width}x{header.height}: too large for me "
            "to look at.",
        )
    picture = MovingPicture(
        data, picture_format, header.width, header.height, header.frame_count, header.fps
    )
    if picture.seconds > limits.max_seconds:
        raise ImageTooLargeError(
            f"{picture.seconds:.0f} s long; the limit is {limits.max_seconds:.0f} s",
            user_message=f"This {name} is {_duration(picture.seconds)} long; I look at "
            f"{_NAMES_PLURAL.get(picture_format, 'videos')} up to "
            f"{_duration(limits.max_seconds)}.",
        )
    return picture


def frame_indices(picture: MovingPicture, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``picture``, each in the middle of its
    share of the frames (so a few do not start on a fade from black), without repeats."""
    total = picture.frame_count
    wanted = {min(total - 1, int((share + 0.5) * total / count)) for share in range(count)}
    return sorted(wanted)


def working_frames(
    picture: MovingPicture,
    indices: list[int],
    *,
    working_side: int,
    min_side: int,
    limits: VideoLimits,
    distinct: bool = False,
) -> Iterator[tuple[int, npt.NDArray[np.uint8]]]:
    """The frames at ``indices`` as grey working images, one at a time: (index, pixels).

    Frames that cannot be decoded are skipped. With ``distinct``, so is a frame too like
    the last one yielded (the same scene).

    Raises:
        ImageTooSmallError: the frames are too small to describe.
        ImageTooLargeError: reading (with what the caller does between frames) takes
            longer than ``limits.read_seconds``.
    """
    size = working_size(picture.width, picture.height, working_side, min_side)
    deadline = time.monotonic() + limits.read_seconds
    last: npt.NDArray[np.float32] | None = None
    with VideoFrames(picture.data) as frames:
        for index in indices:
            if time.monotonic() > deadline:
                raise ImageTooLargeError(
                    f"reading the frames took more than {limits.read_seconds:.0f} s",
                    user_message="This video takes too long to read; please send a shorter "
                    "or smaller one.",
                )
            gray = frames.gray_frame(index, size)
            if gray is None:
                continue
            if distinct:
                thumbnail = _thumbnail(gray)
                if last is not None and float(np.abs(thumbnail - last).mean()) < _SCENE_CHANGE:
                    continue
                last = thumbnail
            yield index, gray


def shown_frame(
    picture: MovingPicture, seconds: float, *, max_side: int
) -> tuple[npt.NDArray[np.uint8], float]:
    """The frame of ``picture`` nearest ``seconds`` from its start (the last one when
    later) as RGB pixels fitting in ``max_side`` x ``max_side``, and its own time: to
    show people which frame a search looked at.

    Raises:
        CorruptImageError: that frame cannot be decoded.
    """
    index = min(picture.frame_count - 1, max(0, round(seconds * picture.fps)))
    with VideoFrames(picture.data) as frames:
        rgb = frames.rgb_frame(index, max_side)
    if rgb is None:
        raise CorruptImageError(
            f"frame {index} ({seconds:.2f} s) of the {picture.format} cannot be decoded",
            user_message=f"This {_NAMES.get(picture.format, 'video')} is damaged: its frame "
            f"at {seconds:.2f} s cannot be read.",
        )
    return rgb, picture.time_of(index)


def _thumbnail(gray: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """The mean grey of each of 16 x 16 cells: a frame's layout without its detail."""
    rows = np.array_split(np.arange(gray.shape[0]), _THUMBNAIL_SIDE)
    columns = np.array_split(np.arange(gray.shape[1]), _THUMBNAIL_SIDE)
    return np.array(
        [[gray[r[0] : r[-1] + 1, c[0] : c[-1] + 1].mean() for c in columns] for r in rows],
        dtype=np.float32,
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} seconds"
    return f"{seconds / 60:.0f} minutes"


_NAMES: Final = {"GIF": "animation", "WEBM": "video sticker"}
_NAMES_PLURAL: Final = {"GIF": "animations", "WEBM": "video stickers"}
