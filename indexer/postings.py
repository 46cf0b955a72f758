"""Posting lists: for each visual word, the images that contain it.

This is the only module that imports numba: the voting kernel below is the hot
loop of the candidate stage.

A set of posting lists is stored word-major in compressed-sparse-row form, as
an inverted file (Sivic & Zisserman's Video Google; COLMAP's retrieval
module): ``words`` holds the distinct words in ascending order, and the
postings of ``words[i]`` are ``docs[starts[i]:starts[i + 1]]`` with their
``signatures`` alongside. A doc is a dense number local to the lists;
``ids[doc]`` is its catalog id and ``scopes[doc]`` its scope. A word is looked
up through a directory (:meth:`PostingLists.with_directory`): of every word,
for lists that hold a good share of the vocabulary, or of blocks of word ids,
each searched in a few steps, so that a small set of lists (a few hundred
images) costs no table of a million offsets.

Eight bytes a posting (doc and signature): with 500 keypoints an image, 4 KB.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numba
import numpy as np
import numpy.typing as npt

from indexer.errors import IndexCorruptError
from indexer.mapped import advise_random_reads

IdArray = npt.NDArray[np.int64]
UintArray = npt.NDArray[np.uint32]
FloatArray = npt.NDArray[np.float32]

_ARRAYS = ("words", "starts", "docs", "signatures", "ids", "scopes")
# Read a list at a time, at random: no read-ahead around the pages a query touches.
_RANDOM_ACCESS = ("docs", "signatures")
# A segment holding this share of the words up to its last one gets a directory of
# every word; a sparser one, of blocks of words.
DIRECTORY_SHARE = 0.25
# Words a block of a sparse directory holds on average: one or two cache lines of
# ``words`` to search.
WORDS_PER_BLOCK = 8


@dataclass(frozen=True, slots=True)
class WordBlocks:
    """A directory of a sparse list of words: ``words[starts[b]:starts[b + 1]]`` are
    the words whose ids lie in block ``b``, ids ``b << shift`` up to ``(b + 1) << shift``."""

    shift: int
    starts: IdArray

    @classmethod
    def of(cls, words: UintArray) -> WordBlocks:
        """Blocks as wide as make ``WORDS_PER_BLOCK`` words a block on average."""
        if not len(words):
            return cls(0, np.zeros(1, np.int64))
        span = int(words[-1]) + 1
        shift = max(0, (WORDS_PER_BLOCK * span // len(words)).bit_length() - 1)
        counts = np.bincount(np.asarray(words) >> shift, minlength=((span - 1) >> shift) + 1)
        starts = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=starts[1:])
        return cls(shift, starts)


@dataclass(frozen=True, slots=True)
class PostingLists:
    """Immutable word-major posting lists of a set of images (in memory or mapped)."""

    words: UintArray  # (w,) distinct words, ascending
    starts: IdArray  # (w + 1,) where each word's postings start in docs/signatures
    docs: UintArray  # (p,) local doc numbers, ascending within a word
    signatures: UintArray  # (p,) Hamming signatures, aligned with docs
    ids: IdArray  # (d,) catalog ids, ascending
    scopes: IdArray  # (d,) scope of each doc
    # Where each word's postings start, for every word up to the last, or where
    # each block of words starts in ``words`` (with_directory).
    directory: IdArray | None = None
    blocks: WordBlocks | None = None

    def __len__(self) -> int:
        """How many images the lists hold."""
        return len(self.ids)

    @property
    def postings(self) -> int:
        return len(self.docs)

    @classmethod
    def empty(cls) -> PostingLists:
        return cls(
            words=np.empty(0, np.uint32),
            starts=np.zeros(1, np.int64),
            docs=np.empty(0, np.uint32),
            signatures=np.empty(0, np.uint32),
            ids=np.empty(0, np.int64),
            scopes=np.empty(0, np.int64),
        )

    @classmethod
    def build(
        cls,
        ids: Sequence[int] | IdArray,
        scopes: Sequence[int] | IdArray,
        words: Sequence[UintArray],
        signatures: Sequence[UintArray],
    ) -> PostingLists:
        """Lists of images ``ids`` (ascending), image ``i`` having postings
        ``words[i]`` with ``signatures[i]``."""
        id_array = np.asarray(ids, dtype=np.int64)
        if len(id_array) > 1 and not np.all(np.diff(id_array) > 0):
            raise ValueError("posting lists need ascending, distinct image ids")
        counts = np.fromiter((len(w) for w in words), np.int64, len(words))
        docs = np.repeat(np.arange(len(id_array), dtype=np.uint32), counts)
        every_word = (
            np.concatenate(words).astype(np.uint32) if len(words) else np.empty(0, np.uint32)
        )
        every_signature = (
            np.concatenate(signatures).astype(np.uint32)
            if len(signatures)
            else np.empty(0, np.uint32)
        )
        return _word_major(
            every_word, docs, every_signature, id_array, np.asarray(scopes, dtype=np.int64)
        )

    def lookup(self, query_words: UintArray) -> tuple[IdArray, IdArray]:
        """Where each query word's postings start and end (equal where it has none).

        Lists made without :meth:`with_directory` (a test's) get their blocks here.
        """
        wanted = np.asarray(query_words, np.uint32)
        if self.directory is not None:
            return _directory_lookup_kernel(self.directory, wanted)
        blocks = self.blocks if self.blocks is not None else WordBlocks.of(self.words)
        return _block_lookup_kernel(
            blocks.starts, np.int64(blocks.shift), self.words, self.starts, wanted
        )

    def with_directory(self) -> PostingLists:
        """These lists with a directory of every word's start when they hold at least
        ``DIRECTORY_SHARE`` of the words up to their last one, else of blocks of words.

        At a million images a segment holds most of the 2^20 words, and a search
        through its list of words costs a query about 0.2 ms per segment (chains of
        dependent reads); the directory answers each word with one read, for 8 bytes
        a word. A sparser segment (the photos added since the last merge) would pay
        that for a table mostly of empty words: its blocks of about
        ``WORDS_PER_BLOCK`` words cost a byte a word and a search of a cache line or
        two, about half the time of a search through the whole list.
        """
        if not len(self.words) or len(self.words) < DIRECTORY_SHARE * (int(self.words[-1]) + 1):
            return replace(self, blocks=WordBlocks.of(self.words))
        lengths = np.zeros(int(self.words[-1]) + 1, dtype=np.int64)
        lengths[np.asarray(self.words)] = np.diff(np.asarray(self.starts))
        directory = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=directory[1:])
        return replace(self, directory=directory)


def merge_lists(parts: Sequence[PostingLists], drop: set[int]) -> PostingLists:
    """One set of lists holding every image of ``parts`` except those in ``drop``.

    ``parts`` must hold disjoint, ascending id ranges, in order.
    """
    kept_words, kept_docs, kept_signatures, kept_ids, kept_scopes = [], [], [], [], []
    base = 0
    for part in parts:
        alive = np.ones(len(part), dtype=bool)
        if drop:
            alive = ~np.isin(part.ids, np.fromiter(drop, np.int64, len(drop)))
        renumbered = (np.cumsum(alive, dtype=np.int64) - 1 + base).astype(np.uint32)
        docs = np.asarray(part.docs)
        keep = alive[docs]
        kept_words.append(np.repeat(np.asarray(part.words), np.diff(part.starts))[keep])
        kept_docs.append(renumbered[docs[keep]])
        kept_signatures.append(np.asarray(part.signatures)[keep])
        kept_ids.append(np.asarray(part.ids)[alive])
        kept_scopes.append(np.asarray(part.scopes)[alive])
        base += int(alive.sum())
    if not parts:
        return PostingLists.empty()
    ids = np.concatenate(kept_ids)
    if len(ids) > 1 and not np.all(np.diff(ids) > 0):
        raise ValueError("merged parts must hold ascending, disjoint id ranges")
    # Each part is word-major already, and its docs keep their order: the parts laid
    # end to end are sorted runs, which a stable sort merges in about one pass. Turned
    # doc-major and back, an add to an open set of 255 photos took 11.5 ms, not 1.9
    # (docs/BENCHMARKS.md, "Merges that stay word-major").
    return _word_major(
        np.concatenate(kept_words),
        np.concatenate(kept_docs),
        np.concatenate(kept_signatures),
        ids,
        np.concatenate(kept_scopes),
    )


def _word_major(
    words: UintArray, docs: UintArray, signatures: UintArray, ids: IdArray, scopes: IdArray
) -> PostingLists:
    # A stable sort keeps each word's docs in the order they came: ascending.
    order = np.argsort(words, kind="stable")
    sorted_words = words[order]
    first = np.flatnonzero(np.diff(sorted_words, prepend=np.int64(-1)) != 0)
    starts = np.append(first, len(sorted_words)).astype(np.int64)
    return PostingLists(
        words=sorted_words[first].astype(np.uint32),
        starts=starts,
        docs=np.ascontiguousarray(docs[order], dtype=np.uint32),
        signatures=np.ascontiguousarray(signatures[order], dtype=np.uint32),
        ids=np.ascontiguousarray(ids, dtype=np.int64),
        scopes=np.ascontiguousarray(scopes, dtype=np.int64),
    )


# -- on disk ------------------------------------------------------------------------


def save_lists(lists: PostingLists, folder: Path) -> list[str]:
    """Write ``lists`` into ``folder`` as one .npy file per array; returns the file names.

    The caller fsyncs and renames the folder into place.
    """
    names = []
    for name in _ARRAYS:
        file_name = f"{name}.npy"
        np.save(folder / file_name, np.ascontiguousarray(getattr(lists, name)))
        names.append(file_name)
    return names


def random_access_files(folder: Path) -> list[Path]:
    """The files of the lists saved in ``folder`` that votes read at random."""
    return [folder / f"{name}.npy" for name in _RANDOM_ACCESS]


def load_lists(folder: Path) -> PostingLists:
    """Map the lists saved in ``folder``; pages are read on demand and shared.

    Raises:
        IndexCorruptError: a file is missing, truncated or inconsistent.
    """
    try:
        arrays = {
            name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in _ARRAYS
        }
        advise_random_reads(random_access_files(folder))
    except (OSError, ValueError) as error:
        raise IndexCorruptError(f"posting segment {folder.name}: {error}") from error
    lists = PostingLists(**arrays)
    consistent = (
        len(lists.starts) == len(lists.words) + 1
        and len(lists.signatures) == len(lists.docs)
        and len(lists.scopes) == len(lists.ids)
        and (len(lists.starts) == 0 or int(lists.starts[-1]) == len(lists.docs))
    )
    if not consistent:
        raise IndexCorruptError(f"posting segment {folder.name} has inconsistent arrays")
    return lists


@numba.njit(cache=True, nogil=True)
def _block_lookup_kernel(  # pragma: no cover - compiled; tested against a plain search
    block_starts: IdArray, shift: np.int64, words: UintArray, starts: IdArray,
    query_words: UintArray,
) -> tuple[IdArray, IdArray]:
    """(begin, end) of each of ``query_words``, each searched for in its block of words
    (:class:`WordBlocks`)."""
    begin = np.zeros(len(query_words), np.int64)
    end = np.zeros(len(query_words), np.int64)
    blocks = len(block_starts) - 1
    for i in range(len(query_words)):
        wanted = query_words[i]
        block = np.int64(wanted) >> shift
        if block >= blocks:
            continue
        low, high = block_starts[block], block_starts[block + 1]
        stop = high
        while low < high:  # the first position whose word is not below ``wanted``
            middle = (low + high) >> 1
            if words[middle] < wanted:
                low = middle + 1
            else:
                high = middle
        if low < stop and words[low] == wanted:
            begin[i] = starts[low]
            end[i] = starts[low + 1]
    return begin, end


@numba.njit(cache=True, nogil=True)
def _directory_lookup_kernel(  # pragma: no cover - compiled; tested against the search
    directory: IdArray, query_words: UintArray
) -> tuple[IdArray, IdArray]:
    """(begin, end) of each of ``query_words`` from a directory of every word's start."""
    begin = np.zeros(len(query_words), np.int64)
    end = np.zeros(len(query_words), np.int64)
    last = len(directory) - 1
    for i in range(len(query_words)):
        word = query_words[i]
        if word < last:
            begin[i] = directory[word]
            end[i] = directory[word + 1]
    return begin, end


# -- voting --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryWords:
    """A query's distinct words, each with the signatures of the query
    descriptors assigned to it and what a match on it is worth."""

    words: UintArray  # (g,) distinct, ascending
    starts: IdArray  # (g + 1,) signatures[starts[i]:starts[i + 1]] are words[i]'s
    signatures: UintArray  # (e,)
    weights: FloatArray  # (g,) idf squared; 0 for stop-listed words

    @classmethod
    def of(cls, words: UintArray, signatures: UintArray) -> QueryWords:
        """Group (word, signature) entries by word, every word weighing 1."""
        order = np.argsort(words, kind="stable")
        distinct, first = np.unique(words[order], return_index=True)
        return cls(
            words=distinct.astype(np.uint32),
            starts=np.append(first, len(words)).astype(np.int64),
            signatures=np.ascontiguousarray(signatures[order], dtype=np.uint32),
            weights=np.ones(len(distinct), dtype=np.float32),
        )


@dataclass(frozen=True, slots=True)
class Votes:
    """The docs of one set of lists that received votes, with their scores (unordered)."""

    docs: UintArray
    scores: FloatArray


def vote(
    lists: PostingLists,
    begin: IdArray,
    end: IdArray,
    query: QueryWords,
    *,
    max_hamming: int,
    hamming_weights: FloatArray,
    scope: int,
    deleted: npt.NDArray[np.bool_] | None,
) -> Votes:
    """Score every doc of ``lists`` visible from ``scope`` against the query.

    ``begin`` and ``end`` are where each query word's postings lie in
    ``lists`` (:meth:`PostingLists.lookup`). A posting matches when a query
    signature of its word differs from its own in at most ``max_hamming``
    bits. Each word a doc shares with the query counts once, with its best
    match: the word's weight times ``hamming_weights[distance]``. Counting a
    shared word once on both sides is what keeps bursts (lines of text, a
    fence, a window's many panes, each giving dozens of near-identical
    descriptors) from outvoting the real match (Jegou, Douze & Schmid 2009).
    """
    if not len(lists) or not len(query.words):
        return Votes(np.empty(0, np.uint32), np.empty(0, np.float32))
    # Most segments have no tombstones: an empty array says so without an array
    # of every doc to allocate and zero for each vote.
    dead = _NONE_DELETED if deleted is None else np.asarray(deleted, np.bool_)
    scratch, touched = _scratch(len(lists))
    docs, scores = _vote_kernel(
        scratch,
        touched,
        begin,
        end,
        query.starts,
        query.signatures,
        query.weights,
        lists.docs,
        lists.signatures,
        lists.scopes,
        dead,
        np.int64(scope),
        np.int64(max_hamming),
        np.asarray(hamming_weights, np.float32),
    )
    return Votes(docs, scores)


_NONE_DELETED = np.zeros(0, dtype=np.bool_)
_SCRATCH = threading.local()


def _scratch(docs: int) -> tuple[FloatArray, UintArray]:
    """This thread's score and touched-doc buffers, at least ``docs`` long, scores all 0.

    A vote within a budget touches a few thousand of a segment's 131,072 docs:
    allocating and zeroing arrays of every doc for each segment and each vote
    cost more than the voting (0.9 ms a query at a million images). The kernel
    sets the scores it touched back to 0.
    """
    buffers: tuple[FloatArray, UintArray] | None = getattr(_SCRATCH, "buffers", None)
    if buffers is None or len(buffers[0]) < docs:
        buffers = (np.zeros(docs, dtype=np.float32), np.empty(docs, dtype=np.uint32))
        _SCRATCH.buffers = buffers
    return buffers


@numba.njit(cache=True, nogil=True)
def _popcount(value: np.uint32) -> int:  # pragma: no cover - compiled
    value = value - ((value >> 1) & 0x55555555)
    value = (value & 0x33333333) + ((value >> 2) & 0x33333333)
    return int((((value + (value >> 4)) & 0x0F0F0F0F) * 0x01010101) & 0xFFFFFFFF) >> 24


# Postings whose distances are computed at a time, before any of them is scored.
_DISTANCE_BLOCK = 4096


@numba.njit(cache=True, nogil=True)
def _vote_kernel(  # noqa: PLR0917, PLR0912 - numba kernels take positional arrays
    # (compiled; tested against brute-force voting)
    scores: FloatArray,
    touched: UintArray,
    begin: IdArray,
    end: IdArray,
    query_starts: IdArray,
    query_signatures: UintArray,
    query_weights: FloatArray,
    docs: UintArray,
    signatures: UintArray,
    scopes: IdArray,
    deleted: npt.NDArray[np.bool_],
    scope: np.int64,
    max_hamming: np.int64,
    hamming_weights: FloatArray,
) -> tuple[UintArray, FloatArray]:
    touched_count = 0
    distances = np.empty(_DISTANCE_BLOCK, np.uint32)
    # The first line of each voting list, read in a loop of independent loads so
    # that their cache misses overlap; the scoring loop below would wait for
    # them one word at a time.
    first_lines = np.uint32(0)
    for word in range(len(begin)):
        if query_weights[word] > 0.0 and begin[word] < end[word]:
            first_lines ^= signatures[begin[word]] ^ docs[begin[word]]
    touched[0] = first_lines  # kept, so that the loads are not optimised away
    for word in range(len(begin)):
        weight = query_weights[word]
        if weight <= 0.0:
            continue
        first, last = query_starts[word], query_starts[word + 1]
        # A word's postings are sorted by doc, so a doc's postings on it are
        # adjacent: its best match is held until the next doc comes, and one
        # write per doc and word reaches the scores. Per-doc bookkeeping arrays
        # cost a cache miss each at a million images.
        held_doc = -1
        held_value = np.float32(0.0)
        start, stop = begin[word], end[word]
        while start < stop:
            count = min(stop - start, _DISTANCE_BLOCK)
            # Distances first, in a loop without branches that the compiler can
            # vectorise; then the postings within reach (about one in ten) are scored.
            wanted = query_signatures[first]
            for i in range(count):
                distances[i] = _popcount(wanted ^ signatures[start + i])
            for entry in range(first + 1, last):
                wanted = query_signatures[entry]
                for i in range(count):
                    distances[i] = min(distances[i], _popcount(wanted ^ signatures[start + i]))
            for i in range(count):
                distance = distances[i]
                if distance > max_hamming:
                    continue
                value = weight * hamming_weights[distance]
                if value <= 0.0:  # a match worth nothing is no vote
                    continue
                doc = int(docs[start + i])
                if doc == held_doc:
                    held_value = max(held_value, value)
                    continue
                if held_doc >= 0:
                    touched_count = _credit(scores, touched, touched_count, held_doc, held_value)
                held_doc, held_value = doc, value
            start += count
        if held_doc >= 0:
            touched_count = _credit(scores, touched, touched_count, held_doc, held_value)
    # Scope and tombstones are checked once per doc voted for, not per posting.
    found = np.empty(touched_count, np.uint32)
    found_scores = np.empty(touched_count, np.float32)
    kept = 0
    for i in range(touched_count):
        doc = touched[i]
        doc_scope = scopes[doc]
        if (doc_scope != 0 and doc_scope != scope) or (len(deleted) and deleted[doc]):  # noqa: PLR1714 - plain
            # comparisons compile to two instructions in numba
            continue
        found[kept] = doc
        found_scores[kept] = scores[doc]
        kept += 1
    for i in range(touched_count):  # the buffers are this thread's, for its next vote
        scores[touched[i]] = 0.0
    return found[:kept].copy(), found_scores[:kept].copy()


@numba.njit(cache=True, nogil=True, inline="always")
def _credit(  # pragma: no cover - compiled
    scores: FloatArray, touched: UintArray, touched_count: int, doc: int, value: np.float32
) -> int:
    """Add ``value`` to ``doc``'s score, noting a doc seen for the first time."""
    if scores[doc] == 0.0:  # no vote yet: every vote is worth more than 0
        touched[touched_count] = doc
        touched_count += 1
    scores[doc] += value
    return touched_count
