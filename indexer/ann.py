"""Candidate search: Annoy generations on disk, plus an exact buffer of fresh vectors.

This is the only module that imports annoy.

Annoy cannot grow after ``build()`` (spotify/annoy#344, #677), so the index on
disk is a *generation*: a folder holding the Annoy file, the image ids and
scopes aligned with Annoy's dense item numbers (Annoy allocates max(id)+1 slots,
so we never hand it catalog ids), the codebook that made the vectors, and a
manifest with checksums. A generation is written under a temporary name,
fsynced, renamed, and only then named in ``CURRENT`` by an atomic
``os.replace``: a reader sees the old generation or the new one, never half of
one. Images added since the generation was built live in :class:`ExactVectors`
and are searched exhaustively beside Annoy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from annoy import AnnoyIndex

from indexer.durable import fsync_directory, fsync_file
from indexer.encoding import Codebook
from indexer.errors import IndexCorruptError, IndexIncompatibleError
from indexer.mapped import advise_random_reads

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]

# 2: checksums per chunk of each file (format 1 had one digest a file, still read).
GENERATION_FORMAT = 2
_READABLE_FORMATS = frozenset({1, 2})
# Checksums are kept per chunk so that the check at start-up runs on every core:
# a 1M-image Annoy file is 1.4 GB, which one sha256 stream takes 1.6 s to read.
CHECKSUM_CHUNK_BYTES = 64 * 1024 * 1024
CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
ANNOY_FILE = "vectors.annoy"
IDS_FILE = "ids.npy"
SCOPES_FILE = "scopes.npy"
CODEBOOK_FILE = "codebook.npz"
_TEMPORARY_PREFIX = ".building-"
_TREE_SEED = 1
_ABANDONED_AFTER_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class Candidates:
    """Nearest images to a query vector: catalog ids, scopes and cosine similarities, best first."""

    ids: IdArray
    scopes: IdArray
    similarities: FloatArray

    @classmethod
    def empty(cls) -> Candidates:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))


class Generation:
    """One immutable, memory-mapped generation of the index."""

    def __init__(
        self, path: Path, manifest: dict[str, Any], codebook: Codebook, *, annoy_checked: bool
    ) -> None:
        self.path = path
        self.name = path.name
        self.manifest = manifest
        self.codebook = codebook
        self.dimensions = int(manifest["dimensions"])
        self.max_image_id = int(manifest["max_image_id"])
        self.ids: IdArray = np.load(path / IDS_FILE, mmap_mode="r", allow_pickle=False)
        self.scopes: IdArray = np.load(path / SCOPES_FILE, mmap_mode="r", allow_pickle=False)
        self._annoy = AnnoyIndex(self.dimensions, "angular")
        if len(self.ids):
            # Annoy mmaps the file: pages are shared between processes and loaded on
            # demand, and a search reads its tree nodes at random.
            self._annoy.load(str(path / ANNOY_FILE), prefault=False)
            advise_random_reads(self.mapped_files())
        # Whether the Annoy file matches its checksums: None until checked
        # (check_annoy_file). Walking damaged trees can crash the process, so no
        # search runs before; reading an item's vector stays within the file.
        self._annoy_intact: bool | None = True if annoy_checked else None
        self._check_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    def check_annoy_file(self) -> bool:
        """Whether the Annoy file matches the manifest's checksums, hashing it the first
        time (blocking: at a million images, 1.5 GB read). A damaged one is never searched.

        Hashed after the generation is opened rather than before: it was 1.97 s of a
        2.19 s start-up at a million images, from a cold page cache.
        """
        if self._annoy_intact is None:
            with self._check_lock:
                if self._annoy_intact is None:
                    expected = {ANNOY_FILE: self.manifest["files"][ANNOY_FILE]}
                    try:
                        self._annoy_intact = not _failed_checksums(self.path, expected)
                    except OSError:  # unreadable is as good as damaged
                        self._annoy_intact = False
        return self._annoy_intact

    def mapped_files(self) -> list[Path]:
        """The files a search reads at random (Annoy's trees)."""
        return [self.path / ANNOY_FILE] if len(self.ids) else []

    def search(self, vector: FloatArray, count: int, search_k: int) -> Candidates:
        """The ``count`` approximate nearest images to ``vector`` (none when the
        Annoy file is damaged; the first search waits for its check)."""
        if not len(self.ids) or count <= 0 or not self.check_annoy_file():
            return Candidates.empty()
        items, distances = self._annoy.get_nns_by_vector(
            vector.tolist(), count, search_k=search_k, include_distances=True
        )
        # Annoy's angular distance is sqrt(2 - 2 cos) on unit vectors.
        distance = np.asarray(distances, dtype=np.float32)
        positions = np.asarray(items, dtype=np.int64)
        return Candidates(
            ids=np.asarray(self.ids[positions], dtype=np.int64),
            scopes=np.asarray(self.scopes[positions], dtype=np.int64),
            similarities=1.0 - distance * distance / 2.0,
        )

    def vectors(self, image_ids: Sequence[int]) -> tuple[IdArray, FloatArray]:
        """The stored vectors of those of ``image_ids`` this generation holds: their
        ids and one row each (none from a damaged Annoy file)."""
        wanted = np.asarray(image_ids, dtype=np.int64)
        if self._annoy_intact is False:
            wanted = wanted[:0]
        positions = np.searchsorted(self.ids, wanted).clip(max=max(len(self.ids) - 1, 0))
        held = (
            self.ids[positions] == wanted if len(self.ids) else np.zeros(len(wanted), np.bool_)
        )
        rows = [self._annoy.get_item_vector(int(p)) for p in positions[held]]
        matrix = np.asarray(rows, dtype=np.float32).reshape(len(rows), self.dimensions)
        # Stored vectors are unit length. Until the file's check has run, a damaged one
        # may hold any bytes: a row whose length is not finite is no vector.
        with np.errstate(over="ignore", invalid="ignore"):
            sane = np.isfinite(np.linalg.norm(matrix, axis=1))
        return wanted[held][sane], matrix[sane]

    def unload(self) -> None:
        self._annoy.unload()


class ExactVectors:
    """Vectors searched exhaustively: the images added since the generation was built.

    Searches run on worker threads while adds happen on the event loop, so the
    arrays are never changed under a reader: an add writes past the visible
    length and then publishes the new length; growing or discarding builds new
    arrays and swaps the reference.
    """

    def __init__(self, dimensions: int) -> None:
        self.dimensions = dimensions
        self._ids: IdArray = np.empty(0, np.int64)
        self._scopes: IdArray = np.empty(0, np.int64)
        self._matrix: FloatArray = np.empty((0, dimensions), np.float32)
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def add(self, image_id: int, scope: int, vector: FloatArray) -> None:
        if self._length == len(self._ids):
            capacity = max(16, 2 * len(self._ids))
            ids, scopes = np.zeros(capacity, np.int64), np.zeros(capacity, np.int64)
            matrix = np.zeros((capacity, self.dimensions), np.float32)
            ids[: self._length] = self._ids[: self._length]
            scopes[: self._length] = self._scopes[: self._length]
            matrix[: self._length] = self._matrix[: self._length]
            self._ids, self._scopes, self._matrix = ids, scopes, matrix
        self._ids[self._length] = image_id
        self._scopes[self._length] = scope
        self._matrix[self._length] = vector
        self._length += 1

    def discard(self, image_id: int) -> None:
        keep = self._ids[: self._length] != image_id
        if keep.all():
            return
        self._ids = self._ids[: self._length][keep].copy()
        self._scopes = self._scopes[: self._length][keep].copy()
        self._matrix = self._matrix[: self._length][keep].copy()
        self._length = len(self._ids)

    def vectors(self, image_ids: Sequence[int]) -> tuple[IdArray, FloatArray]:
        """The vectors of those of ``image_ids`` held here: their ids and one row each."""
        length, ids, matrix = self._length, self._ids, self._matrix
        rows = np.flatnonzero(np.isin(ids[:length], np.asarray(image_ids, dtype=np.int64)))
        return ids[rows], matrix[rows]

    def search(self, vector: FloatArray, count: int) -> Candidates:
        length, ids, scopes, matrix = self._length, self._ids, self._scopes, self._matrix
        if not length or count <= 0:
            return Candidates.empty()
        similarities = matrix[:length] @ vector
        if count < length:
            # A full argsort of 100k similarities costs 5-10 ms; the best few, 0.4 ms.
            best = np.argpartition(-similarities, count - 1)[:count]
            best = best[np.argsort(-similarities[best])]
        else:
            best = np.argsort(-similarities)
        return Candidates(
            ids=ids[:length][best],
            scopes=scopes[:length][best],
            similarities=similarities[best].astype(np.float32),
        )


class GenerationStore:
    """The ``generations/`` folder: writes new generations, names the current one."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def current_name(self) -> str | None:
        """The name in ``CURRENT``, or ``None`` when no generation was ever built."""
        try:
            name = (self.root / CURRENT_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def load_current(self, *, verify_checksums: bool = True) -> Generation | None:
        """Open the current generation, or return ``None`` when there is none yet.

        Every file's size is checked. With ``verify_checksums``, the small files are
        checked against their checksums here and the Annoy file when it is first
        needed (:meth:`Generation.check_annoy_file`); without, the generation is
        trusted (this process has just written it).

        Raises:
            IndexCorruptError: a file of the generation is missing, truncated or altered.
            IndexIncompatibleError: the generation was written in another format.
        """
        name = self.current_name()
        if name is None:
            return None
        path = self.root / name
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise IndexCorruptError(f"generation {name}: unreadable manifest ({error})") from error
        if manifest.get("format") not in _READABLE_FORMATS:
            raise IndexIncompatibleError(
                f"generation {name} has format {manifest.get('format')!r}, "
                f"this version reads {sorted(_READABLE_FORMATS)}"
            )
        for file_name, expected in manifest["files"].items():
            file_path = path / file_name
            try:
                size = file_path.stat().st_size
            except OSError as error:
                raise IndexCorruptError(f"generation {name}: {file_name} is missing") from error
            if size != expected["size"]:
                raise IndexCorruptError(
                    f"generation {name}: {file_name} has {size} bytes, expected {expected['size']}"
                )
        if verify_checksums:
            small = {n: expected for n, expected in manifest["files"].items() if n != ANNOY_FILE}
            failed = _failed_checksums(path, small)
            if failed:
                raise IndexCorruptError(
                    f"generation {name}: {', '.join(failed)} fails its checksum"
                )
        codebook = Codebook.load(path / CODEBOOK_FILE)
        try:
            return Generation(path, manifest, codebook, annoy_checked=not verify_checksums)
        except (OSError, ValueError) as error:
            raise IndexCorruptError(f"generation {name}: {error}") from error

    def write(
        self,
        *,
        codebook: Codebook,
        ids: IdArray,
        scopes: IdArray,
        vectors: Iterable[FloatArray],
        max_image_id: int,
        trees: int,
    ) -> str:
        """Build a new generation from ``vectors`` (aligned with ``ids``) and make it current.

        ``ids`` must be sorted ascending. Returns the new generation's name.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        previous = self.current_name()
        name = f"g{time.time_ns():020d}"
        temporary = self.root / f"{_TEMPORARY_PREFIX}{name}"
        temporary.mkdir()
        try:
            annoy = AnnoyIndex(codebook.dimensions, "angular")
            # Seeded, so that the same vectors give the same trees on a machine (each
            # build thread derives its own generator from this seed).
            annoy.set_seed(_TREE_SEED)
            # Building straight into the file keeps a 1M-item build out of RAM.
            annoy.on_disk_build(str(temporary / ANNOY_FILE))
            for item, vector in enumerate(vectors):
                annoy.add_item(item, vector.tolist())
            if len(ids):
                annoy.build(trees, n_jobs=-1)
            annoy.unload()
            np.save(temporary / IDS_FILE, np.ascontiguousarray(ids, dtype=np.int64))
            np.save(temporary / SCOPES_FILE, np.ascontiguousarray(scopes, dtype=np.int64))
            codebook.save(temporary / CODEBOOK_FILE)
            files = {
                file_name: {
                    "size": (temporary / file_name).stat().st_size,
                    "sha256_chunks": _chunk_digests(temporary / file_name),
                }
                for file_name in (ANNOY_FILE, IDS_FILE, SCOPES_FILE, CODEBOOK_FILE)
            }
            manifest = {
                "format": GENERATION_FORMAT,
                "dimensions": codebook.dimensions,
                "codebook_id": codebook.id,
                "items": len(ids),
                "max_image_id": max_image_id,
                "trees": trees,
                "built_at": time.time(),
                "files": files,
            }
            (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), "utf-8")
            for file_name in (*files, MANIFEST_FILE):
                fsync_file(temporary / file_name)
            final = self.root / name
            temporary.rename(final)
            fsync_directory(self.root)
            pointer = self.root / f"{CURRENT_FILE}.tmp"
            pointer.write_text(name, encoding="utf-8")
            fsync_file(pointer)
            pointer.replace(self.root / CURRENT_FILE)
            fsync_directory(self.root)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        # The previous generation stays one more round: a reader in another process
        # may have read CURRENT just before the swap and be opening it right now.
        self.remove_stale(keep={name} | ({previous} if previous else set()))
        return name

    def remove_stale(self, keep: set[str]) -> None:
        """Delete superseded generations, and half-written ones older than an hour
        (a younger one may be another process's build in progress).

        Processes that still have an old Annoy file mapped keep reading it: on
        POSIX an unlinked file lives until its last mapping is closed.
        """
        if not self.root.exists():
            return
        current = self.current_name()
        for entry in self.root.iterdir():
            if not entry.is_dir() or entry.name in keep or entry.name == current:
                continue
            if entry.name.startswith(_TEMPORARY_PREFIX) and (
                time.time() - entry.stat().st_mtime < _ABANDONED_AFTER_SECONDS
            ):
                continue
            shutil.rmtree(entry, ignore_errors=True)

    def discard_current(self) -> None:
        """Forget the current generation (after corruption); the next build starts afresh."""
        with contextlib.suppress(FileNotFoundError):
            (self.root / CURRENT_FILE).unlink()


def _chunk_digests(path: Path) -> list[str]:
    """The sha256 of each CHECKSUM_CHUNK_BYTES piece of the file, in order."""
    size = path.stat().st_size
    offsets = range(0, max(size, 1), CHECKSUM_CHUNK_BYTES)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda offset: _chunk_digest(path, offset), offsets))


def _chunk_digest(path: Path, offset: int) -> str:
    # hashlib releases the GIL on large buffers, so threads hash on every core.
    with path.open("rb") as handle:
        handle.seek(offset)
        return hashlib.sha256(handle.read(CHECKSUM_CHUNK_BYTES)).hexdigest()


def _failed_checksums(folder: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """The names of the files whose content differs from the manifest's checksums."""
    failed = []
    for file_name, expected in files.items():
        path = folder / file_name
        if "sha256_chunks" in expected:
            intact = _chunk_digests(path) == expected["sha256_chunks"]
        else:  # format 1: one digest of the whole file
            with path.open("rb") as handle:
                intact = hashlib.file_digest(handle, "sha256").hexdigest() == expected["sha256"]
        if not intact:
            failed.append(file_name)
    return failed
