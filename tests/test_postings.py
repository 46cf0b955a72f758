"""The inverted file: vocabulary, posting lists, voting, segments, merges and tombstones.

Voting is checked against brute force: every query descriptor compared with
every stored descriptor's word and signature directly, with no posting lists.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.errors import IndexCorruptError
from indexer.features import LocalFeatures
from indexer.postings import (
    WORDS_PER_BLOCK,
    PostingLists,
    QueryWords,
    WordBlocks,
    load_lists,
    merge_lists,
    save_lists,
    vote,
)
from indexer.segments import (
    Segment,
    SegmentSet,
    SegmentStore,
    VoteParams,
    merge_plan,
    merged,
    within_budget,
)
from indexer.vocabulary import (
    BITS_PER_HALF,
    HALF,
    SIGNATURE_BITS,
    Vocabulary,
    half_words_for,
    train_vocabulary,
)

HAMMING_WEIGHTS = np.exp(-((np.arange(33) / 8.0) ** 2)).astype(np.float32)


def unit_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    rows = rng.standard_normal((count, 64)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return train_vocabulary(unit_rows(np.random.default_rng(1), 4000), half_words=32, trained_on=8)


def features_of(descriptors: np.ndarray, seed: int) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 400, size=(len(descriptors), 2)).astype(np.float32)
    return LocalFeatures(points=points, descriptors=descriptors, width=400, height=400)


def brute_force_scores(
    stored: dict[int, tuple[np.ndarray, np.ndarray, int]],
    entries: tuple[np.ndarray, np.ndarray, dict[int, float]],
    *,
    max_hamming: int,
    scope: int,
    removed: set[int],
) -> dict[int, float]:
    """Each visible image's score: per word it shares with the query, its best match."""
    query_words, query_signatures, word_weights = entries
    scores: dict[int, float] = {}
    for image_id, (words, signatures, image_scope) in stored.items():
        if image_id in removed or image_scope not in (0, scope):
            continue
        best_per_word: dict[int, float] = {}
        for word, signature in zip(query_words.tolist(), query_signatures.tolist(), strict=True):
            if word_weights[word] <= 0:
                continue
            for stored_word, stored_signature in zip(
                words.tolist(), signatures.tolist(), strict=True
            ):
                if stored_word != word:
                    continue
                distance = bin(signature ^ stored_signature).count("1")
                if distance > max_hamming:
                    continue
                value = word_weights[word] * float(HAMMING_WEIGHTS[distance])
                best_per_word[word] = max(value, best_per_word.get(word, 0.0))
        if best_per_word:
            scores[image_id] = sum(best_per_word.values())
    return scores


# -- vocabulary ----------------------------------------------------------------------


def test_a_descriptor_and_a_slightly_moved_copy_share_a_word_and_most_bits(
    vocabulary: Vocabulary,
) -> None:
    rng = np.random.default_rng(2)
    original = unit_rows(rng, 300)
    moved = original + 0.01 * rng.standard_normal(original.shape).astype(np.float32)
    unrelated = unit_rows(rng, 300)

    first = vocabulary.assign(original)
    copy = vocabulary.assign(moved, per_half=2)
    other = vocabulary.assign(unrelated, per_half=2)

    same_word = (copy.words == first.words).any(axis=1)
    assert same_word.mean() > 0.95
    assert (other.words == first.words).any(axis=1).mean() < 0.3
    distances = np.bitwise_count(copy.signatures[:, 0] ^ first.signatures[:, 0])
    random_distances = np.bitwise_count(other.signatures[:, 0] ^ first.signatures[:, 0])
    assert np.median(distances[copy.words[:, 0] == first.words[:, 0]]) <= 3
    assert np.median(random_distances) >= SIGNATURE_BITS // 2 - 4


def test_multiple_assignment_lists_the_nearest_pair_first(vocabulary: Vocabulary) -> None:
    descriptors = unit_rows(np.random.default_rng(3), 50)

    single = vocabulary.assign(descriptors)
    several = vocabulary.assign(descriptors, per_half=2)

    assert several.words.shape == (50, 4)
    assert len(np.unique(several.words, axis=1)[0]) == 4
    np.testing.assert_array_equal(several.words[:, 0], single.words[:, 0])
    np.testing.assert_array_equal(several.signatures[:, 0], single.signatures[:, 0])


