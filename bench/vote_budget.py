"""Would a budget of postings per vote keep the candidates? The vote of the query as sent,
with its rarest words only, shortest lists first, until a budget of postings: the quick
look's vote (``EngineSettings.quick_vote``).

    .venv/bin/python -m bench.vote_budget --index bench/out/e2e-100k/index-100000 \
        --queries bench/out/e2e-100k/queries --descriptors 300 \
        --budgets 0,50000,20000,5000,2000

The index is a distractor index of ``bench.scale --end-to-end --keep`` and the queries are
its edited photos (``<kind>/<NNNN>_<photo>.jpg``; the original is the collection photo of
the same name). For each budget (0: none) and each query, the vote of the query as sent
by its ``--descriptors`` strongest descriptors (``VoteParams.posting_budget``), and:

* whether the original is among the first 2, 8 and 32 images by votes (the quick look
  verifies the first two);
* the postings the vote scanned, and how long it took;
* which share of the voting words have postings in the distractors' segments (those whose
  images all come after the collection's): on distractors drawn from an unspread pool a
  word they lack is free, and a budget that keeps only such words says nothing about a
  real collection (``bench.scale``'s ``--spread``).

The vote is the engine's own, ``SegmentSet.vote``.
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
from indexer.search import CATALOG_FILE
from indexer.segments import SegmentSet, SegmentStore, VoteParams
from indexer.settings import EngineSettings

FIRST_BATCH = 8
DEPTH = 32


def ranked(segment_set: SegmentSet, features: LocalFeatures, params: VoteParams,
           last_original: int) -> tuple[list[int], int, float, float]:
    """The images by votes (best first), the postings scanned, the seconds the vote took,
    and the share of the voting words that have postings in the distractors' segments
    (those above ``last_original``)."""
    clock = time.perf_counter()
    votes = segment_set.vote([features], scope=GLOBAL_SCOPE, count=DEPTH, params=params)
    seconds = time.perf_counter() - clock
    query = segment_set.weighted_query(features, params)
    voting = query.words.weights > 0
    frequency = query.frequency
    outside = np.zeros(len(frequency), np.int64)
    for segment, (begin, end) in zip(query.segments, query.ranges, strict=True):
        if len(segment.lists) and int(segment.lists.ids[0]) > last_original:
            outside += end - begin
    shared = float((outside[voting] > 0).mean()) if voting.any() else 0.0
    return [image_id for image_id, _ in votes], int(frequency[voting].sum()), seconds, shared


def originals(index: Path) -> dict[str, int]:
    """Catalog id of each photo, by its name without the collection's row prefix."""
    with sqlite3.connect(f"file:{index / CATALOG_FILE}?mode=ro", uri=True) as database:
        rows = database.execute("SELECT id, path FROM images WHERE path NOT LIKE 'distractors/%'")
        return {Path(path).stem.split("_", 1)[-1]: int(image_id) for image_id, path in rows}


def run(index: Path, queries: Sequence[Path], budgets: Sequence[int],
        descriptors: int) -> dict[str, Any]:
    settings = EngineSettings()
    segment_set = SegmentStore(index / POSTINGS_DIR).load()
    assert segment_set is not None, f"{index} has no inverted file"
    wanted = originals(index)
    features = {path: analyze_path(path, settings, for_query=True).features for path in queries}
    last_original = max(wanted.values())
    first = next(iter(features.values()))
    ranked(segment_set, first, settings.vote, last_original)  # compile
    results = []
    for budget in budgets:
        params = replace(settings.vote, posting_budget=budget, voting_descriptors=descriptors)
        ranks, scanned, seconds, shared = [], [], [], []
        for path, query_features in features.items():
            order, postings, took, share = ranked(segment_set, query_features, params,
                                                  last_original)
            target = wanted.get(path.stem.split("_", 1)[-1])
            ranks.append(order.index(target) if target in order else DEPTH)
            scanned.append(postings)
            seconds.append(took)
            shared.append(share)
        rank_array = np.asarray(ranks)
        results.append({
            "budget": budget,
            "first_2": float((rank_array < 2).mean()),
            "first_8": float((rank_array < FIRST_BATCH).mean()),
            "first_32": float((rank_array < DEPTH).mean()),
            "postings_p50": float(np.median(scanned)),
            "vote_ms_p50": 1000 * median(seconds),
            "voting_words_with_distractor_postings": float(np.mean(shared)),
        })
        print(results[-1], flush=True)
    return {"benchmark": "vote-budget", "index": str(index), "queries": len(features),
            "descriptors": descriptors, "results": results, "machine": machine_info()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--budgets", default="0,300000,75000,30000,7500")
    parser.add_argument("--descriptors", type=int, default=EngineSettings().vote.voting_descriptors,
                        help="the query's strongest descriptors that vote (the quick look: 300)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/vote-budget.json"))
    arguments = parser.parse_args(argv)
    queries = sorted(arguments.queries.glob("*/*.jpg"))
    budgets = [int(value) for value in arguments.budgets.split(",")]
    write_json(arguments.out, run(arguments.index, queries, budgets, arguments.descriptors))


if __name__ == "__main__":
    main()
