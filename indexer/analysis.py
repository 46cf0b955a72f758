"""The CPU-heavy steps that run in worker processes: decode, extract, hash.

Everything here is a pure function of its arguments, picklable both ways, so the
same code runs inline (the CLI's single query) or in a process pool (the build,
the bot).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from indexer.errors import (
    CorruptImageError,
    IndexerError,
    NoFeaturesError,
    UnsupportedFormatError,
)
from indexer.features import LocalFeatures, extract_features
from indexer.framing import find_frame_marks, find_framed_photo, find_inner_photos
from indexer.images import CopyMaking, WorkingImage, load_working_image, read_image_file
from indexer.moving import (
    MovingPicture,
    frame_indices,
    moving_format,
    open_moving,
    working_frames,
)
from indexer.regions import Region
from indexer.settings import EngineSettings


@dataclass(frozen=True, slots=True)
class VideoFrame:
    """One described frame of a moving picture."""

    seconds: float  # from the start
    features: LocalFeatures


@dataclass(frozen=True, slots=True)
class QuerySource:
    """How a query's picture is stored: its size before it was brought to working
    size and, for a JPEG, its luminance quantization table. A closer look shows a
    candidate's part the same way (see :func:`analyze_framed`)."""

    width: int
    height: int
    luma_table: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Analysis:
    """What the engine needs to know about one image (or one moving picture)."""

    features: LocalFeatures  # a moving picture's: its first described frame's
    content_hash: str
    width: int  # original size, after EXIF orientation
    height: int
    file_size: int
    format: str
    # Queries only: where photos shown inside this image lie (a screenshot, a
    # meme's caption bars, a page, a collage), the likeliest first, to be
    # searched on their own if the whole image fails.
    frames: tuple[Region, ...] = ()
    # Queries only: which keypoints of ``features`` are marks on the frame around
    # a framed photo (a status bar's clock, an icon). Two phones' frames alike
    # match as readily as two copies of a photo: a verdict must not rest on them.
    frame_marks: npt.NDArray[np.bool_] | None = None
    # A moving picture only: its frames described so far, in time order (the
    # first is ``features``), and the indices of the frames still to describe
    # (:func:`analyze_video_frame`): a query describes the next only while
    # nothing verifies.
    video_frames: tuple[VideoFrame, ...] = ()
    frames_left: tuple[int, ...] = ()
    luma_table: tuple[int, ...] | None = None  # a JPEG's (see QuerySource)

    @property
    def moving(self) -> bool:
        return bool(self.video_frames)

    @property
    def source(self) -> QuerySource:
        return QuerySource(self.width, self.height, self.luma_table)


@dataclass(frozen=True, slots=True)
class FileAnalysis:
    """The outcome for one file of a photo folder: an analysis, or why there is none."""

    path: str
    file_size: int
    file_mtime_ns: int
    analysis: Analysis | None
    error: str | None


def analyze_bytes(data: bytes, settings: EngineSettings, *, for_query: bool = False) -> Analysis:
    """Decode ``data`` and extract its features.

    A moving picture is described by several frames (see :mod:`indexer.moving`); for a
    query, only the first of them is described here, the rest are left to
    :func:`analyze_video_frame`.

    Raises:
        ImageError: the bytes are not a usable image (each subclass says why).
    """
    moving = moving_format(data)
    if moving is not None:
        return _analyze_moving(open_moving(data, moving, settings.video_limits), settings,
                               for_query=for_query)
    image = _working_image(data, settings)
    features = extract_features(
        image.gray,
        max_keypoints=settings.query_keypoints if for_query else settings.max_keypoints,
        params=settings.query_kaze if for_query else settings.kaze,
    )
    framed = find_framed_photo(image.gray) if for_query else None
    return Analysis(
        features=features,
        content_hash=hashlib.sha256(data).hexdigest(),
        width=image.width,
        height=image.height,
        file_size=len(data),
        format=image.format,
        frames=tuple(find_inner_photos(image.gray, framed)) if for_query else (),
        frame_marks=find_frame_marks(image.gray, features.points, framed) if for_query else None,
        luma_table=image.luma_table if for_query else None,
    )


def _analyze_moving(
    picture: MovingPicture, settings: EngineSettings, *, for_query: bool
) -> Analysis:
    """Describe a moving picture: for the index up to ``video_frames`` distinct frames (out
    of twice as many looked at); for a query, the first frame that can be described, with
    the rest of ``query_video_frames`` left for later."""
    if for_query:
        indices = frame_indices(picture, settings.query_video_frames)
    else:
        indices = frame_indices(picture, 2 * settings.video_frames)
    described: list[VideoFrame] = []
    tried = 0
    for index, gray in working_frames(
        picture,
        indices,
        working_side=settings.working_side,
        min_side=settings.min_side,
        limits=settings.video_limits,
        distinct=not for_query,
    ):
        tried = indices.index(index) + 1
        try:
            described.append(
                VideoFrame(picture.time_of(index), _frame_features(gray, settings, for_query))
            )
        except NoFeaturesError:
            continue  # a black or flat frame (a fade): the next may describe the picture
        if len(described) == (1 if for_query else settings.video_frames):
            break
    if not described:
        raise NoFeaturesError(
            f"none of {len(indices)} frames of the {picture.format} has enough keypoints",
            user_message="No frame of this video shows enough detail to search for.",
        )
    return Analysis(
        features=described[0].features,
        content_hash=hashlib.sha256(picture.data).hexdigest(),
        width=picture.width,
        height=picture.height,
        file_size=len(picture.data),
        format=picture.format,
        video_frames=tuple(described),
        frames_left=tuple(indices[tried:]) if for_query else (),
    )


