"""The inverted file as segments: immutable lists on disk plus one open set in memory.

The shape is a search engine's (Lucene, tantivy): images added since the last
seal live in an *open* set of posting lists in memory; once it holds
``seal_after`` images it is written once to disk as an immutable, memory-mapped
*segment* and never changed again. A removal is a *tombstone*, honoured by
every query from the next one on and dropped when the segment holding it is
merged. A log merge policy folds ``merge_factor`` adjacent segments of one size
class into one, so a million images live in a few dozen segments at most.

The commit point is ``postings/SEGMENTS.json``: the vocabulary, the live
segments, the tombstones, and ``ceiling``, the highest catalog id the segments
cover. It is replaced atomically (temporary file, fsync, rename), after the
segments it names are fsynced in place, so a reader or a restart sees the old
set or the new one and never half of one. The catalog stays the source of
truth: an image above the ceiling is read from it again at start-up, so an add
killed at any point loses nothing, and every file here can be rebuilt from it.

Queries see a :class:`SegmentSet`, immutable and replaced as a whole, so a query
running on a worker thread keeps a consistent view while adds, seals and merges
install new ones.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from indexer.durable import fsync_directory, fsync_file
from indexer.errors import IndexCorruptError, IndexIncompatibleError
from indexer.features import LocalFeatures
from indexer.postings import PostingLists, QueryWords, load_lists, merge_lists, save_lists, vote
from indexer.vocabulary import Assignment, Vocabulary

log = logging.getLogger(__name__)

IdArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

SEGMENTS_FORMAT = 1
COMMIT_FILE = "SEGMENTS.json"
_VOCABULARY_PREFIX = "vocabulary-"
_SEGMENT_PREFIX = "s"
_TEMPORARY_PREFIX = ".writing-"
_ABANDONED_AFTER_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class VoteParams:
    """How postings vote (free to change between runs)."""

    # Each query half goes to its two nearest half-words, so a descriptor meets
    # its counterpart on four words (docs/BENCHMARKS.md, "Inverted file").
    assignments_per_half: int = 2
    words_per_descriptor: int = 4  # the nearest of those pairs a query descriptor looks at
    voting_descriptors: int = 1000  # the query's strongest descriptors that vote
    max_hamming: int = 10  # of 32 signature bits
    hamming_sigma: float = 8.0  # weight exp(-(h / sigma)^2) of a match at distance h
    # A word in more than this share of the images says little and costs much:
    # at 1% the quality benchmark's queries kept the same candidates as at 5%
    # while scanning 27% of the postings (docs/BENCHMARKS.md, "Inverted file").
    stop_fraction: float = 0.01
    stop_minimum: int = 8  # ... but a small collection keeps lists up to this long
    # The most postings a vote scans, the shortest lists first (0: no limit). A
    # budget makes a vote's cost independent of the collection's size: the quick
    # look (EngineSettings.quick_vote) votes with one.
    posting_budget: int = 0

    @property
    def hamming_weights(self) -> npt.NDArray[np.float32]:
        """What a match at each Hamming distance 0..32 is worth."""
        distances = np.arange(33, dtype=np.float32)
        return np.asarray(np.exp(-((distances / self.hamming_sigma) ** 2)), dtype=np.float32)


Ranking = list[tuple[int, float]]
_Key = TypeVar("_Key", bound=np.generic)


@dataclass(frozen=True, slots=True)
class WeightedQuery:
    """A query's words with their idf weights, and where they lie in each segment."""

    words: QueryWords
    segments: tuple[Segment, ...]  # the segments that hold images
    ranges: tuple[tuple[IdArray, IdArray], ...]  # (begin, end) of each word, per segment
    frequency: IdArray  # each word's postings over every segment


@dataclass(frozen=True, slots=True)
class Segment:
    """Posting lists and which of their docs are tombstoned."""

    name: str | None  # None for the open set, which lives in memory only
    lists: PostingLists
    deleted: npt.NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        # Every vote looks its words up in every segment: each gets a directory once.
        if self.lists.directory is None and self.lists.blocks is None:
            object.__setattr__(self, "lists", self.lists.with_directory())

    def without(self, image_ids: Sequence[int]) -> Segment:
        """This segment with the given images tombstoned (ids it does not hold are ignored)."""
        ids = np.asarray(self.lists.ids)
        wanted = np.asarray(image_ids, dtype=np.int64)
        position = np.searchsorted(ids, wanted)
        inside = position < len(ids)
        hit = position[inside][ids[position[inside]] == wanted[inside]]
        if not len(hit):
            return self
        deleted = (
            np.zeros(len(ids), dtype=np.bool_) if self.deleted is None else self.deleted.copy()
        )
        deleted[hit] = True
        return replace(self, deleted=deleted)

    @property
    def live(self) -> int:
        return len(self.lists) - (int(self.deleted.sum()) if self.deleted is not None else 0)


