"""The exception tree of the engine.

Every error the engine raises on purpose derives from :class:`IndexerError` and
carries a short sentence that can be shown to a user as it is (``user_message``):
its class's, or one written for this case where the engine has advice to give
(a HEIC photo: "send it as JPEG"). The exception's ``str()`` may add detail for
logs (paths, sizes), which users never see.

    IndexerError
    ├── ImageError                 the given image cannot be used
    │   ├── EmptyImageError        zero bytes
    │   ├── UnsupportedFormatError not an image, or a format we cannot decode
    │   ├── CorruptImageError      an image format, but the data is broken
    │   ├── ImageTooLargeError     too many bytes or pixels (decompression bombs)
    │   ├── ImageTooSmallError     too few pixels to describe
    │   └── NoFeaturesError        decodes fine, but has no keypoints (flat colour, icon)
    ├── IndexStateError            the index folder cannot be used
    │   ├── IndexNotFoundError     no index at that path
    │   ├── IndexIncompatibleError made by an incompatible version or with other settings
    │   └── IndexCorruptError      a derived file fails its checksum (it can be rebuilt)
    ├── CatalogError               the SQLite catalog failed
    │   └── StorageFullError       the disk is full (ENOSPC)
    ├── NotFoundError              no such image (or not visible from this scope)
    ├── SourceError                a photo folder or file cannot be read
    │   └── ExportError            not a Telegram Desktop export, or a malformed one
    └── ClusterError               a Dask build's cluster cannot be reached or cannot do the work
"""

from __future__ import annotations


class IndexerError(Exception):
    """Base class of every error the engine raises on purpose."""

    user_message = "Something went wrong while handling this image."

    def __init__(self, detail: str | None = None, *, user_message: str | None = None) -> None:
        """``detail`` is for logs; ``user_message`` replaces the class's sentence for users."""
        if user_message is not None:
            self.user_message = user_message
        super().__init__(detail or self.user_message)


class ImageError(IndexerError):
    user_message = "This file cannot be used as an image."


class EmptyImageError(ImageError):
    user_message = "The file is empty."


class UnsupportedFormatError(ImageError):
    user_message = "This is not an image in a format I can read (JPEG, PNG, WebP, BMP, TIFF, GIF)."


class CorruptImageError(ImageError):
    user_message = "The image is damaged or incomplete and cannot be decoded."


class ImageTooLargeError(ImageError):
    user_message = "The image is too large to process."


class ImageTooSmallError(ImageError):
    user_message = "The image is too small to compare with anything."


class NoFeaturesError(ImageError):
    user_message = "The image has no detail to match (a flat colour or a tiny icon)."


class IndexStateError(IndexerError):
    user_message = "The photo index cannot be used."


class IndexNotFoundError(IndexStateError):
    user_message = "There is no photo index at that path yet."


class IndexIncompatibleError(IndexStateError):
    user_message = "The photo index was made by an incompatible version; rebuild it."


class IndexCorruptError(IndexStateError):
    user_message = "A file of the photo index is damaged; it will be rebuilt from the catalog."


class CatalogError(IndexerError):
    user_message = "The photo catalog could not be read or written."


class StorageFullError(CatalogError):
    user_message = "The disk is full, so nothing was saved."


class NotFoundError(IndexerError):
    user_message = "No such image in the collection."


class SourceError(IndexerError):
    user_message = "The photo folder or file cannot be read."


class ExportError(SourceError):
    user_message = "The folder is not a Telegram Desktop chat export (JSON) that can be read."


class ClusterError(IndexerError):
    user_message = "The Dask cluster could not be reached or could not do the work."
