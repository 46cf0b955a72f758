"""How the candidate stage and the catalog grow from 10k to 1M images.

    .venv/bin/python -m bench.scale --photos ../shared/photos

With ``--end-to-end --distractors N``: the engine's whole query, old and new candidate stage,
among N hard distractors instead (:mod:`bench.scale_end_to_end`; its own options follow).

Global vectors at 10k..1M are synthetic but shaped by real ones. An index is built on the
real photos (or ``--index`` names one); its PCA-whitened vectors are the anchors. A
synthetic photo is a "scene" around a real anchor plus its own variation, both drawn as
Gaussian noise with the covariance of the real vectors:

    scene  = normalize(anchor + s1 * noise),  s1 ~ U(1.2, 2.5): cos(scene, anchor) ~ 0.4-0.6
    vector = normalize(scene + s2 * noise),   s2 ~ U(0.3, 1.0): cos(vector, scene) ~ 0.7-0.96

with about four vectors per scene. "Edited" queries are database vectors moved as far as
real edited copies move from their originals (measured here on crops and rotations of the
real photos); "unrelated" queries are new vectors from new scenes. Sizes are prefixes of one
generated set, so 10k is a subset of 100k, which is a subset of 1M.

For each size and tree count: Annoy generation build time and disk, load time (sha256 check
apart, cold and warm page cache), resident memory, and for each ``search_k`` the query
latency and recall@10 against exact search, plus the fresh exact buffer at the largest size
the engine lets it reach. With ``--graph-efs`` (and faiss installed), an HNSW graph is
measured on the same vectors and queries beside Annoy. Then a catalog of ``--catalog-rows``
rows with real local features: insert rate, lookups, file size, disk per image, and the
service's start-up on it.

Memory: vectors are kept as float16 (512 MB at 1M) and converted in chunks. Disk: the 1M
catalog takes ~37 GB; everything under ``--work`` is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil
from tqdm import tqdm

from bench.common import (
    DEFAULT_OUT_DIR,
    derive_seed,
    list_photos,
    load_rgb,
    machine_info,
    markdown_table,
    median,
    write_json,
)
from indexer.analysis import analyze_bytes
from indexer.ann import ANNOY_FILE, ExactVectors, Generation, GenerationStore
from indexer.build import COMMIT_EVERY, build_index
from indexer.catalog import GLOBAL_SCOPE, Catalog, NewImage
from indexer.encoding import Codebook
from indexer.errors import IndexerError
from indexer.features import LocalFeatures, limit_threads
from indexer.search import CATALOG_FILE, GENERATIONS_DIR
from indexer.settings import EngineSettings
from testsupport.edits import EDITS_BY_NAME, encode_jpeg
from testsupport.engine import opened_service

FloatArray = npt.NDArray[np.float32]
HalfArray = npt.NDArray[np.float16]

RECALL_AT = 10
FIRST_BATCH = EngineSettings().first_batch  # candidates the engine verifies first
CHUNK = 65_536
VECTORS_PER_SCENE = 4
SCENE_SPREAD = (1.2, 2.5)
SHOT_SPREAD = (0.3, 1.0)
CALIBRATION_EDITS = ("crop", "rotate")
RECALL_TARGET = 0.95
# The HNSW graph measured beside Annoy: links per node, and the search effort while building.
GRAPH_LINKS = 32
GRAPH_BUILD_EFFORT = 80
LOOKUPS = 200
GET_MANY_IDS = 30
FEATURES_IDS = 8


@dataclass(frozen=True)
class Config:
    photos: Path
    index: Path | None
    out: Path
    work: Path
    sizes: tuple[int, ...]
    trees: tuple[int, ...]
    largest_trees: tuple[int, ...]
    search_ks: tuple[int, ...]
    queries: int
    calibration_photos: int
    catalog_rows: int
    seed: int
    keep: bool
    graph_efs: tuple[int, ...]


# -- real vectors --------------------------------------------------------------------------


@dataclass
class RealData:
    codebook: Codebook
    vectors: FloatArray  # (n, d) unit rows, as stored in the catalog
    features: list[LocalFeatures]  # the photos' stored local features (for the catalog test)
    sizes: list[tuple[int, int, int]]  # (file size, width, height) of each photo
    edited_similarity: list[float]  # cos(edited copy, its original), best orientation
    seconds: float


async def real_data(config: Config) -> RealData:
    started = time.perf_counter()
    index_dir = config.index
    if index_dir is None:
        index_dir = config.work / "real-index"
        report = await build_index(config.photos, index_dir, workers=os.cpu_count(),
                                   progress=True)
        print(f"real index: {report.images} images in {report.seconds:.0f} s", flush=True)
    async with opened_service(index_dir) as service:
        codebook = current_codebook(index_dir)
        if codebook.projection is None:
            raise SystemExit("the real index needs 512+ images for a PCA-whitened codebook")
        ids: list[int] = []
        rows: list[FloatArray] = []
        async for chunk_ids, _, chunk_vectors in service.catalog.iter_vectors(codebook.id):
            ids.extend(int(i) for i in chunk_ids)
            rows.append(chunk_vectors)
        vectors = np.concatenate(rows)
        features = await service.catalog.features(ids)
        records = await service.catalog.get_many(ids)
        position = {image_id: n for n, image_id in enumerate(ids)}
        rng = np.random.default_rng(derive_seed(config.seed, "calibration"))
        chosen = rng.choice(ids, size=min(config.calibration_photos, len(ids)), replace=False)
        similarities = []
        for image_id in tqdm(chosen.tolist(), desc="calibration", unit="photo"):
            original = service.resolve_path(records[image_id])
            for kind_name in CALIBRATION_EDITS:
                kind = EDITS_BY_NAME[kind_name]
                seed = derive_seed(config.seed, kind_name, image_id)
                edited = kind.apply(load_rgb(original), seed)
                try:
                    analysis = analyze_bytes(encode_jpeg(edited, kind.jpeg_quality),
                                             service.settings, for_query=True)
                except IndexerError:
                    continue
                both = np.stack([codebook.encode(f.descriptors)
                                 for f in (analysis.features, analysis.features.mirrored())])
                similarities.append(float(np.max(both @ vectors[position[image_id]])))
    return RealData(
        codebook=codebook,
        vectors=vectors,
        features=[features[i] for i in ids],
        sizes=[(records[i].file_size, records[i].width, records[i].height) for i in ids],
        edited_similarity=similarities,
        seconds=time.perf_counter() - started,
    )


# -- synthetic vectors ---------------------------------------------------------------------


def normalized(rows: FloatArray) -> FloatArray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


class SyntheticVectors:
    """Clustered vectors shaped by real ones (see the module docstring)."""

    def __init__(self, real: FloatArray, seed: int) -> None:
        self.real = real.astype(np.float32)
        self.seed = seed
        centred = self.real - self.real.mean(axis=0)
        covariance = centred.T @ centred / max(len(centred) - 1, 1)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        eigenvalues = np.clip(eigenvalues, 0.0, None)
        # Scaled so that a noise vector has unit length on average, like the vectors.
        self._shape = (eigenvectors * np.sqrt(eigenvalues / eigenvalues.sum())).astype(np.float32)

    @property
    def dimensions(self) -> int:
        return int(self.real.shape[1])

    def noise(self, rng: np.random.Generator, count: int) -> FloatArray:
        draws = rng.standard_normal((count, self.dimensions), dtype=np.float32)
        return draws @ self._shape.T

    def chunk(self, label: str, number: int, size: int) -> FloatArray:
        """``size`` vectors; the same (label, number) always gives the same ones."""
        rng = np.random.default_rng(derive_seed(self.seed, label, number))
        scenes = max(1, size // VECTORS_PER_SCENE)
        anchors = self.real[rng.integers(len(self.real), size=scenes)]
        spread = rng.uniform(*SCENE_SPREAD, size=(scenes, 1)).astype(np.float32)
        centres = normalized(anchors + spread * self.noise(rng, scenes))
        # Sorted, so that a scene's vectors sit together and every prefix of the set (the
        # smaller sizes) holds whole scenes, as dense as the full set.
        members = np.sort(rng.integers(scenes, size=size))
        shot = rng.uniform(*SHOT_SPREAD, size=(size, 1)).astype(np.float32)
        return normalized(centres[members] + shot * self.noise(rng, size))

    def database(self, size: int) -> HalfArray:
        """The first ``size`` database vectors, float16 (as the catalog stores them)."""
        out = np.empty((size, self.dimensions), dtype=np.float16)
        for number, start in enumerate(range(0, size, CHUNK)):
            end = min(size, start + CHUNK)
            out[start:end] = self.chunk("database", number, CHUNK)[: end - start]
        return out

    def edited_queries(self, database: HalfArray, count: int, similarities: Sequence[float],
                       label: str) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """Queries that lie as far from a database vector as real edited copies do."""
        rng = np.random.default_rng(derive_seed(self.seed, "edited", label))
        sources = rng.integers(len(database), size=count)
        target = np.clip(rng.choice(np.asarray(similarities), size=count), 0.2, 0.99)
        # For noise orthogonal to the source, cos = 1 / sqrt(1 + s^2).
        spread = np.sqrt(1.0 / target**2 - 1.0).astype(np.float32)[:, None]
        base = database[sources].astype(np.float32)
        return normalized(base + spread * self.noise(rng, count)), sources.astype(np.int64)


def exact_top(database: HalfArray, queries: FloatArray, k: int) -> npt.NDArray[np.int64]:
    """Exact top-``k`` rows by cosine, in chunks (the database never goes to float32 whole)."""
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    for start in range(0, len(database), CHUNK):
        chunk = normalized(database[start : start + CHUNK].astype(np.float32))
        scores = queries @ chunk.T
        take = min(k, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_ids = np.concatenate([best_ids, top + start], axis=1)
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        keep = np.argsort(-best_scores, axis=1)[:, :k]
        best_ids = np.take_along_axis(best_ids, keep, 1)
        best_scores = np.take_along_axis(best_scores, keep, 1)
    return best_ids


def nearest_neighbour_similarity(database: HalfArray, sample: int, seed: int) -> dict[str, float]:
    """How close each vector's nearest other vector is: the density the ANN must resolve."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(database), size=min(sample, len(database)), replace=False)
    queries = normalized(database[rows].astype(np.float32))
    top = exact_top(database, queries, 2)
    best = []
    for row, (first, second) in zip(rows.tolist(), top.tolist(), strict=True):
        other = second if first == row else first
        best.append(float(queries[len(best)] @ normalized(
            database[other : other + 1].astype(np.float32))[0]))
    values = np.asarray(best)
    return {"p10": float(np.percentile(values, 10)), "p50": float(np.median(values)),
            "p90": float(np.percentile(values, 90))}