def analyze_video_frame(source: bytes | Path, index: int, settings: EngineSettings) -> VideoFrame:
    """Query features of frame ``index`` of a moving picture (see :attr:`Analysis.frames_left`).

    Raises:
        SourceError: the file cannot be read.
        ImageError: it is not a usable moving picture, or that frame cannot be decoded or
            described.
    """
    if isinstance(source, Path):
        source, _ = read_image_file(source, settings.max_file_bytes)
    moving = moving_format(source)
    if moving is None:
        raise UnsupportedFormatError("the source is not a moving picture any more")
    picture = open_moving(source, moving, settings.video_limits)
    for _, gray in working_frames(
        picture,
        [index],
        working_side=settings.working_side,
        min_side=settings.min_side,
        limits=settings.video_limits,
    ):
        return VideoFrame(picture.time_of(index), _frame_features(gray, settings, for_query=True))
    raise CorruptImageError(f"frame {index} of the {picture.format} cannot be decoded")


def _frame_features(
    gray: npt.NDArray[np.uint8], settings: EngineSettings, for_query: bool
) -> LocalFeatures:
    return extract_features(
        gray,
        max_keypoints=settings.query_keypoints if for_query else settings.max_keypoints,
        params=settings.query_kaze if for_query else settings.kaze,
    )


def analyze_framed(
    source: bytes | Path,
    frame: Region,
    settings: EngineSettings,
    *,
    made_as: CopyMaking | None = None,
) -> LocalFeatures:
    """Query features of the photo inside ``frame`` (see :attr:`Analysis.frames`),
    or of the part of a candidate a query shows, made ``made_as`` the query was.

    Decoded again from the source rather than cut from the working image: in a
    tall screenshot the photo may be only 150 px wide at working size.

    Raises:
        SourceError: the file cannot be read.
        ImageError: it is not a usable image, or the framed part is too small.
    """
    if isinstance(source, Path):
        source, _ = read_image_file(source, settings.max_file_bytes)
    image = _working_image(source, settings, crop=frame, made_as=made_as)
    return extract_features(
        image.gray, max_keypoints=settings.query_keypoints, params=settings.query_kaze
    )


def _working_image(
    data: bytes,
    settings: EngineSettings,
    *,
    crop: Region | None = None,
    made_as: CopyMaking | None = None,
) -> WorkingImage:
    """The working image the settings ask for: one place for the decoding limits."""
    return load_working_image(
        data,
        working_side=settings.working_side,
        min_side=settings.min_side,
        max_bytes=settings.max_file_bytes,
        max_pixels=settings.max_pixels,
        crop=crop,
        made_as=made_as,
    )


def analyze_path(path: Path, settings: EngineSettings, *, for_query: bool = False) -> Analysis:
    """Read and analyse a file.

    Raises:
        SourceError: the file cannot be read.
        ImageError: it is not a usable image.
    """
    data, _ = read_image_file(path, settings.max_file_bytes)
    return analyze_bytes(data, settings, for_query=for_query)


@dataclass(frozen=True, slots=True)
class ReadFile:
    """The bytes of one file of a photo folder, with its size and modification time as read."""

    path: str
    file_size: int
    file_mtime_ns: int
    data: bytes


def analyze_folder_file(path: str, settings: EngineSettings) -> FileAnalysis:
    """Analyse one file of a photo folder; failures are returned, not raised.

    The size and modification time recorded are those of the file as read, so a
    file that changes during the build is extracted again on the next run, and
    one that failed is not retried until it changes.
    """
    read = read_folder_file(path, settings.max_file_bytes)
    if isinstance(read, FileAnalysis):
        return read
    return analyze_read_file(read, settings)


def read_folder_file(path: str, max_bytes: int) -> ReadFile | FileAnalysis:
    """The bytes of one file of a photo folder, or the failure to read them."""
    try:
        status = Path(path).stat()
    except OSError as error:
        return FileAnalysis(path, 0, 0, None, f"cannot read: {error.strerror or error}")
    try:
        data, status = read_image_file(Path(path), max_bytes)
    except IndexerError as error:
        return FileAnalysis(path, status.st_size, status.st_mtime_ns, None, str(error))
    return ReadFile(path, status.st_size, status.st_mtime_ns, data)


def analyze_read_file(read: ReadFile, settings: EngineSettings) -> FileAnalysis:
    """Analyse the bytes read from one file of a photo folder; failures are returned."""
    try:
        analysis = analyze_bytes(read.data, settings)
    except IndexerError as error:
        return FileAnalysis(read.path, read.file_size, read.file_mtime_ns, None, str(error))
    return FileAnalysis(read.path, read.file_size, read.file_mtime_ns, analysis, None)