@dataclass(frozen=True, slots=True)
class SegmentSet:
    """What queries vote on: a vocabulary, its sealed segments and the open set."""

    vocabulary: Vocabulary
    sealed: tuple[Segment, ...]
    open: Segment
    ceiling: int  # every catalog id up to this is in a sealed segment (or removed)
    tombstones: frozenset[int] = field(default_factory=frozenset)

    def __len__(self) -> int:
        return sum(segment.live for segment in (*self.sealed, self.open))

    @property
    def emptied(self) -> bool:
        """Whether a sealed segment holds no live image (upkeep drops it)."""
        return not all(segment.live for segment in self.sealed)

    @property
    def segments(self) -> tuple[Segment, ...]:
        return (*self.sealed, self.open)

    def with_images(
        self, ids: Sequence[int], scopes: Sequence[int], assignments: Sequence[Assignment]
    ) -> SegmentSet:
        """This set with images added to the open set (ids above everything it holds)."""
        added = PostingLists.build(
            ids,
            scopes,
            [a.words[:, 0] for a in assignments],
            [a.signatures[:, 0] for a in assignments],
        )
        merged = merge_lists([self.open.lists, added], drop=set())
        return replace(self, open=Segment(None, merged))

    def without_images(self, image_ids: Sequence[int]) -> SegmentSet:
        """This set with the images tombstoned."""
        return replace(
            self,
            sealed=tuple(segment.without(image_ids) for segment in self.sealed),
            open=self.open.without(image_ids),
            tombstones=self.tombstones | frozenset(int(i) for i in image_ids),
        )

    def weighted_query(self, features: LocalFeatures, params: VoteParams) -> WeightedQuery:
        """The words ``features`` vote with, weighted by idf squared (a word shared
        by the query and an image counts once on each side: Jegou et al. 2009,
        with Hamming embedding), stop-listed words weighing 0."""
        # A segment whose images were all removed waits for the upkeep that drops
        # it; until then it would cost every query a lookup of each word for nothing.
        segments = tuple(s for s in self.segments if s.live)
        documents = sum(len(s.lists) for s in segments)
        stop = max(params.stop_minimum, params.stop_fraction * documents)
        assignment = self.vocabulary.assign(
            features.descriptors[: params.voting_descriptors],
            per_half=params.assignments_per_half,
        )
        nearest = params.words_per_descriptor
        grouped = QueryWords.of(
            assignment.words[:, :nearest].reshape(-1),
            assignment.signatures[:, :nearest].reshape(-1),
        )
        ranges = tuple(s.lists.lookup(grouped.words) for s in segments)
        frequency = sum(
            (end - begin for begin, end in ranges), np.zeros(len(grouped.words), np.int64)
        )
        idf = np.log(max(documents, 1) / np.maximum(frequency, 1)).astype(np.float32)
        voting = within_budget(frequency, (frequency > 0) & (frequency <= stop),
                               params.posting_budget)
        weights = np.where(voting, idf * idf, 0.0)
        return WeightedQuery(
            words=replace(grouped, weights=weights.astype(np.float32)),
            segments=segments,
            ranges=ranges,
            frequency=frequency,
        )

    def vote(
        self,
        oriented: Sequence[LocalFeatures],
        *,
        scope: int,
        count: int,
        params: VoteParams,
        threads: Executor | None = None,
    ) -> Ranking:
        """The ``count`` images with the most votes from any of ``oriented`` (the
        query and its mirror image), best first, with their scores.

        With ``threads``, the segments are voted on side by side, as a search
        engine searches its segments: the kernel releases the GIL.
        """
        if count <= 0 or not any(len(s.lists) for s in self.segments):
            return []
        hamming_weights = params.hamming_weights  # once, not once per segment
        best: dict[int, float] = {}
        for features in oriented:
            query = self.weighted_query(features, params)
            top_of = functools.partial(
                _top_votes,
                query=query.words,
                params=params,
                hamming_weights=hamming_weights,
                scope=scope,
                count=count,
            )
            parts = list(zip(query.segments, query.ranges, strict=True))
            found = list((threads.map if threads else map)(top_of, parts))
            # An image lives in one segment: the best ``count`` of every segment's
            # best are this orientation's best.
            ids, scores = _top(
                np.concatenate([ids for ids, _ in found]),
                np.concatenate([scores for _, scores in found]),
                count,
            )
            for image_id, score in zip(ids.tolist(), scores.tolist(), strict=True):
                if score > best.get(image_id, 0.0):
                    best[image_id] = score
        ordered = sorted(best.items(), key=lambda item: item[1], reverse=True)
        return ordered[:count]


