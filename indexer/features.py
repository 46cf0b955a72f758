"""KAZE local features, and the few other OpenCV calls the engine needs.

This is the only module that imports OpenCV: extraction, the mirror trick,
homography estimation and the reading of video frames (``VideoCapture``, whose
wheel bundles FFmpeg) all live here, so the rest of the engine deals in numpy
arrays only. What to read of a video, and its limits, are
:mod:`indexer.moving`'s.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import cv2
import numpy as np
import numpy.typing as npt

from indexer.errors import ImageError, NoFeaturesError

DESCRIPTOR_SIZE = 64
# KAZE descriptors are unit-length; their components stay below ~0.67 in practice
# (99.9th percentile 0.51 on real photos), so this scale keeps int8 storage within
# one quantisation step of ~0.005 while clipping almost nothing.
DESCRIPTOR_INT8_SCALE = 200.0
# Fewer than this many keypoints cannot support a homography with a safe margin.
MIN_KEYPOINTS = 8

FloatArray = npt.NDArray[np.float32]
Int8Array = npt.NDArray[np.int8]


@dataclass(frozen=True, slots=True)
class KazeParams:
    """How KAZE is run. Stored with the index: queries must use the same values."""

    threshold: float = 0.001
    octaves: int = 4
    octave_layers: int = 4
    enough_keypoints: int = 300  # below this, detect again with a lower threshold
    retries: int = 2
    retry_divisor: float = 4.0
    # Keep keypoints spread over grid x grid cells (0: simply the strongest).
    grid: int = 0


@dataclass(frozen=True, slots=True)
class LocalFeatures:
    """Keypoints and descriptors of one working image, strongest first."""

    points: FloatArray  # (n, 2) x, y in working-image pixels
    descriptors: FloatArray  # (n, 64) float32, unit length
    width: int  # working-image size the points refer to
    height: int

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def keep(self, count: int, *, grid: int = 0) -> LocalFeatures:
        """At most ``count`` keypoints, strongest first: simply the strongest, or
        with ``grid``, spread over grid x grid cells (see :func:`spread_selection`)."""
        if len(self) <= count:
            return self
        if grid:
            chosen = spread_selection(self.points, self.width, self.height, count, grid)
        else:
            chosen = np.arange(count)
        return LocalFeatures(
            points=self.points[chosen],
            descriptors=self.descriptors[chosen],
            width=self.width,
            height=self.height,
        )

    def mirrored(self) -> LocalFeatures:
        """The features the horizontally mirrored image would give, without re-extracting.

        KAZE's M-SURF descriptor is a 4x4 grid of (dx, dy, |dx|, |dy|) cells laid
        out along the keypoint's orientation. Mirroring the image maps the
        orientation to pi - theta, which reverses the grid across the orientation
        axis and negates dx; measured on real photos, 94% of mirrored descriptors
        find their true counterpart as nearest neighbour (12% without the trick).
        """
        cells = self.descriptors.reshape(-1, 4, 4, 4)[:, :, ::-1, :].copy()
        cells[..., 0] *= -1.0
        points = self.points.copy()
        points[:, 0] = (self.width - 1) - points[:, 0]
        return LocalFeatures(
            points=points,
            descriptors=cells.reshape(-1, DESCRIPTOR_SIZE),
            width=self.width,
            height=self.height,
        )


def extract_features(
    gray: npt.NDArray[np.uint8], *, max_keypoints: int, params: KazeParams = KazeParams()
) -> LocalFeatures:
    """Detect KAZE keypoints on ``gray`` and keep the ``max_keypoints`` strongest.

    Low-contrast photos (fog, night, flat studio shots) give few keypoints at
    the default threshold, too few to verify a match after a crop; for those,
    detection is repeated with a lower threshold (``params.retries`` times).

    Raises:
        NoFeaturesError: fewer than ``MIN_KEYPOINTS`` keypoints were found
            (a flat colour, a tiny icon).
    """
    if gray.ndim != 2 or gray.dtype != np.uint8 or min(gray.shape, default=0) < 1:
        raise ImageError(
            f"features need a 2-D uint8 grey image, got {gray.dtype} with shape {gray.shape}"
        )
    threshold = params.threshold
    for attempt in range(params.retries + 1):
        # cv2.KAZE.create is cv2.KAZE_create under the name OpenCV's type stubs know.
        kaze = cv2.KAZE.create(
            extended=False,
            upright=False,
            threshold=threshold,
            nOctaves=params.octaves,
            nOctaveLayers=params.octave_layers,
        )
        keypoints, descriptors = kaze.detectAndCompute(gray, None)
        found = 0 if descriptors is None else len(keypoints)
        if found >= params.enough_keypoints or attempt == params.retries:
            break
        threshold /= params.retry_divisor
    if descriptors is None or found < MIN_KEYPOINTS:
        raise NoFeaturesError(f"only {found} keypoints found (need {MIN_KEYPOINTS})")
    responses = np.fromiter((k.response for k in keypoints), np.float32, len(keypoints))
    order = np.argsort(-responses, kind="stable")
    height, width = gray.shape[:2]
    every = LocalFeatures(
        points=np.array([keypoints[i].pt for i in order], dtype=np.float32).reshape(-1, 2),
        descriptors=np.ascontiguousarray(descriptors[order], dtype=np.float32),
        width=int(width),
        height=int(height),
    )
    return every.keep(max_keypoints, grid=params.grid)


def spread_selection(
    points: FloatArray, width: int, height: int, count: int, grid: int
) -> npt.NDArray[np.intp]:
    """Which of ``points`` (strongest first) to keep: ``count`` of them, in order.

    Each of the grid x grid cells first gets up to its share of ``count``, its
    strongest points; what is left goes to the strongest of the rest.  Kept
    whole, the strongest points of a photo gather on its most textured object,
    and a copy with that object cropped away or covered shares none of them.
    """
    columns = np.minimum((points[:, 0] * grid // width).astype(np.intp), grid - 1)
    rows = np.minimum((points[:, 1] * grid // height).astype(np.intp), grid - 1)
    cells = rows * grid + columns
    # The rank of each point among the points of its cell, strongest first.
    by_cell = np.argsort(cells, kind="stable")
    sorted_cells = cells[by_cell]
    starts = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank_in_cell = np.empty(len(points), dtype=np.intp)
    rank_in_cell[by_cell] = np.arange(len(points)) - starts
    share = -(-count // (grid * grid))
    chosen = rank_in_cell < share
    picked = int(chosen.sum())
    if picked > count:
        chosen[np.flatnonzero(chosen)[count:]] = False
    elif picked < count:
        chosen[np.flatnonzero(~chosen)[: count - picked]] = True
    return np.flatnonzero(chosen)


def quantize_descriptors(descriptors: FloatArray) -> Int8Array:
    """Store descriptors in one byte per component (64 bytes each instead of 256)."""
    scaled = np.rint(descriptors * DESCRIPTOR_INT8_SCALE)
    return np.asarray(np.clip(scaled, -127, 127), dtype=np.int8)


def dequantize_descriptors(quantized: Int8Array) -> FloatArray:
    """Back to unit-length float32, the form matching works on."""
    descriptors = quantized.astype(np.float32)
    norms = np.linalg.norm(descriptors, axis=1, keepdims=True)
    return np.asarray(descriptors / np.maximum(norms, 1e-6), dtype=np.float32)


def find_homography(
    source: FloatArray, target: FloatArray, *, reprojection_error: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]] | None:
    """Robustly fit a homography mapping ``source`` points onto ``target`` points.

    Returns the 3x3 matrix and the inlier mask, or ``None`` when no model fits
    (too few or degenerate points): for verification "no homography" is an
    ordinary answer, not an error.
    """
    if len(source) < 4:
        return None
    matrix, mask = cv2.findHomography(
        source, target, cv2.USAC_MAGSAC, reprojection_error, maxIters=2000, confidence=0.995
    )
    if matrix is None or mask is None:
        return None
    return matrix.astype(np.float64), mask.ravel().astype(bool)


def connected_groups(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int, int, int, int]]:
    """Each 4-connected group of true cells of ``mask`` as (top, left, bottom,
    right, cells), bottom and right exclusive, in OpenCV's labelling order."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    groups = []
    for label in range(1, count):  # label 0 is the background
        left, top, width, height, cells = (int(v) for v in stats[label])
        groups.append((top, left, top + height, left + width, cells))
    return groups


