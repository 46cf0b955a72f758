"""End-to-end scale: the engine's whole query among N hard distractors.

    .venv/bin/python -m bench.scale --end-to-end --distractors 1000000 \\
        --photos ../shared/photos --out bench/out/scale-e2e-1m.json

Collection and queries: those of ``bench.quality`` (same split, same seed, same edits): 900
photos indexed by ``indexer.build.build_index`` exactly as ``bench.quality`` indexes them (its
cached index is reused), ``--queries-per-kind`` of them edited in every kind of
``testsupport.edits.EDIT_KINDS`` (``crop_deep``, ``collage`` and ``page`` included), and the 100
held-out photos of the split as unrelated queries.

Distractors are synthetic images whose stored features are real KAZE descriptors:

* a descriptor pool: each of the 100 held-out photos, whole and under ``POOL_EDITS`` (seeded
  crops, a deep crop, a rotation, a scale change from ``testsupport.edits`` and PIL), extracted by
  the engine (``indexer.analysis.analyze_bytes`` with the index's settings, 500 keypoints),
  stored int8 as the catalog stores them: about 300,000 distinct real descriptors;
* the pool is spread (``--spread``, on by default): each descriptor gets ``--copies`` (64)
  seeded noisy copies, ``d + N(0, spread^2)`` per component then normalised and stored int8,
  and the copies replace it. Without this, 300,000 descriptors from 100 photos sit on 125,000
  of the 2^20 words however many distractors are drawn, while real photos keep reaching new
  words (the 900 collection photos reach 38k, 68k, 117k and 200k distinct words at 100, 200,
  400 and 900 photos): a word the pool misses costs a query nothing, which flatters any vote
  that prefers rare words. A noise of 0.04 a component (0.32 in all, about the distance from
  a descriptor to its nearest neighbour in another photo, 0.35) makes 900 distractors reach
  as many distinct words as 900 real photos; at a million, each copy serves about 28
  distractors. ``--spread 0`` draws from the pool itself, as the runs before it did;
* a distractor takes ``max_keypoints`` (500) descriptors from 2-4 seeded photos of the pool,
  split between them by a Dirichlet draw (so its words are bursty like a real photo's:
  a scene point seen in several versions of one photo comes back as near-identical
  descriptors), at positions drawn uniformly in a 640x480 frame: they hit real words with
  real signatures, but their geometry is noise and cannot verify.

The unrelated queries are extracted from the very photos the pool comes from, which makes
the false-verification test harder, not easier: every unrelated query shares real
descriptors with thousands of distractors.

Writing them as the engine's own files: each pool descriptor's word and signature are
computed once with the index's vocabulary (``Vocabulary.assign``, as a rebuild does); a
distractor only gathers them. Rows go into the catalog through ``Catalog.insert_images``
(features, a synthetic path and content hash, and the global vector
``codebook.encode(descriptors)``); posting lists are written as segments of
``segment_images`` images with ``SegmentStore.write_segment`` and committed after the
existing ones, with the catalog's highest id as ceiling; the Annoy generation is rebuilt
over every vector with ``GenerationStore.write``. The built index is cached under
``--work`` (``index-<N>``) and reused by a rerun; distractor chunks are seeded by their
number, so the 100k set is a prefix of the 1M set.

Measured with ``SearchService.open`` on that index, in a fresh process limited to one
BLAS and OpenCV thread, queries run one at a time on the inline pool, three candidate
stages (``STAGES``) on the same queries in the same run: the engine's (default settings:
the quick look, then inverted-file votes fused with Annoy when it verifies nothing), the
same without the quick look, and the old one (Annoy only). Per stage: R@1, R@5 and
verified@1 per kind; false verifications on the unrelated photos; the share of edited
copies the quick look answered; ``StageTimings`` "candidates" p50/p95 (the quick look, the
first look and the regional look, those that ran), for the edited copies and for the
unrelated photos apart, whole-query p50 and its ratio to bare KAZE of
the same query; RSS, USS and PSS after opening and after the queries, with RSS split into
private memory and mapped index pages; start-up (warm page cache). Then, on the same files
opened apart, the first look alone per query, split into its parts (global vectors, Annoy,
word assignment, posting lookups, the numba voting kernel) with the postings it scanned.
Disk per image: catalog + current generation + postings, over every image.

``--cold`` measures the engine's stage alone, with no warm-up pass, after asking the kernel
to drop the index's files from the page cache (``posix_fadvise``, no root needed): start-up
and queries from a cold start. Run under a memory limit, it tests the engine within that
limit, page cache included, and the JSON records the limit of the process's cgroup::

    systemd-run --scope -p MemoryMax=1536M .venv/bin/python -m bench.scale --end-to-end \\
        --distractors 1000000 --cold --keep --out bench/out/scale-e2e-1m-capped.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil
from PIL import Image

from bench.common import (
    DEFAULT_OUT_DIR,
    derive_seed,
    list_photos,
    load_rgb,
    machine_info,
    markdown_table,
    median,
    percent,
    seeded_sample,
    split_photos,
    write_json,
)

FloatArray = npt.NDArray[np.float32]

TOP_K = 5
COLLECTION = 900
UNRELATED = 100
# Versions of each held-out photo whose descriptors fill the pool: (edit, repeats).
POOL_EDITS: tuple[tuple[str, int], ...] = (
    ("original", 1), ("crop", 2), ("crop_deep", 1), ("rotate", 1), ("scale", 1),
)
SCALE_RANGE = (0.45, 0.75)
FRAME = (640, 480)
SOURCES_PER_DISTRACTOR = (2, 4)
CHUNK = 4096  # distractors drawn per seeded chunk (fixed, so sizes are prefixes)
INSERT_BATCH = 2048
BUILD_STAMP = "DISTRACTORS.json"


@dataclass(frozen=True)
class Config:
    photos: Path
    out: Path
    work: Path
    distractors: int
    queries_per_kind: int
    seed: int
    workers: int
    keep: bool
    profile_queries: int
    spread: float = 0.04
    copies: int = 64
    cold: bool = False  # the engine's stage alone, from a cold page cache

    def key(self) -> dict[str, Any]:
        """What a cached distractor index depends on."""
        key: dict[str, Any] = {
            "distractors": self.distractors, "seed": self.seed,
            "pool_edits": [list(edit) for edit in POOL_EDITS], "frame": list(FRAME),
            "sources": list(SOURCES_PER_DISTRACTOR), "chunk": CHUNK}
        if self.spread > 0:  # an unspread index keeps the key it was built with
            key.update(spread=self.spread, copies=self.copies)
        return key


# -- collection, queries, base index -----------------------------------------------------


def quality_config(config: Config, out: Path) -> Any:
    from bench import quality
    from testsupport.edits import EDIT_KINDS

    return quality.Config(
        photos=config.photos, out=out, collection_size=COLLECTION, unrelated_size=UNRELATED,
        queries_per_kind=config.queries_per_kind, kinds=EDIT_KINDS, methods=("engine",),
        seed=config.seed, workers=config.workers, work_size=640, fresh_index=False)


def collection(config: Config) -> tuple[Any, list[Any], Path]:
    """bench.quality's split and edited queries (written under --work, cached), and the
    index of the collection (bench.quality's own cache, brought up to date)."""
    from bench import quality
    from testsupport.edits import EDIT_KINDS

    photos = list_photos(config.photos)
    split = split_photos(photos, COLLECTION, UNRELATED, derive_seed(config.seed, "split"))
    targets = seeded_sample(range(len(split.collection)), config.queries_per_kind,
                            derive_seed(config.seed, "queries"))
    queries_config = quality_config(config, config.work / "queries.json")
    stamp = config.work / "queries" / "STAMP.json"
    wanted = {"seed": config.seed, "targets": list(targets),
              "kinds": [kind.name for kind in EDIT_KINDS]}
    expected = [quality.Query(kind.name, target, config.work / "queries" / kind.name
                              / f"{target:04d}_{split.collection[target].stem}.jpg")
                for target in targets for kind in EDIT_KINDS]
    if (stamp.exists() and json.loads(stamp.read_text()) == wanted
            and all(q.path.exists() for q in expected)):
        queries = expected
    else:
        queries = quality.write_queries(queries_config, split, targets,
                                        quality.filler_pool(photos, split))
        stamp.write_text(json.dumps(wanted))
    _, index_dir = quality.link_collection(
        quality_config(config, DEFAULT_OUT_DIR / "quality.json"), split)
    return split, queries, index_dir


# -- the descriptor pool ------------------------------------------------------------------


def _pool_version(path: str, edit: str, seed: int, settings: Any) -> npt.NDArray[np.int8]:
    """The stored (int8) descriptors of one version of a held-out photo (worker process)."""
    from indexer.analysis import analyze_bytes
    from indexer.errors import IndexerError
    from indexer.features import limit_threads, quantize_descriptors
    from testsupport.edits import EDITS_BY_NAME, encode_jpeg

    limit_threads()
    image = load_rgb(Path(path))
    if edit == "scale":
        factor = np.random.default_rng(seed).uniform(*SCALE_RANGE)
        height, width = image.shape[:2]
        size = (max(16, round(width * factor)), max(16, round(height * factor)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    elif edit != "original":
        image = EDITS_BY_NAME[edit].apply(image, seed)
    try:
        analysis = analyze_bytes(encode_jpeg(image, 90), settings)
    except IndexerError:
        return np.empty((0, 64), np.int8)
    return quantize_descriptors(analysis.features.descriptors)


def descriptor_pool(config: Config, unrelated: Sequence[Path], settings: Any
                    ) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int64], float]:
    """(descriptors int8, start of each photo's rows + end), cached under --work."""
    cache = config.work / f"pool-seed{config.seed}.npz"
    if cache.exists():
        with np.load(cache) as data:
            return data["descriptors"], data["starts"], float(data["seconds"][0])
    started = time.perf_counter()
    jobs = [(str(path), edit, derive_seed(config.seed, "pool", edit, repeat, path.name))
            for path in unrelated for edit, repeats in POOL_EDITS for repeat in range(repeats)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(config.workers, mp_context=context) as executor:
        parts = list(executor.map(_pool_version, *zip(*jobs, strict=True),
                                  [settings] * len(jobs)))
    per_photo = sum(repeats for _, repeats in POOL_EDITS)
    photos = [np.concatenate(parts[i : i + per_photo]) for i in range(0, len(parts), per_photo)]
    descriptors = np.concatenate(photos)
    starts = np.cumsum([0, *(len(p) for p in photos)]).astype(np.int64)
    seconds = time.perf_counter() - started
    np.savez(cache, descriptors=descriptors, starts=starts, seconds=np.array([seconds]))
    return descriptors, starts, seconds


def spread_pool(quantized: npt.NDArray[np.int8], starts: npt.NDArray[np.int64], config: Config
                ) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int64]]:
    """The pool with each descriptor replaced by ``config.copies`` noisy copies (module
    docstring), a photo's copies kept together, so that ``draw_chunk`` draws from it as
    from the pool."""
    from indexer.features import dequantize_descriptors, quantize_descriptors

    photos = []
    for photo in range(len(starts) - 1):
        rng = np.random.default_rng(derive_seed(config.seed, "spread", photo))
        own = dequantize_descriptors(quantized[starts[photo] : starts[photo + 1]])
        copies = np.repeat(own, config.copies, axis=0)
        copies += rng.standard_normal(copies.shape, dtype=np.float32) * np.float32(config.spread)
        copies /= np.maximum(np.linalg.norm(copies, axis=1, keepdims=True), 1e-6)
        photos.append(quantize_descriptors(copies))
    return np.concatenate(photos), starts * config.copies


