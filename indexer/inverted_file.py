"""Keeping the inverted file: adds, removals, seals, merges and rebuilds.

:class:`InvertedFile` owns the :class:`SegmentSet` that queries vote on and
replaces it as a whole on every change. Each change is computed from the set
current at that moment, on the event loop with no await in between, so an add
that lands while a seal or a merge writes its files on a thread is never lost:
the seal's or merge's result is applied to the newer set, not to the one it
started from.

Work on disk (writing a segment, committing) runs on threads, and seals and
merges run in the background, one at a time. The catalog is the source of
truth: an image above the commit's ceiling is read from it again at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from indexer.catalog import Catalog
from indexer.errors import IndexCorruptError
from indexer.features import LocalFeatures
from indexer.postings import PostingLists, merge_lists, random_access_files
from indexer.segments import Segment, SegmentSet, SegmentStore, merge_plan, merged
from indexer.settings import EngineSettings
from indexer.vocabulary import Vocabulary, half_words_for, train_vocabulary
from indexer.workers import CpuPool

log = logging.getLogger(__name__)

POSTINGS_DIR = "postings"
# Images whose features are read and assigned at a time by a rebuild.
_REBUILD_BATCH = 2048


class InvertedFile:
    """The inverted file of an index folder. Open with :meth:`load`."""

    def __init__(
        self,
        index_dir: Path,
        catalog: Catalog,
        settings: EngineSettings,
        write_lock: asyncio.Lock,
        *,
        pool: CpuPool,
    ) -> None:
        self.catalog = catalog
        self.settings = settings
        self.pool = pool  # trains vocabularies
        # The index's write lock, held by every add: a rebuild swaps its new set
        # in under it, so no add lands in the set being replaced.
        self._write_lock = write_lock
        self.store = SegmentStore(index_dir / POSTINGS_DIR)
        self._current: SegmentSet | None = None
        # Seals, merges and rebuilds take turns; commits too, so that two
        # never interleave their writes of the commit point.
        self._upkeep_lock = asyncio.Lock()
        self._commit_lock = asyncio.Lock()
        self._upkeep_task: asyncio.Task[None] | None = None

    @property
    def current(self) -> SegmentSet | None:
        """The set queries vote on now (``None`` before the first build); take it once."""
        return self._current

    def mapped_files(self) -> list[Path]:
        """The files of the sealed segments that queries read at random."""
        current = self._current
        if current is None:
            return []
        return [
            path
            for segment in current.sealed
            if segment.name is not None
            for path in random_access_files(self.store.root / segment.name)
        ]

    # -- life cycle ---------------------------------------------------------------------

    async def load(self) -> None:
        """Open the committed segments and read the images above their ceiling
        from the catalog; rebuild from the catalog when there is nothing usable
        (an index made before the inverted file existed, or damaged files).

        Raises:
            IndexIncompatibleError: the files were written by a newer version.
        """
        try:
            loaded = await asyncio.to_thread(self.store.load)
        except IndexCorruptError as error:
            log.warning("%s; rebuilding the inverted file from the catalog", error)
            self.store.discard()
            loaded = None
        if loaded is None:
            if await self.catalog.count():
                await self.rebuild()
            return
        await asyncio.to_thread(self.store.remove_stale)
        self._current = await self._with_catalog_images(loaded, after_id=loaded.ceiling)
        if self._seal_due() or self._current.emptied:
            self._start_upkeep()

    async def close(self) -> None:
        """Wait for background upkeep, then serve nothing."""
        if self._upkeep_task is not None:
            with contextlib.suppress(Exception):
                await self._upkeep_task
        self._current = None

    # -- changes --------------------------------------------------------------------------

    def add(self, image_id: int, scope: int, features: LocalFeatures) -> None:
        """Make an image just inserted into the catalog searchable (the caller
        holds the write lock, so ids arrive in ascending order)."""
        current = self._current
        if current is None:
            return  # no vocabulary yet: the first rebuild reads the image from the catalog
        assignment = current.vocabulary.assign(features.descriptors)
        self._current = current.with_images([image_id], [scope], [assignment])
        if self._seal_due():
            self._start_upkeep()

    async def remove(self, image_ids: Sequence[int]) -> None:
        """Tombstone images already deleted from the catalog, and persist the tombstones."""
        if self._current is None or not image_ids:
            return
        self._current = self._current.without_images(image_ids)
        await self._commit()
        if self._current.emptied:
            self._start_upkeep()  # upkeep drops the emptied segment

    # -- upkeep -----------------------------------------------------------------------------

    def _seal_due(self) -> bool:
        """Whether the open set has reached ``seal_after`` images."""
        current = self._current
        return current is not None and len(current.open.lists) >= self.settings.seal_after

    def _start_upkeep(self) -> None:
        if self._upkeep_task is None or self._upkeep_task.done():
            self._upkeep_task = asyncio.create_task(self._upkeep(), name="inverted-file-upkeep")

    async def _upkeep(self) -> None:
        try:
            async with self._upkeep_lock:
                # Upkeep started by a removal that emptied a segment seals nothing early.
                if self._seal_due():
                    await self._seal()
                await self._merge_while_planned()
        except Exception:
            # The catalog holds every image: a failed seal only leaves them in
            # memory until the next one, and nothing is lost.
            log.exception("sealing or merging the inverted file failed")

    async def _seal(self) -> None:
        """Write the open set as a segment and commit it."""
        current = self._current
        if current is None or not len(current.open.lists):
            return
        snapshot = current.open.lists
        segment = await asyncio.to_thread(self.store.write_segment, snapshot)
        ceiling = int(snapshot.ids[-1])
        self._current = _sealed(self._current or current, segment, ceiling)
        await self._commit()
        log.info("sealed %d images into segment %s", len(snapshot), segment.name)

    async def _drop_emptied(self) -> None:
        """Forget the sealed segments whose images were all removed, and delete them.

        The log merge policy picks segments by size, so an emptied one could wait
        for a merge forever (a folder build that replaces a collection empties its
        old segments), kept on disk and looked up by nothing.
        """
        current = self._current
        if current is None or not current.emptied:
            return
        # Read and replaced with no await between: an add or a removal landing while
        # this runs acts on the set it finds, which keeps every live segment.
        kept = tuple(segment for segment in current.sealed if segment.live)
        self._current = replace(current, sealed=kept)
        await self._commit()
        await asyncio.to_thread(self.store.remove_stale)
        log.info("dropped %d emptied segments", len(current.sealed) - len(kept))

    async def _merge_while_planned(self) -> None:
        await self._drop_emptied()
        while True:
            current = self._current
            if current is None:
                return
            plan = merge_plan(
                [len(s.lists) for s in current.sealed],
                seal_after=self.settings.seal_after,
                merge_factor=self.settings.merge_factor,
            )
            if plan is None:
                return
            parts = current.sealed[plan.start : plan.stop]
            lists = await asyncio.to_thread(merged, parts)
            segment = await asyncio.to_thread(self.store.write_segment, lists)
            self._current = _merged(self._current or current, parts, segment)
            await self._commit()
            await asyncio.to_thread(self.store.remove_stale)
            log.info("merged %d segments into %s (%d images)", len(parts), segment.name, len(lists))

    async def _commit(self) -> None:
        async with self._commit_lock:
            current = self._current
            if current is not None:
                await asyncio.to_thread(self.store.commit, current)

    async def rebuild(self, *, retrain: bool = False) -> None:
        """Bring the inverted file up to date with the catalog.

        Trains a new vocabulary and re-indexes every image when asked, when
        there is none, or when the collection has grown ``retrain_growth`` times
        since it was trained; otherwise seals the images above the ceiling,
        tombstones images the catalog no longer has (a folder build deletes
        them directly), and merges.
        """
        async with self._upkeep_lock:
            total = await self.catalog.count()
            if total == 0:
                return
            current = self._current
            if current is None or retrain or self._should_retrain(current.vocabulary, total):
                await self._reindex(await self._train(total))
            else:
                await self._forget_removed()
                await self._catch_up()
                await self._seal()
            await self._merge_while_planned()
            await asyncio.to_thread(self.store.remove_stale)

    async def _catch_up(self) -> None:
        """Take into the open set the catalog's images that reached it without an
        :meth:`add` (a folder build inserts them directly), so that the seal after
        this writes them instead of every start-up reading them again."""
        # Under the write lock: an add landing meanwhile would be read twice.
        async with self._write_lock:
            current = self._current
            if current is None:
                return
            open_ids = np.asarray(current.open.lists.ids)
            after = max(current.ceiling, int(open_ids[-1]) if len(open_ids) else 0)
            self._current = await self._with_catalog_images(current, after_id=after)

    def _should_retrain(self, vocabulary: Vocabulary, total: int) -> bool:
        wanted = min(total, self.settings.training_images)
        return wanted >= vocabulary.trained_on * self.settings.retrain_growth

    async def _train(self, total: int) -> Vocabulary:
        sampled = min(total, self.settings.training_images)
        per_image = max(8, self.settings.vocabulary_training_descriptors // sampled)
        sample = [
            features.descriptors[:per_image]
            async for _, features in self.catalog.iter_training_features(sampled)
        ]
        descriptors = np.concatenate(sample)
        half_words = half_words_for(len(descriptors), largest=self.settings.vocabulary_half_words)
        vocabulary = await self.pool.run(
            train_vocabulary, descriptors, half_words=half_words, trained_on=sampled
        )
        log.info("trained a vocabulary of %d words on %d images", vocabulary.size, sampled)
        return vocabulary

    async def _reindex(self, vocabulary: Vocabulary) -> None:
        """Write every catalog image as segments of ``vocabulary`` and swap them in."""
        await asyncio.to_thread(self.store.save_vocabulary, vocabulary)
        # The ceiling first: an image added while this runs is read again below.
        ceiling = await self.catalog.max_id()
        segments: list[Segment] = []
        pending = _Pending(vocabulary)
        async for image_id, scope, features in self.catalog.iter_features(up_to_id=ceiling):
            pending.add(image_id, scope, features)
            if len(pending) >= self.settings.segment_images:
                segments.append(await asyncio.to_thread(self.store.write_segment, pending.lists()))
                pending = _Pending(vocabulary)
        if len(pending):
            segments.append(await asyncio.to_thread(self.store.write_segment, pending.lists()))
        rebuilt = SegmentSet(
            vocabulary=vocabulary,
            sealed=tuple(segments),
            open=Segment(None, PostingLists.empty()),
            ceiling=ceiling,
        )
        # Removals that happened meanwhile are honoured: their ids are gone from
        # the catalog, so reading it again drops them.
        async with self._write_lock:
            self._current = await self._with_catalog_images(rebuilt, after_id=ceiling)
        await self._forget_removed()
        await self._commit()
        log.info("inverted file rebuilt: %d images in %d segments", len(rebuilt), len(segments))

    async def _forget_removed(self) -> None:
        """Tombstone the images of the sealed segments that the catalog no longer has."""
        current = self._current
        if current is None or not current.sealed:
            return
        held = np.concatenate([np.asarray(s.lists.ids) for s in current.sealed])
        known = await self.catalog.ids(up_to_id=current.ceiling)
        gone = np.setdiff1d(held, known, assume_unique=True)
        gone = np.setdiff1d(
            gone, np.fromiter(current.tombstones, np.int64, len(current.tombstones))
        )
        if len(gone):
            await self.remove(gone.tolist())

    async def _with_catalog_images(self, segments: SegmentSet, *, after_id: int) -> SegmentSet:
        """``segments`` with the catalog's images above ``after_id`` in the open set."""
        pending = _Pending(segments.vocabulary)
        async for image_id, scope, features in self.catalog.iter_features(after_id=after_id):
            pending.add(image_id, scope, features)
        if not len(pending):
            return segments
        lists = merge_lists([segments.open.lists, pending.lists()], drop=set())
        return replace(segments, open=Segment(None, lists))


