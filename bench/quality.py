"""Retrieval quality of the engine and of two baselines, on edited copies of real photos.

    .venv/bin/python -m bench.quality --photos ../shared/photos --out bench/out/quality.json

The photos are split (seeded) into a collection and held-out unrelated photos. A seeded
sample of the collection is edited in every kind of ``testsupport.edits.EDIT_KINDS``; each edited
copy is a query searched against the whole collection, and a query is a hit at k when its
original is among the first k results. Composite edits (a collage, a page) fill the rest of
their picture with photos from outside the collection. Every method runs on the same split
and queries in the same run. The JSON file gets everything; a Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.baselines import BASELINES, TUTORIAL_DEVIATIONS, extract_all, target_ranks
from bench.common import (
    DEFAULT_OUT_DIR,
    Split,
    default_workers,
    derive_seed,
    list_photos,
    load_rgb,
    machine_info,
    markdown_table,
    median,
    percent,
    seeded_sample,
    split_photos,
    timed,
    write_json,
)
from testsupport.edits import EDITS_BY_NAME, EditKind, encode_jpeg

METHODS = ("tutorial", "phash", "engine-global", "engine")
# engine-global: the engine with its former candidate stage, the global vector alone (no
# inverted-file votes), on the same index: the old stage and the new one in one run.
ENGINE_METHODS = ("engine-global", "engine")
METHOD_LABELS = {
    "tutorial": "Tutorial",
    "phash": "pHash",
    "engine-global": "Engine (global vector only)",
    "engine": "Engine",
}
TOP_K = 5


@dataclass(frozen=True)
class Config:
    photos: Path
    out: Path
    collection_size: int
    unrelated_size: int
    queries_per_kind: int
    kinds: tuple[EditKind, ...]
    methods: tuple[str, ...]
    seed: int
    workers: int
    work_size: int
    fresh_index: bool

    @property
    def out_dir(self) -> Path:
        return self.out.parent

    def as_json(self) -> dict[str, Any]:
        return {
            "photos": _display(self.photos),
            "collection_size": self.collection_size,
            "unrelated_size": self.unrelated_size,
            "queries_per_kind": self.queries_per_kind,
            "kinds": [kind.name for kind in self.kinds],
            "methods": list(self.methods),
            "seed": self.seed,
            "workers": self.workers,
            "work_size": self.work_size,
            "top_k": TOP_K,
        }


@dataclass(frozen=True)
class Query:
    kind: str  # an edit kind's name
    target: int  # the row of the edited photo in the collection
    path: Path


@dataclass(frozen=True)
class QueryOutcome:
    query: Query
    rank: int | None  # 0-based rank of the target; None when it is not in the results
    failure: str | None = None  # why the method could not search with this query
    verified_top1: bool = False  # engine only: the top result is the target and verified


def _display(path: Path) -> str:
    """A path for the report: relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return os.path.relpath(path)


# --- Queries ------------------------------------------------------------------------------


def filler_pool(photos: Sequence[Path], split: Split) -> list[Path]:
    """The photos a composite edit may show beside its target: every photo outside the
    collection, which with the default split are the unrelated photos. That is fair: none of
    them is in the collection, so the target stays the only right answer and the others only
    distract, as the other photos of a real collage do."""
    collection = set(split.collection)
    return [photo for photo in photos if photo not in collection]


def write_queries(config: Config, split: Split, targets: Sequence[int],
                  fillers: Sequence[Path]) -> list[Query]:
    """Edits every target in every kind and writes the results as JPEG files; composites get
    a seeded choice of ``fillers`` for the rest of their picture."""
    if not fillers and any(kind.fillers_wanted for kind in config.kinds):
        raise ValueError("composite edits need photos outside the collection; "
                         "ask for some with --unrelated")
    queries_dir = config.out_dir / "queries"
    for kind in config.kinds:
        kind_dir = queries_dir / kind.name
        kind_dir.mkdir(parents=True, exist_ok=True)
        for stale in kind_dir.glob("*.jpg"):  # from a run with another sample
            stale.unlink()
    queries: list[Query] = []
    for target in tqdm(targets, desc="editing queries", unit="photo"):
        source = split.collection[target]
        original = load_rgb(source)
        for kind in config.kinds:
            chosen = seeded_sample(fillers, kind.fillers_wanted,
                                   derive_seed(config.seed, "fillers", kind.name, source.name))
            edited = kind.edit(original, derive_seed(config.seed, kind.name, source.name),
                               [load_rgb(path) for path in chosen])
            path = queries_dir / kind.name / f"{target:04d}_{source.stem}.jpg"
            path.write_bytes(encode_jpeg(edited, kind.jpeg_quality))
            queries.append(Query(kind.name, target, path))
    return queries