def draw_chunk(number: int, starts: npt.NDArray[np.int64], keypoints: int, seed: int
               ) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Pool rows (CHUNK, keypoints) and positions (CHUNK, keypoints, 2) of one seeded chunk."""
    rng = np.random.default_rng(derive_seed(seed, "distractors", number))
    photos = len(starts) - 1
    rows = np.empty((CHUNK, keypoints), np.int64)
    for n in range(CHUNK):
        count = int(rng.integers(SOURCES_PER_DISTRACTOR[0], SOURCES_PER_DISTRACTOR[1] + 1))
        chosen = rng.choice(photos, size=count, replace=False)
        shares = rng.multinomial(keypoints, rng.dirichlet(np.ones(count)))
        taken = []
        for photo, share in zip(chosen.tolist(), shares.tolist(), strict=True):
            begin, end = int(starts[photo]), int(starts[photo + 1])
            taken.append(begin + rng.choice(end - begin, size=share, replace=share > end - begin))
        rows[n] = np.concatenate(taken)
    points = rng.uniform((0, 0), FRAME, size=(CHUNK, keypoints, 2)).astype(np.float32)
    return rows, points


# -- building the distractor index ----------------------------------------------------------


def encode_many(codebook: Any, pool: FloatArray, nearest: npt.NDArray[np.int64],
                rows: npt.NDArray[np.int64]) -> FloatArray:
    """``codebook.encode(pool[r])`` for every row ``r`` of ``rows``, batched: the same VLAD
    (intra-, power- and L2-normalised, then PCA-whitened), with each pool descriptor's
    nearest centroid (``nearest``) computed once. Per image, ``encode`` would cost the
    build ~0.4 ms, and much more when a sqlite thread competes for the GIL."""
    centroids = codebook.centroids
    k, dimensions = centroids.shape
    count = len(rows)
    keys = (nearest[rows] + k * np.arange(count)[:, None]).ravel()
    order = np.argsort(keys, kind="stable")
    data = pool[rows.ravel()[order]]
    present, first = np.unique(keys[order], return_index=True)
    sums = np.zeros((count * k, dimensions), np.float32)
    sums[present] = np.add.reduceat(data, first, axis=0)
    counts = np.bincount(keys, minlength=count * k).astype(np.float32)
    residuals = sums - counts[:, None] * np.tile(centroids, (count, 1))
    residuals /= np.maximum(np.linalg.norm(residuals, axis=1, keepdims=True), 1e-12)
    flat = residuals.reshape(count, k * dimensions)
    flat = np.sign(flat) * np.sqrt(np.abs(flat))
    flat /= np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    if codebook.projection is None or codebook.mean is None:
        return flat.astype(np.float32)
    projected = (flat - codebook.mean) @ codebook.projection
    norms = np.linalg.norm(projected, axis=1, keepdims=True)
    return np.asarray(projected / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def directory_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


async def build_distractor_index(config: Config, base: Path, target: Path,
                                 unrelated: Sequence[Path]) -> dict[str, Any]:
    """Copies ``base`` to ``target`` and writes the distractors into it (module docstring)."""
    from indexer.ann import GenerationStore
    from indexer.catalog import GLOBAL_SCOPE, Catalog, NewImage
    from indexer.features import LocalFeatures, dequantize_descriptors
    from indexer.inverted_file import POSTINGS_DIR, InvertedFile
    from indexer.postings import PostingLists
    from indexer.search import CATALOG_FILE, GENERATIONS_DIR
    from indexer.segments import Segment, SegmentSet, SegmentStore
    from indexer.settings import EngineSettings
    from indexer.workers import CpuPool

    stats: dict[str, Any] = {}
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(base, target)
    catalog = await Catalog.open(target / CATALOG_FILE)
    try:
        settings = EngineSettings().with_stored(await catalog.settings())
        generations = GenerationStore(target / GENERATIONS_DIR)
        generation = generations.load_current(verify_checksums=False)
        assert generation is not None, "the base index has no generation"
        codebook = generation.codebook
        codebook_id = codebook.id  # a property that hashes the codebook's 4 MB: once
        generation.unload()
        # The base's images must all be in committed segments: the distractors'
        # commit raises the ceiling over every id, and an image below it is never
        # read from the catalog again.
        inverted = InvertedFile(target, catalog, settings, asyncio.Lock(), pool=CpuPool.inline())
        await inverted.load()
        await inverted.rebuild()
        await inverted.close()
        store = SegmentStore(target / POSTINGS_DIR)
        existing = store.load()
        assert existing is not None, "the base index has no inverted file"
        assert existing.ceiling == await catalog.max_id(), "the base's inverted file lags"
        vocabulary = existing.vocabulary

        quantized, starts, stats["pool_seconds"] = descriptor_pool(config, unrelated, settings)
        clock = time.perf_counter()
        if config.spread > 0:
            quantized, starts = spread_pool(quantized, starts, config)
        pool = dequantize_descriptors(quantized)
        pool_words = np.empty(len(pool), np.uint32)
        pool_signatures = np.empty(len(pool), np.uint32)
        nearest = np.empty(len(pool), np.int64)
        half_norms = 0.5 * np.einsum("ij,ij->i", codebook.centroids, codebook.centroids)
        for begin in range(0, len(pool), 262_144):  # a spread pool's products fill no RAM
            part = pool[begin : begin + 262_144]
            assignment = vocabulary.assign(part)
            pool_words[begin : begin + len(part)] = assignment.words[:, 0]
            pool_signatures[begin : begin + len(part)] = assignment.signatures[:, 0]
            nearest[begin : begin + len(part)] = np.argmax(
                part @ codebook.centroids.T - half_norms, axis=1)
        check = draw_chunk(0, starts, settings.max_keypoints, config.seed)[0][:8]
        expected = np.stack([codebook.encode(pool[r]) for r in check])
        error = float(np.abs(encode_many(codebook, pool, nearest, check) - expected).max())
        assert error < 1e-4, f"batched encoding differs from Codebook.encode by {error}"
        stats["batched_encode_max_error"] = error
        stats["pool"] = {"descriptors": len(pool), "photos": len(starts) - 1,
                         "spread": config.spread, "copies": config.copies if config.spread else 1,
                         "distinct_words": len(np.unique(pool_words)),
                         "assign_seconds": time.perf_counter() - clock}
        print(f"pool: {stats['pool']}", flush=True)

        keypoints = settings.max_keypoints
        vectors = np.empty((config.distractors, codebook.dimensions), np.float16)
        all_ids: list[int] = []
        segments: list[Segment] = []
        pending_ids: list[int] = []
        pending_words: list[npt.NDArray[np.uint32]] = []
        pending_signatures: list[npt.NDArray[np.uint32]] = []
        seconds = {"draw": 0.0, "encode": 0.0, "segments": 0.0}

        def seal() -> None:
            clock = time.perf_counter()
            lists = PostingLists.build(pending_ids, [GLOBAL_SCOPE] * len(pending_ids),
                                       pending_words, pending_signatures)
            segments.append(store.write_segment(lists))
            pending_ids.clear()
            pending_words.clear()
            pending_signatures.clear()
            seconds["segments"] += time.perf_counter() - clock

        def batches() -> Any:
            made = 0
            for number in range((config.distractors + CHUNK - 1) // CHUNK):
                clock = time.perf_counter()
                rows, points = draw_chunk(number, starts, keypoints, config.seed)
                take = min(CHUNK, config.distractors - made)
                seconds["draw"] += time.perf_counter() - clock
                for batch in range(0, take, INSERT_BATCH):
                    stop = min(take, batch + INSERT_BATCH)
                    yield made + batch, rows[batch:stop], points[batch:stop]
                made += take

        def make(first: int, rows: Any, points: Any) -> list[Any]:
            """Catalog rows of a batch."""
            images = []
            encoded = encode_many(codebook, pool, nearest, rows)
            vectors[first : first + len(rows)] = encoded
            for n in range(len(rows)):
                descriptors = pool[rows[n]]
                vector = encoded[n]
                serial = first + n
                images.append(NewImage(
                    content_hash=f"{derive_seed(config.seed, 'hash', serial):064x}"[-64:],
                    scope=GLOBAL_SCOPE, path=f"distractors/{serial:07d}.jpg",
                    file_size=0, file_mtime_ns=0, width=FRAME[0], height=FRAME[1],
                    features=LocalFeatures(points=points[n], descriptors=descriptors,
                                           width=FRAME[0], height=FRAME[1]),
                    vector=vector, codebook_id=codebook_id))
            return images

        async def finish(task: asyncio.Task[list[int]], rows: Any) -> None:
            clock = time.perf_counter()
            ids = await task
            seconds["insert_wait"] += time.perf_counter() - clock
            for n, image_id in enumerate(ids):
                pending_ids.append(image_id)
                pending_words.append(pool_words[rows[n]])
                pending_signatures.append(pool_signatures[rows[n]])
            all_ids.extend(ids)
            if len(pending_ids) >= settings.segment_images:
                seal()
            if len(all_ids) % (10 * CHUNK) < INSERT_BATCH:
                rate = len(all_ids) / (time.perf_counter() - started)
                print(f"distractors: {len(all_ids)}/{config.distractors} ({rate:.0f}/s) "
                      f"{seconds}", flush=True)

        seconds["insert_wait"] = 0.0
        started = time.perf_counter()
        inflight: tuple[asyncio.Task[list[int]], Any] | None = None
        for first, rows, points in batches():
            clock = time.perf_counter()
            # Not on a thread: beside aiosqlite's thread it ran 20x slower (GIL convoy).
            images = make(first, rows, points)
            seconds["encode"] += time.perf_counter() - clock
            if inflight is not None:
                await finish(*inflight)
            inflight = (asyncio.create_task(catalog.insert_images(images)), rows)
        if inflight is not None:
            await finish(*inflight)
        seconds["catalog_and_encode"] = time.perf_counter() - started
        if pending_ids:
            seal()
        ceiling = await catalog.max_id()
        assert ceiling == all_ids[-1]
        clock = time.perf_counter()
        store.commit(SegmentSet(
            vocabulary=vocabulary, sealed=(*existing.sealed, *segments),
            open=Segment(None, PostingLists.empty()), ceiling=ceiling,
            tombstones=existing.tombstones))
        seconds["commit"] = time.perf_counter() - clock

        # The Annoy generation over every vector, as a rebuild writes it.
        real_ids, real_scopes, real_vectors = [], [], []
        async for ids, scopes, chunk in catalog.iter_vectors(codebook.id,
                                                             up_to_id=all_ids[0] - 1):
            real_ids.append(ids)
            real_scopes.append(scopes)
            real_vectors.append(chunk)
        ids_array = np.concatenate([*real_ids, np.asarray(all_ids, np.int64)])
        scopes_array = np.concatenate([*real_scopes, np.zeros(len(all_ids), np.int64)])

        def rows_of() -> Any:
            for chunk in real_vectors:
                yield from chunk.astype(np.float32)
            for start in range(0, len(vectors), 65_536):
                yield from vectors[start : start + 65_536].astype(np.float32)

        clock = time.perf_counter()
        generations.write(codebook=codebook, ids=ids_array, scopes=scopes_array,
                          vectors=rows_of(), max_image_id=ceiling,
                          trees=settings.annoy_build_trees)
        seconds["annoy"] = time.perf_counter() - clock
        generations.remove_stale(keep=set())
        stats["seconds"] = seconds
        stats["images"] = await catalog.count()
    finally:
        await catalog.close()
    return stats


def build_entry(config: Config, base: Path, target: Path, unrelated: list[Path]) -> None:
    """Child process: build, then write the stamp that marks the index complete."""
    started = time.perf_counter()
    stats = asyncio.run(build_distractor_index(config, base, target, unrelated))
    stats["total_seconds"] = time.perf_counter() - started
    (target / BUILD_STAMP).write_text(json.dumps({"key": config.key(), "stats": stats}))


# -- measuring --------------------------------------------------------------------------------


def memory() -> dict[str, float]:
    """RSS, USS and PSS, and on Linux RSS split into private memory (``anon_mb``) and
    mapped file pages (``file_mb``: clean pages of the index, which the kernel may drop and
    other processes mapping the same files share)."""
    process = psutil.Process()
    result = {"rss_mb": process.memory_info().rss / 2**20}
    try:
        full = process.memory_full_info()
        result["uss_mb"] = full.uss / 2**20
        result["pss_mb"] = getattr(full, "pss", 0) / 2**20
    except (psutil.AccessDenied, AttributeError):
        pass
    status = Path("/proc/self/status")
    if status.exists():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines()
                      if ":" in line)
        for field, key in (("RssAnon", "anon_mb"), ("RssFile", "file_mb")):
            if field in fields:
                result[key] = int(fields[field].split()[0]) / 1024
    return result


def memory_limit_mb() -> float | None:
    """The memory limit of this process's cgroup, or None when it has none."""
    from indexer.mapped import cgroup_memory

    limited = cgroup_memory()
    return limited[0] / 2**20 if limited is not None else None