# -- Annoy generations -----------------------------------------------------------------------


def rows_of(database: HalfArray) -> Iterator[FloatArray]:
    for start in range(0, len(database), CHUNK):
        yield from database[start : start + CHUNK].astype(np.float32)


def directory_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def evict(paths: Sequence[Path]) -> None:
    """Drop these (clean, fsynced) files from the page cache, as after a reboot.

    Only our own files: the rest of the machine's cache is left alone.
    """
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def sha256_seconds(path: Path) -> float:
    started = time.perf_counter()
    with path.open("rb") as handle:
        hashlib.file_digest(handle, "sha256")
    return time.perf_counter() - started


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def measure_load(root: Path) -> dict[str, float]:
    """Seconds to open the current generation, with and without its sha256 check."""
    store = GenerationStore(root)
    files = [p for p in (root / (store.current_name() or "")).iterdir() if p.is_file()]
    annoy_file = next(p for p in files if p.name == ANNOY_FILE)
    result: dict[str, float] = {}
    for label, verify in (("unverified", False), ("verified", True)):
        for state in ("cold", "warm"):
            if state == "cold":
                evict(files)
            started = time.perf_counter()
            generation = store.load_current(verify_checksums=verify)
            assert generation is not None
            generation.check_annoy_file()  # the service checks it in the background
            result[f"{state}_{label}"] = time.perf_counter() - started
            generation.unload()
    evict([annoy_file])
    result["cold_sha256_annoy"] = sha256_seconds(annoy_file)
    result["warm_sha256_annoy"] = sha256_seconds(annoy_file)
    return result