@pytest.mark.parametrize("per_half", [1, 2])
def test_assignment_equals_the_nearest_half_words_by_brute_force(
    vocabulary: Vocabulary, per_half: int
) -> None:
    descriptors = unit_rows(np.random.default_rng(4), 40)

    assignment = vocabulary.assign(descriptors, per_half=per_half)

    ranks, bits = [], []
    for side in range(2):
        halves = descriptors[:, side * HALF : (side + 1) * HALF].astype(np.float64)
        distances = ((halves[:, None, :] - vocabulary.centroids[side][None]) ** 2).sum(axis=2)
        nearest = np.argsort(distances, axis=1, kind="stable")[:, :per_half]
        above = (halves @ vocabulary.projections[side])[:, None, :] > (
            vocabulary.medians[side][nearest]
        )
        ranks.append(nearest)
        bits.append((above * (1 << np.arange(BITS_PER_HALF))).sum(axis=2))
    for row in range(len(descriptors)):
        pairs = sorted(
            ((a, b) for a in range(per_half) for b in range(per_half)),
            key=lambda pair: pair[0] + pair[1],
        )
        expected_words = [ranks[0][row, a] * vocabulary.half_words + ranks[1][row, b]
                          for a, b in pairs]
        expected_signatures = [bits[0][row, a] | (bits[1][row, b] << BITS_PER_HALF)
                               for a, b in pairs]
        assert assignment.words[row].tolist() == expected_words
        assert assignment.signatures[row].tolist() == expected_signatures


def test_assigning_every_half_word_gives_every_word_once(vocabulary: Vocabulary) -> None:
    descriptors = unit_rows(np.random.default_rng(5), 3)

    assignment = vocabulary.assign(descriptors, per_half=vocabulary.half_words)

    every_word = np.arange(vocabulary.size)
    for words in assignment.words:
        np.testing.assert_array_equal(np.sort(words), every_word)


def test_the_vocabulary_round_trips_and_a_damaged_file_is_reported(
    vocabulary: Vocabulary, tmp_path: Path
) -> None:
    path = tmp_path / "vocabulary.npz"
    vocabulary.save(path)
    loaded = Vocabulary.load(path)
    assert loaded.id == vocabulary.id
    descriptors = unit_rows(np.random.default_rng(4), 20)
    np.testing.assert_array_equal(
        loaded.assign(descriptors).words, vocabulary.assign(descriptors).words
    )

    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(IndexCorruptError, match="vocabulary"):
        Vocabulary.load(path)


@pytest.mark.parametrize(
    ("descriptors", "expected"), [(100, 16), (20_000, 512), (40_000, 1024), (10**7, 1024)]
)
def test_a_small_collection_gets_a_smaller_vocabulary(descriptors: int, expected: int) -> None:
    assert half_words_for(descriptors, largest=1024) == expected


# -- lists and voting ----------------------------------------------------------------


def random_images(
    vocabulary: Vocabulary, seed: int, count: int, scopes: tuple[int, ...] = (0,)
) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    images = {}
    for image_id in range(1, count + 1):
        assignment = vocabulary.assign(unit_rows(rng, int(rng.integers(5, 60))))
        images[image_id * 3] = (
            assignment.words[:, 0],
            assignment.signatures[:, 0],
            scopes[image_id % len(scopes)],
        )
    return images


def lists_of(images: dict[int, tuple[np.ndarray, np.ndarray, int]]) -> PostingLists:
    ids = sorted(images)
    return PostingLists.build(
        ids,
        [images[i][2] for i in ids],
        [images[i][0] for i in ids],
        [images[i][1] for i in ids],
    )