def evict_page_cache(folder: Path) -> int:
    """Ask the kernel to drop the cached pages of every file under ``folder`` (no root
    needed; pages another process maps stay), so that a measurement starts cold.
    Returns the bytes of the files advised."""
    advised = 0
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
        advised += path.stat().st_size
    return advised


def percentiles(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64) * 1000
    return {"p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)),
            "mean": float(array.mean()), "count": len(array)}


STAGES = {
    # The engine as it stands: the quick look, then the first look when it verifies nothing.
    "new": {},
    # The inverted file's full vote fused with Annoy, with no quick look before it.
    "first_look": {"quick_vote": None},
    # Annoy alone: the candidate stage before the inverted file.
    "old": {"quick_vote": None, "vote_candidates": 0},
}


async def measure_stage(index_dir: Path, *, stage: str, queries: Sequence[Any],
                        unrelated: Sequence[Path], collection_paths: Sequence[Path],
                        kaze: dict[Path, float]) -> dict[str, Any]:
    from bench.quality import bare_kaze_seconds
    from indexer.errors import ImageError
    from indexer.search import SearchService, StageTimings
    from indexer.settings import EngineSettings

    gc.collect()
    before = memory()
    settings = EngineSettings(**STAGES[stage])
    clock = time.perf_counter()
    service = await SearchService.open(index_dir, settings=settings)
    startup = time.perf_counter() - clock
    after_open = memory()
    expected = [path.resolve() for path in collection_paths]
    kinds: dict[str, list[tuple[int | None, bool]]] = {}
    candidates, whole, kaze_of = [], [], []
    unrelated_candidates, unrelated_whole = [], []
    quick_found = 0
    failed: list[str] = []
    try:
        await service.query(unrelated[0], top=TOP_K)  # numba, caches: not timed
        for query in queries:
            timings = StageTimings()
            clock = time.perf_counter()
            try:
                matches = await service.query(query.path, top=TOP_K, timings=timings)
            except ImageError as error:
                failed.append(f"{query.path.name}: {error}")
                kinds.setdefault(query.kind, []).append((None, False))
                continue
            whole.append(time.perf_counter() - clock)
            candidates.append(timings.seconds.get("candidates", 0.0))
            quick_found += timings.counts.get("quick look found", 0)
            if query.path not in kaze:
                kaze[query.path] = bare_kaze_seconds(query.path, 640)
            kaze_of.append(kaze[query.path])
            found = [Path(m.path).resolve() for m in matches]
            target = expected[query.target]
            rank = found.index(target) if target in found else None
            kinds.setdefault(query.kind, []).append(
                (rank, rank == 0 and bool(matches[0].verified)))
        false_verified = []
        for photo in unrelated:
            timings = StageTimings()
            clock = time.perf_counter()
            try:
                matches = await service.query(photo, top=TOP_K, timings=timings)
            except ImageError:
                continue
            unrelated_whole.append(time.perf_counter() - clock)
            unrelated_candidates.append(timings.seconds.get("candidates", 0.0))
            if any(m.verified for m in matches):
                false_verified.append(photo.name)
        after_queries = memory()
    finally:
        await service.close()
    everything = [outcome for outcomes in kinds.values() for outcome in outcomes]

    def rate(outcomes: Sequence[tuple[int | None, bool]], k: int) -> float:
        return sum(1 for rank, _ in outcomes if rank is not None and rank < k) / len(outcomes)

    return {
        "r1": {**{k: rate(v, 1) for k, v in kinds.items()}, "all": rate(everything, 1)},
        "r5": {**{k: rate(v, 5) for k, v in kinds.items()}, "all": rate(everything, 5)},
        "verified_at_1": {**{k: sum(o[1] for o in v) / len(v) for k, v in kinds.items()},
                          "all": sum(o[1] for o in everything) / len(everything)},
        "queries": len(everything),
        "failed": failed,
        "false_verified": len(false_verified),
        "false_verified_queries": false_verified,
        "unrelated_queries": len(unrelated),
        "candidate_ms": percentiles(candidates),
        "query_ms": percentiles(whole),
        "quick_look_found": quick_found / max(len(candidates), 1),
        "unrelated_candidate_ms": percentiles(unrelated_candidates),
        "unrelated_query_ms": percentiles(unrelated_whole),
        "bare_kaze_ms": percentiles(kaze_of),
        "query_to_kaze": median(whole) / median(kaze_of),
        "rss_mb": after_queries["rss_mb"],
        "memory": {"before_open": before, "after_open": after_open,
                   "after_queries": after_queries},
        "startup_s": startup,
    }


