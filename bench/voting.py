"""Does numba pay for the inverted file's voting loop? The same vote, compiled and in numpy.

    .venv/bin/python -m bench.voting --index bench/out/engine/<collection>/index \
        --queries bench/out/queries --tile 1,10,100

The index is one that ``bench.quality`` built (its 900 photos); the queries are its edited
photos. ``--tile T`` repeats the index's posting lists T times (doc numbers shifted), so each
list is T times longer, as in a collection T times larger with the same word statistics:
the vote's cost at 90k images without building them. For each query (both orientations) the
time of the numba kernel (:func:`indexer.postings.vote`) and of the numpy version below are
taken back to back on the same input, and their scores must agree.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.common import machine_info, median, write_json
from indexer.analysis import analyze_path
from indexer.postings import PostingLists, QueryWords, Votes, vote
from indexer.search import SearchService
from indexer.segments import SegmentSet, WeightedQuery
from indexer.settings import EngineSettings


def tiled(lists: PostingLists, times: int) -> PostingLists:
    """``lists`` with every doc repeated ``times`` times (new doc numbers and ids)."""
    if times == 1:
        return lists
    counts = np.diff(lists.starts)
    docs, signatures, word_of = [], [], []
    for copy in range(times):
        docs.append(lists.docs.astype(np.int64) + copy * len(lists))
        signatures.append(lists.signatures)
        word_of.append(np.repeat(np.arange(len(lists.words)), counts))
    order = np.argsort(np.concatenate(word_of), kind="stable")
    return PostingLists(
        words=lists.words,
        starts=lists.starts * times,
        docs=np.concatenate(docs)[order].astype(np.uint32),
        signatures=np.concatenate(signatures)[order],
        ids=np.arange(1, times * len(lists) + 1, dtype=np.int64),
        scopes=np.zeros(times * len(lists), dtype=np.int64),
    )


def numpy_vote(
    lists: PostingLists, begin: np.ndarray, end: np.ndarray, query: QueryWords,
    *, max_hamming: int, hamming_weights: np.ndarray,
) -> Votes:
    """The kernel's vote in numpy: each (query word, doc) counts once, with its best match."""
    lengths = end - begin
    alive = (query.weights > 0) & (lengths > 0)
    words = np.flatnonzero(alive)
    lengths = lengths[words]
    total = int(lengths.sum())
    if not total:
        return Votes(np.empty(0, np.uint32), np.empty(0, np.float32))
    word_of_posting = np.repeat(words, lengths)
    offsets = np.repeat(begin[words] - np.cumsum(lengths) + lengths, lengths)
    postings = offsets + np.arange(total)
    stored = lists.signatures[postings]
    # Each posting against every query signature of its word: expand by group size.
    group = np.diff(query.starts)[word_of_posting]
    pair_posting = np.repeat(np.arange(total), group)
    first = query.starts[word_of_posting]
    pair_entry = np.repeat(first - np.cumsum(group) + group, group) + np.arange(int(group.sum()))
    distance = np.bitwise_count(query.signatures[pair_entry] ^ stored[pair_posting])
    best = np.full(total, 33, dtype=np.int64)
    np.minimum.at(best, pair_posting, distance)
    keep = best <= max_hamming
    value = query.weights[word_of_posting[keep]] * hamming_weights[best[keep]]
    docs = lists.docs[postings[keep]].astype(np.int64)
    key = word_of_posting[keep].astype(np.int64) * len(lists) + docs
    order = np.lexsort((-value, key))
    first_of_key = np.ones(len(order), dtype=bool)
    first_of_key[1:] = key[order][1:] != key[order][:-1]
    chosen = order[first_of_key]
    scores = np.bincount(docs[chosen], weights=value[chosen], minlength=len(lists))
    voted = np.flatnonzero(scores)
    return Votes(voted.astype(np.uint32), scores[voted].astype(np.float32))


def queries_of(segments: SegmentSet, settings: EngineSettings, photos: Sequence[Path]
               ) -> list[WeightedQuery]:
    """Each photo's weighted query words (both orientations), as the engine votes with them."""
    prepared = []
    for photo in photos:
        features = analyze_path(photo, settings, for_query=True).features
        for oriented in (features, features.mirrored()):
            prepared.append(segments.weighted_query(oriented, settings.vote))
    return prepared


async def run(index: Path, photos: Sequence[Path], tiles: Sequence[int]) -> dict[str, object]:
    service = await SearchService.open(index)
    try:
        segments = service.segments
        assert segments is not None
        settings = service.settings
        prepared = queries_of(segments, settings, photos)
    finally:
        await service.close()
    params = settings.vote
    hamming_weights = params.hamming_weights
    result: dict[str, object] = {"machine": machine_info(), "queries": len(photos), "tiles": {}}
    for times in tiles:
        compiled, plain, postings = [], [], []
        cache: dict[int, PostingLists] = {}
        for prepared_query in prepared:
            query = prepared_query.words
            for segment in prepared_query.segments:
                item = segment.lists
                big = cache.setdefault(id(item), tiled(item, times))
                begin, end = big.lookup(query.words)
                postings.append(int((end - begin).sum()))
                start = time.perf_counter()
                fast = vote(big, begin, end, query, max_hamming=params.max_hamming,
                            hamming_weights=hamming_weights, scope=0, deleted=None)
                compiled.append(time.perf_counter() - start)
                start = time.perf_counter()
                slow = numpy_vote(big, begin, end, query, max_hamming=params.max_hamming,
                                  hamming_weights=hamming_weights)
                plain.append(time.perf_counter() - start)
                expected = dict(zip(slow.docs.tolist(), slow.scores.tolist(), strict=True))
                got = dict(zip(fast.docs.tolist(), fast.scores.tolist(), strict=True))
                assert got.keys() == expected.keys()
                assert all(abs(got[d] - expected[d]) <= 1e-3 * max(1.0, expected[d]) for d in got)
        ratios = [p / c for p, c in zip(plain, compiled, strict=True)]
        summary = {
            "images": times * sum(len(segment.lists) for segment in prepared[0].segments),
            "postings_visited_median": median(postings),
            "numba_ms_median": 1000 * median(compiled),
            "numpy_ms_median": 1000 * median(plain),
            "numpy_over_numba_median": median(ratios),
        }
        result["tiles"][str(times)] = summary  # type: ignore[index]
        print(f"x{times}: {summary}", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    import asyncio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True,
                        help="a folder of query photos (bench.quality's queries folder)")
    parser.add_argument("--count", type=int, default=40, help="query photos used")
    parser.add_argument("--tile", default="1,10,100")
    parser.add_argument("--out", type=Path, default=Path("bench/out/voting.json"))
    arguments = parser.parse_args(argv)
    photos = sorted(arguments.queries.rglob("*.jpg"))
    step = max(1, len(photos) // arguments.count)
    chosen = photos[::step][: arguments.count]
    tiles = [int(t) for t in arguments.tile.split(",")]
    write_json(arguments.out, asyncio.run(run(arguments.index, chosen, tiles)))


if __name__ == "__main__":
    main()
