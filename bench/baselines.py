"""The two baselines the engine is compared with, and their cached, parallel extraction.

``tutorial``: the widely copied 2018 tutorial "Feature extraction and similar image search
with OpenCV for newbies" (A. Nikishaev, Machine Learning World on Medium, Feb 2018): KAZE
keypoints on the full-resolution RGB image, the 32 strongest by response, their 64-float
descriptors flattened into one 2048-d vector (zero-padded), ranked by cosine distance.

``phash``: ``imagehash.phash`` (64 bits), ranked by Hamming distance.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from bench.common import file_sha256, load_rgb

TUTORIAL_KEYPOINTS = 32
KAZE_DESCRIPTOR_FLOATS = 64
TUTORIAL_VECTOR_SIZE = TUTORIAL_KEYPOINTS * KAZE_DESCRIPTOR_FLOATS
PHASH_BITS = 64

# Where this reproduction differs from the tutorial, and why; copied into the JSON output.
TUTORIAL_DEVIATIONS = (
    "The image is decoded with Pillow's convert('RGB') instead of the removed "
    "scipy.misc.imread(mode='RGB'), which did the same through Pillow. As in the tutorial, "
    "the image is not resized and EXIF orientation is ignored, and the RGB array is handed "
    "to KAZE, which converts it to grey as if it were BGR.",
    "The tutorial crashes (dsc.flatten() on None) or returns None when KAZE finds no "
    "keypoint or raises; here such a photo gets no vector: as a query it is a listed miss, "
    "in the collection it is never returned.",
    "Cosine distance is computed with numpy in float64, the same formula as the tutorial's "
    "scipy.spatial.distance.cdist(..., 'cosine').",
)


class FeatureError(Exception):
    """A baseline could not describe an image."""


def tutorial_vector(path: Path) -> np.ndarray:
    """The tutorial's 2048-d feature vector of the image file at ``path``."""
    import cv2

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    kaze = cv2.KAZE_create()
    try:
        keypoints = kaze.detect(rgb)
        strongest = sorted(keypoints, key=lambda keypoint: -keypoint.response)
        _, descriptors = kaze.compute(rgb, strongest[:TUTORIAL_KEYPOINTS])
    except cv2.error as error:
        raise FeatureError(f"KAZE failed: {error}") from error
    if descriptors is None or descriptors.size == 0:
        raise FeatureError("KAZE found no keypoints")
    vector = np.zeros(TUTORIAL_VECTOR_SIZE, dtype=np.float64)
    flat = descriptors.flatten()[:TUTORIAL_VECTOR_SIZE]
    vector[: flat.size] = flat
    return vector


def phash_vector(path: Path) -> np.ndarray:
    """The 64-bit perceptual hash of the image at ``path``, as 64 booleans."""
    import imagehash

    photo = Image.fromarray(load_rgb(path))
    return np.asarray(imagehash.phash(photo).hash, dtype=bool).reshape(PHASH_BITS)


def cosine_distances(queries: np.ndarray, collection: np.ndarray) -> np.ndarray:
    """The (queries x collection) matrix of cosine distances; NaN where a vector is zero."""
    query_norms = np.linalg.norm(queries, axis=1, keepdims=True)
    collection_norms = np.linalg.norm(collection, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        similarity = (queries @ collection.T) / (query_norms * collection_norms.T)
    return 1.0 - similarity


def hamming_distances(queries: np.ndarray, collection: np.ndarray) -> np.ndarray:
    """The (queries x collection) matrix of differing bits between boolean hash rows."""
    packed_queries = np.packbits(queries, axis=1)
    packed_collection = np.packbits(collection, axis=1)
    differing = np.bitwise_xor(packed_queries[:, None, :], packed_collection[None, :, :])
    return np.bitwise_count(differing).sum(axis=2, dtype=np.int64)


@dataclass(frozen=True)
class Baseline:
    name: str
    # Bump the version when the extraction changes, so that stale cached vectors are ignored.
    version: int
    extract: Callable[[Path], np.ndarray]
    distances: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (queries, collection) matrix
    dtype: type[np.generic]
    size: int


BASELINES: dict[str, Baseline] = {
    "tutorial": Baseline("tutorial", 1, tutorial_vector, cosine_distances, np.float64,
                         TUTORIAL_VECTOR_SIZE),
    "phash": Baseline("phash", 1, phash_vector, hamming_distances, np.bool_, PHASH_BITS),
}


@dataclass
class Extraction:
    """Vectors of a list of images, row by row; a row is only meaningful where ``ok``."""

    vectors: np.ndarray
    ok: np.ndarray
    failures: dict[int, str] = field(default_factory=dict)  # row -> reason


def _worker_init() -> None:
    import cv2

    # One OpenCV thread per process: the pool already keeps every core busy.
    cv2.setNumThreads(1)


def _extract_in_worker(method: str, path: Path) -> np.ndarray:
    return BASELINES[method].extract(path)


def extract_all(method: str, paths: Sequence[Path], cache_dir: Path, workers: int,
                description: str) -> Extraction:
    """Vectors of ``paths`` by ``method``, from the cache where the file's hash is known.

    New vectors are computed in a pool of ``workers`` processes and cached under the hash of
    the file's bytes, so a rerun on the same photos and queries costs only the hashing.
    """
    baseline = BASELINES[method]
    method_cache = cache_dir / f"{baseline.name}-v{baseline.version}"
    method_cache.mkdir(parents=True, exist_ok=True)
    result = Extraction(
        vectors=np.zeros((len(paths), baseline.size), dtype=baseline.dtype),
        ok=np.zeros(len(paths), dtype=bool),
    )
    missing: dict[int, Path] = {}
    for row, path in enumerate(paths):
        cached = method_cache / f"{file_sha256(path)}.npy"
        if cached.is_file():
            result.vectors[row] = np.load(cached)
            result.ok[row] = True
        else:
            missing[row] = cached
    if not missing:
        return result

    context = multiprocessing.get_context("spawn")  # no fork of a process with OpenCV threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                             initializer=_worker_init) as pool:
        futures = {pool.submit(_extract_in_worker, method, paths[row]): row for row in missing}
        for future in tqdm(as_completed(futures), total=len(futures), desc=description,
                           unit="img"):
            row = futures[future]
            try:
                vector = future.result()
            except FeatureError as error:
                result.failures[row] = str(error)
                continue
            result.vectors[row] = vector
            result.ok[row] = True
            np.save(missing[row], vector)
    return result


def target_ranks(distance_matrix: np.ndarray, targets: np.ndarray,
                 usable_collection: np.ndarray) -> np.ndarray:
    """The 0-based rank of each query's target in its row, counting ties against the target.

    A tie is counted as ranked before the target: with 64-bit hashes many photos share a
    distance, and an order among equals would credit the method with luck. Unusable
    collection rows are never ranked; a target that is unusable, or whose distance is not a
    number, gets rank = collection size (a miss at any cut-off).
    """
    query_count, collection_size = distance_matrix.shape
    ranks = np.full(query_count, collection_size, dtype=np.int64)
    for row in range(query_count):
        target = targets[row]
        if not usable_collection[target]:
            continue
        row_distances = distance_matrix[row].astype(np.float64)
        target_distance = row_distances[target]
        if np.isnan(target_distance):
            continue
        at_least_as_close = (row_distances <= target_distance) & usable_collection
        ranks[row] = int(at_least_as_close.sum()) - 1
    return ranks