def query_words(
    vocabulary: Vocabulary, descriptors: np.ndarray
) -> tuple[QueryWords, tuple[np.ndarray, np.ndarray, dict[int, float]]]:
    """The grouped query, and the same entries ungrouped for brute force."""
    assignment = vocabulary.assign(descriptors, per_half=2)
    words, signatures = assignment.words.reshape(-1), assignment.signatures.reshape(-1)
    grouped = QueryWords.of(words, signatures)
    rng = np.random.default_rng(len(descriptors))
    # Some words stop-listed (weight 0), the rest weighted unevenly.
    weights = np.where(
        rng.random(len(grouped.words)) < 0.1, 0.0, rng.uniform(0.5, 2.0, len(grouped.words))
    ).astype(np.float32)
    by_word = dict(zip(grouped.words.tolist(), weights.tolist(), strict=True))
    return dataclasses.replace(grouped, weights=weights), (words, signatures, by_word)


def voted(
    lists: PostingLists,
    query: QueryWords,
    *,
    max_hamming: int,
    scope: int,
    deleted: np.ndarray | None = None,
) -> dict[int, float]:
    begin, end = lists.lookup(query.words)
    votes = vote(
        lists,
        begin,
        end,
        query,
        max_hamming=max_hamming,
        hamming_weights=HAMMING_WEIGHTS,
        scope=scope,
        deleted=deleted,
    )
    return dict(zip(lists.ids[votes.docs].tolist(), votes.scores.tolist(), strict=True))


@pytest.mark.parametrize("max_hamming", [0, 6, 12, 32])
def test_voting_equals_brute_force(vocabulary: Vocabulary, max_hamming: int) -> None:
    images = random_images(vocabulary, seed=5, count=40, scopes=(0, -100, -200))
    lists = lists_of(images)
    rng = np.random.default_rng(6)
    query, entries = query_words(vocabulary, unit_rows(rng, 80))

    expected = brute_force_scores(
        images, entries, max_hamming=max_hamming, scope=-100, removed=set()
    )
    got = voted(lists, query, max_hamming=max_hamming, scope=-100)

    assert got.keys() == expected.keys()
    for image_id, score in expected.items():
        assert got[image_id] == pytest.approx(score, rel=1e-5)
    assert all(images[i][2] in (0, -100) for i in got)


def test_a_stored_image_votes_for_itself_first(vocabulary: Vocabulary) -> None:
    rng = np.random.default_rng(7)
    stored = {i: unit_rows(rng, 60) for i in range(1, 31)}
    assignments = {i: vocabulary.assign(d) for i, d in stored.items()}
    lists = PostingLists.build(
        list(stored),
        [0] * len(stored),
        [assignments[i].words[:, 0] for i in stored],
        [assignments[i].signatures[:, 0] for i in stored],
    )
    for image_id in (1, 17, 30):
        noisy = stored[image_id][:30] + 0.01 * rng.standard_normal((30, 64)).astype(np.float32)
        scores = voted(lists, query_words(vocabulary, noisy)[0], max_hamming=10, scope=0)
        assert max(scores, key=scores.__getitem__) == image_id


def test_tombstoned_docs_get_no_votes(vocabulary: Vocabulary) -> None:
    images = random_images(vocabulary, seed=8, count=30)
    lists = lists_of(images)
    query, _ = query_words(vocabulary, unit_rows(np.random.default_rng(9), 60))
    everyone = voted(lists, query, max_hamming=32, scope=0)
    removed = sorted(everyone)[:5]

    segment = Segment(None, lists).without(removed)
    after = voted(lists, query, max_hamming=32, scope=0, deleted=segment.deleted)

    assert after == {i: s for i, s in everyone.items() if i not in removed}


def test_lists_round_trip_through_files_and_truncation_is_reported(
    vocabulary: Vocabulary, tmp_path: Path
) -> None:
    lists = lists_of(random_images(vocabulary, seed=10, count=12))
    save_lists(lists, tmp_path)
    loaded = load_lists(tmp_path)
    for name in ("words", "starts", "docs", "signatures", "ids", "scopes"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(lists, name))

    (tmp_path / "docs.npy").write_bytes((tmp_path / "docs.npy").read_bytes()[:-8])
    with pytest.raises(IndexCorruptError):
        load_lists(tmp_path)
    (tmp_path / "docs.npy").write_bytes(b"not an array")
    with pytest.raises(IndexCorruptError):
        load_lists(tmp_path)


