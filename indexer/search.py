"""The search service: query, add, remove, and keep the index fresh.

A query runs in stages: decode and extract (worker), encode the query and its
mirror image into global vectors, take candidates from the Annoy generation
and the fresh buffer, verify the best few geometrically (worker), and only if
none verifies, look again with regional vectors (the photo may be a small part
of the query, as in a screenshot) and verify more.

Adds land in the catalog first (the source of truth), then in the fresh buffer,
so they are searchable at once; a background rebuild folds them into a new
Annoy generation and swaps it in atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from indexer.analysis import Analysis, analyze_bytes, analyze_framed, analyze_path
from indexer.ann import ExactVectors, Generation, GenerationStore
from indexer.catalog import GLOBAL_SCOPE, Catalog, ImageRecord, NewImage
from indexer.encoding import Codebook, region_grid, train_centroids, train_codebook, vlad_vector
from indexer.errors import (
    ImageError,
    IndexCorruptError,
    IndexNotFoundError,
    NotFoundError,
    StorageFullError,
)
from indexer.features import LocalFeatures
from indexer.settings import EngineSettings
from indexer.verify import Verification, verify_candidates
from indexer.workers import CpuPool

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

CATALOG_FILE = "catalog.sqlite"
GENERATIONS_DIR = "generations"
ORIGINALS_DIR = "originals"
REGIONS = region_grid()
# k-means needs far fewer descriptors than the collection has; more only costs time.
CENTROID_TRAINING_DESCRIPTORS = 200_000


@dataclass(frozen=True, slots=True)
class Match:
    """One result of a query."""

    image: ImageRecord
    path: Path  # absolute path of the photo file
    score: float  # 0..1; above 0.5 only when verified
    verified: bool  # geometric verification says it is the same picture
    inliers: int
    mirrored: bool  # matched as a mirror image of the query
    similarity: float  # cosine similarity of the global vectors


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


@dataclass(slots=True)
class StageTimings:
    """Seconds spent in each stage of the last query (for benchmarks)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


@dataclass(frozen=True, slots=True)
class _Serving:
    """What queries search: a generation and what changed since it was built.

    Replaced as a whole when a new generation is installed, so a query that
    took it keeps a consistent view (same codebook, same dimensions) even if a
    swap happens while it runs.
    """

    generation: Generation | None
    fresh: ExactVectors
    removed: set[int]


Ranking = list[tuple[int, float]]  # (image id, similarity), best first
FramedLoader = Callable[[], Awaitable[LocalFeatures]]
# Regions with fewer keypoints than this describe too little to rank by.
MIN_REGION_KEYPOINTS = 24
# Inliers beyond which a verified first candidate needs no second opinion.
_CONFIDENT_INLIERS = 30
# Reciprocal-rank fusion constant: how much a first place outweighs a fifth.
RANK_FUSION_K = 3.0


def _best_similarity(
    rankings: Sequence[Ranking], best: dict[int, float] | None = None
) -> dict[int, float]:
    """Each image's highest similarity over ``rankings``, added into ``best`` if given."""
    best = {} if best is None else best
    for ranking in rankings:
        for image_id, value in ranking:
            best[image_id] = max(value, best.get(image_id, -2.0))
    return best


def _by_score(scores: dict[int, float]) -> list[int]:
    """Image ids, highest score first."""
    return sorted(scores, key=scores.__getitem__, reverse=True)


def _fused_ranking(rankings: Sequence[Ranking]) -> list[int]:
    """Image ids by reciprocal-rank fusion over several rankings.

    Regional vectors are noisy one by one (a window of sky resembles many
    photos), but the true original tends to rank well in several overlapping
    windows; summing 1/(k + rank) rewards that agreement where a plain maximum
    of similarities rewards the luckiest window.
    """
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, (image_id, _) in enumerate(ranking):
            scores[image_id] = scores.get(image_id, 0.0) + 1.0 / (RANK_FUSION_K + rank)
    return _by_score(scores)


def _stronger(first: Verification, second: Verification) -> bool:
    return (first.verified, first.inliers) > (second.verified, second.inliers)