def within_budget(
    frequency: IdArray, voting: npt.NDArray[np.bool_], budget: int
) -> npt.NDArray[np.bool_]:
    """``voting`` less the longest of its lists whose postings would take the
    vote over ``budget`` postings (0: no budget).

    The shortest lists are kept: they are the rarest words, which weigh most
    by idf and cost least to scan.
    """
    lengths = np.where(voting, frequency, 0)
    if budget <= 0 or int(lengths.sum()) <= budget:
        return voting
    order = np.argsort(lengths, kind="stable")
    kept = np.zeros(len(frequency), dtype=np.bool_)
    kept[order[np.cumsum(lengths[order]) <= budget]] = True
    return voting & kept


def _top_votes(
    part: tuple[Segment, tuple[IdArray, IdArray]],
    *,
    query: QueryWords,
    params: VoteParams,
    hamming_weights: FloatArray,
    scope: int,
    count: int,
) -> tuple[IdArray, FloatArray]:
    """The ids and scores of the ``count`` images of one segment with the most votes
    (unordered); ``part`` is the segment and where the query's words lie in it."""
    segment, (begin, end) = part
    votes = vote(
        segment.lists,
        begin,
        end,
        query,
        max_hamming=params.max_hamming,
        hamming_weights=hamming_weights,
        scope=scope,
        deleted=segment.deleted,
    )
    docs, scores = _top(votes.docs, votes.scores, count)
    return np.asarray(segment.lists.ids)[docs].astype(np.int64, copy=False), scores


def _top(
    keys: npt.NDArray[_Key], scores: FloatArray, count: int
) -> tuple[npt.NDArray[_Key], FloatArray]:
    """The ``count`` entries with the highest scores (unordered)."""
    if len(scores) <= count:
        return keys, scores
    top = np.argpartition(-scores, count - 1)[:count]
    return keys[top], scores[top]


# -- the folder ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Commit:
    """The commit point as read from disk."""

    vocabulary_id: str
    segments: tuple[str, ...]
    ceiling: int
    tombstones: frozenset[int]