def limit_threads() -> None:
    """Keep OpenCV single-threaded: parallelism comes from our process pool."""
    cv2.setNumThreads(1)


def pack_features(features: LocalFeatures) -> bytes:
    """Compact storage: int8 descriptors, then float16 x, y: 68 bytes a keypoint."""
    return quantize_descriptors(features.descriptors).tobytes() + features.points.astype(
        np.float16
    ).tobytes()


def unpack_features(blob: bytes, *, count: int, width: int, height: int) -> LocalFeatures:
    """Inverse of :func:`pack_features` (descriptors come back unit-length float32).

    Raises:
        ValueError: the blob does not hold ``count`` keypoints.
    """
    descriptor_bytes = count * DESCRIPTOR_SIZE
    if len(blob) != descriptor_bytes + count * 4:
        raise ValueError(f"feature blob of {len(blob)} bytes does not hold {count} keypoints")
    quantized = np.frombuffer(blob, dtype=np.int8, count=descriptor_bytes).reshape(count, -1)
    points = np.frombuffer(blob, dtype=np.float16, offset=descriptor_bytes).reshape(count, 2)
    return LocalFeatures(
        points=points.astype(np.float32),
        descriptors=dequantize_descriptors(quantized),
        width=width,
        height=height,
    )


@dataclass(frozen=True, slots=True)
class VideoHeader:
    """What a video's container says of it, before any frame is decoded."""

    width: int
    height: int
    frame_count: int  # 0 or less: the container does not say
    fps: float


