"""Keeping the index fresh: what queries search, and rebuilding it.

Queries search a :class:`ServingView`: an Annoy generation plus what changed
since it was built (a fresh buffer searched exactly, and the ids removed). A
rebuild folds the catalog into a new generation in the background, writes it
beside the old one and swaps a new view in as a whole. The maintainer also
owns the inverted file (:class:`InvertedFile`), which keeps its own segments
and is brought up to date by the same rebuilds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from indexer.ann import ANNOY_FILE, ExactVectors, Generation, GenerationStore
from indexer.catalog import Catalog
from indexer.encoding import Codebook, train_centroids, train_codebook, vlad_vector
from indexer.errors import IndexCorruptError
from indexer.inverted_file import InvertedFile
from indexer.mapped import PageCacheWarmer
from indexer.settings import EngineSettings
from indexer.workers import CpuPool, background_work

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]

# k-means needs far fewer descriptors than the collection has; more only costs time.
CENTROID_TRAINING_DESCRIPTORS = 200_000


@dataclass(frozen=True, slots=True)
class ServingView:
    """What queries search: a generation and what changed since it was built.

    Replaced as a whole when a new generation is installed, so a query that
    took it keeps a consistent view (same codebook, same dimensions) even if a
    swap happens while it runs. Only its buffers grow in place, so an add or a
    removal is seen by the next query without a swap.
    """

    generation: Generation | None
    fresh: ExactVectors
    removed: set[int]

    @classmethod
    def empty(cls) -> ServingView:
        """The view before any generation: every query finds nothing."""
        return cls(None, ExactVectors(0), set())

    @property
    def pending(self) -> int:
        """Changes since the generation was built: what a rebuild would fold in."""
        return len(self.fresh) + len(self.removed)

    def vectors(self, image_ids: Sequence[int]) -> tuple[IdArray, FloatArray]:
        """The global vectors of those of ``image_ids`` still searchable (from the
        generation or the fresh buffer): their ids and one row each."""
        if self.generation is None:
            return np.empty(0, np.int64), np.empty((0, 0), np.float32)
        found = [self.generation.vectors(image_ids), self.fresh.vectors(image_ids)]
        ids = np.concatenate([ids for ids, _ in found])
        matrix = np.concatenate([matrix for _, matrix in found])
        searchable = ~np.isin(ids, np.fromiter(self.removed, np.int64, len(self.removed)))
        return ids[searchable], matrix[searchable]

    def record_added(self, image_id: int, scope: int, vector: FloatArray) -> None:
        """Make an image added to the catalog searchable until the next rebuild."""
        self.fresh.add(image_id, scope, vector)

    def record_removed(self, image_id: int) -> None:
        """Hide an image removed from the catalog until the next rebuild."""
        self.fresh.discard(image_id)
        self.removed.add(image_id)


class IndexMaintainer:
    """Owns the serving view and rebuilds the generations behind it.

    ``write_lock`` is held by every change to the catalog's images and by the
    swap to a new view, so no add lands in a fresh buffer that is being replaced.
    """

    def __init__(
        self,
        index_dir: Path,
        catalog: Catalog,
        settings: EngineSettings,
        store: GenerationStore,
        *,
        pool: CpuPool,
    ) -> None:
        self.catalog = catalog
        self.settings = settings
        self.pool = pool  # trains codebooks and vocabularies
        self.write_lock = asyncio.Lock()
        self.inverted = InvertedFile(index_dir, catalog, settings, self.write_lock, pool=pool)
        self._store = store
        self._serving = ServingView.empty()
        self._rebuild_lock = asyncio.Lock()
        self._rebuild_task: asyncio.Task[str | None] | None = None
        self._annoy_check: asyncio.Task[None] | None = None
        self._warmer = PageCacheWarmer([])

    @property
    def serving(self) -> ServingView:
        """The view queries search now; take it once per query."""
        return self._serving

    @property
    def rebuild_running(self) -> bool:
        return self._rebuild_task is not None and not self._rebuild_task.done()

    async def load(self) -> None:
        """Serve the current generation and inverted file; rebuild either from the
        catalog if it is corrupt or missing (an index older than the inverted file).
        The generation's Annoy file is checked in the background (_check_annoy_file)."""
        await self.inverted.load()
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
        await self.install(generation)
        if generation is not None:
            self._annoy_check = asyncio.create_task(
                self._check_annoy_file(generation), name="annoy-checksums"
            )
        self._warm_page_cache()

    async def _check_annoy_file(self, generation: Generation) -> None:
        """Check the served generation's Annoy file after the start; if it is damaged,
        rebuild the index from the catalog in the background (queries meanwhile find
        candidates by their votes, and in the fresh buffer)."""
        if await asyncio.to_thread(generation.check_annoy_file):
            return
        if self._serving.generation is not generation:
            return  # a rebuild has replaced it meanwhile
        log.warning(
            "generation %s: %s fails its checksum; rebuilding the index from the catalog",
            generation.name,
            ANNOY_FILE,
        )
        # CURRENT keeps naming it until the new generation replaces it: a restart
        # before then finds it damaged again, and rebuilds again.
        self._rebuild_in_background()

    def _warm_page_cache(self) -> None:
        """Read the files queries map at random once, in the background, if they fit
        in memory (:class:`PageCacheWarmer`)."""
        generation = self._serving.generation
        self._warmer = PageCacheWarmer(
            [
                *self.inverted.mapped_files(),
                *(generation.mapped_files() if generation is not None else ()),
            ]
        )
        if self._warmer.start():
            log.info("reading the index's mapped files into the page cache in the background")

    async def close(self) -> None:
        """Wait for a running background rebuild, then serve nothing.

        A background rebuild that fails (now or earlier) was logged when it
        failed (:meth:`_background_rebuild_done`); the index it leaves is the
        previous one, whole, so closing goes on.
        """
        await asyncio.to_thread(self._warmer.stop)
        if self._annoy_check is not None:
            await asyncio.wait({self._annoy_check})
        if self._rebuild_task is not None:
            await asyncio.wait({self._rebuild_task})
        await self.inverted.close()
        self._serving = ServingView.empty()

    async def install(self, generation: Generation | None) -> None:
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
        self._serving = ServingView(generation, fresh, set())

    def maybe_rebuild_in_background(self) -> None:
        """Start a rebuild when enough has changed and none is running."""
        serving = self._serving
        threshold = self.settings.rebuild_threshold(len(serving.generation or ()))
        if serving.pending >= threshold:
            self._rebuild_in_background()

    def _rebuild_in_background(self) -> None:
        """Start a rebuild unless one is running; its failure is logged."""
        if not self.rebuild_running:
            # Nobody waits for it: its training yields the CPU to queries and adds alike.
            with background_work():
                self._rebuild_task = asyncio.create_task(self.rebuild(), name="index-rebuild")
            self._rebuild_task.add_done_callback(self._background_rebuild_done)

    @staticmethod
    def _background_rebuild_done(task: asyncio.Task[str | None]) -> None:
        """Log a background rebuild's failure: nobody awaits its result.

        Queries go on with the previous generation and the fresh buffer, and the
        next change tries again, so a failure is an error in the log, not a crash.
        """
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error(
                "the background rebuild failed; still serving the previous generation "
                "(the next change retries)",
                exc_info=error,
            )

    async def rebuild(self, *, retrain: bool = False) -> str | None:
        """Fold every image of the catalog into a new generation and swap it in,
        and bring the inverted file up to date (:meth:`InvertedFile.rebuild`).

        Retrains the codebook when asked, when there is none, or when the
        collection has grown ``retrain_growth`` times since it was trained.
        Returns the new generation's name, or ``None`` for an empty catalog.
        """
        await self.inverted.rebuild(retrain=retrain)
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
            async with self.write_lock:
                await self.install(fresh_generation)
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
        centroids = await self.pool.run(
            train_centroids, np.concatenate(sample), centroids=self.settings.centroids
        )
        vlads: list[FloatArray] = []
        async for _, features in self.catalog.iter_training_features(sampled):
            vlads.append(vlad_vector(features.descriptors, centroids))
        codebook = await self.pool.run(
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