def profile_first_look(index_dir: Path, queries: Sequence[Any], limit: int) -> dict[str, Any]:
    """The first look of each query, timed part by part, on the same files opened apart:
    the global vectors (``Codebook.encode``), Annoy, the whole vote
    (``SegmentSet.vote``), and inside it the word assignment and the posting lookups
    timed again on their own; the numba kernel is the rest of the vote. The quick look's
    vote (the query as sent) is split the same way."""
    from indexer.analysis import analyze_path
    from indexer.ann import GenerationStore
    from indexer.catalog import GLOBAL_SCOPE
    from indexer.errors import ImageError
    from indexer.inverted_file import POSTINGS_DIR
    from indexer.postings import QueryWords
    from indexer.search import GENERATIONS_DIR
    from indexer.segments import SegmentStore
    from indexer.settings import EngineSettings

    settings = EngineSettings()
    generation = GenerationStore(index_dir / GENERATIONS_DIR).load_current(
        verify_checksums=False)
    segment_set = SegmentStore(index_dir / POSTINGS_DIR).load()
    assert generation is not None
    assert segment_set is not None
    params = settings.vote
    segments = [s for s in segment_set.segments if s.live]
    documents = sum(len(s.lists) for s in segments)
    stop = max(params.stop_minimum, params.stop_fraction * documents)
    depth = max(TOP_K, settings.verify_limit)
    parts: dict[str, list[float]] = {
        k: [] for k in ("encode", "annoy", "vote", "assign", "lookup", "kernel_and_rest",
                        "total", "quick_vote", "quick_assign", "quick_lookup",
                        "quick_kernel_and_rest")}
    scanned, distinct_words, quick_scanned = [], [], []
    quick = settings.quick_vote
    assert quick is not None
    for query in seeded_sample(list(queries), limit, 1):
        try:
            features = analyze_path(query.path, settings, for_query=True).features
        except ImageError:
            continue
        times = dict.fromkeys(parts, 0.0)
        postings = words_voting = 0
        for oriented in (features, features.mirrored()):
            clock = time.perf_counter()
            vector = generation.codebook.encode(oriented.descriptors)
            times["encode"] += time.perf_counter() - clock
            clock = time.perf_counter()
            generation.search(vector, depth, settings.search_k)
            times["annoy"] += time.perf_counter() - clock
            clock = time.perf_counter()
            segment_set.vote([oriented], scope=GLOBAL_SCOPE, count=settings.vote_candidates,
                             params=params)
            times["vote"] += time.perf_counter() - clock
            clock = time.perf_counter()
            assignment = segment_set.vocabulary.assign(
                oriented.descriptors, per_half=params.assignments_per_half)
            times["assign"] += time.perf_counter() - clock
            clock = time.perf_counter()
            grouped = QueryWords.of(assignment.words.reshape(-1),
                                    assignment.signatures.reshape(-1))
            ranges = [s.lists.lookup(grouped.words) for s in segments]
            frequency = sum((e - b for b, e in ranges), np.zeros(len(grouped.words), np.int64))
            times["lookup"] += time.perf_counter() - clock
            voting = (frequency > 0) & (frequency <= stop)
            postings += int(frequency[voting].sum())
            words_voting += int(voting.sum())
        clock = time.perf_counter()
        segment_set.vote([features], scope=GLOBAL_SCOPE, count=depth, params=quick)
        times["quick_vote"] = time.perf_counter() - clock
        clock = time.perf_counter()
        assignment = segment_set.vocabulary.assign(
            features.descriptors[: quick.voting_descriptors], per_half=quick.assignments_per_half)
        times["quick_assign"] = time.perf_counter() - clock
        clock = time.perf_counter()
        nearest = quick.words_per_descriptor
        grouped = QueryWords.of(assignment.words[:, :nearest].reshape(-1),
                                assignment.signatures[:, :nearest].reshape(-1))
        ranges = [s.lists.lookup(grouped.words) for s in segments]
        frequency = sum((e - b for b, e in ranges), np.zeros(len(grouped.words), np.int64))
        times["quick_lookup"] = time.perf_counter() - clock
        times["quick_kernel_and_rest"] = (
            times["quick_vote"] - times["quick_assign"] - times["quick_lookup"])
        # The engine's own choice of words, for the postings the quick vote scanned.
        weighted = segment_set.weighted_query(features, quick)
        quick_scanned.append(int(weighted.frequency[weighted.words.weights > 0].sum()))
        times["kernel_and_rest"] = times["vote"] - times["assign"] - times["lookup"]
        times["total"] = times["encode"] + times["annoy"] + times["vote"]
        for key, value in times.items():
            parts[key].append(value)
        scanned.append(postings)
        distinct_words.append(words_voting)
    generation.unload()
    return {
        "queries": len(scanned),
        "ms": {key: percentiles(values) for key, values in parts.items()},
        "postings_scanned": {"p50": float(np.median(scanned)),
                             "p95": float(np.percentile(scanned, 95))},
        "distinct_words_voting": float(np.median(distinct_words)),
        "quick_postings_scanned": {"p50": float(np.median(quick_scanned)),
                                   "p95": float(np.percentile(quick_scanned, 95))},
        "segments": len(segments),
        "stop_list_length": stop,
        "note": "both orientations encoded, searched in Annoy and voted; the engine's first "
                "look votes with the query as sent only (the mirror image votes in the second "
                f"look), so its vote is about half of this one; Annoy at search_k "
                f"{settings.search_k}, depth {depth}",
    }