def test_ids_must_ascend() -> None:
    with pytest.raises(ValueError, match="ascending"):
        PostingLists.build([3, 2], [0, 0], [np.ones(1, np.uint32)] * 2, [np.ones(1, np.uint32)] * 2)


# -- merges and tombstones, as properties --------------------------------------------------


def contents(lists: PostingLists) -> dict[int, list[tuple[int, int]]]:
    """Image id -> its sorted (word, signature) postings, whatever the layout."""
    words = np.repeat(lists.words, np.diff(lists.starts))
    result: dict[int, list[tuple[int, int]]] = {int(i): [] for i in lists.ids}
    for doc, word, signature in zip(
        lists.docs.tolist(), words.tolist(), lists.signatures.tolist(), strict=True
    ):
        result[int(lists.ids[doc])].append((word, signature))
    return {i: sorted(p) for i, p in result.items()}


image_postings = st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 2**32 - 1)), min_size=0, max_size=12
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(image_postings, min_size=0, max_size=6), min_size=1, max_size=5),
    st.sets(st.integers(1, 40)),
)
def test_merging_keeps_every_live_image_and_drops_tombstoned_ones(
    parts_postings: list[list[list[tuple[int, int]]]], removed: set[int]
) -> None:
    parts, expected, next_id = [], {}, 1
    for part in parts_postings:
        ids = list(range(next_id, next_id + len(part)))
        next_id += len(part)
        parts.append(
            PostingLists.build(
                ids,
                [0] * len(ids),
                [np.array([w for w, _ in p], np.uint32) for p in part],
                [np.array([s for _, s in p], np.uint32) for p in part],
            )
        )
        expected.update({i: sorted(p) for i, p in zip(ids, part, strict=True) if i not in removed})

    segments = [Segment(None, part).without(sorted(removed)) for part in parts]
    result = merged(segments)

    assert contents(result) == expected
    assert list(result.ids) == sorted(expected)
    assert np.all(np.diff(result.words.astype(np.int64)) > 0)
    for start, end in zip(result.starts[:-1], result.starts[1:], strict=True):
        assert np.all(np.diff(result.docs[start:end].astype(np.int64)) >= 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=0, max_size=30), st.integers(2, 6))
def test_the_merge_plan_merges_adjacent_segments_of_one_level(
    sizes: list[int], factor: int
) -> None:
    plan = merge_plan(sizes, seal_after=100, merge_factor=factor)
    if plan is None:
        return
    assert len(plan) == factor
    assert plan.stop <= len(sizes)


def test_the_merge_plan_waits_for_enough_segments() -> None:
    assert merge_plan([100] * 7, seal_after=100, merge_factor=8) is None
    assert merge_plan([100] * 8, seal_after=100, merge_factor=8) == range(8)
    assert merge_plan([800, 100, 100, 100], seal_after=100, merge_factor=3) == range(1, 4)


# -- the segment set and its folder ---------------------------------------------------------


def test_a_segment_set_survives_sealing_committing_and_reloading(
    vocabulary: Vocabulary, tmp_path: Path
) -> None:
    rng = np.random.default_rng(11)
    descriptors = {i: unit_rows(rng, 40) for i in range(1, 21)}
    empty = SegmentSet(vocabulary, (), Segment(None, PostingLists.empty()), ceiling=0)
    grown = empty.with_images(
        list(descriptors), [0] * 20, [vocabulary.assign(d) for d in descriptors.values()]
    )
    store = SegmentStore(tmp_path / "postings")
    store.save_vocabulary(vocabulary)
    segment = store.write_segment(grown.open.lists)
    sealed = SegmentSet(vocabulary, (segment,), Segment(None, PostingLists.empty()), ceiling=20)
    sealed = sealed.without_images([5])
    store.commit(sealed)

    reloaded = store.load()

    assert reloaded is not None
    assert reloaded.ceiling == 20
    assert reloaded.tombstones == {5}
    assert len(reloaded) == 19
    query = [features_of(descriptors[9][:25], seed=1)]
    ranking = reloaded.vote(query, scope=0, count=3, params=VoteParams())
    assert ranking[0][0] == 9
    removed_query = [features_of(descriptors[5][:25], seed=2)]
    assert all(
        i != 5 for i, _ in reloaded.vote(removed_query, scope=0, count=20, params=VoteParams())
    )


