"""The CPU-heavy steps that run in worker processes: decode, extract, hash.

Everything here is a pure function of its arguments, picklable both ways, so the
same code runs inline (the CLI's single query) or in a process pool (the build,
the bot).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from indexer.errors import IndexerError
from indexer.features import LocalFeatures, extract_features
from indexer.framing import find_inner_photos
from indexer.images import WorkingImage, load_working_image, read_image_file
from indexer.regions import Region
from indexer.settings import EngineSettings


@dataclass(frozen=True, slots=True)
class Analysis:
    """What the engine needs to know about one image."""

    features: LocalFeatures
    content_hash: str
    width: int  # original size, after EXIF orientation
    height: int
    file_size: int
    format: str
    # Queries only: where photos shown inside this image lie (a screenshot, a
    # meme's caption bars, a page, a collage), the likeliest first, to be
    # searched on their own if the whole image fails.
    frames: tuple[Region, ...] = ()


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

    Raises:
        ImageError: the bytes are not a usable image (each subclass says why).
    """
    image = _working_image(data, settings)
    features = extract_features(
        image.gray,
        max_keypoints=settings.query_keypoints if for_query else settings.max_keypoints,
        params=settings.query_kaze if for_query else settings.kaze,
    )
    return Analysis(
        features=features,
        content_hash=hashlib.sha256(data).hexdigest(),
        width=image.width,
        height=image.height,
        file_size=len(data),
        format=image.format,
        frames=tuple(find_inner_photos(image.gray)) if for_query else (),
    )


def analyze_framed(source: bytes | Path, frame: Region, settings: EngineSettings) -> LocalFeatures:
    """Query features of the photo inside ``frame`` (see :attr:`Analysis.frames`).

    Decoded again from the source rather than cut from the working image: in a
    tall screenshot the photo may be only 150 px wide at working size.

    Raises:
        SourceError: the file cannot be read.
        ImageError: it is not a usable image, or the framed part is too small.
    """
    if isinstance(source, Path):
        source, _ = read_image_file(source, settings.max_file_bytes)
    image = _working_image(source, settings, crop=frame)
    return extract_features(
        image.gray, max_keypoints=settings.query_keypoints, params=settings.query_kaze
    )


def _working_image(
    data: bytes, settings: EngineSettings, *, crop: Region | None = None
) -> WorkingImage:
    """The working image the settings ask for: one place for the decoding limits."""
    return load_working_image(
        data,
        working_side=settings.working_side,
        min_side=settings.min_side,
        max_bytes=settings.max_file_bytes,
        max_pixels=settings.max_pixels,
        crop=crop,
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