def match_score(verification: Verification, similarity: float) -> float:
    """A score in [0, 1]: verified matches above 0.5 and growing with inliers,
    unverified ones below 0.5 by global similarity."""
    if verification.verified:
        return 0.5 + 0.5 * verification.inliers / (verification.inliers + 20.0)
    return 0.5 * min(max(similarity, 0.0), 0.999)


class SearchService:
    """The engine's public face. Open with :meth:`open`; close with :meth:`close`."""

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
        self._store = store
        self._serving = _Serving(None, ExactVectors(0), set())
        self._write_lock = asyncio.Lock()
        self._rebuild_lock = asyncio.Lock()
        self._rebuild_task: asyncio.Task[str | None] | None = None

    # -- life cycle -------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        index_dir: Path,
        *,
        settings: EngineSettings | None = None,
        pool: CpuPool | None = None,
        create: bool = False,
    ) -> SearchService:
        """Open the index in ``index_dir``.

        A derived file that fails its checksum is rebuilt from the catalog here.

        Raises:
            IndexNotFoundError: there is no index and ``create`` is false.
            IndexIncompatibleError: it was made by an incompatible version.
            CatalogError: the catalog cannot be opened.
        """
        index_dir = index_dir.absolute()
        if not create and not (index_dir / CATALOG_FILE).exists():
            raise IndexNotFoundError(f"no index in {index_dir} (build one first)")
        index_dir.mkdir(parents=True, exist_ok=True)
        catalog = await Catalog.open(index_dir / CATALOG_FILE)
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
            await service._load()
        except BaseException:
            await catalog.close()
            raise
        return service

    async def close(self) -> None:
        """Wait for a running rebuild, then release the index."""
        if self._rebuild_task is not None:
            with contextlib.suppress(Exception):
                await self._rebuild_task
        self._serving = _Serving(None, ExactVectors(0), set())
        await self.catalog.close()

    async def _load(self) -> None:
        await self._remove_orphan_originals()
        try:
            generation = self._store.load_current()
        except IndexCorruptError as error:
            log.warning("%s; rebuilding the index from the catalog", error)
            self._store.discard_current()
            generation = None
            if await self.catalog.count():
                await self.rebuild()
                return
        self._store.remove_stale(keep=set())
        await self._install(generation)

    async def _install(self, generation: Generation | None) -> None:
        """Serve ``generation``, with everything newer than it in the fresh buffer."""
        fresh = ExactVectors(generation.dimensions if generation else 0)
        if generation is not None:
            codebook = generation.codebook
            # Everything up to max_image_id is in the generation: only newer images
            # can lack a vector of its codebook, and a range of ids is cheap to read.
            await self._encode_missing(codebook, after_id=generation.max_image_id)
            async for ids, scopes, vectors in self.catalog.iter_vectors(
                codebook.id, after_id=generation.max_image_id
            ):
                for image_id, scope, vector in zip(ids, scopes, vectors, strict=True):
                    fresh.add(int(image_id), int(scope), vector)
        # No explicit unload of the previous generation: queries still running on
        # worker threads hold it, and Annoy crashes if unmapped under a search.
        # It is released with the last reference.
        self._serving = _Serving(generation, fresh, set())

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
        timings = timings if timings is not None else StageTimings()
        started = time.perf_counter()
        analysis = await self.pool.run(_analyze, source, self.settings)
        timings.add("analyze", time.perf_counter() - started)
        framed: FramedLoader | None = None
        if analysis.frame is not None:
            frame = analysis.frame

            async def framed() -> LocalFeatures:
                return await self.pool.run(analyze_framed, source, frame, self.settings)

        return await self.search_features(
            analysis.features, scope=scope, top=top, timings=timings, framed=framed
        )

    async def search_features(
        self,
        features: LocalFeatures,
        *,
        scope: int = GLOBAL_SCOPE,
        top: int = 5,
        timings: StageTimings | None = None,
        framed: FramedLoader | None = None,
    ) -> list[Match]:
        """Search with features already extracted (see :meth:`query`).

        ``framed`` extracts the features of a photo framed inside the query; it
        is called only if the whole query verifies nothing.
        """
        timings = timings if timings is not None else StageTimings()
        serving = self._serving  # one consistent view for the whole query
        generation = serving.generation
        if generation is None:
            return []
        visible = {GLOBAL_SCOPE, scope}
        oriented = (features, features.mirrored())

        # Encoding and Annoy are pure CPU work of a few milliseconds each: on a
        # thread they never stall the event loop (numpy and annoy release the GIL).
        clock = time.perf_counter()
        # Deep enough to take part in the regional look's fusion below; only the
        # first batch of it is verified before that.
        depth = max(top, self.settings.verify_limit)
        rankings = await asyncio.to_thread(self._rank_whole, serving, oriented, visible, depth)
        timings.add("candidates", time.perf_counter() - clock)
        similarity = _best_similarity(rankings)
        ranked = _by_score(similarity)
        # The original is nearly always first: verify the top two alone, and the
        # rest of the first batch only when they leave doubt.
        verdicts = await self._verify(features, ranked[:2], timings)
        if not any(v.verified and v.inliers >= _CONFIDENT_INLIERS for v in verdicts.values()):
            verdicts.update(
                await self._verify(features, ranked[2 : self.settings.first_batch], timings)
            )
        # The framed photo's verdicts are kept apart: a candidate it rejects may
        # still verify against the whole query, and it has a budget of its own.
        framed_verdicts: dict[int, Verification] = {}
        if framed is not None and not any(v.verified for v in verdicts.values()):
            framed_verdicts = await self._search_framed(
                framed, serving=serving, visible=visible, similarity=similarity, timings=timings
            )
        if not any(v.verified for v in (*verdicts.values(), *framed_verdicts.values())):
            clock = time.perf_counter()
            regional = await asyncio.to_thread(self._rank_regions, serving, oriented, visible)
            timings.add("candidates", time.perf_counter() - clock)
            _best_similarity(regional, similarity)
            budget = max(self.settings.verify_limit - len(verdicts), 0)
            # The whole query's own ranking takes part: an original half covered
            # ranks 20th there and 50th by windows, but well in both together.
            fused = _fused_ranking([*regional, *rankings])
            extra = [i for i in fused if i not in verdicts][:budget]
            verdicts.update(await self._verify(features, extra, timings))
        for image_id, verdict in framed_verdicts.items():
            if image_id not in verdicts or _stronger(verdict, verdicts[image_id]):
                verdicts[image_id] = verdict

        clock = time.perf_counter()
        shown = set(ranked[:top]) | {i for i, v in verdicts.items() if v.verified}
        records = await self.catalog.get_many(sorted(shown))
        timings.add("catalog", time.perf_counter() - clock)
        matches = []
        for image_id, record in records.items():
            if record.scope not in visible:  # defence in depth: never cross chats
                continue
            verdict = verdicts.get(image_id, Verification.rejected())
            matches.append(
                Match(
                    image=record,
                    path=self.resolve_path(record),
                    score=match_score(verdict, similarity[image_id]),
                    verified=verdict.verified,
                    inliers=verdict.inliers,
                    mirrored=verdict.mirrored,
                    similarity=similarity[image_id],
                )
            )
        matches.sort(key=lambda m: (m.score, m.inliers), reverse=True)
        return matches[:top]

    async def _search_framed(
        self,
        framed: FramedLoader,
        *,
        serving: _Serving,
        visible: set[int],
        similarity: dict[int, float],
        timings: StageTimings,
    ) -> dict[int, Verification]:
        """Search the photo framed inside the query as a query of its own.

        Records its candidates' similarities in ``similarity``; returns the
        verdicts of the framed photo on its first batch of candidates.
        """
        clock = time.perf_counter()
        try:
            inner = await framed()
        except ImageError as error:
            log.info("the framed photo cannot be described: %s", error)
            return {}
        timings.add("analyze", time.perf_counter() - clock)
        clock = time.perf_counter()
        rankings = await asyncio.to_thread(
            self._rank_whole, serving, (inner, inner.mirrored()), visible, self.settings.first_batch
        )
        timings.add("candidates", time.perf_counter() - clock)
        _best_similarity(rankings, similarity)
        ranked = _by_score(_best_similarity(rankings))
        return await self._verify(inner, ranked[: self.settings.first_batch], timings)

    def _rank(
        self,
        serving: _Serving,
        vectors: Sequence[FloatArray],
        visible: set[int],
        count: int,
        search_k: int,
    ) -> list[Ranking]:
        """For each vector, the nearest visible images (Annoy and fresh buffer merged)."""
        # Other chats' images are filtered out after the search, so a chat's own
        # (rarer) images need a deeper look to stay among the results.
        depth = count if visible == {GLOBAL_SCOPE} else count * 4
        generation, fresh, removed = serving.generation, serving.fresh, serving.removed
        assert generation is not None  # noqa: S101 - callers return early without one
        rankings = []
        for vector in vectors:
            merged: dict[int, float] = {}
            for found in (
                generation.search(vector, depth, search_k),
                fresh.search(vector, depth),
            ):
                for image_id, scope, value in zip(
                    found.ids.tolist(),
                    found.scopes.tolist(),
                    found.similarities.tolist(),
                    strict=True,
                ):
                    if scope in visible and image_id not in removed:
                        merged[image_id] = max(value, merged.get(image_id, -2.0))
            ordered = sorted(merged.items(), key=lambda item: item[1], reverse=True)
            rankings.append(ordered[:count])
        return rankings

    def _rank_whole(
        self,
        serving: _Serving,
        oriented: Sequence[LocalFeatures],
        visible: set[int],
        count: int,
    ) -> list[Ranking]:
        assert serving.generation is not None  # noqa: S101 - checked by the caller
        vectors = [serving.generation.codebook.encode(f.descriptors) for f in oriented]
        return self._rank(serving, vectors, visible, count, self.settings.search_k)

    def _rank_regions(
        self, serving: _Serving, oriented: Sequence[LocalFeatures], visible: set[int]
    ) -> list[Ranking]:
        assert serving.generation is not None  # noqa: S101 - checked by the caller
        codebook = serving.generation.codebook
        vectors = [
            row
            for features in oriented
            for row in codebook.encode_regions(
                features, REGIONS, min_keypoints=MIN_REGION_KEYPOINTS
            )
        ]
        return self._rank(
            serving,
            vectors,
            visible,
            self.settings.candidates_per_region,
            self.settings.search_k // 4,
        )

    async def _verify(
        self, features: LocalFeatures, ids: Sequence[int], timings: StageTimings
    ) -> dict[int, Verification]:
        if not ids:
            return {}
        clock = time.perf_counter()
        stored = await self.catalog.features(ids)
        timings.add("catalog", time.perf_counter() - clock)
        present = [i for i in ids if i in stored]
        clock = time.perf_counter()
        verdicts = await self.pool.run(
            verify_candidates, features, [stored[i] for i in present], params=self.settings.verify
        )
        timings.add("verify", time.perf_counter() - clock)
        return dict(zip(present, verdicts, strict=True))

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
    ) -> AddResult:
        """Keep ``data`` under the index folder and make it searchable at once.

        If the collection already has the same picture (identical bytes, or a
        verified match) visible from ``scope``, nothing is added and that image
        is returned with ``created=False``.

        Raises:
            ImageError: the bytes are not a usable image.
            StorageFullError: the disk is full (nothing was added).
        """
        analysis = await self.pool.run(analyze_bytes, data, self.settings, for_query=True)
        async with self._write_lock:
            existing = await self._find_existing(analysis, scope)
            if existing is not None:
                return AddResult(existing, created=False)
            relative = self._store_original(data, analysis)
            stored_features = analysis.features.keep(
                self.settings.max_keypoints, grid=self.settings.keypoint_grid
            )
            generation = self._serving.generation
            vector = (
                generation.codebook.encode(stored_features.descriptors)
                if generation is not None
                else None
            )
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
                            features=stored_features,
                            vector=vector,
                            codebook_id=generation.codebook.id if generation else None,
                            added_by=added_by,
                            origin_chat_id=origin_chat_id,
                            origin_message_id=origin_message_id,
                            telegram_file_id=telegram_file_id,
                        )
                    ]
                )
            except BaseException:
                # The file is named by content: another chat's row may share it.
                if not await self.catalog.find_by_path(relative):
                    self._delete_original(relative)
                raise
            if generation is not None and vector is not None:
                self._serving.fresh.add(image_id, scope, vector)
            record = await self.catalog.get(image_id)
        if generation is None:
            await self.rebuild()  # the first image: train a codebook so search works at once
        else:
            self._maybe_rebuild_in_background()
        return AddResult(record, created=True)

    async def _find_existing(self, analysis: Analysis, scope: int) -> ImageRecord | None:
        scopes = sorted({GLOBAL_SCOPE, scope})
        same_bytes = await self.catalog.find_by_hash(analysis.content_hash, scopes)
        if same_bytes is not None:
            return same_bytes
        for match in await self.search_features(analysis.features, scope=scope, top=1):
            if match.verified:
                return match.image
        return None

    async def remove(self, image_id: int, *, scope: int | None = None) -> ImageRecord:
        """Remove an image. With ``scope``, only an image of that scope may be removed.

        Raises:
            NotFoundError: no such image (or it belongs to another scope).
        """
        async with self._write_lock:
            record = await self.catalog.get(image_id)
            if scope is not None and record.scope != scope:
                raise NotFoundError(f"no image #{image_id} in this chat")
            await self.catalog.delete_images([image_id])
            self._serving.fresh.discard(image_id)
            self._serving.removed.add(image_id)
            if record.path.startswith(f"{ORIGINALS_DIR}/") and not await self.catalog.find_by_path(
                record.path
            ):
                self._delete_original(record.path)
        self._maybe_rebuild_in_background()
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
        path = Path(record.path)
        return path if path.is_absolute() else self.index_dir / path

    # -- originals kept under the index folder ----------------------------------------------

    def _store_original(self, data: bytes, analysis: Analysis) -> str:
        """Write the bytes durably under originals/, named by content (never by user input)."""
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

    def _delete_original(self, relative: str) -> None:
        (self.index_dir / relative).unlink(missing_ok=True)

    async def _remove_orphan_originals(self) -> None:
        """An add killed between writing the file and committing its row leaves a
        file nobody refers to (or a temporary one): removed at start-up, so an add
        is either whole or absent."""
        originals = self.index_dir / ORIGINALS_DIR
        if not originals.exists():
            return
        referenced = await self.catalog.paths_under(f"{ORIGINALS_DIR}/")
        for leftover in originals.glob("*/*"):
            relative = f"{ORIGINALS_DIR}/{leftover.parent.name}/{leftover.name}"
            if leftover.is_file() and relative not in referenced:
                leftover.unlink(missing_ok=True)

    # -- rebuilding ---------------------------------------------------------------------------

    def _maybe_rebuild_in_background(self) -> None:
        generation = self._serving.generation
        pending = len(self._serving.fresh) + len(self._serving.removed)
        threshold = self.settings.rebuild_threshold(len(generation or ()))
        if pending >= threshold and (self._rebuild_task is None or self._rebuild_task.done()):
            self._rebuild_task = asyncio.create_task(self.rebuild(), name="index-rebuild")

    @property
    def generation_name(self) -> str | None:
        """The generation being served, ``None`` before the first build."""
        return self._serving.generation.name if self._serving.generation is not None else None

    @property
    def rebuild_running(self) -> bool:
        return self._rebuild_task is not None and not self._rebuild_task.done()

    async def rebuild(self, *, retrain: bool = False) -> str | None:
        """Fold every image of the catalog into a new generation and swap it in.

        Retrains the codebook when asked, when there is none, or when the
        collection has grown ``retrain_growth`` times since it was trained.
        Returns the new generation's name, or ``None`` for an empty catalog.
        """
        async with self._rebuild_lock:
            total = await self.catalog.count()
            if total == 0:
                return None
            generation = self._serving.generation
            codebook = generation.codebook if generation is not None else None
            if codebook is None or retrain or self._should_retrain(codebook, total):
                codebook = await self._train(total)
            # The ceiling first: an image added while this runs has a vector of the
            # serving codebook, and is either encoded below or left to the fresh buffer.
            ceiling = await self.catalog.max_id()
            await self._encode_missing(codebook)
            id_chunks, scope_chunks, vector_chunks = [], [], []
            async for ids, scopes, vectors in self.catalog.iter_vectors(
                codebook.id, up_to_id=ceiling
            ):
                id_chunks.append(ids)
                scope_chunks.append(scopes)
                vector_chunks.append(vectors)
            all_ids = np.concatenate(id_chunks) if id_chunks else np.empty(0, np.int64)
            matrix = (
                np.concatenate(vector_chunks)
                if vector_chunks
                else np.empty((0, codebook.dimensions), np.float32)
            )
            name = await asyncio.to_thread(
                self._store.write,
                codebook=codebook,
                ids=all_ids,
                scopes=np.concatenate(scope_chunks) if scope_chunks else all_ids,
                vectors=iter(matrix),
                max_image_id=ceiling,
                trees=self.settings.annoy_build_trees,
            )
            fresh_generation = self._store.load_current(verify_checksums=False)
            async with self._write_lock:
                await self._install(fresh_generation)
            log.info("index generation %s: %d images", name, len(all_ids))
            return name

    def _should_retrain(self, codebook: Codebook, total: int) -> bool:
        wanted = min(total, self.settings.training_images)
        return wanted >= codebook.trained_on * self.settings.retrain_growth

    async def _train(self, total: int) -> Codebook:
        """Train centroids and whitening on a sample of the catalog's images."""
        sampled = min(total, self.settings.training_images)
        per_image = max(16, CENTROID_TRAINING_DESCRIPTORS // sampled)
        sample: list[FloatArray] = []
        async for _, features in self.catalog.iter_training_features(sampled):
            sample.append(features.descriptors[:per_image])
        centroids = await asyncio.to_thread(
            train_centroids, np.concatenate(sample), centroids=self.settings.centroids
        )
        vlads: list[FloatArray] = []
        async for _, features in self.catalog.iter_training_features(sampled):
            vlads.append(vlad_vector(features.descriptors, centroids))
        codebook = await asyncio.to_thread(
            train_codebook, centroids, np.stack(vlads), dimensions=self.settings.dimensions
        )
        log.info(
            "trained a codebook on %d images: %d dimensions",
            codebook.trained_on,
            codebook.dimensions,
        )
        return codebook

    async def _encode_missing(self, codebook: Codebook, *, after_id: int = 0) -> None:
        """Encode the images (above ``after_id``) whose vector is missing or from
        another codebook."""
        missing = await self.catalog.ids_without_vector(codebook.id, after_id=after_id)
        for start in range(0, len(missing), 512):
            chunk = missing[start : start + 512]
            features = await self.catalog.features(chunk)
            vectors = [(i, codebook.encode(f.descriptors)) for i, f in features.items()]
            await self.catalog.save_vectors(codebook.id, vectors)

    # -- reporting -------------------------------------------------------------------------------

    async def stats(self) -> IndexStats:
        generation = self._serving.generation
        return IndexStats(
            images=await self.catalog.count(),
            indexed=len(generation) if generation is not None else 0,
            fresh=len(self._serving.fresh),
            generation=generation.name if generation is not None else None,
            built_at=float(generation.manifest["built_at"]) if generation is not None else None,
            dimensions=generation.dimensions if generation is not None else None,
            codebook_trained_on=generation.codebook.trained_on if generation is not None else None,
            failures=len(await self.catalog.failures()),
            bytes_per_image=await self.catalog.bytes_per_image(),
        )


_EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
    "GIF": "gif",
}


def _analyze(source: bytes | Path, settings: EngineSettings) -> Analysis:
    if isinstance(source, Path):
        return analyze_path(source, settings, for_query=True)
    return analyze_bytes(source, settings, for_query=True)