def test_segments_voted_on_side_by_side_rank_as_one_after_the_other(
    vocabulary: Vocabulary,
) -> None:
    rng = np.random.default_rng(16)
    descriptors = {i: unit_rows(rng, 40) for i in range(1, 61)}
    segments = []
    for first in (1, 21, 41):  # three sealed segments of 20 images
        ids = list(range(first, first + 20))
        lists = PostingLists.build(
            ids,
            [0] * 20,
            [vocabulary.assign(descriptors[i]).words[:, 0] for i in ids],
            [vocabulary.assign(descriptors[i]).signatures[:, 0] for i in ids],
        )
        segments.append(Segment(f"s{first}", lists))
    segment_set = SegmentSet(
        vocabulary, tuple(segments), Segment(None, PostingLists.empty()), ceiling=60
    ).without_images([44])
    queries = [[features_of(descriptors[i][:25], seed=i)] for i in (3, 30, 44, 59)]

    with ThreadPoolExecutor(max_workers=3) as threads:
        for query in queries:
            alone = segment_set.vote(query, scope=0, count=10, params=VoteParams())
            side_by_side = segment_set.vote(
                query, scope=0, count=10, params=VoteParams(), threads=threads
            )
            assert side_by_side == alone
            assert all(image_id != 44 for image_id, _ in side_by_side)
    firsts = [segment_set.vote(q, scope=0, count=1, params=VoteParams()) for q in queries[:2]]
    assert [ranking[0][0] for ranking in firsts] == [3, 30]  # each image votes for itself


def test_stale_and_abandoned_files_are_removed_but_committed_ones_kept(
    vocabulary: Vocabulary, tmp_path: Path
) -> None:
    store = SegmentStore(tmp_path)
    store.save_vocabulary(vocabulary)
    lists = lists_of(random_images(vocabulary, seed=12, count=5))
    kept = store.write_segment(lists)
    dropped = store.write_segment(lists)
    store.commit(SegmentSet(vocabulary, (kept,), Segment(None, PostingLists.empty()), ceiling=15))

    store.remove_stale()

    names = {entry.name for entry in tmp_path.iterdir()}
    assert kept.name in names
    assert dropped.name not in names
    assert store.load() is not None


