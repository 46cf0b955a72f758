"""The search service: the engine's one public face.

It wires the parts together and holds none of their logic: the query stages
are in :mod:`indexer.querying`, what queries search and its rebuilds in
:mod:`indexer.maintenance`, the originals kept for added photos in
:mod:`indexer.originals`. The catalog is the source of truth for all of them.

Adds land in the catalog first, then in the serving view's fresh buffer and
the inverted file's open set, so they are searchable at once; a background
rebuild folds them into a new Annoy generation and the open set is sealed into
a segment, each swapped in atomically.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from indexer.analysis import Analysis, analyze_bytes, analyze_video_frame
from indexer.ann import GenerationStore
from indexer.catalog import GLOBAL_SCOPE, Catalog, ChatRecords, ImageRecord, NewFrame, NewImage
from indexer.copies import CopyFinder, CopyQuestion
from indexer.errors import ImageError, IndexNotFoundError, NotFoundError
from indexer.features import LocalFeatures
from indexer.maintenance import CENTROID_TRAINING_DESCRIPTORS, IndexMaintainer
from indexer.originals import ORIGINALS_DIR, OriginalStore
from indexer.querying import (
    MIN_REGION_KEYPOINTS,
    RANK_FUSION_K,
    REGIONS,
    FramedLoader,
    Match,
    QueryPipeline,
    Ranking,
    StageTimings,
    match_score,
)
from indexer.segments import SegmentSet
from indexer.settings import EngineSettings
from indexer.workers import CpuPool, background_work

__all__ = [
    "CATALOG_FILE",
    "CENTROID_TRAINING_DESCRIPTORS",
    "GENERATIONS_DIR",
    "MIN_REGION_KEYPOINTS",
    "ORIGINALS_DIR",
    "RANK_FUSION_K",
    "REGIONS",
    "AddResult",
    "FramedLoader",
    "IndexStats",
    "Match",
    "Ranking",
    "SearchService",
    "StageTimings",
    "match_score",
]

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite"
GENERATIONS_DIR = "generations"


@dataclass(frozen=True, slots=True)
class AddResult:
    """The outcome of an add: the image in the catalog, and whether it is new."""

    image: ImageRecord
    created: bool


@dataclass(frozen=True, slots=True)
class IndexStats:
    images: int
    indexed: int  # in the Annoy generation
    fresh: int  # searched exactly until the next rebuild
    generation: str | None
    built_at: float | None
    dimensions: int | None
    codebook_trained_on: int | None
    failures: int
    bytes_per_image: dict[str, float]
    # The inverted file: images it holds (live), and its segments on disk.
    voting_images: int = 0
    segments: int = 0


class SearchService:
    """The engine's public face. Open with :meth:`open`; close with :meth:`close`.

    ``pipeline`` runs the queries (benchmarks time and count its stages).
    """

    def __init__(
        self,
        index_dir: Path,
        catalog: Catalog,
        settings: EngineSettings,
        pool: CpuPool,
        store: GenerationStore,
    ) -> None:
        self.index_dir = index_dir
        self.catalog = catalog
        self.settings = settings
        self.pool = pool
        self._originals = OriginalStore(index_dir, catalog)
        self._maintainer = IndexMaintainer(index_dir, catalog, settings, store, pool=pool)
        self.pipeline = QueryPipeline(
            catalog,
            settings,
            pool,
            serving=lambda: self._maintainer.serving,
            segments=lambda: self._maintainer.inverted.current,
            locate=self._originals.locate,
        )
        self._copies = CopyFinder(catalog, self.pipeline)

    # -- life cycle -------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        index_dir: Path,
        *,
        settings: EngineSettings | None = None,
        pool: CpuPool | None = None,
        create: bool = False,
        max_catalog_bytes: int | None = None,
    ) -> SearchService:
        """Open the index in ``index_dir``.

        A derived file that fails its checksum is rebuilt from the catalog here.
        ``max_catalog_bytes`` is a quota on the catalog (see :meth:`Catalog.open`):
        past it, adds fail with StorageFullError as on a full disk.

        Raises:
            IndexNotFoundError: there is no index and ``create`` is false.
            IndexIncompatibleError: it was made by an incompatible version.
            CatalogError: the catalog cannot be opened.
        """
        index_dir = index_dir.absolute()
        if not create and not (index_dir / CATALOG_FILE).exists():
            raise IndexNotFoundError(f"no index in {index_dir} (build one first)")
        index_dir.mkdir(parents=True, exist_ok=True)
        catalog = await Catalog.open(index_dir / CATALOG_FILE, max_bytes=max_catalog_bytes)
        try:
            requested = settings or EngineSettings()
            stored = await catalog.settings()
            if stored:
                resolved = requested.with_stored(stored)
            else:
                resolved = requested
                await catalog.save_settings(requested.stored())
            service = cls(
                index_dir,
                catalog,
                resolved,
                pool or CpuPool.inline(),
                GenerationStore(index_dir / GENERATIONS_DIR),
            )
            await service._originals.remove_orphans()
            await service._maintainer.load()
        except BaseException:
            await catalog.close()
            raise
        return service

    async def close(self) -> None:
        """Wait for a running rebuild, then release the index."""
        await self._maintainer.close()
        await self.catalog.close()

    # -- queries ------------------------------------------------------------------

    async def query(
        self,
        source: bytes | Path,
        *,
        scope: int = GLOBAL_SCOPE,
        top: int = 5,
        timings: StageTimings | None = None,
    ) -> list[Match]:
        """The ``top`` most similar images visible from ``scope``, best first.

        Raises:
            ImageError: the query is not a usable image (each subclass says why).
            SourceError: the query file cannot be read.
        """
        return await self.pipeline.query(source, scope=scope, top=top, timings=timings)

    async def search_features(
        self,
        features: LocalFeatures,
        *,
        scope: int = GLOBAL_SCOPE,
        top: int = 5,
        timings: StageTimings | None = None,
        inner: Sequence[FramedLoader] = (),
    ) -> list[Match]:
        """Search with features already extracted (see :meth:`query`).

        ``inner`` extract the features of photos shown inside the query; see
        :meth:`QueryPipeline.search`.
        """
        return await self.pipeline.search(
            features, scope=scope, top=top, timings=timings, inner=inner
        )

    # -- adding and removing ------------------------------------------------------------

    async def add(
        self,
        data: bytes,
        *,
        scope: int = GLOBAL_SCOPE,
        added_by: str | None = None,
        origin_chat_id: int | None = None,
        origin_message_id: int | None = None,
        telegram_file_id: str | None = None,
        added_at: float | None = None,
        analysis: Analysis | None = None,
        distinct_from: Collection[int] = (),
        every_look: bool = False,
    ) -> AddResult:
        """Keep ``data`` under the index folder and make it searchable at once.

        If the collection already has the same picture (identical bytes, or a
        verified match) visible from ``scope``, nothing is added and that image
        is returned with ``created=False``. ``distinct_from`` are images the
        caller knows ``data`` is not (a chat said "not a repost"): they are never
        returned as its verified copy (identical bytes still are).

        The copy is looked for with the first look of a query (the candidates
        most photos are found among), which keeps bulk adds fast. With
        ``every_look``, when that verifies nothing, the rest of a query's looks
        follow (the photo shown inside a frame, the regions; a moving picture's
        later frames), so the copy a query would find is found: for a caller
        that tells people a photo was seen before. A new photo then costs about
        a query's time more.

        ``added_at`` is when the photo was posted, when that was not now (an
        imported chat history). ``analysis`` is :meth:`analyze` of ``data``, for
        a caller that analyses the next photos while this one is added.

        Raises:
            ImageError: the bytes are not a usable image.
            StorageFullError: the disk is full (nothing was added).
        """
        # An add yields the CPU to queries: people wait for an answer, a bulk import does not.
        with background_work():
            if analysis is None:
                analysis = await self.analyze(data)
            look = await self._copies.look(
                CopyQuestion(data, analysis, scope, distinct_from, every_look)
            )
            async with self._maintainer.write_lock:
                existing = await self._copies.confirm(look)
                if existing is not None:
                    return AddResult(existing, created=False)
                first_image = self._maintainer.serving.generation is None
                record = await self._store_new(
                    data,
                    analysis,
                    scope=scope,
                    added_by=added_by,
                    origin_chat_id=origin_chat_id,
                    origin_message_id=origin_message_id,
                    telegram_file_id=telegram_file_id,
                    added_at=added_at,
                )
            if first_image:
                # The first image: train a codebook so search works at once.
                await self._maintainer.rebuild()
            else:
                self._maintainer.maybe_rebuild_in_background()
            return AddResult(record, created=True)

    async def _store_new(
        self,
        data: bytes,
        analysis: Analysis,
        *,
        scope: int,
        added_by: str | None,
        origin_chat_id: int | None,
        origin_message_id: int | None,
        telegram_file_id: str | None,
        added_at: float | None,
    ) -> ImageRecord:
        """Keep a new photo and make it searchable: under the write lock, which keeps
        the serving view in place until the photo is in its buffer."""
        relative = self._originals.store(data, analysis)
        # A moving picture is its first frame, and more frames tied to it.
        described = [
            features.keep(self.settings.max_keypoints, grid=self.settings.keypoint_grid)
            for features in [f.features for f in analysis.video_frames] or [analysis.features]
        ]
        serving = self._maintainer.serving
        generation = serving.generation
        vectors = [
            generation.codebook.encode(features.descriptors) if generation else None
            for features in described
        ]
        seconds = [frame.seconds for frame in analysis.video_frames]
        try:
            [image_id] = await self.catalog.insert_images(
                [
                    NewImage(
                        content_hash=analysis.content_hash,
                        scope=scope,
                        path=relative,
                        file_size=analysis.file_size,
                        file_mtime_ns=0,
                        width=analysis.width,
                        height=analysis.height,
                        features=described[0],
                        vector=vectors[0],
                        codebook_id=generation.codebook.id if generation else None,
                        added_by=added_by,
                        origin_chat_id=origin_chat_id,
                        origin_message_id=origin_message_id,
                        telegram_file_id=telegram_file_id,
                        added_at=added_at,
                        frame_seconds=seconds[0] if seconds else None,
                        later_frames=[
                            NewFrame(*frame)
                            for frame in zip(seconds[1:], described[1:], vectors[1:], strict=True)
                        ],
                    )
                ]
            )
            searchable = [image_id, *await self.catalog.frame_ids([image_id])]
        except BaseException:
            await self._originals.release(relative)
            raise
        for row_id, features, row_vector in zip(searchable, described, vectors, strict=True):
            if row_vector is not None:
                serving.record_added(row_id, scope, row_vector)
            self._maintainer.inverted.add(row_id, scope, features)
        return await self.catalog.get(image_id)

    async def analyze(self, data: bytes) -> Analysis:
        """What :meth:`add` needs to know of ``data`` (on the pool's background workers,
        as the rest of an add): of a moving picture, every frame a query would look at.

        Raises:
            ImageError: the bytes are not a usable image.
        """
        with background_work():
            analysis = await self.pool.run(analyze_bytes, data, self.settings, for_query=True)
            if not analysis.frames_left:
                return analysis
            more = []
            for index in analysis.frames_left:
                try:
                    more.append(
                        await self.pool.run(analyze_video_frame, data, index, self.settings)
                    )
                except ImageError as error:
                    log.info("frame %d of a moving picture cannot be described: %s", index, error)
        return dataclasses.replace(
            analysis, video_frames=(*analysis.video_frames, *more), frames_left=()
        )

    async def closest_picture(self, analysis: Analysis, image_ids: Sequence[int]) -> int | None:
        """Of ``image_ids``, the one ``analysis``'s photo verifies as the same picture with
        the most inliers; None if it verifies as none. For pictures a chat keeps apart: a
        photo matching both is the one it shares more with."""
        verdicts = await self.pipeline.verdicts(analysis, image_ids)
        verified = [(v.inliers, image_id) for image_id, v in verdicts.items() if v.verified]
        return max(verified)[1] if verified else None

    async def remove(self, image_id: int, *, scope: int | None = None) -> ImageRecord:
        """Remove an image. With ``scope``, only an image of that scope may be removed.

        A photo of the offline collection stays removed: builds of its folder skip
        the file until its content changes.

        Raises:
            NotFoundError: no such image (or it belongs to another scope).
        """
        async with self._maintainer.write_lock:
            record = await self.catalog.get(image_id)
            if scope is not None and record.scope != scope:
                raise NotFoundError(f"no image #{image_id} in this chat")
            removed = await self.catalog.delete_images([image_id], on_purpose=True)
            for row_id in removed:  # with the further frames of a moving picture
                self._maintainer.serving.record_removed(row_id)
            await self._maintainer.inverted.remove(removed)
            await self._originals.release(record.path)
        self._maintainer.maybe_rebuild_in_background()
        return record

    async def remove_path(self, path: Path) -> list[ImageRecord]:
        """Remove every image indexed from this file path.

        Raises:
            NotFoundError: nothing is indexed from that path.
        """
        records = await self.catalog.find_by_path(os.path.normpath(path.absolute()))
        if not records:
            raise NotFoundError(f"{path} is not in the index")
        return [await self.remove(record.id) for record in records]

    async def remember_file_id(self, image_id: int, file_id: str) -> None:
        """Cache the Telegram file id of an uploaded result, so it is uploaded once."""
        await self.catalog.set_telegram_file_id(image_id, file_id)

    def resolve_path(self, record: ImageRecord) -> Path:
        return self._originals.locate(record)

    async def get(self, image_id: int) -> ImageRecord:
        """The image with this id.

        Raises:
            NotFoundError: there is no such image.
        """
        return await self.catalog.get(image_id)

    @property
    def chat_records(self) -> ChatRecords:
        """The bot's records of its chats (the repost watch's), kept in the catalog's database
        so that they are written and removed together with the images they name."""
        return self.catalog.chats

    async def count(self, *, scope: int | None = None) -> int:
        """Images in the collection, or in one scope."""
        return await self.catalog.count(scope=scope)

    # -- rebuilding ---------------------------------------------------------------------------

    @property
    def generation_name(self) -> str | None:
        """The generation being served, ``None`` before the first build."""
        generation = self._maintainer.serving.generation
        return generation.name if generation is not None else None

    @property
    def segments(self) -> SegmentSet | None:
        """The inverted file as queries see it now (``None`` before the first build)."""
        return self._maintainer.inverted.current

    async def rebuild(self, *, retrain: bool = False) -> str | None:
        """Fold every image of the catalog into a new generation and swap it in.

        Retrains the codebook when asked, when there is none, or when the
        collection has grown ``retrain_growth`` times since it was trained.
        Returns the new generation's name, or ``None`` for an empty catalog.
        """
        return await self._maintainer.rebuild(retrain=retrain)

    # -- reporting -------------------------------------------------------------------------------

    async def stats(self) -> IndexStats:
        serving = self._maintainer.serving
        generation = serving.generation
        segments = self._maintainer.inverted.current
        return IndexStats(
            images=await self.catalog.count(),
            indexed=len(generation) if generation is not None else 0,
            fresh=len(serving.fresh),
            generation=generation.name if generation is not None else None,
            built_at=float(generation.manifest["built_at"]) if generation is not None else None,
            dimensions=generation.dimensions if generation is not None else None,
            codebook_trained_on=generation.codebook.trained_on if generation is not None else None,
            failures=len(await self.catalog.failures()),
            bytes_per_image=await self.catalog.bytes_per_image(),
            voting_images=len(segments) if segments is not None else 0,
            segments=len(segments.sealed) if segments is not None else 0,
        )
