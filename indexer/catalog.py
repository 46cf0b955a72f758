"""The catalog: SQLite through aiosqlite, the source of truth of the index.

This is the only module that imports aiosqlite. Every derived file (vectors,
Annoy generations, codebooks) can be rebuilt from what is stored here: one row
per image, its local features (compact, see :func:`pack_features`), and its
global vector tagged with the codebook that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite
import numpy as np
import numpy.typing as npt

from indexer.errors import CatalogError, IndexIncompatibleError, NotFoundError, StorageFullError
from indexer.features import LocalFeatures, pack_features, unpack_features

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]

GLOBAL_SCOPE = 0
"""The scope of the offline collection, visible from every chat. Chat ids are never 0."""

# Each entry upgrades the schema by one version (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE images (
        -- AUTOINCREMENT: an id shown to a user ("#42") is never reused after a removal.
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        content_hash TEXT NOT NULL,
        scope INTEGER NOT NULL DEFAULT 0,
        path TEXT NOT NULL,
        file_size INTEGER NOT NULL,
        file_mtime_ns INTEGER NOT NULL DEFAULT 0,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        added_at REAL NOT NULL,
        added_by TEXT,
        origin_chat_id INTEGER,
        origin_message_id INTEGER,
        telegram_file_id TEXT,
        UNIQUE (scope, path)
    );
    CREATE INDEX images_by_hash ON images (content_hash, scope);
    CREATE TABLE features (
        image_id INTEGER PRIMARY KEY REFERENCES images (id) ON DELETE CASCADE,
        keypoints INTEGER NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        data BLOB NOT NULL
    );
    CREATE TABLE vectors (
        image_id INTEGER PRIMARY KEY REFERENCES images (id) ON DELETE CASCADE,
        codebook TEXT NOT NULL,
        vector BLOB NOT NULL
    );
    CREATE TABLE failures (
        path TEXT PRIMARY KEY,
        file_size INTEGER NOT NULL,
        file_mtime_ns INTEGER NOT NULL,
        reason TEXT NOT NULL,
        failed_at REAL NOT NULL
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # Removals by path and the start-up check of kept originals look paths up
    # in every scope; UNIQUE (scope, path) cannot serve that, so it was a scan.
    """
    CREATE INDEX images_by_path ON images (path);
    """,
    # Repost watch (the bot's group feature). A sighting is one chat message showing a picture
    # (an image row); the chat's first sighting of an image is its original. The inbox keeps
    # every watched photo received but not yet checked, so a kill loses none of them.
    # IF NOT EXISTS: a catalog whose version number was lowered by hand can be upgraded again.
    """
    CREATE TABLE IF NOT EXISTS chat_settings (
        chat_id INTEGER PRIMARY KEY,
        watch INTEGER NOT NULL DEFAULT 0,
        reply_style TEXT NOT NULL DEFAULT 'reply',
        global_counts INTEGER NOT NULL DEFAULT 0,
        retention_days INTEGER NOT NULL DEFAULT 0,
        add_policy TEXT,
        updated_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS sightings (
        chat_id INTEGER NOT NULL,
        message_id INTEGER NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
        sender_id INTEGER,
        sender_name TEXT NOT NULL,
        posted_at REAL NOT NULL,
        file_unique_id TEXT NOT NULL,
        answer_message_id INTEGER,
        dismissed INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (chat_id, message_id)
    );
    CREATE INDEX IF NOT EXISTS sightings_by_image ON sightings (image_id, chat_id, posted_at);
    CREATE INDEX IF NOT EXISTS sightings_by_answer ON sightings (chat_id, answer_message_id);
    CREATE INDEX IF NOT EXISTS sightings_by_date ON sightings (chat_id, posted_at);
    CREATE TABLE IF NOT EXISTS dismissed_pairs (
        chat_id INTEGER NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
        file_unique_id TEXT NOT NULL,
        PRIMARY KEY (chat_id, image_id, file_unique_id)
    );
    CREATE TABLE IF NOT EXISTS watch_inbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        chat_id INTEGER NOT NULL,
        message_id INTEGER NOT NULL,
        payload TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        UNIQUE (chat_id, message_id)
    );
    """,
    # A folder photo an admin removed stays removed: the next build skips the file
    # at that path until its content (hash) changes.
    """
    CREATE TABLE IF NOT EXISTS removed_sources (
        path TEXT PRIMARY KEY,
        content_hash TEXT NOT NULL,
        file_size INTEGER NOT NULL,
        file_mtime_ns INTEGER NOT NULL,
        removed_at REAL NOT NULL
    );
    """,
    # Moving pictures (videos, animations): the image row is the file, described by its
    # first sampled frame (frame_seconds says when it is); every further frame is a row of
    # its own, searchable like any image, tied to it by video_id and removed with it.
    # Frame rows are not images of the collection: counts, paths and hashes skip them.
    """
    ALTER TABLE images ADD COLUMN video_id INTEGER REFERENCES images (id) ON DELETE CASCADE;
    ALTER TABLE images ADD COLUMN frame_seconds REAL;
    CREATE INDEX IF NOT EXISTS images_by_video ON images (video_id) WHERE video_id IS NOT NULL;
    """,
    # "Not a repost" keeps the two pictures apart: the dismissed photo becomes a picture of
    # its own (other_id), and a later photo taken for image_id is the one it matches better.
    """
    CREATE TABLE IF NOT EXISTS pictures_apart (
        chat_id INTEGER NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
        other_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
        PRIMARY KEY (chat_id, image_id, other_id)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
_SQLITE_FULL = 13

_IMAGE_COLUMNS = (
    "id, content_hash, scope, path, file_size, width, height, added_at, added_by, "
    "origin_chat_id, origin_message_id, telegram_file_id, video_id, frame_seconds"
)
# The rows that are images of the collection, not further frames of a moving picture.
_WHOLE = "video_id IS NULL"


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image of the collection, as the catalog knows it."""

    id: int
    content_hash: str
    scope: int
    path: str  # absolute for folder sources; relative to the index folder for stored originals
    file_size: int
    width: int
    height: int
    added_at: float
    added_by: str | None
    origin_chat_id: int | None
    origin_message_id: int | None
    telegram_file_id: str | None
    # A moving picture's row has the time of the frame it is described by; a further
    # frame's row also names the moving picture's row (``video_id``).
    video_id: int | None = None
    frame_seconds: float | None = None

    @property
    def moving(self) -> bool:
        """Whether this is (a frame of) a video or an animation."""
        return self.frame_seconds is not None


@dataclass(frozen=True, slots=True)
class NewFrame:
    """A further frame of a moving picture to insert (see :attr:`NewImage.later_frames`)."""

    seconds: float
    features: LocalFeatures
    vector: FloatArray | None = None


@dataclass(frozen=True, slots=True)
class NewImage:
    """An image to insert, with its features (and vector, when a codebook exists)."""

    content_hash: str
    scope: int
    path: str
    file_size: int
    file_mtime_ns: int
    width: int
    height: int
    features: LocalFeatures
    vector: FloatArray | None = None
    codebook_id: str | None = None
    added_by: str | None = None
    origin_chat_id: int | None = None
    origin_message_id: int | None = None
    telegram_file_id: str | None = None
    added_at: float | None = None  # when it was posted, for a photo imported later; else now
    # A moving picture: when the frame ``features`` describe is, and its further frames.
    frame_seconds: float | None = None
    later_frames: Sequence[NewFrame] = ()


@dataclass(frozen=True, slots=True)
class SourceState:
    """What the catalog remembers of a file in a photo folder (to skip unchanged files)."""

    image_id: int | None  # None: the file failed last time
    file_size: int
    file_mtime_ns: int


@dataclass(frozen=True, slots=True)
class RemovedSource:
    """A folder file whose image was removed on purpose: what it was when removed."""

    content_hash: str
    file_size: int
    file_mtime_ns: int


class Catalog:
    """Async access to the catalog database. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, connection: aiosqlite.Connection, path: Path) -> None:
        self._db = connection
        self.path = path
        # One connection serves every task: transactions must take turns, or a
        # second BEGIN arrives inside the first one.
        self._write_turn = asyncio.Lock()
        self.chats = ChatRecords(self)

    @classmethod
    async def open(cls, path: Path, *, max_bytes: int | None = None) -> Catalog:
        """Open (creating if needed) and migrate the catalog at ``path``.

        With ``max_bytes``, the catalog does not grow past that size (nor shrinks
        to it if it is larger): a write that needs more fails with
        :class:`StorageFullError`, exactly as on a full disk. It is a quota.

        Raises:
            IndexIncompatibleError: the catalog was written by a newer version.
            CatalogError: the file is not a usable SQLite database.
        """
        try:
            connection = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as error:
            raise CatalogError(f"cannot open the catalog {path}: {error}") from error
        catalog = cls(connection, path)
        try:
            await catalog._configure()
            if max_bytes is not None:
                await catalog._limit_size(max_bytes)
        except BaseException:
            await connection.close()
            raise
        return catalog

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._db.close()

    async def _configure(self) -> None:
        async with _translated_errors():
            await self._db.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit that returned is on disk; users' adds must survive power loss.
            await self._db.execute("PRAGMA synchronous = FULL")
            await self._db.execute("PRAGMA foreign_keys = ON")
            await self._db.execute("PRAGMA busy_timeout = 10000")
            version = await self._scalar("PRAGMA user_version")
            if version > SCHEMA_VERSION:
                raise IndexIncompatibleError(
                    f"the catalog has schema version {version}; this version knows up to "
                    f"{SCHEMA_VERSION}: upgrade the software"
                )
            for number in range(version, SCHEMA_VERSION):
                await self._db.execute("BEGIN IMMEDIATE")
                for statement in _statements(MIGRATIONS[number]):
                    if not await self._column_exists(statement):
                        await self._db.execute(statement)
                await self._db.execute(f"PRAGMA user_version = {number + 1}")
                await self._db.execute("COMMIT")

    async def _column_exists(self, statement: str) -> bool:
        """Whether ``statement`` adds a column that is already there: SQLite has no ADD
        COLUMN IF NOT EXISTS, and a catalog whose version number was lowered by hand must
        upgrade again."""
        words = statement.split()
        if [w.upper() for w in words[:2]] != ["ALTER", "TABLE"] or len(words) < 6:
            return False
        table, column = words[2], words[5]
        rows = await self._db.execute_fetchall(f"PRAGMA table_info({table})")
        return any(row[1] == column for row in rows)

    async def _limit_size(self, max_bytes: int) -> None:
        # max_page_count holds for this connection only, which is the engine's one
        # writer; SQLite never lowers it below the pages already in use.
        page_size = await self._scalar("PRAGMA page_size")
        async with _translated_errors():
            await self._db.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page_size)}")

    # -- settings ---------------------------------------------------------------

    async def settings(self) -> dict[str, str]:
        async with _translated_errors():
            rows = await self._db.execute_fetchall("SELECT key, value FROM settings")
        return {str(key): str(value) for key, value in rows}

    async def save_settings(self, values: dict[str, str]) -> None:
        async with _translated_errors(), self._transaction():
            await self._db.executemany(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                sorted(values.items()),
            )

    # -- images -----------------------------------------------------------------

    async def insert_images(self, images: Sequence[NewImage]) -> list[int]:
        """Insert images with their features (and vectors) in one transaction; return their ids.

        A folder file that is already in the catalog in the same scope is replaced.
        """
        ids: list[int] = []
        now = time.time()
        async with _translated_errors(), self._transaction():
            for image in images:
                await self._db.execute(
                    "DELETE FROM images WHERE scope = ? AND path = ?", (image.scope, image.path)
                )
                cursor = await self._db.execute(
                    "INSERT INTO images (content_hash, scope, path, file_size, file_mtime_ns, "
                    "width, height, added_at, added_by, origin_chat_id, origin_message_id, "
                    "telegram_file_id, frame_seconds) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        image.content_hash,
                        image.scope,
                        image.path,
                        image.file_size,
                        image.file_mtime_ns,
                        image.width,
                        image.height,
                        now if image.added_at is None else image.added_at,
                        image.added_by,
                        image.origin_chat_id,
                        image.origin_message_id,
                        image.telegram_file_id,
                        image.frame_seconds,
                    ),
                )
                image_id = int(cursor.lastrowid or 0)
                ids.append(image_id)
                await self._insert_described(
                    image_id, image.features, image.vector, image.codebook_id
                )
                for frame in image.later_frames:
                    cursor = await self._db.execute(
                        "INSERT INTO images (content_hash, scope, path, file_size, "
                        "file_mtime_ns, width, height, added_at, added_by, video_id, "
                        "frame_seconds) SELECT content_hash, scope, ?, file_size, "
                        "file_mtime_ns, width, height, added_at, added_by, id, ? "
                        "FROM images WHERE id = ?",
                        (frame_path(image.path, frame.seconds), frame.seconds, image_id),
                    )
                    await self._insert_described(
                        int(cursor.lastrowid or 0), frame.features, frame.vector,
                        image.codebook_id,
                    )
                await self._db.execute("DELETE FROM failures WHERE path = ?", (image.path,))
        return ids

    async def _insert_described(
        self,
        image_id: int,
        features: LocalFeatures,
        vector: FloatArray | None,
        codebook_id: str | None,
    ) -> None:
        await self._db.execute(
            "INSERT INTO features (image_id, keypoints, width, height, data) "
            "VALUES (?, ?, ?, ?, ?)",
            (image_id, len(features), features.width, features.height, pack_features(features)),
        )
        if vector is not None and codebook_id is not None:
            await self._db.execute(
                "INSERT INTO vectors (image_id, codebook, vector) VALUES (?, ?, ?)",
                (image_id, codebook_id, _pack_vector(vector)),
            )

    async def frame_ids(self, video_ids: Sequence[int]) -> list[int]:
        """The ids of the further frames of these moving pictures."""
        found: list[int] = []
        async with _translated_errors():
            for chunk in _chunks(video_ids, 500):
                rows = await self._db.execute_fetchall(
                    f"SELECT id FROM images WHERE video_id IN ({','.join('?' * len(chunk))}) "
                    "ORDER BY id",
                    chunk,
                )
                found.extend(int(row[0]) for row in rows)
        return found

    async def delete_images(self, ids: Iterable[int], *, on_purpose: bool = False) -> list[int]:
        """Remove images (features and vectors go with them); returns the ids that existed,
        with those of the further frames of the moving pictures among them.

        ``on_purpose``: someone removed them, rather than their files vanishing. Those of
        the offline collection are then remembered (:meth:`removed_under`), so that the
        next build of the photo folder does not add them back.
        """
        id_list = [int(i) for i in ids]
        async with _translated_errors(), self._transaction():
            existing: list[int] = []
            for chunk in _chunks(id_list, 500):
                rows = await self._db.execute_fetchall(
                    f"SELECT id FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk
                )
                existing.extend(int(row[0]) for row in rows)
            frames = await self.frame_ids(existing)
            if on_purpose:
                await self._db.executemany(
                    "INSERT OR REPLACE INTO removed_sources "
                    "(path, content_hash, file_size, file_mtime_ns, removed_at) "
                    "SELECT path, content_hash, file_size, file_mtime_ns, ? FROM images "
                    "WHERE id = ? AND scope = ?",
                    [(time.time(), i, GLOBAL_SCOPE) for i in existing],
                )
            await self._db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in existing])
        return sorted({*existing, *frames})

    async def get(self, image_id: int) -> ImageRecord:
        """The image with this id.

        Raises:
            NotFoundError: there is no such image.
        """
        async with _translated_errors():
            rows = await self._db.execute_fetchall(
                f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id = ?", (image_id,)
            )
        if not rows:
            raise NotFoundError(f"no image #{image_id}")
        return _record(next(iter(rows)))

    async def get_many(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """The images among ``ids`` that exist (removed ones are simply absent)."""
        result: dict[int, ImageRecord] = {}
        async with _translated_errors():
            for chunk in _chunks(ids, 500):
                rows = await self._db.execute_fetchall(
                                        f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id IN "
                    f"({','.join('?' * len(chunk))})",
                    chunk,
                )
                result.update((record.id, record) for record in map(_record, rows))
        return result

    async def images_after(self, image_id: int) -> list[ImageRecord]:
        """The images added after ``image_id``, the further frames of moving pictures
        among them (ids only grow, and are never reused)."""
        async with _translated_errors():
            rows = await self._db.execute_fetchall(
                f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id > ? ORDER BY id", (image_id,)
            )
        return [_record(row) for row in rows]

    async def find_by_hash(self, content_hash: str, scopes: Sequence[int]) -> ImageRecord | None:
        """An image with exactly these bytes visible from ``scopes``, if there is one."""
        async with _translated_errors():
            rows = await self._db.execute_fetchall(
                f"SELECT {_IMAGE_COLUMNS} FROM images "
                f"WHERE {_WHOLE} AND content_hash = ? AND scope IN "
                f"({','.join('?' * len(scopes))}) ORDER BY id LIMIT 1",
                (content_hash, *scopes),
            )
        return _record(next(iter(rows))) if rows else None

    async def find_by_path(self, path: str) -> list[ImageRecord]:
        async with _translated_errors():
            rows = await self._db.execute_fetchall(
                f"SELECT {_IMAGE_COLUMNS} FROM images WHERE {_WHOLE} AND path = ? ORDER BY id",
                (path,),
            )
        return [_record(row) for row in rows]

    async def paths_under(self, prefix: str) -> set[str]:
        """Every stored path that starts with ``prefix`` (e.g. the kept originals)."""
        async with _translated_errors():
            rows = await self._db.execute_fetchall(
                "SELECT DISTINCT path FROM images WHERE path >= ? AND path < ?",
                _prefix_range(prefix),
            )
        return {str(row[0]) for row in rows}

    async def set_telegram_file_id(self, image_id: int, file_id: str) -> None:
        async with _translated_errors(), self._transaction():
            await self._db.execute(
                "UPDATE images SET telegram_file_id = ? WHERE id = ?", (file_id, image_id)
            )

    async def count(self, scope: int | None = None) -> int:
        if scope is None:
            return await self._scalar(f"SELECT count(*) FROM images WHERE {_WHOLE}")
        return await self._scalar(
            f"SELECT count(*) FROM images WHERE {_WHOLE} AND scope = ?", (scope,)
        )

    async def max_id(self) -> int:
        return await self._scalar("SELECT coalesce(max(id), 0) FROM images")

    async def bytes_per_image(self) -> dict[str, float]:
        """Average stored bytes of features and vectors per image (payload, not page overhead)."""
        async with _translated_errors():
            rows = await self._db.execute_fetchall(
                "SELECT (SELECT avg(length(data)) FROM features), "
                "(SELECT avg(length(vector)) FROM vectors), "
                "(SELECT avg(keypoints) FROM features)"
            )
        features, vector, keypoints = next(iter(rows))
        return {
            "features": float(features or 0),
            "vector": float(vector or 0),
            "keypoints": float(keypoints or 0),
        }

    # -- folder sources -----------------------------------------------------------

    async def sources_under(self, root: str) -> dict[str, SourceState]:
        """Every file path under ``root`` the catalog knows (indexed or failed)."""
        low, high = _prefix_range(root.rstrip("/") + "/")
        states: dict[str, SourceState] = {}
        async with _translated_errors():
            rows = await self._db.execute_fetchall(
                "SELECT path, file_size, file_mtime_ns FROM failures WHERE path >= ? AND path < ?",
                (low, high),
            )
            for path, size, mtime in rows:
                states[str(path)] = SourceState(None, int(size), int(mtime))
            rows = await self._db.execute_fetchall(
                "SELECT path, id, file_size, file_mtime_ns FROM images "
                f"WHERE {_WHOLE} AND path >= ? AND path < ? AND scope = ?",
                (low, high, GLOBAL_SCOPE),
            )
            for path, image_id, size, mtime in rows:
                states[str(path)] = SourceState(int(image_id), int(size), int(mtime))
        return states

    async def removed_under(self, root: str) -> dict[str, RemovedSource]:
        """The files under ``root`` whose images were removed on purpose."""
        low, high = _prefix_range(root.rstrip("/") + "/")
        async with _translated_errors():
            rows = await self._db.execute_fetchall(
                "SELECT path, content_hash, file_size, file_mtime_ns FROM removed_sources "
                "WHERE path >= ? AND path < ?",
                (low, high),
            )
        return {
            str(path): RemovedSource(str(content_hash), int(size), int(mtime))
            for path, content_hash, size, mtime in rows
        }

    async def update_removed(self, path: str, removed: RemovedSource | None) -> None:
        """Remember the removed file at ``path`` as it is now, or forget it (``None``)."""
        async with _translated_errors(), self._transaction():
            if removed is None:
                await self._db.execute("DELETE FROM removed_sources WHERE path = ?", (path,))
            else:
                await self._db.execute(
                    "UPDATE removed_sources SET content_hash = ?, file_size = ?, "
                    "file_mtime_ns = ? WHERE path = ?",
                    (removed.content_hash, removed.file_size, removed.file_mtime_ns, path),
                )

    async def record_failures(self, failures: Sequence[tuple[str, int, int, str]]) -> None:
        """Remember files that could not be indexed: (path, size, mtime_ns, reason)."""
        now = time.time()
        async with _translated_errors(), self._transaction():
            await self._db.executemany(
                "INSERT INTO failures (path, file_size, file_mtime_ns, reason, failed_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET "
                "file_size = excluded.file_size, file_mtime_ns = excluded.file_mtime_ns, "
                "reason = excluded.reason, failed_at = excluded.failed_at",
                [(*failure, now) for failure in failures],
            )

    async def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that could not be indexed, by path."""
        async with _translated_errors():
            rows = await self._db.execute_fetchall(
                "SELECT path, reason FROM failures ORDER BY path"
            )
        return [(str(path), str(reason)) for path, reason in rows]

    async def forget_failures(self, paths: Iterable[str]) -> None:
        async with _translated_errors(), self._transaction():
            await self._db.executemany(
                "DELETE FROM failures WHERE path = ?", [(p,) for p in paths]
            )

    # -- features and vectors ---------------------------------------------------------

    async def features(self, ids: Sequence[int]) -> dict[int, LocalFeatures]:
        """Local features of the images among ``ids`` that exist."""
        result: dict[int, LocalFeatures] = {}
        async with _translated_errors():
            for chunk in _chunks(ids, 500):
                rows = await self._db.execute_fetchall(
                    "SELECT image_id, keypoints, width, height, data FROM features "
                    f"WHERE image_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                for image_id, *stored in rows:
                    result[int(image_id)] = _stored_features(*stored)
        return result

    async def iter_features(
        self, *, after_id: int = 0, up_to_id: int | None = None, batch: int = 256
    ) -> AsyncIterator[tuple[int, int, LocalFeatures]]:
        """(id, scope, features) of the images with ids in (``after_id``, ``up_to_id``],
        in id order."""
        last = after_id
        ceiling = up_to_id if up_to_id is not None else 2**63 - 1
        while True:
            async with _translated_errors():
                rows = list(
                    await self._db.execute_fetchall(
                        "SELECT f.image_id, i.scope, f.keypoints, f.width, f.height, f.data "
                        "FROM features f JOIN images i ON i.id = f.image_id "
                        "WHERE f.image_id > ? AND f.image_id <= ? ORDER BY f.image_id LIMIT ?",
                        (last, ceiling, batch),
                    )
                )
            if not rows:
                return
            for image_id, scope, *stored in rows:
                yield int(image_id), int(scope), _stored_features(*stored)
            last = int(rows[-1][0])

    async def ids(self, *, up_to_id: int | None = None) -> IdArray:
        """Every image id (up to ``up_to_id``), ascending."""
        ceiling = up_to_id if up_to_id is not None else 2**63 - 1
        async with _translated_errors():
            rows = await self._db.execute_fetchall(
                "SELECT id FROM images WHERE id <= ? ORDER BY id", (ceiling,)
            )
        return np.fromiter((row[0] for row in rows), np.int64)

    async def iter_training_features(
        self, count: int, *, batch: int = 256
    ) -> AsyncIterator[tuple[int, LocalFeatures]]:
        """The features of the ``count`` images with the smallest content hashes.

        SHA-256 makes them a uniform sample, and one that does not depend on the
        order in which a parallel build happened to insert the images: the same
        photos always train the same codebook.
        """
        position: tuple[str, int, int] = ("", -1, 0)
        taken = 0
        while taken < count:
            async with _translated_errors():
                # The row-value order is the images_by_hash index's own (hash,
                # scope, rowid), so each batch is a range of the index, not a sort.
                rows = list(
                    await self._db.execute_fetchall(
                        "SELECT i.content_hash, i.scope, i.id, f.keypoints, f.width, f.height, "
                        "f.data FROM images i JOIN features f ON f.image_id = i.id "
                        "WHERE (i.content_hash, i.scope, i.id) > (?, ?, ?) "
                        "ORDER BY i.content_hash, i.scope, i.id LIMIT ?",
                        (*position, min(batch, count - taken)),
                    )
                )
            if not rows:
                return
            for _, _, image_id, *stored in rows:
                yield int(image_id), _stored_features(*stored)
            last = rows[-1]
            position = (str(last[0]), int(last[1]), int(last[2]))
            taken += len(rows)

    async def ids_without_vector(self, codebook_id: str, *, after_id: int = 0) -> list[int]:
        """Images with an id above ``after_id`` whose vector is missing or was made
        by another codebook."""
        async with _translated_errors():
            rows = await self._db.execute_fetchall(
                "SELECT i.id FROM images i LEFT JOIN vectors v ON v.image_id = i.id "
                "WHERE i.id > ? AND (v.codebook IS NULL OR v.codebook != ?) ORDER BY i.id",
                (after_id, codebook_id),
            )
        return [int(row[0]) for row in rows]

    async def save_vectors(
        self, codebook_id: str, vectors: Sequence[tuple[int, FloatArray]]
    ) -> None:
        async with _translated_errors(), self._transaction():
            await self._db.executemany(
                "INSERT INTO vectors (image_id, codebook, vector) SELECT ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM images WHERE id = ?) "
                "ON CONFLICT (image_id) DO UPDATE SET codebook = excluded.codebook, "
                "vector = excluded.vector",
                [(i, codebook_id, _pack_vector(v), i) for i, v in vectors],
            )

    async def iter_vectors(
        self,
        codebook_id: str,
        *,
        after_id: int = 0,
        up_to_id: int | None = None,
        batch: int = 4096,
    ) -> AsyncIterator[tuple[IdArray, IdArray, FloatArray]]:
        """(ids, scopes, vectors) in id order, in batches, for one codebook."""
        last = after_id
        ceiling = up_to_id if up_to_id is not None else 2**62
        while True:
            async with _translated_errors():
                rows = list(
                    await self._db.execute_fetchall(
                        "SELECT v.image_id, i.scope, v.vector FROM vectors v "
                        "JOIN images i ON i.id = v.image_id "
                        "WHERE v.codebook = ? AND v.image_id > ? AND v.image_id <= ? "
                        "ORDER BY v.image_id LIMIT ?",
                        (codebook_id, last, ceiling, batch),
                    )
                )
            if not rows:
                return
            ids = np.array([row[0] for row in rows], dtype=np.int64)
            scopes = np.array([row[1] for row in rows], dtype=np.int64)
            vectors = np.stack([_unpack_vector(row[2]) for row in rows])
            yield ids, scopes, vectors
            last = int(ids[-1])

    # -- helpers ------------------------------------------------------------------------

    async def _scalar(self, sql: str, parameters: tuple[Any, ...] = ()) -> int:
        async with _translated_errors():
            rows = await self._db.execute_fetchall(sql, parameters)
        return int(next(iter(rows))[0])

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._write_turn)


class ChatRecords:
    """The bot's records of its chats, kept in the catalog's database beside the images
    (so that a sighting goes with its image): the repost watch's chat settings, its
    sightings, dismissed pairs and inbox. Reach it as ``Catalog.chats``.

    A sighting is one chat message showing a picture (an image row); a chat's first
    sighting of an image is its original. The inbox holds every watched photo received and
    not yet checked, so that a kill loses none. Rows are returned as dicts keyed by column
    name; the bot gives them their types.
    """

    def __init__(self, catalog: Catalog) -> None:
        # The catalog's one connection and its turns for transactions, shared.
        self._catalog = catalog

    @property
    def _db(self) -> aiosqlite.Connection:
        return self._catalog._db

    def _transaction(self) -> _Transaction:
        return self._catalog._transaction()

    async def _scalar(self, sql: str, parameters: tuple[Any, ...] = ()) -> int:
        return await self._catalog._scalar(sql, parameters)

    _CHAT_SETTINGS_COLUMNS = (
        "chat_id, watch, reply_style, global_counts, retention_days, add_policy"
    )
    _SIGHTING_COLUMNS = (
        "chat_id, message_id, image_id, sender_id, sender_name, posted_at, file_unique_id, "
        "answer_message_id, dismissed"
    )
    _INBOX_COLUMNS = "chat_id, message_id, payload, attempts"

    async def chat_settings(self, chat_id: int) -> dict[str, Any] | None:
        """The chat's stored settings, or None if it never changed any."""
        rows = await self._rows(
            f"SELECT {self._CHAT_SETTINGS_COLUMNS} FROM chat_settings WHERE chat_id = ?",
            (chat_id,),
        )
        return rows[0] if rows else None

    async def save_chat_settings(
        self,
        chat_id: int,
        *,
        watch: bool,
        reply_style: str,
        global_counts: bool,
        retention_days: int,
        add_policy: str | None,
    ) -> None:
        async with _translated_errors(), self._transaction():
            await self._db.execute(
                "INSERT INTO chat_settings (chat_id, watch, reply_style, global_counts, "
                "retention_days, add_policy, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (chat_id) DO UPDATE SET watch = excluded.watch, "
                "reply_style = excluded.reply_style, global_counts = excluded.global_counts, "
                "retention_days = excluded.retention_days, add_policy = excluded.add_policy, "
                "updated_at = excluded.updated_at",
                (chat_id, int(watch), reply_style, int(global_counts), retention_days,
                 add_policy, time.time()),
            )  # fmt: skip

    async def chats_with_retention(self) -> list[dict[str, Any]]:
        """Settings of every chat that forgets its photos after some days."""
        return await self._rows(
            f"SELECT {self._CHAT_SETTINGS_COLUMNS} FROM chat_settings "
            "WHERE retention_days > 0 ORDER BY chat_id"
        )

    async def inbox_put(self, chat_id: int, message_id: int, payload: str) -> None:
        """Keep a watched photo until it is checked; a newer payload (an edit) replaces it."""
        async with _translated_errors(), self._transaction():
            await self._db.execute(
                "INSERT INTO watch_inbox (chat_id, message_id, payload) VALUES (?, ?, ?) "
                "ON CONFLICT (chat_id, message_id) DO UPDATE SET payload = excluded.payload, "
                "attempts = 0",
                (chat_id, message_id, payload),
            )

    async def inbox_items(self, *, limit: int) -> list[dict[str, Any]]:
        """The oldest ``limit`` photos waiting to be checked, in arrival order."""
        return await self._rows(
            f"SELECT {self._INBOX_COLUMNS} FROM watch_inbox ORDER BY seq LIMIT ?", (limit,)
        )

    async def inbox_item(self, chat_id: int, message_id: int) -> dict[str, Any] | None:
        rows = await self._rows(
            f"SELECT {self._INBOX_COLUMNS} FROM watch_inbox WHERE chat_id = ? AND message_id = ?",
            (chat_id, message_id),
        )
        return rows[0] if rows else None

    async def inbox_count(self) -> int:
        return await self._scalar("SELECT count(*) FROM watch_inbox")

    async def inbox_failed_attempt(self, chat_id: int, message_id: int) -> None:
        async with _translated_errors(), self._transaction():
            await self._db.execute(
                "UPDATE watch_inbox SET attempts = attempts + 1 "
                "WHERE chat_id = ? AND message_id = ?",
                (chat_id, message_id),
            )

    async def inbox_drop(self, chat_id: int, message_id: int, payload: str) -> bool:
        """Forget a waiting photo, unless an edit replaced its payload meanwhile (then False)."""
        async with _translated_errors(), self._transaction():
            cursor = await self._db.execute(
                "DELETE FROM watch_inbox WHERE chat_id = ? AND message_id = ? AND payload = ?",
                (chat_id, message_id, payload),
            )
        return cursor.rowcount > 0

    async def record_sighting(
        self, sighting: dict[str, Any], *, inbox_payload: str | None
    ) -> bool:
        """Store a checked photo (replacing an earlier sighting of the same message) and take
        it out of the inbox, in one transaction (``inbox_payload`` None: it was not in the
        inbox, as an imported message). ``sighting`` has the sightings columns.
        Returns False, storing no sighting, when its image was removed meanwhile."""
        async with _translated_errors(), self._transaction():
            exists = await self._db.execute_fetchall(
                "SELECT 1 FROM images WHERE id = ?", (sighting["image_id"],)
            )
            if exists:
                columns = self._SIGHTING_COLUMNS.split(", ")
                await self._db.execute(
                    f"INSERT OR REPLACE INTO sightings ({self._SIGHTING_COLUMNS}) "
                    f"VALUES ({', '.join('?' * len(columns))})",
                    tuple(sighting[column] for column in columns),
                )
            if inbox_payload is not None:
                await self._db.execute(
                    "DELETE FROM watch_inbox WHERE chat_id = ? AND message_id = ? "
                    "AND payload = ?",
                    (sighting["chat_id"], sighting["message_id"], inbox_payload),
                )
        return bool(exists)

    async def sighting(self, chat_id: int, message_id: int) -> dict[str, Any] | None:
        rows = await self._rows(
            f"SELECT {self._SIGHTING_COLUMNS} FROM sightings WHERE chat_id = ? AND message_id = ?",
            (chat_id, message_id),
        )
        return rows[0] if rows else None

    async def sighted_messages(self, chat_id: int) -> set[int]:
        """The ids of the chat's messages that have a sighting (checked or imported)."""
        rows = await self._rows(
            "SELECT message_id FROM sightings WHERE chat_id = ?", (chat_id,)
        )
        return {int(row["message_id"]) for row in rows}

    async def sightings_of(self, chat_id: int, image_id: int) -> list[dict[str, Any]]:
        """The chat's sightings of an image that were not dismissed, oldest first."""
        return await self._rows(
            f"SELECT {self._SIGHTING_COLUMNS} FROM sightings WHERE image_id = ? AND chat_id = ? "
            "AND dismissed = 0 ORDER BY posted_at, message_id",
            (image_id, chat_id),
        )

    async def sightings_answered_by(
        self, chat_id: int, answer_message_id: int
    ) -> list[dict[str, Any]]:
        """The sightings one of the bot's repost answers is about."""
        return await self._rows(
            f"SELECT {self._SIGHTING_COLUMNS} FROM sightings WHERE chat_id = ? "
            "AND answer_message_id = ? ORDER BY message_id",
            (chat_id, answer_message_id),
        )

    async def set_answer(
        self, chat_id: int, message_ids: Sequence[int], answer_message_id: int
    ) -> None:
        async with _translated_errors(), self._transaction():
            await self._db.executemany(
                "UPDATE sightings SET answer_message_id = ? WHERE chat_id = ? AND message_id = ?",
                [(answer_message_id, chat_id, message_id) for message_id in message_ids],
            )

    async def is_dismissed(self, chat_id: int, image_id: int, file_unique_id: str) -> bool:
        rows = await self._rows(
            "SELECT 1 AS found FROM dismissed_pairs WHERE chat_id = ? AND image_id = ? "
            "AND file_unique_id = ?",
            (chat_id, image_id, file_unique_id),
        )
        return bool(rows)

    async def dismiss(self, chat_id: int, pairs: Sequence[tuple[int, int, str]]) -> None:
        """Mark sightings (message id, image id, file unique id) as "not a repost": they no
        longer count, and the pair of pictures is remembered."""
        async with _translated_errors(), self._transaction():
            await self._db.executemany(
                "UPDATE sightings SET dismissed = 1, answer_message_id = NULL "
                "WHERE chat_id = ? AND message_id = ?",
                [(chat_id, message_id) for message_id, _, _ in pairs],
            )
            await self._db.executemany(
                "INSERT OR IGNORE INTO dismissed_pairs (chat_id, image_id, file_unique_id) "
                "VALUES (?, ?, ?)",
                [(chat_id, image_id, unique_id) for _, image_id, unique_id in pairs],
            )

    async def keep_apart(
        self, chat_id: int, message_id: int, image_id: int, other_id: int
    ) -> None:
        """ "Not a repost", once the photo of message ``message_id`` is a picture of its own
        (``other_id``): its sighting moves to that picture, and the chat keeps the two
        pictures apart (see :meth:`pictures_apart_from`)."""
        async with _translated_errors(), self._transaction():
            await self._db.execute(
                "UPDATE sightings SET image_id = ?, answer_message_id = NULL, dismissed = 0 "
                "WHERE chat_id = ? AND message_id = ?",
                (other_id, chat_id, message_id),
            )
            await self._db.execute(
                "INSERT OR IGNORE INTO pictures_apart (chat_id, image_id, other_id) "
                "VALUES (?, ?, ?)",
                (chat_id, image_id, other_id),
            )

    async def pictures_apart_from(self, chat_id: int, image_id: int) -> list[int]:
        """The pictures the chat said are not ``image_id``, though photos of them were taken
        for it."""
        rows = await self._rows(
            "SELECT other_id FROM pictures_apart WHERE chat_id = ? AND image_id = ? "
            "ORDER BY other_id",
            (chat_id, image_id),
        )
        return [int(row["other_id"]) for row in rows]

    async def delete_sightings(self, chat_id: int, message_ids: Sequence[int]) -> None:
        async with _translated_errors(), self._transaction():
            await self._db.executemany(
                "DELETE FROM sightings WHERE chat_id = ? AND message_id = ?",
                [(chat_id, message_id) for message_id in message_ids],
            )

    async def chat_images_before(self, chat_id: int, cutoff: float) -> list[int]:
        """Ids of the chat's own images first posted (or else added) before ``cutoff``."""
        rows = await self._rows(
            "SELECT i.id AS id FROM images i LEFT JOIN sightings s ON s.chat_id = i.scope "
            "AND s.message_id = i.origin_message_id "
            "WHERE i.video_id IS NULL AND i.scope = ? AND coalesce(s.posted_at, i.added_at) < ? "
            "ORDER BY i.id",
            (chat_id, cutoff),
        )
        return [int(row["id"]) for row in rows]

    async def forget_sightings_before(self, chat_id: int, cutoff: float) -> int:
        """Delete the chat's sightings posted before ``cutoff``; returns how many."""
        async with _translated_errors(), self._transaction():
            cursor = await self._db.execute(
                "DELETE FROM sightings WHERE chat_id = ? AND posted_at < ?", (chat_id, cutoff)
            )
        return int(cursor.rowcount)

    async def _rows(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        async with _translated_errors():
            cursor = await self._db.execute(sql, parameters)
            names = [column[0] for column in cursor.description]
            rows = await cursor.fetchall()
            await cursor.close()
        return [dict(zip(names, row, strict=True)) for row in rows]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, one at a time, rolled back on any exception
    (including cancellation)."""

    def __init__(self, connection: aiosqlite.Connection, turn: asyncio.Lock) -> None:
        self._db = connection
        self._turn = turn

    async def __aenter__(self) -> None:
        await self._turn.acquire()
        try:
            await self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._turn.release()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                try:
                    await self._db.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT (a full disk) leaves the transaction open.
                    with contextlib.suppress(sqlite3.Error):
                        await self._db.execute("ROLLBACK")
                    raise
            elif self._db.in_transaction:
                # SQLite has already rolled back after some errors (SQLITE_FULL).
                await self._db.execute("ROLLBACK")
        finally:
            self._turn.release()


class _translated_errors:  # noqa: N801 - used like a function: `async with _translated_errors():`
    """Turn sqlite3 errors into the engine's CatalogError / StorageFullError."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, sqlite3.Error):
            if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "full" in str(exc):
                raise StorageFullError(f"the catalog's disk is full: {exc}") from exc
            raise CatalogError(f"catalog error: {exc}") from exc
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise StorageFullError(f"the disk is full: {exc}") from exc


def _stored_features(keypoints: int, width: int, height: int, data: bytes) -> LocalFeatures:
    """The features of one row of the features table (keypoints, width, height, data)."""
    return unpack_features(
        bytes(data), count=int(keypoints), width=int(width), height=int(height)
    )


def _prefix_range(prefix: str) -> tuple[str, str]:
    """Bounds ``[low, high)`` holding exactly the strings that start with ``prefix``.

    A range, unlike LIKE, uses the path index and is case-sensitive, as file
    names are. SQLite compares TEXT as UTF-8 bytes, which order like code
    points, so raising the last character bounds the prefix from above.
    """
    if not prefix:
        raise ValueError("an empty prefix has no upper bound")
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _record(row: Iterable[Any]) -> ImageRecord:
    values = tuple(row)
    return ImageRecord(
        id=int(values[0]),
        content_hash=str(values[1]),
        scope=int(values[2]),
        path=str(values[3]),
        file_size=int(values[4]),
        width=int(values[5]),
        height=int(values[6]),
        added_at=float(values[7]),
        added_by=values[8],
        origin_chat_id=values[9],
        origin_message_id=values[10],
        telegram_file_id=values[11],
        video_id=None if values[12] is None else int(values[12]),
        frame_seconds=None if values[13] is None else float(values[13]),
    )


def frame_path(path: str, seconds: float) -> str:
    """The path recorded for a further frame of the moving picture at ``path``: a W3C Media
    Fragments time (``clip.mp4#t=1.500``), which no file of a folder scan is named."""
    return f"{path}#t={seconds:.3f}"


def _pack_vector(vector: FloatArray) -> bytes:
    # float16 halves the catalog's share; ranking by cosine does not notice the rounding.
    return vector.astype(np.float16).tobytes()


def _unpack_vector(blob: bytes) -> FloatArray:
    return np.frombuffer(blob, dtype=np.float16).astype(np.float32)


def _statements(script: str) -> list[str]:
    return [statement.strip() for statement in script.split(";") if statement.strip()]


def _chunks(values: Sequence[int], size: int) -> Iterable[list[int]]:
    items = [int(v) for v in values]
    for start in range(0, len(items), size):
        yield items[start : start + size]