def test_an_unreadable_commit_point_is_reported(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path)
    (tmp_path / "SEGMENTS.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(IndexCorruptError, match="SEGMENTS"):
        store.load()


def test_merging_lists_of_overlapping_ranges_is_refused(vocabulary: Vocabulary) -> None:
    lists = lists_of(random_images(vocabulary, seed=13, count=3))
    with pytest.raises(ValueError, match="ascending"):
        merge_lists([lists, lists], drop=set())


def test_a_burst_of_one_texture_counts_once_on_both_sides(vocabulary: Vocabulary) -> None:
    """Lines of text or a fence give dozens of near-identical descriptors: a stored image
    with the same burst must not outvote one that shares several distinct descriptors."""
    rng = np.random.default_rng(14)
    texture = unit_rows(rng, 1)
    distinct = unit_rows(rng, 5)
    burst = np.repeat(texture, 40, axis=0)
    bursty = vocabulary.assign(np.vstack([burst, unit_rows(rng, 10)]))
    shared = vocabulary.assign(np.vstack([distinct, unit_rows(rng, 10)]))
    lists = PostingLists.build(
        [1, 2],
        [0, 0],
        [bursty.words[:, 0], shared.words[:, 0]],
        [bursty.signatures[:, 0], shared.signatures[:, 0]],
    )
    query, _ = query_words(vocabulary, np.vstack([burst, distinct]))
    query = dataclasses.replace(query, weights=np.ones(len(query.words), np.float32))

    scores = voted(lists, query, max_hamming=32, scope=0)

    assert scores[2] > 3 * scores[1]


@pytest.mark.parametrize("max_hamming", [14, 32])
def test_voting_on_lists_longer_than_the_kernels_block_equals_brute_force(
    max_hamming: int,
) -> None:
    """Thousands of images on the same few words, each with three postings on one
    word: the kernel scores a list block by block (4,096 postings, not a multiple of
    three) and holds each image's best match across the blocks' boundaries."""
    rng = np.random.default_rng(15)
    images = {}
    for image_id in range(1, 6_001):
        words = np.array([7, 7, 7, int(rng.integers(0, 3))], dtype=np.uint32)
        signatures = rng.integers(0, 2**32, len(words), dtype=np.uint64).astype(np.uint32)
        images[image_id] = (words, signatures, 0)
    lists = lists_of(images)
    query_entries = np.array([7, 7, 1], dtype=np.uint32)
    query_signatures = rng.integers(0, 2**32, 3, dtype=np.uint64).astype(np.uint32)
    query = dataclasses.replace(
        QueryWords.of(query_entries, query_signatures),
        weights=np.array([1.5, 2.0], dtype=np.float32),
    )
    entries = (query_entries, query_signatures, {1: 1.5, 7: 2.0})

    assert np.diff(lists.starts).max() > 4096  # one list spans several blocks
    expected = brute_force_scores(
        images, entries, max_hamming=max_hamming, scope=0, removed=set()
    )
    got = voted(lists, query, max_hamming=max_hamming, scope=0)

    assert got.keys() == expected.keys()
    for image_id, score in expected.items():
        assert got[image_id] == pytest.approx(score, rel=1e-5)


# -- a budget of postings ---------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 50), st.booleans()), max_size=40),
    st.integers(0, 400),
)
def test_a_budget_keeps_the_shortest_voting_lists_that_fit(
    words: list[tuple[int, bool]], budget: int
) -> None:
    frequency = np.array([length for length, _ in words], dtype=np.int64)
    voting = np.array([wanted for _, wanted in words], dtype=np.bool_)

    kept = within_budget(frequency, voting, budget)

    assert not (kept & ~voting).any()  # only voting words are kept
    if budget == 0 or frequency[voting].sum() <= budget:
        assert (kept == voting).all()
        return
    assert frequency[kept].sum() <= budget
    dropped = voting & ~kept
    # Every dropped list is at least as long as every kept one, and the shortest
    # dropped one would not have fitted.
    assert frequency[dropped].min() >= frequency[kept].max(initial=0)
    assert frequency[kept].sum() + frequency[dropped].min() > budget


def three_sealed_segments(
    vocabulary: Vocabulary, images: dict[int, tuple[np.ndarray, np.ndarray, int]]
) -> SegmentSet:
    """``random_images(..., count=60)`` (ids 3 to 180) as three sealed segments of 20."""
    segments = []
    for first, last in ((3, 60), (63, 120), (123, 180)):
        part = {i: images[i] for i in images if first <= i <= last}
        segments.append(Segment(f"s{first}", lists_of(part)))
    return SegmentSet(
        vocabulary, tuple(segments), Segment(None, PostingLists.empty()), ceiling=180
    )