# --- Scoring ------------------------------------------------------------------------------


def _rates(outcomes: Sequence[QueryOutcome], with_verification: bool) -> dict[str, Any]:
    count = len(outcomes)
    hits_at_1 = sum(1 for o in outcomes if o.rank is not None and o.rank < 1)
    hits_at_5 = sum(1 for o in outcomes if o.rank is not None and o.rank < TOP_K)
    rates: dict[str, Any] = {
        "queries": count,
        "hits_at_1": hits_at_1,
        "hits_at_5": hits_at_5,
        "recall_at_1": hits_at_1 / count,
        "recall_at_5": hits_at_5 / count,
        "failed": sum(1 for o in outcomes if o.failure is not None),
    }
    if with_verification:
        verified = sum(1 for o in outcomes if o.verified_top1)
        rates["verified_top1"] = verified
        # Of the queries whose top result is right, the share the engine also verified.
        rates["verified_rate_of_correct_top1"] = verified / hits_at_1 if hits_at_1 else None
        # Right and verified at once: the answers a user can trust without looking.
        rates["verified_recall_at_1"] = verified / count
    return rates


def summarise(outcomes: Sequence[QueryOutcome], kinds: Sequence[EditKind],
              with_verification: bool = False) -> dict[str, Any]:
    return {
        "overall": _rates(outcomes, with_verification),
        "per_kind": {
            kind.name: _rates([o for o in outcomes if o.query.kind == kind.name],
                              with_verification)
            for kind in kinds
        },
        "failed_queries": [
            {"kind": o.query.kind, "query": _display(o.query.path), "reason": o.failure}
            for o in outcomes
            if o.failure is not None
        ],
        # Queries whose original is not first, so that two runs can be compared query by query.
        "missed_queries": [
            {"kind": o.query.kind, "query": _display(o.query.path), "rank": o.rank}
            for o in outcomes
            if o.failure is None and o.rank != 0
        ],
    }


# --- Baselines ----------------------------------------------------------------------------


def evaluate_baseline(method: str, config: Config, split: Split,
                      queries: Sequence[Query]) -> dict[str, Any]:
    cache_dir = config.out_dir / "cache"
    collection = extract_all(method, split.collection, cache_dir, config.workers,
                             description=f"{method}: collection")
    searched = extract_all(method, [q.path for q in queries], cache_dir, config.workers,
                           description=f"{method}: queries")
    distance_matrix = BASELINES[method].distances(searched.vectors, collection.vectors)
    targets = np.array([q.target for q in queries], dtype=np.int64)
    ranks = target_ranks(distance_matrix, targets, collection.ok)
    outcomes = [
        QueryOutcome(
            query=query,
            rank=int(ranks[row]) if searched.ok[row] and ranks[row] < len(split.collection)
            else None,
            failure=searched.failures.get(row),
        )
        for row, query in enumerate(queries)
    ]
    result = summarise(outcomes, config.kinds)
    result["unusable_collection_photos"] = [
        {"photo": _display(split.collection[row]), "reason": reason}
        for row, reason in sorted(collection.failures.items())
    ]
    return result


# --- Engine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineMatch:
    path: Path
    verified: bool


EngineSearch = Callable[[Path], Awaitable[list[EngineMatch]]]


def engine_unavailable_reason() -> str | None:
    """Why the engine cannot be benchmarked here, or None when its API can be imported."""
    try:
        import indexer  # noqa: F401
    except ImportError as error:
        return f"the engine's library API cannot be imported yet ({error})"
    return None


