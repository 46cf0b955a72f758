"""The photos added through the service, kept under the index folder.

Each original is written once, named by its content hash (never by user
input), so two chats adding the same bytes share one file; the catalog's rows
say who still refers to it.
"""

from __future__ import annotations

import os
from pathlib import Path

from indexer.analysis import Analysis
from indexer.catalog import Catalog, ImageRecord
from indexer.errors import StorageFullError

ORIGINALS_DIR = "originals"

_EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
    "GIF": "gif",
    "MP4": "mp4",
    "MOV": "mov",
    "WEBM": "webm",
}


class OriginalStore:
    """The files under ``index_dir/originals``; ``catalog`` says which are referred to."""

    def __init__(self, index_dir: Path, catalog: Catalog) -> None:
        self.index_dir = index_dir
        self.catalog = catalog

    def locate(self, record: ImageRecord) -> Path:
        """The file of ``record``: an original under the index folder, or an indexed path."""
        path = Path(record.path)
        return path if path.is_absolute() else self.index_dir / path

    def store(self, data: bytes, analysis: Analysis) -> str:
        """Write ``data`` durably; return its path relative to the index folder.

        Raises:
            StorageFullError: the disk is full (nothing is left behind).
        """
        extension = _EXTENSIONS.get(analysis.format, "img")
        digest = analysis.content_hash
        relative = f"{ORIGINALS_DIR}/{digest[:2]}/{digest}.{extension}"
        target = self.index_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        try:
            with temporary.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(target)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            if error.errno == 28:  # ENOSPC
                raise StorageFullError(f"cannot store the photo: {error}") from error
            raise
        return relative

    async def release(self, relative: str) -> None:
        """Delete the original at ``relative`` unless a catalog row still refers to it.

        The file is named by content: another chat's row may share it. Paths
        outside the originals (photos indexed where they lie) are never touched.
        """
        if relative.startswith(f"{ORIGINALS_DIR}/") and not await self.catalog.find_by_path(
            relative
        ):
            (self.index_dir / relative).unlink(missing_ok=True)

    async def remove_orphans(self) -> None:
        """Remove the files no row refers to.

        An add killed between writing the file and committing its row leaves a
        file nobody refers to (or a temporary one): removed at start-up, so an
        add is either whole or absent.
        """
        originals = self.index_dir / ORIGINALS_DIR
        if not originals.exists():
            return
        referenced = await self.catalog.paths_under(f"{ORIGINALS_DIR}/")
        for leftover in originals.glob("*/*"):
            relative = f"{ORIGINALS_DIR}/{leftover.parent.name}/{leftover.name}"
            if leftover.is_file() and relative not in referenced:
                leftover.unlink(missing_ok=True)
