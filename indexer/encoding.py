"""Local descriptors -> one global vector per image (VLAD, PCA-whitened).

The codebook (k-means centroids) and the whitening projection are trained from
the collection itself and saved beside the index; every vector in the index is
tied to the codebook that made it (``Codebook.id``).

VLAD follows Jegou et al. (2010) with the refinements that matter on real
photos: intra-normalisation per centroid (Arandjelovic & Zisserman 2013) against
bursty textures, signed square root, and PCA-whitening with re-normalisation
(Jegou & Chum 2012), which spreads the energy of co-occurring components.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer.errors import IndexCorruptError
from indexer.features import LocalFeatures
from indexer.npz import read_arrays, write_arrays
from indexer.regions import Region

FloatArray = npt.NDArray[np.float32]

# Whitening needs enough images per output dimension to estimate the spectrum;
# below this many training images per dimension we keep the un-projected VLAD,
# which is exact but larger. Small collections are cheap to search either way.
IMAGES_PER_PCA_DIMENSION = 2
# Regularises whitening: tiny eigenvalues would otherwise blow noise up.
WHITENING_EPSILON = 1e-3
KMEANS_ITERATIONS = 20


@dataclass(frozen=True, slots=True)
class Codebook:
    """Centroids plus an optional whitening projection; immutable once trained."""

    centroids: FloatArray  # (k, 64)
    mean: FloatArray | None  # (k*64,) PCA mean, None when not projected
    projection: FloatArray | None  # (k*64, dims) whitening projection
    trained_on: int  # images the projection was trained on

    @property
    def dimensions(self) -> int:
        if self.projection is None:
            return int(self.centroids.size)
        return int(self.projection.shape[1])

    # Hashing 4 MB of projection takes about 9 ms, and every add reads the id.
    _id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        digest = hashlib.blake2b(self.centroids.tobytes(), digest_size=8)
        if self.projection is not None and self.mean is not None:
            digest.update(self.projection.tobytes())
            digest.update(self.mean.tobytes())
        object.__setattr__(self, "_id", digest.hexdigest())

    @property
    def id(self) -> str:
        """A content hash: vectors made by different codebooks never mix."""
        return self._id

    def encode(self, descriptors: FloatArray) -> FloatArray:
        """The global vector of one image (unit length, ``dimensions`` long)."""
        vlad = vlad_vector(descriptors, self.centroids)
        if self.projection is None or self.mean is None:
            return vlad
        return _normalized((vlad - self.mean) @ self.projection)

    def encode_regions(
        self, features: LocalFeatures, regions: Sequence[Region], *, min_keypoints: int = 1
    ) -> FloatArray:
        """Global vectors of sub-windows of one image, one row per region that
        holds at least ``min_keypoints`` keypoints.

        VLAD is a sum over descriptors, so a region's vector only needs the
        descriptors whose keypoints fall inside it: one assignment serves all.
        """
        points = features.points
        masks = np.stack(
            [
                (points[:, 0] >= r.left * features.width)
                & (points[:, 0] < r.right * features.width)
                & (points[:, 1] >= r.top * features.height)
                & (points[:, 1] < r.bottom * features.height)
                for r in regions
            ]
        ).astype(np.float32)
        masks = masks[masks.sum(axis=1) >= min_keypoints]
        if not len(masks):
            return np.empty((0, self.dimensions), dtype=np.float32)
        k = len(self.centroids)
        assignment = _nearest_centroid(features.descriptors, self.centroids)
        one_hot = np.zeros((len(assignment), k), dtype=np.float32)
        one_hot[np.arange(len(assignment)), assignment] = 1.0
        weighted = masks[:, :, None] * one_hot[None]  # (regions, points, centroids)
        sums = np.einsum("rpk,pd->rkd", weighted, features.descriptors, optimize=True)
        counts = masks @ one_hot  # (regions, centroids)
        residuals = sums - counts[:, :, None] * self.centroids[None]
        residuals /= np.maximum(np.linalg.norm(residuals, axis=2, keepdims=True), 1e-12)
        flat = residuals.reshape(len(masks), -1)
        vlads = _normalized_rows(np.sign(flat) * np.sqrt(np.abs(flat)))
        if self.projection is None or self.mean is None:
            return vlads
        return _normalized_rows((vlads - self.mean) @ self.projection)

    def save(self, path: Path) -> None:
        """Write to ``path`` (npz). The caller makes the write atomic."""
        arrays: dict[str, npt.NDArray[np.float32] | npt.NDArray[np.int64]] = {
            "centroids": self.centroids,
            "trained_on": np.array([self.trained_on], dtype=np.int64),
        }
        if self.projection is not None and self.mean is not None:
            arrays["mean"] = self.mean
            arrays["projection"] = self.projection
        write_arrays(path, arrays)

    @classmethod
    def load(cls, path: Path) -> Codebook:
        """Read a codebook written by :meth:`save`.

        Raises:
            IndexCorruptError: the file is missing, truncated or malformed.
        """
        data = read_arrays(path, "codebook")
        try:
            centroids = np.asarray(data["centroids"], dtype=np.float32)
            trained_on = int(data["trained_on"][0])
        except (KeyError, IndexError, ValueError) as error:
            raise IndexCorruptError(f"codebook {path.name} is unreadable: {error}") from error
        mean = np.asarray(data["mean"], dtype=np.float32) if "mean" in data else None
        projection = (
            np.asarray(data["projection"], dtype=np.float32) if "projection" in data else None
        )
        if centroids.ndim != 2 or (projection is not None and projection.ndim != 2):
            raise IndexCorruptError(f"codebook {path.name} has malformed arrays")
        return cls(centroids=centroids, mean=mean, projection=projection, trained_on=trained_on)


def vlad_vector(descriptors: FloatArray, centroids: FloatArray) -> FloatArray:
    """Intra-normalised, power-normalised, L2-normalised VLAD of one image."""
    k = len(centroids)
    assignment = _nearest_centroid(descriptors, centroids)
    # A one-hot product sums descriptors per centroid with BLAS; np.add.at would
    # be ten times slower and hold the GIL throughout.
    one_hot = np.zeros((len(assignment), k), dtype=np.float32)
    one_hot[np.arange(len(assignment)), assignment] = 1.0
    sums = one_hot.T @ descriptors
    counts = one_hot.sum(axis=0)
    residuals = sums - counts[:, None] * centroids
    residuals /= np.maximum(np.linalg.norm(residuals, axis=1, keepdims=True), 1e-12)
    flat = residuals.reshape(-1)
    return _normalized(np.sign(flat) * np.sqrt(np.abs(flat)))


def train_centroids(
    descriptors: FloatArray, *, centroids: int, seed: int = 0
) -> FloatArray:
    """k-means centroids of a sample of local descriptors (the visual vocabulary)."""
    rng = np.random.default_rng(seed)
    return _kmeans(descriptors, min(centroids, len(descriptors)), rng)


def train_codebook(
    centroids: FloatArray, vlads: FloatArray, *, dimensions: int
) -> Codebook:
    """Fit the whitening projection on the raw VLADs of the training images.

    Without enough images to estimate the spectrum the codebook keeps the
    un-projected VLAD (see ``IMAGES_PER_PCA_DIMENSION``).
    """
    images = len(vlads)
    output_dims = min(dimensions, centroids.size)
    if images < IMAGES_PER_PCA_DIMENSION * output_dims:
        return Codebook(centroids, mean=None, projection=None, trained_on=images)
    mean = vlads.mean(axis=0)
    # SVD of the centred data gives the principal axes without forming the
    # (k*64)^2 covariance matrix.
    _, singular_values, axes = np.linalg.svd(vlads - mean, full_matrices=False)
    variances = singular_values[:output_dims] ** 2 / max(images - 1, 1)
    projection = axes[:output_dims].T / np.sqrt(variances + WHITENING_EPSILON * variances[0])
    return Codebook(
        centroids=centroids,
        mean=mean.astype(np.float32),
        projection=projection.astype(np.float32),
        trained_on=images,
    )


def _nearest_centroid(descriptors: FloatArray, centroids: FloatArray) -> npt.NDArray[np.intp]:
    # argmin ||x - c||^2 == argmax (x.c - |c|^2 / 2): one matrix product.
    scores = descriptors @ centroids.T - 0.5 * np.einsum("ij,ij->i", centroids, centroids)
    return np.asarray(np.argmax(scores, axis=1))


def _kmeans(points: FloatArray, k: int, rng: np.random.Generator) -> FloatArray:
    """Lloyd's k-means with k-means++ seeding; empty clusters are re-seeded."""
    centroids = _kmeans_plus_plus(points, k, rng)
    for _ in range(KMEANS_ITERATIONS):
        assignment = _nearest_centroid(points, centroids)
        one_hot = np.zeros((len(points), k), dtype=np.float32)
        one_hot[np.arange(len(points)), assignment] = 1.0
        sums = one_hot.T @ points  # six times faster than np.add.at on 100k points
        counts = np.bincount(assignment, minlength=k)
        empty = counts == 0
        centroids = np.asarray(sums / np.maximum(counts, 1)[:, None], dtype=np.float32)
        if empty.any():
            centroids[empty] = points[rng.choice(len(points), int(empty.sum()), replace=False)]
    return centroids.astype(np.float32)


def _kmeans_plus_plus(points: FloatArray, k: int, rng: np.random.Generator) -> FloatArray:
    # Seeding on a subsample keeps this O(sample * k) while keeping the spread.
    sample = points[rng.choice(len(points), min(len(points), 20_000), replace=False)]
    chosen = [sample[rng.integers(len(sample))]]
    distances = np.sum((sample - chosen[0]) ** 2, axis=1)
    for _ in range(1, k):
        total = float(distances.sum())
        index = (
            int(rng.choice(len(sample), p=distances / total))
            if total > 0
            else int(rng.integers(len(sample)))
        )
        chosen.append(sample[index])
        distances = np.minimum(distances, np.sum((sample - sample[index]) ** 2, axis=1))
    return np.stack(chosen).astype(np.float32)


def _normalized_rows(rows: npt.NDArray[np.floating[Any]]) -> FloatArray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.asarray(rows / np.maximum(norms, 1e-12), dtype=np.float32)


def _normalized(vector: npt.NDArray[np.floating[Any]]) -> FloatArray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)