def test_a_budgeted_vote_counts_the_kept_words_alone_as_brute_force_does(
    vocabulary: Vocabulary,
) -> None:
    images = random_images(vocabulary, seed=21, count=60)
    segment_set = three_sealed_segments(vocabulary, images)
    query = features_of(unit_rows(np.random.default_rng(22), 40), seed=3)
    everything = VoteParams(stop_fraction=1.0)
    full = segment_set.weighted_query(query, everything)
    postings = full.frequency
    budget = int(postings[full.words.weights > 0].sum()) // 3
    budgeted = dataclasses.replace(everything, posting_budget=budget)

    weighted = segment_set.weighted_query(query, budgeted)
    kept = weighted.words.weights > 0

    assert 0 < int(postings[kept].sum()) <= budget
    assert kept.sum() < (full.words.weights > 0).sum()
    # The kept words weigh what they weighed without a budget (idf is unchanged).
    assert np.array_equal(weighted.words.weights[kept], full.words.weights[kept])
    grouped = weighted.words
    entries = (
        np.repeat(grouped.words, np.diff(grouped.starts)),
        grouped.signatures,
        dict(zip(grouped.words.tolist(), grouped.weights.tolist(), strict=True)),
    )
    expected = brute_force_scores(
        images, entries, max_hamming=budgeted.max_hamming, scope=0, removed=set()
    )
    got = dict(segment_set.vote([query], scope=0, count=len(images), params=budgeted))
    assert got.keys() == expected.keys()
    for image_id, score in expected.items():
        assert got[image_id] == pytest.approx(score, rel=1e-5)


def test_the_best_few_across_segments_are_the_best_of_the_whole_vote(
    vocabulary: Vocabulary,
) -> None:
    images = random_images(vocabulary, seed=23, count=60)
    segment_set = three_sealed_segments(vocabulary, images)
    params = VoteParams(stop_fraction=1.0)
    for seed in range(4):
        query = features_of(unit_rows(np.random.default_rng(30 + seed), 300), seed=seed)
        whole = dict(segment_set.vote([query], scope=0, count=len(images), params=params))
        assert len(whole) > 10  # the query's words reach images of every segment
        for count in (1, 3, 10):
            best = segment_set.vote([query], scope=0, count=count, params=params)
            assert len(best) == count
            # Each image keeps its score, and no image left out scores higher.
            assert all(whole[image_id] == score for image_id, score in best)
            assert [s for _, s in best] == sorted(whole.values(), reverse=True)[:count]


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([300, 5_000, 2**20 - 1]),
    st.data(),
)
def test_looking_words_up_finds_each_word_s_postings_in_any_order(
    largest: int, data: st.DataObject
) -> None:
    # From a few hundred word ids to the whole vocabulary's: blocks of one to thousands of ids.
    stored = data.draw(st.lists(st.integers(0, largest), max_size=60, unique=True))
    wanted = data.draw(
        st.lists(st.one_of(st.sampled_from(stored or [0]), st.integers(0, largest + 20)),
                 max_size=40)
    )
    words = np.array(sorted(stored), dtype=np.uint32)
    lengths = np.arange(len(words)) % 4 + 1
    lists = PostingLists(
        words=words,
        starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        docs=np.zeros(int(lengths.sum()), np.uint32),
        signatures=np.zeros(int(lengths.sum()), np.uint32),
        ids=np.array([1], np.int64),
        scopes=np.zeros(1, np.int64),
    )
    # The engine asks with its words ascending; any order must give the same answer.
    for query in (sorted(set(wanted)), wanted):
        begin, end = lists.lookup(np.array(query, dtype=np.uint32))
        for word, first, last in zip(query, begin.tolist(), end.tolist(), strict=True):
            if word in stored:
                position = int(np.searchsorted(words, word))
                assert (first, last) == (lists.starts[position], lists.starts[position + 1])
            else:
                assert first == last


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**20 - 1), min_size=1, max_size=3_000, unique=True))
def test_word_blocks_hold_every_word_in_its_block_a_few_words_each(stored: list[int]) -> None:
    words = np.array(sorted(stored), dtype=np.uint32)
    blocks = WordBlocks.of(words)

    for block in range(len(blocks.starts) - 1):
        inside = words[blocks.starts[block] : blocks.starts[block + 1]]
        assert np.all(inside >> blocks.shift == block)
    assert blocks.starts[-1] == len(words)
    # About WORDS_PER_BLOCK words a block: never more than twice as wide as that needs.
    span = int(words[-1]) + 1
    assert len(blocks.starts) - 1 <= 2 * len(words) // WORDS_PER_BLOCK + 1
    assert (1 << blocks.shift) <= WORDS_PER_BLOCK * span // len(words)