@dataclass
class SearchKResult:
    search_k: int
    p50: float
    p95: float
    recall_edited: float
    recall_unrelated: float
    source_in_first_batch: float  # edited queries whose source is among the first 8


@dataclass(frozen=True)
class QuerySet:
    """The queries of one size, with their exact top-10 rows."""

    edited: FloatArray
    sources: npt.NDArray[np.int64]  # the database row each edited query was made from
    unrelated: FloatArray
    truth_edited: npt.NDArray[np.int64]
    truth_unrelated: npt.NDArray[np.int64]


def measure_search(search: Callable[[FloatArray, int], npt.NDArray[np.int64]],
                   efforts: Sequence[int], queries: QuerySet, label: str) -> list[SearchKResult]:
    """Latency and recall@10 of ``search(query, effort)``, which returns database rows.

    ``effort`` is what buys recall with time: Annoy's search_k, or an HNSW graph's efSearch.
    """
    edited, sources = queries.edited, queries.sources
    results = []
    for effort in efforts:
        seconds: list[float] = []
        recalls: dict[str, list[float]] = {"edited": [], "unrelated": []}
        in_batch = 0
        for kind, vectors, truth in (("edited", edited, queries.truth_edited),
                                     ("unrelated", queries.unrelated, queries.truth_unrelated)):
            for row, query in enumerate(vectors):
                started = time.perf_counter()
                positions = search(query, effort)
                seconds.append(time.perf_counter() - started)
                recalls[kind].append(len(set(positions.tolist()) & set(truth[row].tolist()))
                                     / RECALL_AT)
                if kind == "edited":
                    in_batch += int(sources[row] in positions[:FIRST_BATCH])
        results.append(SearchKResult(
            search_k=effort,
            p50=float(np.percentile(seconds, 50)),
            p95=float(np.percentile(seconds, 95)),
            recall_edited=float(np.mean(recalls["edited"])),
            recall_unrelated=float(np.mean(recalls["unrelated"])),
            source_in_first_batch=in_batch / len(edited),
        ))
        print(f"  {label} {effort}: p50 {results[-1].p50 * 1000:.2f} ms, recall@10 edited "
              f"{results[-1].recall_edited:.3f} unrelated {results[-1].recall_unrelated:.3f}",
              flush=True)
    return results