def measure_entry(index_dir: Path, queries: list[Any], unrelated: list[Path],  # noqa: PLR0917
                  collection_paths: list[Path], profile_queries: int, out: Path) -> None:
    # (positional: multiprocessing passes a child's arguments as a tuple)
    """Child process (one BLAS thread): every stage, then the first-look profile."""
    from indexer.features import limit_threads

    limit_threads()

    async def every_stage() -> dict[str, Any]:
        kaze: dict[Path, float] = {}
        # A pass of the stage that reads the most, untimed, first: whichever stage came
        # first would otherwise read the catalog's and the postings' pages from disk
        # for the others (a 100k run without it: the engine's stage, measured first,
        # 1.11x bare KAZE, the first look alone, second, 0.97x; run query by query in
        # turns, the engine's stage was the faster, 117 against 125 ms at the median).
        await measure_stage(index_dir, stage="first_look", queries=queries,
                            unrelated=unrelated, collection_paths=collection_paths,
                            kaze=kaze)
        return {stage: await measure_stage(index_dir, stage=stage, queries=queries,
                                           unrelated=unrelated,
                                           collection_paths=collection_paths, kaze=kaze)
                for stage in STAGES}

    result = asyncio.run(every_stage())
    write_json(out, result)  # the stages survive a failed profile
    try:
        result["profile"] = profile_first_look(index_dir, queries, profile_queries)
    except Exception as error:  # the engine's internals move: say so, keep the rest
        result["profile"] = {"error": f"{type(error).__name__}: {error}"}
    write_json(out, result)