class SegmentStore:
    """The ``postings/`` folder: vocabularies, segments and the commit point."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read_commit(self) -> Commit | None:
        """The commit point, or ``None`` when no inverted file was ever built.

        Raises:
            IndexCorruptError: the commit point is unreadable.
            IndexIncompatibleError: it was written in another format.
        """
        try:
            text = (self.root / COMMIT_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as error:
            raise IndexCorruptError(f"inverted file: unreadable {COMMIT_FILE} ({error})") from error
        try:
            data: dict[str, Any] = json.loads(text)
            if data.get("format") != SEGMENTS_FORMAT:
                raise IndexIncompatibleError(
                    f"the inverted file has format {data.get('format')!r}, "
                    f"this version reads {SEGMENTS_FORMAT}"
                )
            return Commit(
                vocabulary_id=str(data["vocabulary"]),
                segments=tuple(str(name) for name in data["segments"]),
                ceiling=int(data["ceiling"]),
                tombstones=frozenset(int(i) for i in data["tombstones"]),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise IndexCorruptError(f"inverted file: malformed {COMMIT_FILE} ({error})") from error

    def load(self) -> SegmentSet | None:
        """Open the committed segments (memory-mapped) with an empty open set.

        Raises:
            IndexCorruptError: a file is missing, truncated or malformed.
            IndexIncompatibleError: the files were written in another format.
        """
        commit = self.read_commit()
        if commit is None:
            return None
        vocabulary = Vocabulary.load(self._vocabulary_path(commit.vocabulary_id))
        if vocabulary.id != commit.vocabulary_id:
            raise IndexCorruptError("inverted file: the vocabulary does not match its name")
        tombstones = sorted(commit.tombstones)
        sealed = tuple(
            Segment(name, load_lists(self.root / name)).without(tombstones)
            for name in commit.segments
        )
        return SegmentSet(
            vocabulary=vocabulary,
            sealed=sealed,
            open=Segment(None, PostingLists.empty()),
            ceiling=commit.ceiling,
            tombstones=commit.tombstones,
        )

    def save_vocabulary(self, vocabulary: Vocabulary) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self._vocabulary_path(vocabulary.id)
        if target.exists():
            return
        temporary = target.with_name(f"{_TEMPORARY_PREFIX}{target.name}")
        vocabulary.save(temporary)
        fsync_file(temporary)
        temporary.replace(target)
        fsync_directory(self.root)

    def write_segment(self, lists: PostingLists) -> Segment:
        """Write ``lists`` as a new immutable segment (not yet committed) and map it."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{_SEGMENT_PREFIX}{time.time_ns():020d}"
        temporary = self.root / f"{_TEMPORARY_PREFIX}{name}"
        temporary.mkdir()
        try:
            for file_name in save_lists(lists, temporary):
                fsync_file(temporary / file_name)
            final = self.root / name
            temporary.rename(final)
            fsync_directory(self.root)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return Segment(name, load_lists(final))

    def commit(self, segments: SegmentSet) -> None:
        """Name ``segments`` (their sealed part) as the live set, atomically."""
        names = [segment.name for segment in segments.sealed]
        if any(name is None for name in names):
            raise ValueError("only written segments can be committed")
        live_ids = [np.asarray(s.lists.ids) for s in segments.sealed]
        # Tombstones of images no segment holds any more are dropped, so the
        # commit point stays small however many removals a merge has purged.
        every = np.concatenate(live_ids) if live_ids else np.empty(0, np.int64)
        tombstones = sorted(i for i in segments.tombstones if _holds(every, i))
        data = {
            "format": SEGMENTS_FORMAT,
            "vocabulary": segments.vocabulary.id,
            "segments": names,
            "ceiling": segments.ceiling,
            "tombstones": tombstones,
            "committed_at": time.time(),
        }
        temporary = self.root / f"{COMMIT_FILE}.tmp"
        temporary.write_text(json.dumps(data), encoding="utf-8")
        fsync_file(temporary)
        temporary.replace(self.root / COMMIT_FILE)
        fsync_directory(self.root)

    def remove_stale(self) -> None:
        """Delete segments and vocabularies the commit point does not name, and
        half-written ones older than an hour (a younger one may be another
        process's seal in progress).

        A process that still maps a deleted segment keeps reading it: on POSIX
        an unlinked file lives until its last mapping is closed.
        """
        if not self.root.exists():
            return
        commit = self.read_commit()
        keep = set(commit.segments) if commit else set()
        if commit:
            keep.add(self._vocabulary_path(commit.vocabulary_id).name)
        for entry in self.root.iterdir():
            if entry.name in keep or entry.name.startswith(COMMIT_FILE):
                continue
            if entry.name.startswith(_TEMPORARY_PREFIX) and (
                time.time() - entry.stat().st_mtime < _ABANDONED_AFTER_SECONDS
            ):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def discard(self) -> None:
        """Forget the commit point (after corruption); the next rebuild starts afresh."""
        with contextlib.suppress(FileNotFoundError):
            (self.root / COMMIT_FILE).unlink()

    def _vocabulary_path(self, vocabulary_id: str) -> Path:
        return self.root / f"{_VOCABULARY_PREFIX}{vocabulary_id}.npz"


def merge_plan(sizes: Sequence[int], *, seal_after: int, merge_factor: int) -> range | None:
    """Which adjacent segments to merge next, by a log merge policy, or ``None``.

    A segment's level is how many times ``merge_factor`` its size is over
    ``seal_after``; the first run of ``merge_factor`` adjacent segments of one
    level is merged, so segment sizes grow geometrically and an image is
    rewritten about log_factor(N / seal_after) times in its life.
    """
    levels = [
        int(math.log(max(size, 1) / seal_after, merge_factor)) if size > seal_after else 0
        for size in sizes
    ]
    for start in range(len(levels) - merge_factor + 1):
        window = levels[start : start + merge_factor]
        if all(level == window[0] for level in window):
            return range(start, start + merge_factor)
    return None


def merged(segments: Sequence[Segment]) -> PostingLists:
    """The lists of adjacent ``segments`` as one, tombstoned images dropped."""
    drop: set[int] = set()
    for segment in segments:
        if segment.deleted is not None:
            drop.update(np.asarray(segment.lists.ids)[segment.deleted].tolist())
    return merge_lists([segment.lists for segment in segments], drop=drop)


def _holds(ids: IdArray, image_id: int) -> bool:
    position = int(np.searchsorted(ids, image_id)) if len(ids) else 0
    return position < len(ids) and int(ids[position]) == image_id