@asynccontextmanager
async def open_engine(photos_dir: Path, index_dir: Path, workers: int,
                      *, votes: bool = True) -> AsyncIterator[EngineSearch]:
    """Indexes ``photos_dir`` and yields a search function: the only code that knows the
    engine's API, so this is what to change when that API changes. Without ``votes`` the
    inverted file takes no part in the candidates (the engine's former candidate stage)."""
    from indexer import EngineSettings, SearchService, build_index

    await build_index(photos_dir, index_dir, workers=workers, progress=True)
    settings = (EngineSettings() if votes
                else EngineSettings(vote_candidates=0, quick_vote=None))
    service = await SearchService.open(index_dir, settings=settings)

    async def search(query: Path) -> list[EngineMatch]:
        matches = await service.query(query, top=TOP_K)
        return [EngineMatch(Path(match.path), bool(match.verified)) for match in matches]

    try:
        yield search
    finally:
        await service.close()


def link_collection(config: Config, split: Split) -> tuple[Path, Path]:
    """A folder of symbolic links to the collection (the photos are never copied), and the
    index folder beside it; both are named by the collection, so a rerun reuses the index."""
    listing = "\n".join(str(path.resolve()) for path in split.collection)
    key = hashlib.sha256(listing.encode()).hexdigest()[:12]
    base = config.out_dir / "engine" / f"collection-{key}"
    photos_dir, index_dir = base / "photos", base / "index"
    photos_dir.mkdir(parents=True, exist_ok=True)
    for row, path in enumerate(split.collection):
        link = photos_dir / f"{row:04d}_{path.name}"
        if not link.is_symlink():  # a rerun, or one interrupted while linking
            link.symlink_to(path.resolve())
    return photos_dir, index_dir


def bare_kaze_seconds(path: Path, work_size: int, min_side: int = 400) -> float:
    """Seconds of ``KAZE.detectAndCompute`` alone on the image in grey, at the engine's
    working size (longest side at most ``work_size``; smaller photos brought up to
    ``min_side``, as the engine does): what one KAZE extraction of that query costs."""
    import cv2

    grey = cv2.cvtColor(load_rgb(path), cv2.COLOR_RGB2GRAY)
    height, width = grey.shape
    longest = max(height, width)
    target = work_size if longest > work_size else max(longest, min_side)
    scale = target / longest
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(grey, (max(1, round(width * scale)), max(1, round(height * scale))),
                         interpolation=interpolation)
    kaze = cv2.KAZE_create()
    _, seconds = timed(lambda: kaze.detectAndCompute(resized, None))
    return seconds


async def evaluate_engine(config: Config, split: Split, queries: Sequence[Query],
                          *, votes: bool = True) -> dict[str, Any]:
    from indexer import ImageError

    photos_dir, index_dir = link_collection(config, split)
    expected = [path.resolve() for path in split.collection]
    outcomes: list[QueryOutcome] = []
    engine_seconds: list[float] = []
    kaze_seconds: list[float] = []
    false_verified: list[dict[str, Any]] = []
    refused_unrelated: list[dict[str, str]] = []

    async with open_engine(photos_dir, index_dir, config.workers, votes=votes) as search:
        for query in tqdm(queries, desc="engine: queries", unit="query"):
            start = time.perf_counter()
            try:
                matches = await search(query.path)
            except ImageError as error:
                outcomes.append(QueryOutcome(query, None, f"{type(error).__name__}: {error}"))
                continue
            engine_seconds.append(time.perf_counter() - start)
            # Interleaved with the engine's query, so that both see the same machine load.
            kaze_seconds.append(bare_kaze_seconds(query.path, config.work_size))
            found = [match.path.resolve() for match in matches]
            target = expected[query.target]
            rank = found.index(target) if target in found else None
            outcomes.append(QueryOutcome(query, rank,
                                         verified_top1=rank == 0 and matches[0].verified))

        for photo in tqdm(split.unrelated, desc="engine: unrelated", unit="query"):
            try:
                matches = await search(photo)
            except ImageError as error:
                refused_unrelated.append({"query": _display(photo),
                                          "reason": f"{type(error).__name__}: {error}"})
                continue
            verified = [match for match in matches if match.verified]
            if verified:
                false_verified.append({"query": _display(photo),
                                       "verified": [_display(m.path) for m in verified]})

    result = summarise(outcomes, config.kinds, with_verification=True)
    searched_unrelated = len(split.unrelated) - len(refused_unrelated)
    result["unrelated"] = {
        "queries": len(split.unrelated),
        "refused": refused_unrelated,
        "false_verified": len(false_verified),
        # A refused unrelated photo cannot be falsely verified, but it is no evidence either.
        "false_verified_rate": len(false_verified) / searched_unrelated
        if searched_unrelated else None,
        "false_verified_queries": false_verified,
    }
    if engine_seconds:
        engine_median, kaze_median = median(engine_seconds), median(kaze_seconds)
        result["timing"] = {
            "queries_timed": len(engine_seconds),
            "work_size": config.work_size,
            "engine_query_median_s": engine_median,
            "bare_kaze_median_s": kaze_median,
            "ratio_of_medians": engine_median / kaze_median,
            "median_of_ratios": median(e / k for e, k in zip(engine_seconds, kaze_seconds,
                                                             strict=True)),
            "note": "engine: the whole in-process query (decoding included); bare KAZE: "
                    "detectAndCompute alone on the grey image already resized to work_size",
        }
    return result