def measure_cold_entry(index_dir: Path, queries: list[Any], unrelated: list[Path],
                       collection_paths: list[Path], out: Path) -> None:
    """Child process (one BLAS thread): the engine's stage alone, its index's files
    dropped from the page cache first, no warm-up pass: how the engine serves from a
    cold start, and, run in a cgroup with a memory limit, within that limit."""
    from indexer.features import limit_threads

    limit_threads()
    advised = evict_page_cache(index_dir)
    result = asyncio.run(measure_stage(index_dir, stage="new", queries=queries,
                                       unrelated=unrelated, collection_paths=collection_paths,
                                       kaze={}))
    write_json(out, {"new": result, "evicted_bytes": advised,
                     "memory_limit_mb": memory_limit_mb()})


def disk_usage(index_dir: Path, images: int) -> dict[str, Any]:
    from indexer.ann import CURRENT_FILE
    from indexer.inverted_file import POSTINGS_DIR
    from indexer.search import CATALOG_FILE, GENERATIONS_DIR

    catalog = sum(p.stat().st_size for p in index_dir.glob(f"{CATALOG_FILE}*"))
    generations = index_dir / GENERATIONS_DIR
    current = generations / (generations / CURRENT_FILE).read_text().strip()
    parts = {"catalog": catalog, "generation": directory_bytes(current),
             "postings": directory_bytes(index_dir / POSTINGS_DIR)}
    return {"bytes": parts, "images": images,
            "kb_per_image": {k: v / images / 1024 for k, v in parts.items()},
            "total_kb_per_image": sum(parts.values()) / images / 1024}


