"""Would a budget of postings per vote keep the candidates? The first look's vote, with the
query's rarest words only, shortest lists first, until a budget of postings.

    .venv/bin/python -m bench.vote_budget --index bench/out/e2e-100k/index-100000 \
        --queries bench/out/e2e-100k/queries --budgets 0,300000,75000,30000,7500

The index is a distractor index of ``bench.scale --end-to-end --keep`` and the queries are
its edited photos (``<kind>/<NNNN>_<photo>.jpg``; the original is the collection photo of
the same name). For each budget (0: none) and each query, the vote of the query as sent
(as the engine's first look votes), and:

* whether the original is among the first 8 and 32 images by votes;
* the postings the vote scanned, and how long it took;
* which share of the words kept by the budget have postings in the distractors' segments
  (those whose images all come after the collection's): the distractors'
  descriptors sit on fewer words than a real collection's, so a word they lack is free,
  and a budget that keeps only such words says nothing about a real collection.

The vote is the engine's (``SegmentSet.weighted_query``'s words and weights, then
``postings.vote`` per segment); only the budget is added here, on top of the stop list.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine_info, median, write_json
from indexer.analysis import analyze_path
from indexer.catalog import GLOBAL_SCOPE
from indexer.features import LocalFeatures
from indexer.inverted_file import POSTINGS_DIR
from indexer.postings import vote
from indexer.search import CATALOG_FILE
from indexer.segments import SegmentSet, SegmentStore, within_budget
from indexer.settings import EngineSettings

FIRST_BATCH = 8
DEPTH = 32


def ranked(segment_set: SegmentSet, features: LocalFeatures, budget: int,
           settings: EngineSettings, last_original: int) -> tuple[list[int], int, float]:
    """The images by votes (best first), the postings scanned, and the share of the kept
    words that have postings in the distractors' segments (those above ``last_original``)."""
    params = settings.vote
    query = segment_set.weighted_query(features, params)
    frequency = sum((end - begin for begin, end in query.ranges),
                    np.zeros(len(query.words.words), np.int64))
    kept = within_budget(frequency, query.words.weights > 0, budget)
    words = replace(query.words, weights=np.where(kept, query.words.weights, 0).astype(np.float32))
    best: dict[int, float] = {}
    for segment, (begin, end) in zip(query.segments, query.ranges, strict=True):
        votes = vote(segment.lists, begin, end, words, max_hamming=params.max_hamming,
                     hamming_weights=params.hamming_weights, scope=GLOBAL_SCOPE,
                     deleted=segment.deleted)
        ids = np.asarray(segment.lists.ids)[votes.docs]
        for image_id, score in zip(ids.tolist(), votes.scores.tolist(), strict=True):
            best[image_id] = max(score, best.get(image_id, 0.0))
    outside = np.zeros(len(frequency), np.int64)
    for segment, (begin, end) in zip(query.segments, query.ranges, strict=True):
        if len(segment.lists) and int(segment.lists.ids[0]) > last_original:
            outside += end - begin
    shared = float((outside[kept] > 0).mean()) if kept.any() else 0.0
    order = sorted(best, key=lambda image_id: best[image_id], reverse=True)[:DEPTH]
    return order, int(frequency[kept].sum()), shared


def originals(index: Path) -> dict[str, int]:
    """Catalog id of each photo, by its name without the collection's row prefix."""
    with sqlite3.connect(f"file:{index / CATALOG_FILE}?mode=ro", uri=True) as database:
        rows = database.execute("SELECT id, path FROM images WHERE path NOT LIKE 'distractors/%'")
        return {Path(path).stem.split("_", 1)[-1]: int(image_id) for image_id, path in rows}


def run(index: Path, queries: Sequence[Path], budgets: Sequence[int]) -> dict[str, Any]:
    settings = EngineSettings()
    segment_set = SegmentStore(index / POSTINGS_DIR).load()
    assert segment_set is not None, f"{index} has no inverted file"
    wanted = originals(index)
    features = {path: analyze_path(path, settings, for_query=True).features for path in queries}
    last_original = max(wanted.values())
    ranked(segment_set, next(iter(features.values())), 0, settings, last_original)  # compile
    results = []
    for budget in budgets:
        ranks, scanned, seconds, shared = [], [], [], []
        for path, query_features in features.items():
            clock = time.perf_counter()
            order, postings, share = ranked(segment_set, query_features, budget, settings,
                                            last_original)
            seconds.append(time.perf_counter() - clock)
            target = wanted.get(path.stem.split("_", 1)[-1])
            ranks.append(order.index(target) if target in order else DEPTH)
            scanned.append(postings)
            shared.append(share)
        rank_array = np.asarray(ranks)
        results.append({
            "budget": budget,
            "first_8": float((rank_array < FIRST_BATCH).mean()),
            "first_32": float((rank_array < DEPTH).mean()),
            "postings_p50": float(np.median(scanned)),
            "vote_ms_p50": 1000 * median(seconds),
            "kept_words_with_distractor_postings": float(np.mean(shared)),
        })
        print(results[-1], flush=True)
    return {"benchmark": "vote-budget", "index": str(index), "queries": len(features),
            "results": results, "machine": machine_info()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--budgets", default="0,300000,75000,30000,7500")
    parser.add_argument("--out", type=Path, default=Path("bench/out/vote-budget.json"))
    arguments = parser.parse_args(argv)
    queries = sorted(arguments.queries.glob("*/*.jpg"))
    budgets = [int(value) for value in arguments.budgets.split(",")]
    write_json(arguments.out, run(arguments.index, queries, budgets))


if __name__ == "__main__":
    main()