# --- Report -------------------------------------------------------------------------------


def markdown_report(report: dict[str, Any], kinds: Sequence[EditKind]) -> str:
    config, methods = report["config"], report["methods"]
    ran = [name for name in config["methods"] if methods[name]["status"] == "ok"]
    headers = ["Edit"]
    for name in ran:
        headers += [f"{METHOD_LABELS[name]} R@1", f"{METHOD_LABELS[name]} R@5"]
        if name in ENGINE_METHODS:
            headers.append(f"{METHOD_LABELS[name]} verified@1")

    def cells(kind_name: str | None) -> list[str]:
        """The row of one edit kind, or of all edits together when ``kind_name`` is None."""
        row: list[str] = []
        for name in ran:
            result = methods[name]
            rates = result["overall"] if kind_name is None else result["per_kind"][kind_name]
            row += [percent(rates["recall_at_1"]), percent(rates["recall_at_5"])]
            if name in ENGINE_METHODS:
                row.append(percent(rates["verified_recall_at_1"]))
        return row

    rows = [[kind.label, *cells(kind.name)] for kind in kinds]
    rows.append(["**all edits**", *(f"**{cell}**" for cell in cells(None))])

    machine = report["machine"]
    lines = [
        f"Collection: {config['collection_size']} photos; {config['queries_per_kind']} edited "
        f"queries per edit; {config['unrelated_size']} unrelated photos; seed {config['seed']}.",
        "",
        markdown_table(headers, rows),
        "",
        "R@k: the original is among the first k results. Engine verified@1: the top result "
        "is the original and the engine marked it verified.",
    ]
    if "tutorial" in ran:
        lines.append("Tutorial: the 2018 KAZE + cosine method as published (full resolution, "
                     "32 keypoints); the few deviations are listed in the JSON.")
    for name in config["methods"]:
        if methods[name]["status"] != "ok":
            lines.append(f"{METHOD_LABELS[name]}: not run ({methods[name]['reason']}).")
    for engine_name in (name for name in ran if name in ENGINE_METHODS):
        engine = methods[engine_name]
        label = METHOD_LABELS[engine_name]
        unrelated = engine["unrelated"]
        lines.append(
            f"{label} false verifications on unrelated photos: {unrelated['false_verified']} "
            f"of {unrelated['queries'] - len(unrelated['refused'])} "
            f"({percent(unrelated['false_verified_rate'])})."
        )
        if "timing" in engine:
            timing = engine["timing"]
            lines.append(
                f"{label} query in-process: median {1000 * timing['engine_query_median_s']:.0f} "
                f"ms, {timing['ratio_of_medians']:.2f}x the median bare KAZE extraction "
                f"({1000 * timing['bare_kaze_median_s']:.0f} ms at {timing['work_size']} px) "
                f"of the same {timing['queries_timed']} queries."
            )
    failed = {name: methods[name]["overall"]["failed"] for name in ran
              if methods[name]["overall"]["failed"]}
    if failed:
        listed = ", ".join(f"{METHOD_LABELS[name]} {count}" for name, count in failed.items())
        lines.append(f"Queries a method could not use (counted as misses, listed in the JSON): "
                     f"{listed}.")
    lines.append(
        f"Machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores, "
        f"Python {machine['python']}, OpenCV {machine['opencv']}."
    )
    return "\n".join(lines)