class _Pending:
    """Images being gathered into one set of posting lists."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        self.ids: list[int] = []
        self.scopes: list[int] = []
        self.words: list[np.ndarray] = []
        self.signatures: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, image_id: int, scope: int, features: LocalFeatures) -> None:
        assignment = self.vocabulary.assign(features.descriptors)
        self.ids.append(image_id)
        self.scopes.append(scope)
        self.words.append(assignment.words[:, 0])
        self.signatures.append(assignment.signatures[:, 0])

    def lists(self) -> PostingLists:
        return PostingLists.build(self.ids, self.scopes, self.words, self.signatures)


def _sealed(current: SegmentSet, segment: Segment, ceiling: int) -> SegmentSet:
    """``current`` with ``segment`` (the open images up to ``ceiling``) sealed."""
    tombstoned = segment.without(sorted(current.tombstones))
    open_ids = np.asarray(current.open.lists.ids)
    still_open = merge_lists([current.open.lists], drop=set(open_ids[open_ids <= ceiling].tolist()))
    return replace(
        current,
        sealed=(*current.sealed, tombstoned),
        open=Segment(None, still_open).without(sorted(current.tombstones)),
        ceiling=max(current.ceiling, ceiling),
    )


def _merged(current: SegmentSet, parts: Sequence[Segment], segment: Segment) -> SegmentSet:
    """``current`` with the adjacent ``parts`` replaced by their merge ``segment``."""
    names = [part.name for part in parts]
    sealed_names = [s.name for s in current.sealed]
    start = sealed_names.index(names[0])
    if sealed_names[start : start + len(names)] != names:
        raise RuntimeError("the segments being merged changed under the merge")
    tombstoned = segment.without(sorted(current.tombstones))
    return replace(
        current,
        sealed=(*current.sealed[:start], tombstoned, *current.sealed[start + len(names) :]),
    )