def annoy_rows(generation: Generation) -> Callable[[FloatArray, int], npt.NDArray[np.int64]]:
    """Annoy's search, answering in database rows (the generation's image ids are rows + 1)."""

    def search(query: FloatArray, search_k: int) -> npt.NDArray[np.int64]:
        return generation.search(query, RECALL_AT, search_k).ids - 1

    return search


def measure_graph_index(prefix: HalfArray, efs: Sequence[int], queries: QuerySet
                        ) -> dict[str, Any]:
    """The alternative proposed for large collections, on the same vectors and queries: an
    HNSW graph (faiss ``IndexHNSWFlat``, inner product on unit rows), built on every core and
    searched on one, as the engine searches Annoy.

    faiss is not a dependency of the engine: ``pip install faiss-cpu`` to run this part.
    """
    try:
        import faiss
    except ImportError as error:
        raise SystemExit("--graph-efs needs faiss: .venv/bin/pip install faiss-cpu") from error
    index = faiss.IndexHNSWFlat(prefix.shape[1], GRAPH_LINKS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = GRAPH_BUILD_EFFORT
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    before = rss()
    started = time.perf_counter()
    for start in range(0, len(prefix), CHUNK):
        index.add(normalized(prefix[start : start + CHUNK].astype(np.float32)))
    build_seconds = time.perf_counter() - started
    built = rss()
    faiss.omp_set_num_threads(1)

    def search(query: FloatArray, ef: int) -> npt.NDArray[np.int64]:
        index.hnsw.efSearch = ef
        _, rows = index.search(query[None].astype(np.float32), RECALL_AT)
        return np.asarray(rows[0], dtype=np.int64)

    searches = measure_search(search, efs, queries, "efSearch")
    return {
        "links": GRAPH_LINKS,
        "build_effort": GRAPH_BUILD_EFFORT,
        "build_seconds": build_seconds,
        "rss_after_build": built - before,
        "search": [asdict(s) for s in searches],
    }


def measure_fresh(database: HalfArray, size: int, queries: FloatArray) -> dict[str, float]:
    """The exact buffer at ``size`` vectors: steady search, and the first search after an add."""
    fresh = ExactVectors(database.shape[1])
    for position, row in enumerate(rows_of(database[:size])):
        fresh.add(position + 1, GLOBAL_SCOPE, row)
    fresh.search(queries[0], FIRST_BATCH)  # stacks the matrix once
    steady = []
    for query in queries:
        started = time.perf_counter()
        fresh.search(query, FIRST_BATCH)
        steady.append(time.perf_counter() - started)
    after_add = []
    for number, query in enumerate(queries[:10]):
        fresh.add(size + number + 1, GLOBAL_SCOPE, query)
        started = time.perf_counter()
        fresh.search(query, FIRST_BATCH)
        after_add.append(time.perf_counter() - started)
    return {"size": size, "p50": median(steady), "p95": float(np.percentile(steady, 95)),
            "after_add_p50": median(after_add)}


async def measure_size(config: Config, real: RealData, synthetic: SyntheticVectors, *,
                       database: HalfArray, size: int, unrelated: FloatArray) -> dict[str, Any]:
    prefix = database[:size]
    edited, sources = synthetic.edited_queries(prefix, config.queries, real.edited_similarity,
                                               str(size))
    started = time.perf_counter()
    queries = QuerySet(edited, sources, unrelated, exact_top(prefix, edited, RECALL_AT),
                       exact_top(prefix, unrelated, RECALL_AT))
    exact_seconds = (time.perf_counter() - started) / (2 * config.queries)
    largest = size == max(config.sizes)
    result: dict[str, Any] = {
        "size": size,
        "exact_numpy_batched_seconds_per_query": exact_seconds,
        "nearest_neighbour_similarity": nearest_neighbour_similarity(
            prefix, 500, derive_seed(config.seed, "nn", size)),
        "source_is_exact_top1": float(np.mean(queries.truth_edited[:, 0] == sources)),
        "trees": [],
    }
    for trees in config.largest_trees if largest else config.trees:
        root = generation_root(config, size, trees)
        if root.exists():
            shutil.rmtree(root)
        print(f"{size} vectors, {trees} trees: building", flush=True)
        started = time.perf_counter()
        GenerationStore(root).write(
            codebook=real.codebook,
            ids=np.arange(1, size + 1, dtype=np.int64),
            scopes=np.zeros(size, dtype=np.int64),
            vectors=rows_of(prefix),
            max_image_id=size,
            trees=trees,
        )
        build_seconds = time.perf_counter() - started
        load = measure_load(root)
        before = rss()
        generation = GenerationStore(root).load_current(verify_checksums=False)
        assert generation is not None
        after_load = rss()
        searches = measure_search(annoy_rows(generation), config.search_ks, queries, "search_k")
        after_queries = rss()
        generation.unload()
        annoy_bytes = (root / (GenerationStore(root).current_name() or "") / ANNOY_FILE).stat()
        result["trees"].append({
            "trees": trees,
            "build_seconds": build_seconds,
            "disk_bytes": directory_bytes(root),
            "annoy_bytes": annoy_bytes.st_size,
            "load": load,
            "rss_after_load": after_load - before,
            "rss_after_queries": after_queries - before,
            "search": [asdict(s) for s in searches],
            "smallest_search_k_for_target": smallest_search_k(searches),
        })
        if not (largest and trees == EngineSettings().annoy_build_trees):
            shutil.rmtree(root)  # only the default 1M generation is kept, for the start-up test
    if config.graph_efs:
        print(f"{size} vectors, HNSW graph: building", flush=True)
        result["graph"] = measure_graph_index(prefix, config.graph_efs, queries)
    fresh_size = EngineSettings().rebuild_threshold(size)
    result["fresh_buffer"] = measure_fresh(prefix, fresh_size, edited)
    return result


def smallest_search_k(searches: Sequence[SearchKResult]) -> dict[str, Any]:
    """The cheapest search_k reaching the recall target, per query set."""
    answer: dict[str, Any] = {}
    for label in ("edited", "unrelated"):
        passing = [s for s in searches if getattr(s, f"recall_{label}") >= RECALL_TARGET]
        answer[label] = ({"search_k": passing[0].search_k, "p50": passing[0].p50}
                         if passing else None)
    return answer


def generation_root(config: Config, size: int, trees: int) -> Path:
    if size == max(config.sizes) and trees == EngineSettings().annoy_build_trees:
        return config.work / "catalog-index" / GENERATIONS_DIR
    return config.work / f"generations-{size}-{trees}"


# -- the catalog -----------------------------------------------------------------------------


def synthetic_image(number: int, real: RealData, vector: FloatArray, codebook_id: str
                    ) -> NewImage:
    """Row ``number`` of the big catalog: a real photo's features and size, a synthetic
    vector, and a path and content hash shaped like real ones."""
    source = number % len(real.features)
    file_size, width, height = real.sizes[source]
    return NewImage(
        content_hash=hashlib.sha256(number.to_bytes(8, "little")).hexdigest(),
        scope=GLOBAL_SCOPE,
        path=f"/srv/photos/{2010 + number // 100_000}/{number // 1000 % 100:02d}/"
        f"IMG_{number:08d}.JPG",
        file_size=file_size,
        file_mtime_ns=1_700_000_000_000_000_000 + number,
        width=width,
        height=height,
        features=real.features[source],
        vector=vector,
        codebook_id=codebook_id,
    )


def catalog_files(index_dir: Path) -> list[Path]:
    return [p for p in index_dir.glob(f"{CATALOG_FILE}*") if p.is_file()]


async def measure_catalog(config: Config, real: RealData, database: HalfArray
                          ) -> dict[str, Any]:
    index_dir = config.work / "catalog-index"
    index_dir.mkdir(parents=True, exist_ok=True)
    for path in catalog_files(index_dir):
        path.unlink()
    rows = config.catalog_rows
    codebook_id = real.codebook.id
    window = max(COMMIT_EVERY, rows // 100)
    next_mark = window
    rates: list[tuple[int, float]] = []  # (rows so far, rows per second since the last mark)
    rss_before = rss()
    catalog = await Catalog.open(index_dir / CATALOG_FILE)
    started = window_started = time.perf_counter()
    try:
        with tqdm(total=rows, unit="row", desc="catalog") as bar:
            for start in range(0, rows, COMMIT_EVERY):
                end = min(rows, start + COMMIT_EVERY)
                vectors = database[start:end].astype(np.float32)
                await catalog.insert_images([
                    synthetic_image(n, real, vectors[n - start], codebook_id)
                    for n in range(start, end)
                ])
                bar.update(end - start)
                if end >= next_mark or end == rows:
                    now = time.perf_counter()
                    done = rates[-1][0] if rates else 0
                    rates.append((end, (end - done) / (now - window_started)))
                    window_started, next_mark = now, next_mark + window
        insert_seconds = time.perf_counter() - started
        payload = await catalog.bytes_per_image()
    finally:
        await catalog.close()
    rss_after = rss()
    file_bytes = sum(p.stat().st_size for p in catalog_files(index_dir))
    lookups = await measure_lookups(index_dir, rows, config.seed)
    return {
        "rows": rows,
        "insert_seconds": insert_seconds,
        "insert_rows_per_second": rows / insert_seconds,
        "insert_rate_windows": rates,
        "rss_growth": rss_after - rss_before,
        "file_bytes": file_bytes,
        "file_bytes_per_image": file_bytes / rows,
        "payload_per_image": payload,
        "lookups": lookups,
    }


async def measure_lookups(index_dir: Path, rows: int, seed: int) -> dict[str, Any]:
    """get_many(30) and features(8) of random ids: first with the catalog out of the page
    cache (a fresh start), then the same ids again (warm)."""
    rng = np.random.default_rng(derive_seed(seed, "lookups"))
    id_sets = [(rng.integers(1, rows + 1, GET_MANY_IDS).tolist(),
                rng.integers(1, rows + 1, FEATURES_IDS).tolist()) for _ in range(LOOKUPS)]
    evict(catalog_files(index_dir))
    result: dict[str, Any] = {}
    catalog = await Catalog.open(index_dir / CATALOG_FILE)
    try:
        for label in ("cold", "warm"):
            get_many, features = [], []
            for many, few in id_sets:
                started = time.perf_counter()
                await catalog.get_many(many)
                middle = time.perf_counter()
                await catalog.features(few)
                features.append(time.perf_counter() - middle)
                get_many.append(middle - started)
            result[label] = {
                "get_many_30": {"p50": median(get_many), "p95": float(np.percentile(get_many, 95))},
                "features_8": {"p50": median(features), "p95": float(np.percentile(features, 95))},
            }
    finally:
        await catalog.close()
    return result


async def measure_startup(config: Config) -> dict[str, float]:
    """SearchService.open on the big catalog with its Annoy generation, cold and warm, and
    apart from it, cold, the catalog scan every open runs (images without a vector)."""
    index_dir = config.work / "catalog-index"
    generation_files = [p for p in (index_dir / GENERATIONS_DIR).rglob("*") if p.is_file()]
    codebook_id = current_codebook(index_dir).id
    result: dict[str, float] = {}
    evict(catalog_files(index_dir))
    async with await Catalog.open(index_dir / CATALOG_FILE) as catalog:
        clock = time.perf_counter()
        await catalog.ids_without_vector(codebook_id)
        result["ids_without_vector_cold"] = time.perf_counter() - clock
    for label in ("cold", "warm"):
        if label == "cold":
            evict(catalog_files(index_dir) + generation_files)
        started = time.perf_counter()
        async with opened_service(index_dir) as service:
            result[f"open_{label}"] = time.perf_counter() - started
            clock = time.perf_counter()
            await service.catalog.ids_without_vector(codebook_id)
            result[f"ids_without_vector_after_open_{label}"] = time.perf_counter() - clock
            clock = time.perf_counter()
            await service.catalog.count()
            result[f"count_after_open_{label}"] = time.perf_counter() - clock
    return result


def spectrum_before_whitening(codebook: Codebook) -> dict[str, float]:
    """How concentrated the VLAD variance is before whitening equalises it.

    Whitening divides each principal axis by its standard deviation, so a column
    of the projection has norm 1 / sd. The participation ratio is the number of
    equally strong axes that would hold the same variance: near the dimension
    count, no few axes carry the neighbourhoods that a tree could split on.
    """
    assert codebook.projection is not None  # real_data refuses an index without one
    variances = 1.0 / np.square(np.linalg.norm(codebook.projection, axis=0))
    shares = variances / variances.sum()
    cumulative = np.cumsum(shares)
    result = {"participation_ratio": float(1.0 / np.square(shares).sum())}
    for axes in (16, 32, 64, 128):
        if axes <= len(shares):
            result[f"variance_in_top_{axes}"] = float(cumulative[axes - 1])
    return result


def current_codebook(index_dir: Path) -> Codebook:
    """The codebook of the generation an index serves."""
    generation = GenerationStore(index_dir / GENERATIONS_DIR).load_current(verify_checksums=False)
    if generation is None:
        raise SystemExit(f"{index_dir} has no index generation")
    generation.unload()
    return generation.codebook


# -- report ------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def mb(count: float) -> str:
    return f"{count / 2**20:.1f}"


def print_report(result: dict[str, Any]) -> None:
    real = result["real"]
    spectrum = real["spectrum_before_whitening"]
    print(f"\nreal vectors: {real['images']} x {real['dimensions']}; before whitening, "
          f"participation ratio {spectrum['participation_ratio']:.0f}, "
          f"{100 * spectrum.get('variance_in_top_32', float('nan')):.0f}% of the variance "
          f"in the top 32 axes; nearest-neighbour similarity "
          f"{real['nearest_neighbour_similarity']}")
    print("\n## Candidate stage\n")
    rows = []
    for size_result in result["sizes"]:
        for tree_result in size_result["trees"]:
            for search in tree_result["search"]:
                rows.append((size_result["size"], tree_result["trees"], search["search_k"],
                             ms(search["p50"]), ms(search["p95"]),
                             f"{search['recall_edited']:.3f}", f"{search['recall_unrelated']:.3f}",
                             f"{search['source_in_first_batch']:.3f}"))
    print(markdown_table(("vectors", "trees", "search_k", "p50 ms", "p95 ms", "recall@10 edited",
                          "recall@10 unrelated", "source in first 8"), rows))
    graphs = [(s["size"], s["graph"]) for s in result["sizes"] if "graph" in s]
    if graphs:
        print(f"\n## HNSW graph (faiss, M={GRAPH_LINKS}, efConstruction={GRAPH_BUILD_EFFORT})\n")
        print(markdown_table(
            ("vectors", "build s", "RSS MB", "efSearch", "p50 ms", "p95 ms", "recall@10 edited",
             "recall@10 unrelated", "source in first 8"),
            [(size, f"{graph['build_seconds']:.0f}", mb(graph["rss_after_build"]),
              search["search_k"], ms(search["p50"]), ms(search["p95"]),
              f"{search['recall_edited']:.3f}", f"{search['recall_unrelated']:.3f}",
              f"{search['source_in_first_batch']:.3f}")
             for size, graph in graphs for search in graph["search"]]))
    print("\n## Build, disk, memory, load\n")
    rows = []
    for size_result in result["sizes"]:
        for tree_result in size_result["trees"]:
            load = tree_result["load"]
            rows.append((size_result["size"], tree_result["trees"],
                         f"{tree_result['build_seconds']:.1f}", mb(tree_result["disk_bytes"]),
                         mb(tree_result["rss_after_load"]), mb(tree_result["rss_after_queries"]),
                         ms(load["cold_verified"]), ms(load["cold_unverified"]),
                         ms(load["warm_verified"]), ms(load["cold_sha256_annoy"])))
    print(markdown_table(("vectors", "trees", "build s", "disk MB", "RSS load MB",
                          "RSS after queries MB", "load cold ms", "load cold no-sha ms",
                          "load warm ms", "sha256 cold ms"), rows))
    print("\n## Fresh buffer\n")
    print(markdown_table(("vectors", "buffer", "p50 ms", "p95 ms", "first after add ms"), [
        (s["size"], s["fresh_buffer"]["size"], ms(s["fresh_buffer"]["p50"]),
         ms(s["fresh_buffer"]["p95"]), ms(s["fresh_buffer"]["after_add_p50"]))
        for s in result["sizes"]]))
    catalog = result.get("catalog")
    if catalog:
        print(f"\n## Catalog: {catalog['rows']} rows\n")
        print(f"insert {catalog['insert_rows_per_second']:.0f} rows/s "
              f"({catalog['insert_seconds']:.0f} s), file {catalog['file_bytes'] / 2**30:.2f} GiB, "
              f"{catalog['file_bytes_per_image'] / 1024:.1f} KiB per image")
        for label, values in catalog["lookups"].items():
            print(f"{label}: get_many(30) p50 {ms(values['get_many_30']['p50'])} ms p95 "
                  f"{ms(values['get_many_30']['p95'])} ms; features(8) p50 "
                  f"{ms(values['features_8']['p50'])} ms p95 {ms(values['features_8']['p95'])} ms")
        print(f"start-up: {result.get('startup')}")


# -- main ------------------------------------------------------------------------------------


async def run(config: Config) -> dict[str, Any]:
    started = time.perf_counter()
    limit_threads()
    list_photos(config.photos)  # fail early on a wrong folder
    real = await real_data(config)
    synthetic = SyntheticVectors(real.vectors, config.seed)
    largest = max(config.sizes)
    print(f"generating {largest} vectors", flush=True)
    clock = time.perf_counter()
    database = synthetic.database(max(largest, config.catalog_rows))
    generate_seconds = time.perf_counter() - clock
    unrelated = synthetic.chunk("unrelated", 0, config.queries)
    real_half = real.vectors.astype(np.float16)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "config": {key: str(value) for key, value in asdict(config).items()},
        "real": {
            "images": len(real.vectors),
            "dimensions": int(real.vectors.shape[1]),
            "edited_similarity": {
                "count": len(real.edited_similarity),
                "p10": float(np.percentile(real.edited_similarity, 10)),
                "p50": median(real.edited_similarity),
                "p90": float(np.percentile(real.edited_similarity, 90)),
            },
            "nearest_neighbour_similarity": nearest_neighbour_similarity(
                real_half, 500, derive_seed(config.seed, "nn-real")),
            "spectrum_before_whitening": spectrum_before_whitening(real.codebook),
            "seconds": real.seconds,
        },
        "generate_seconds": generate_seconds,
        "sizes": [],
    }
    for size in sorted(config.sizes):
        result["sizes"].append(
            await measure_size(config, real, synthetic, database=database, size=size,
                               unrelated=unrelated))
        write_json(config.out, result)  # partial results survive an interrupted run
    if config.catalog_rows:
        result["catalog"] = await measure_catalog(config, real, database)
        write_json(config.out, result)
        if config.catalog_rows == largest:
            result["startup"] = await measure_startup(config)
            annoy_bytes = result["sizes"][-1]["trees"]
            default = next(t for t in annoy_bytes
                           if t["trees"] == EngineSettings().annoy_build_trees)
            result["disk_per_image"] = (result["catalog"]["file_bytes"]
                                        + default["disk_bytes"]) / largest
    result["seconds"] = time.perf_counter() - started
    return result


def integers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def parse_arguments(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--index", type=Path, default=None,
                        help="an existing index of real photos (default: build one on --photos)")
    parser.add_argument("--sizes", type=integers, default=(10_000, 100_000, 1_000_000))
    parser.add_argument("--trees", type=integers, default=(16, 32, 64),
                        help="tree counts tried below the largest size")
    parser.add_argument("--largest-trees", type=integers, default=(32, 64),
                        help="tree counts tried at the largest size (each build takes minutes)")
    parser.add_argument("--search-ks", type=integers,
                        default=(1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000))
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind")
    parser.add_argument("--calibration-photos", type=int, default=40)
    parser.add_argument("--catalog-rows", type=int, default=1_000_000, help="0 skips it")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "scale.json")
    parser.add_argument("--work", type=Path, default=DEFAULT_OUT_DIR / "scale")
    parser.add_argument("--keep", action="store_true", help="keep the catalog and generations")
    parser.add_argument("--end-to-end", action="store_true",
                        help="the end-to-end benchmark among distractors instead "
                             "(bench.scale_end_to_end: --distractors N, --queries-per-kind, "
                             "--work, --out, --keep)")
    parser.add_argument("--graph-efs", type=integers, default=(),
                        help="also measure an HNSW graph (faiss) at these efSearch values")
    arguments = parser.parse_args(argv)
    return Config(
        photos=arguments.photos, index=arguments.index, out=arguments.out, work=arguments.work,
        sizes=arguments.sizes, trees=arguments.trees, largest_trees=arguments.largest_trees,
        search_ks=arguments.search_ks, queries=arguments.queries,
        calibration_photos=arguments.calibration_photos, catalog_rows=arguments.catalog_rows,
        seed=arguments.seed, keep=arguments.keep, graph_efs=arguments.graph_efs,
    )


def main(argv: Sequence[str] | None = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if "--end-to-end" in arguments:
        from bench import scale_end_to_end

        arguments.remove("--end-to-end")
        scale_end_to_end.main(arguments)
        return
    config = parse_arguments(arguments)
    config.work.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(run(config))
    finally:
        if not config.keep:
            for entry in config.work.iterdir():
                if entry.name != "real-index":  # small, and slow to rebuild
                    shutil.rmtree(entry, ignore_errors=True)
    write_json(config.out, result)
    print_report(result)
    print(f"\n{result['seconds']:.0f} s; everything in {config.out}")


if __name__ == "__main__":
    main()