def run_child(target: Any, *args: Any, env: dict[str, str] | None = None) -> None:
    context = multiprocessing.get_context("spawn")
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        process = context.Process(target=target, args=args)
        process.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{target.__name__} failed (exit code {process.exitcode})")


def run(config: Config) -> dict[str, Any]:
    from indexer.build import build_index

    started = time.perf_counter()
    split, queries, base = collection(config)
    clock = time.perf_counter()
    photos_dir = base.parent / "photos"
    asyncio.run(build_index(photos_dir, base, workers=config.workers, progress=True))
    base_seconds = time.perf_counter() - clock
    target = config.work / f"index-{config.distractors}"
    # One BLAS thread: on a shared two-core machine OpenBLAS's threads only contend
    # (Annoy's build threads are its own).
    single = dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                            "NUMBA_NUM_THREADS"), "1")
    stamp = target / BUILD_STAMP
    reused = stamp.exists() and json.loads(stamp.read_text())["key"] == config.key()
    if not reused:
        print(f"building {config.distractors} distractors into {target}", flush=True)
        run_child(build_entry, config, base, target, list(split.unrelated), env=single)
    build = json.loads(stamp.read_text())["stats"]
    measured_file = config.work / f"measured-{config.distractors}.json"
    disk = disk_usage(target, build["images"])
    if config.cold:
        run_child(measure_cold_entry, target, list(queries), list(split.unrelated),
                  list(split.collection), measured_file, env=single)
        measured = json.loads(measured_file.read_text())
        return {
            "benchmark": "scale-end-to-end-cold",
            "distractors": config.distractors,
            "images": build["images"],
            **measured["new"],
            "memory_limit_mb": measured["memory_limit_mb"],
            "evicted_bytes": measured["evicted_bytes"],
            "disk_kb_per_image": disk["total_kb_per_image"],
            "disk": disk,
            "machine": machine_info(),
            "config": {**{k: str(v) for k, v in asdict(config).items()},
                       "photos": os.path.relpath(config.photos),
                       "distractor_design": config.key()},
            "seconds": time.perf_counter() - started,
        }
    run_child(measure_entry, target, list(queries), list(split.unrelated),
              list(split.collection), config.profile_queries, measured_file, env=single)
    measured = json.loads(measured_file.read_text())
    new, first_look, old = measured["new"], measured["first_look"], measured["old"]
    result: dict[str, Any] = {
        "benchmark": "scale-end-to-end",
        "distractors": config.distractors,
        "images": build["images"],
        **new,
        "disk_kb_per_image": disk["total_kb_per_image"],
        "global_only": {**old, "disk_kb_per_image": disk["total_kb_per_image"]},
        "without_quick_look": {**first_look, "disk_kb_per_image": disk["total_kb_per_image"]},
        "first_look_profile": measured["profile"],
        "disk": disk,
        "build": {**build, "reused": reused, "base_index_seconds": base_seconds},
        "machine": machine_info(),
        "config": {**{k: str(v) for k, v in asdict(config).items()},
                   "photos": os.path.relpath(config.photos), "collection": COLLECTION,
                   "unrelated": UNRELATED, "distractor_design": config.key(),
                   "threads": "one BLAS/OpenCV/numba thread; queries sequential, inline pool"},
        "seconds": time.perf_counter() - started,
    }
    return result