class VideoFrames:
    """The frames of a video held in memory, decoded one at a time on request.

    Use as a context manager; :attr:`opened` is false when FFmpeg cannot read
    the data (not a video, or damaged beyond its header).
    """

    def __init__(self, data: bytes) -> None:
        # OpenCV 4.14 reads a Python binary stream directly (no temporary file);
        # its type stubs only know the IStreamReader form of that overload. The
        # binding keeps no reference to the stream: this one must outlive the
        # capture, or FFmpeg reads freed memory (a segfault on release).
        self._stream = io.BytesIO(data)
        self._capture = cv2.VideoCapture(
            self._stream, cv2.CAP_FFMPEG, []  # type: ignore[call-overload]
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._capture.release()

    @property
    def opened(self) -> bool:
        return bool(self._capture.isOpened())

    def header(self) -> VideoHeader:
        capture = self._capture
        return VideoHeader(
            width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            frame_count=int(max(-1.0, min(capture.get(cv2.CAP_PROP_FRAME_COUNT), 2.0**31))),
            fps=float(capture.get(cv2.CAP_PROP_FPS)),
        )

    def gray_frame(self, index: int, size: tuple[int, int]) -> npt.NDArray[np.uint8] | None:
        """Frame ``index`` as grey pixels of ``size`` (width, height), or ``None`` when
        it cannot be decoded (past the real end, or damaged)."""
        frame = self._frame(index)
        if frame is None:
            return None
        gray = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if (gray.shape[1], gray.shape[0]) != size:
            enlarging = size[0] > gray.shape[1]
            gray = cv2.resize(
                gray, size, interpolation=cv2.INTER_CUBIC if enlarging else cv2.INTER_AREA
            )
        return np.ascontiguousarray(gray, dtype=np.uint8)

    def rgb_frame(self, index: int, max_side: int) -> npt.NDArray[np.uint8] | None:
        """Frame ``index`` as RGB pixels (height x width x 3) for showing to people, its
        longest side shrunk to ``max_side`` if it is longer (never enlarged), or ``None``
        when it cannot be decoded (past the real end, or damaged)."""
        frame = self._frame(index)
        if frame is None:
            return None
        rgb = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB if frame.ndim == 2 else cv2.COLOR_BGR2RGB)
        height, width = rgb.shape[:2]
        if max(width, height) > max_side:
            scale = max_side / max(width, height)
            size = (max(1, int(width * scale)), max(1, int(height * scale)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(rgb, dtype=np.uint8)

    def _frame(self, index: int) -> npt.NDArray[np.uint8] | None:
        """Frame ``index`` as OpenCV decodes it (BGR, or grey), or ``None``."""
        self._capture.set(cv2.CAP_PROP_POS_FRAMES, float(index))
        read, frame = self._capture.read()
        if not read or frame is None or frame.size == 0:
            return None
        return np.asarray(frame, dtype=np.uint8)
