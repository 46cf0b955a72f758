"""Small sets of named numpy arrays in one .npz file (a codebook, a vocabulary)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer.errors import IndexCorruptError

Array = npt.NDArray[Any]


def write_arrays(path: Path, arrays: dict[str, Array]) -> None:
    """Write ``arrays`` to ``path``. The caller makes the write atomic."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    path.write_bytes(buffer.getvalue())


def read_arrays(path: Path, what: str) -> dict[str, Array]:
    """Every array of the file at ``path`` (``what`` names it in errors).

    Raises:
        IndexCorruptError: the file is missing, truncated or not an npz file.
    """
    try:
        # Read whole first: np.load on a damaged file would leave it open.
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise IndexCorruptError(f"{what} {path.name} is unreadable: {error}") from error