def test_a_segment_whose_images_were_all_removed_is_not_looked_up(
    vocabulary: Vocabulary,
) -> None:
    images = random_images(vocabulary, seed=31, count=20)
    first = {i: images[i] for i in images if i <= 30}
    second = {i: images[i] for i in images if i > 30}
    segment_set = SegmentSet(
        vocabulary,
        (Segment("s1", lists_of(first)), Segment("s2", lists_of(second))),
        Segment(None, PostingLists.empty()),
        ceiling=60,
    )
    query = features_of(unit_rows(np.random.default_rng(32), 30), seed=4)

    emptied = segment_set.without_images(sorted(first))
    weighted = emptied.weighted_query(query, VoteParams())

    assert [segment.name for segment in weighted.segments] == ["s2"]
    ranking = emptied.vote([query], scope=0, count=20, params=VoteParams())
    assert ranking
    assert all(image_id in second for image_id, _ in ranking)


def dense_lists(rng: np.random.Generator, words: int, docs: int) -> PostingLists:
    """Lists of ``docs`` images on half of the words below ``words``: enough for a directory."""
    present = np.flatnonzero(rng.random(words) < 0.5).astype(np.uint32)
    images = [rng.choice(present, size=20) for _ in range(docs)]
    return PostingLists.build(
        np.arange(1, docs + 1),
        np.zeros(docs, np.int64),
        images,
        [rng.integers(0, 2**32, size=20, dtype=np.uint32) for _ in images],
    )


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.lists(st.integers(0, 700), max_size=80))
def test_a_directory_finds_what_the_search_through_the_words_finds(
    seed: int, wanted: list[int]
) -> None:
    lists = dense_lists(np.random.default_rng(seed), words=600, docs=30)
    with_directory = lists.with_directory()
    assert lists.directory is None
    assert with_directory.directory is not None

    for query in (np.array(sorted(set(wanted)), np.uint32), np.array(wanted, np.uint32)):
        begin, end = lists.lookup(query)
        found_begin, found_end = with_directory.lookup(query)
        assert np.array_equal(end - begin, found_end - found_begin)
        held = end > begin
        assert np.array_equal(begin[held], found_begin[held])


def test_a_segment_gets_a_directory_of_words_when_dense_and_of_blocks_when_sparse(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(40)
    sparse = PostingLists.build(
        [1, 2], [0, 0], [np.array([3, 9000], np.uint32), np.array([5], np.uint32)],
        [np.zeros(2, np.uint32), np.zeros(1, np.uint32)],
    )
    dense = dense_lists(rng, words=2000, docs=50)
    for name, lists in (("sparse", sparse), ("dense", dense)):
        (tmp_path / name).mkdir()
        save_lists(lists, tmp_path / name)

    mapped_sparse = Segment("sparse", load_lists(tmp_path / "sparse")).lists
    mapped_dense = Segment("dense", load_lists(tmp_path / "dense")).lists
    open_set = Segment(None, sparse).lists

    assert (mapped_sparse.directory, mapped_dense.blocks) == (None, None)
    assert mapped_sparse.blocks is not None
    assert open_set.blocks is not None
    assert mapped_dense.directory is not None
    for plain, indexed in ((dense, mapped_dense), (sparse, mapped_sparse), (sparse, open_set)):
        query = np.arange(0, 9100, 7, dtype=np.uint32)
        begin, end = plain.lookup(query)
        found_begin, found_end = indexed.lookup(query)
        assert np.array_equal(end - begin, found_end - found_begin)
        assert np.array_equal(begin[end > begin], found_begin[end > begin])


def test_votes_on_one_thread_after_another_leave_no_scores_behind(
    vocabulary: Vocabulary,
) -> None:
    # The kernel's score buffers are kept per thread between votes.
    large = lists_of(random_images(vocabulary, seed=41, count=50))
    small = lists_of(random_images(vocabulary, seed=42, count=10))
    query, _ = query_words(vocabulary, unit_rows(np.random.default_rng(43), 60))

    first = voted(large, query, max_hamming=32, scope=0)
    voted(small, query, max_hamming=32, scope=0)
    again = voted(large, query, max_hamming=32, scope=0)

    assert first
    assert again == first