def print_report(result: dict[str, Any]) -> None:
    stages: tuple[tuple[str, dict[str, Any]], ...] = (("new", result),)
    if "global_only" in result:  # not in a --cold run
        stages += (("first look", result["without_quick_look"]), ("old", result["global_only"]))
    kinds = [k for k in result["r1"] if k != "all"] + ["all"]
    print(f"\n## {result['distractors']} distractors ({result['images']} images)\n")
    print(markdown_table(
        ("kind", *(f"{label} {figure}" for label, _ in stages
                   for figure in ("R@1", "R@5", "verified@1"))),
        [(k, *(percent(stage[figure][k]) for _, stage in stages
               for figure in ("r1", "r5", "verified_at_1")))
         for k in kinds]))
    for label, stage in stages:
        print(f"{label}: candidates p50 {stage['candidate_ms']['p50']:.1f} ms p95 "
              f"{stage['candidate_ms']['p95']:.1f} ms (unrelated "
              f"{stage['unrelated_candidate_ms']['p50']:.1f}); query p50 "
              f"{stage['query_ms']['p50']:.0f} ms, {stage['query_to_kaze']:.2f}x bare KAZE; "
              f"quick look found {stage['quick_look_found']:.1%}; RSS {stage['rss_mb']:.0f} MB; "
              f"start-up {stage['startup_s']:.2f} s; false verified {stage['false_verified']}"
              f"/{stage['unrelated_queries']}")
    after = result["memory"]["after_queries"]
    if "anon_mb" in after:
        limit = result.get("memory_limit_mb")
        print(f"after the queries: private {after['anon_mb']:.0f} MB, mapped files "
              f"{after['file_mb']:.0f} MB; "
              + (f"memory limit {limit:.0f} MB" if limit else "no memory limit"))
    if "first_look_profile" not in result:
        return
    profile = result["first_look_profile"]
    if "error" in profile:
        print(f"first-look profile failed: {profile['error']}")
        return
    print("first look (ms p50): " + ", ".join(
        f"{k} {v['p50']:.2f}" for k, v in profile["ms"].items())
        + f"; postings scanned p50 {profile['postings_scanned']['p50']:.0f}")
    print(f"disk {result['disk_kb_per_image']:.1f} KB/image: {result['disk']['kb_per_image']}")


def parse_arguments(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale --end-to-end", description=__doc__.split("\n")[0])
    parser.add_argument("--distractors", type=int, required=True)
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "scale-end-to-end.json")
    parser.add_argument("--work", type=Path, default=DEFAULT_OUT_DIR / "scale-end-to-end")
    parser.add_argument("--queries-per-kind", type=int, default=20)
    parser.add_argument("--profile-queries", type=int, default=120,
                        help="queries whose first look is timed part by part")
    parser.add_argument("--seed", type=int, default=0, help="bench.quality's seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for the pool's extraction and the base index")
    parser.add_argument("--spread", type=float, default=0.04,
                        help="noise a component of the pool's copies (0: the pool itself)")
    parser.add_argument("--copies", type=int, default=64,
                        help="noisy copies of each pool descriptor")
    parser.add_argument("--keep", action="store_true",
                        help="keep the distractor index (otherwise deleted at the end)")
    parser.add_argument("--cold", action="store_true",
                        help="only the engine's stage, after dropping the index's files from "
                             "the page cache (run it under a memory limit to test one)")
    arguments = parser.parse_args(argv)
    if arguments.distractors < 1 or arguments.queries_per_kind < 1 or arguments.copies < 1:
        parser.error("--distractors, --queries-per-kind and --copies must be positive")
    if arguments.spread < 0:
        parser.error("--spread cannot be negative")
    return Config(photos=arguments.photos, out=arguments.out, work=arguments.work,
                  distractors=arguments.distractors,
                  queries_per_kind=arguments.queries_per_kind, seed=arguments.seed,
                  workers=arguments.workers, keep=arguments.keep,
                  profile_queries=arguments.profile_queries, spread=arguments.spread,
                  copies=arguments.copies, cold=arguments.cold)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_arguments(argv)
    config.work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(config)
    finally:
        if not config.keep:
            shutil.rmtree(config.work / f"index-{config.distractors}", ignore_errors=True)
    write_json(config.out, result)
    print_report(result)
    print(f"\n{result['seconds']:.0f} s; everything in {config.out}")


if __name__ == "__main__":
    main()