# --- Entry point --------------------------------------------------------------------------


def _names(text: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"),
                        help="folder of photos (searched recursively)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "quality.json",
                        help="JSON result; queries, caches and the index go beside it")
    parser.add_argument("--collection", type=int, default=900, help="photos searched")
    parser.add_argument("--unrelated", type=int, default=100,
                        help="held-out photos, not in the collection")
    parser.add_argument("--queries-per-kind", type=int, default=60,
                        help="collection photos edited in every kind")
    parser.add_argument("--kinds", default=",".join(EDITS_BY_NAME),
                        type=lambda text: _names(text, list(EDITS_BY_NAME), "edit kind"),
                        help="comma-separated edit kinds (default: all)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        type=lambda text: _names(text, METHODS, "method"),
                        help="comma-separated methods (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes for the baselines' extraction, and the engine's build")
    parser.add_argument("--work-size", type=int, default=640,
                        help="longer side of the image for the bare KAZE timing reference")
    parser.add_argument("--fresh-index", action="store_true",
                        help="delete the engine's index of this collection before building")
    # argparse runs ``type`` on string defaults too, so both are always tuples of known names.
    args = parser.parse_args(argv)
    if args.queries_per_kind < 1 or args.workers < 1 or args.work_size < 16:
        parser.error("--queries-per-kind and --workers must be positive, --work-size >= 16")
    return Config(
        photos=args.photos, out=args.out, collection_size=args.collection,
        unrelated_size=args.unrelated, queries_per_kind=args.queries_per_kind,
        kinds=tuple(EDITS_BY_NAME[name] for name in args.kinds), methods=args.methods,
        seed=args.seed, workers=args.workers, work_size=args.work_size,
        fresh_index=args.fresh_index,
    )


def run(config: Config) -> dict[str, Any]:
    engine_blocker = (
        engine_unavailable_reason() if set(ENGINE_METHODS) & set(config.methods) else None
    )
    if engine_blocker:
        print(f"engine skipped: {engine_blocker}", flush=True)

    photos = list_photos(config.photos)
    split = split_photos(photos, config.collection_size, config.unrelated_size,
                         derive_seed(config.seed, "split"))
    targets = seeded_sample(range(len(split.collection)), config.queries_per_kind,
                            derive_seed(config.seed, "queries"))
    queries = write_queries(config, split, targets, filler_pool(photos, split))

    if config.fresh_index:
        # Once per run: both engine methods then search the same index.
        shutil.rmtree(link_collection(config, split)[1], ignore_errors=True)
    methods: dict[str, Any] = {}
    for method in config.methods:
        if method in ENGINE_METHODS and engine_blocker:
            methods[method] = {"status": "skipped", "reason": engine_blocker}
            continue
        start = time.perf_counter()
        if method in ENGINE_METHODS:
            result = asyncio.run(evaluate_engine(config, split, queries,
                                                 votes=method == "engine"))
        else:
            result = evaluate_baseline(method, config, split, queries)
        methods[method] = {"status": "ok", **result,
                           "wall_seconds": time.perf_counter() - start}
    if "tutorial" in methods:
        methods["tutorial"]["deviations_from_the_tutorial"] = list(TUTORIAL_DEVIATIONS)
    return {
        "benchmark": "quality",
        "config": config.as_json(),
        "machine": machine_info(),
        "edit_kinds": {kind.name: kind.label for kind in config.kinds},
        "queries_dir": _display(config.out_dir / "queries"),
        "methods": methods,
    }


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    report = run(config)
    write_json(config.out, report)
    print(markdown_report(report, config.kinds))
    for name, result in report["methods"].items():
        for failed in result.get("failed_queries", []):
            print(f"{METHOD_LABELS[name]} could not use {failed['query']}: {failed['reason']}")
    print(f"\nfull results: {_display(config.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
