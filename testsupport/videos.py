"""Small generated moving pictures for the tests and benchmarks: a camera panning and
zooming over a photo (written by OpenCV's VideoWriter), animated GIFs (Pillow), and
broken files."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

Rgb = npt.NDArray[np.uint8]

# FourCC codes the OpenCV wheel's FFmpeg writes (H.264 has no encoder in it).
MP4_CODEC = "mp4v"
WEBM_CODEC = "VP90"


def pan_and_zoom(
    photo: Rgb, *, frames: int = 24, size: tuple[int, int] = (320, 240), zoom: float = 1.6
) -> Iterator[Rgb]:
    """Frames of a camera moving over ``photo``: from the whole picture (fitted to the
    aspect of ``size``) it zooms in ``zoom`` times while panning from left to right."""
    height, width = photo.shape[:2]
    aspect = size[0] / size[1]
    base_width = min(width, height * aspect)
    for step in range(frames):
        progress = step / max(1, frames - 1)
        crop_width = base_width / (1.0 + (zoom - 1.0) * progress)
        crop_height = crop_width / aspect
        left = (width - crop_width) * progress
        top = (height - crop_height) / 2
        window = photo[
            round(top) : round(top + crop_height), round(left) : round(left + crop_width)
        ]
        yield cv2.resize(window, size, interpolation=cv2.INTER_AREA)


def video_bytes(
    frames: Sequence[Rgb] | Iterator[Rgb], *, fps: float = 12.0, codec: str = MP4_CODEC
) -> bytes:
    """``frames`` (RGB, all one size) as a video file: MP4 (MPEG-4 part 2) or WebM (VP9)."""
    suffix = ".webm" if codec == WEBM_CODEC else ".mp4"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"clip{suffix}"
        writer: cv2.VideoWriter | None = None
        for frame in frames:
            if writer is None:
                size = (frame.shape[1], frame.shape[0])
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*codec), fps, size)
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        if writer is None:  # no frames: a container with nothing in it
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*codec), fps, (64, 48))
        writer.release()
        return path.read_bytes()


def gif_bytes(frames: Sequence[Rgb] | Iterator[Rgb], *, frame_ms: int = 80) -> bytes:
    """``frames`` as an animated GIF that loops."""
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0
    )
    return buffer.getvalue()


def truncated(data: bytes, keep: float = 0.4) -> bytes:
    """The first ``keep`` of ``data``: a download cut short (an MP4's index is at its end)."""
    return data[: int(len(data) * keep)]
