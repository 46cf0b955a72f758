"""Making writes durable: what a crash or a power cut must not undo.

A derived file is written under a temporary name, fsynced, renamed into place,
and then its folder is fsynced, so that the rename itself survives; only then
may a commit point name it.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk."""
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Flush a folder's entries (a rename, a new file) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
