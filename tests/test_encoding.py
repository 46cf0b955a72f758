"""Tests of indexer.encoding: k-means, VLAD, whitening, regional vectors and
codebook files."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from indexer.encoding import (
    IMAGES_PER_PCA_DIMENSION,
    Codebook,
    train_centroids,
    train_codebook,
    vlad_vector,
)
from indexer.errors import IndexCorruptError
from indexer.features import DESCRIPTOR_SIZE, LocalFeatures
from indexer.regions import Region, region_grid

FloatArray = npt.NDArray[np.float32]


def unit_rows(rows: npt.NDArray[np.floating]) -> FloatArray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered_descriptors(
    rng: np.random.Generator, clusters: int, per_cluster: int, spread: float = 0.05
) -> tuple[FloatArray, FloatArray]:
    """Unit descriptors around ``clusters`` random unit centres: (descriptors, centres)."""
    centres = unit_rows(rng.normal(size=(clusters, DESCRIPTOR_SIZE)))
    noise = rng.normal(scale=spread, size=(clusters, per_cluster, DESCRIPTOR_SIZE))
    points = unit_rows((centres[:, None, :] + noise).reshape(-1, DESCRIPTOR_SIZE))
    return points, centres


def random_features(rng: np.random.Generator, count: int = 300) -> LocalFeatures:
    return LocalFeatures(
        points=rng.uniform(0, [640, 480], size=(count, 2)).astype(np.float32),
        descriptors=unit_rows(rng.normal(size=(count, DESCRIPTOR_SIZE))),
        width=640,
        height=480,
    )


@pytest.fixture(scope="module")
def centroids() -> FloatArray:
    descriptors, _ = clustered_descriptors(np.random.default_rng(1), clusters=8, per_cluster=50)
    return train_centroids(descriptors, centroids=8)


@pytest.fixture(scope="module")
def projected_codebook(centroids: FloatArray) -> Codebook:
    """A codebook with whitening: enough images for 16 output dimensions."""
    rng = np.random.default_rng(2)
    images = IMAGES_PER_PCA_DIMENSION * 16 + 8
    vlads = np.stack(
        [vlad_vector(random_features(rng, 120).descriptors, centroids) for _ in range(images)]
    )
    return train_codebook(centroids, vlads, dimensions=16)


# --- k-means ------------------------------------------------------------------------------


def test_kmeans_finds_every_cluster() -> None:
    rng = np.random.default_rng(3)
    descriptors, centres = clustered_descriptors(rng, clusters=6, per_cluster=60, spread=0.01)

    found = train_centroids(descriptors[rng.permutation(len(descriptors))], centroids=6)

    assert found.shape == (6, DESCRIPTOR_SIZE)
    assert found.dtype == np.float32
    # Each true centre has its own centroid next to it (the clusters are ~1.4
    # apart, each ~0.1 wide).
    distances = np.linalg.norm(centres[:, None, :] - found[None], axis=2)
    assert distances.min(axis=1).max() < 0.05
    assert len(set(distances.argmin(axis=1).tolist())) == 6


def test_kmeans_is_reproducible() -> None:
    descriptors, _ = clustered_descriptors(np.random.default_rng(4), clusters=5, per_cluster=30)

    first = train_centroids(descriptors, centroids=5, seed=9)
    second = train_centroids(descriptors, centroids=5, seed=9)

    np.testing.assert_array_equal(first, second)


def test_kmeans_asks_no_more_centroids_than_descriptors() -> None:
    few = unit_rows(np.random.default_rng(5).normal(size=(6, DESCRIPTOR_SIZE)))

    assert train_centroids(few, centroids=64).shape == (6, DESCRIPTOR_SIZE)


# --- VLAD ---------------------------------------------------------------------------------------


def test_vlad_is_a_unit_vector_of_one_block_per_centroid(centroids: FloatArray) -> None:
    features = random_features(np.random.default_rng(6))

    vector = vlad_vector(features.descriptors, centroids)

    assert vector.shape == (centroids.size,)
    assert vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_vlad_ignores_the_order_of_descriptors(centroids: FloatArray) -> None:
    descriptors = random_features(np.random.default_rng(7)).descriptors
    shuffled = descriptors[np.random.default_rng(8).permutation(len(descriptors))]

    np.testing.assert_allclose(
        vlad_vector(descriptors, centroids), vlad_vector(shuffled, centroids), atol=1e-6
    )


def picture_descriptors(
    rng: np.random.Generator, centroids: FloatArray, offsets: FloatArray, per_centroid: int
) -> FloatArray:
    """Descriptors of a synthetic picture: around each visual word, shifted the
    picture's own way (``offsets``, one row per centroid), plus a little noise."""
    around = centroids[:, None, :] + offsets[:, None, :]
    noise = rng.normal(scale=0.02, size=(len(centroids), per_centroid, DESCRIPTOR_SIZE))
    return unit_rows((around + noise).reshape(-1, DESCRIPTOR_SIZE))


def test_vlad_of_the_same_picture_is_closer_than_of_another(centroids: FloatArray) -> None:
    rng = np.random.default_rng(9)
    own_offsets = rng.normal(scale=0.04, size=centroids.shape)
    other_offsets = rng.normal(scale=0.04, size=centroids.shape)
    picture = picture_descriptors(rng, centroids, own_offsets, per_centroid=30)
    # The same picture seen again: other noise, and a third fewer keypoints.
    again = picture_descriptors(rng, centroids, own_offsets, per_centroid=20)
    another = picture_descriptors(rng, centroids, other_offsets, per_centroid=30)

    reference = vlad_vector(picture, centroids)

    assert float(reference @ vlad_vector(again, centroids)) > 0.8
    assert float(reference @ vlad_vector(another, centroids)) < 0.3


def test_a_burst_of_repeated_descriptors_does_not_dominate(centroids: FloatArray) -> None:
    """Intra-normalisation: a texture repeating one descriptor 500 times weighs as
    much as one block, so the rest of the picture still decides the vector."""
    rng = np.random.default_rng(10)
    picture = random_features(rng).descriptors
    burst = np.repeat(unit_rows(rng.normal(size=(1, DESCRIPTOR_SIZE))), 500, axis=0)

    plain = vlad_vector(picture, centroids)
    with_burst = vlad_vector(np.concatenate([picture, burst]), centroids)

    assert float(plain @ with_burst) > 0.75


# --- whitening ---------------------------------------------------------------------------------


def test_too_few_images_keep_the_unprojected_vlad(centroids: FloatArray) -> None:
    rng = np.random.default_rng(11)
    images = IMAGES_PER_PCA_DIMENSION * 16 - 1
    vlads = np.stack(
        [vlad_vector(random_features(rng, 80).descriptors, centroids) for _ in range(images)]
    )
    features = random_features(rng)

    codebook = train_codebook(centroids, vlads, dimensions=16)

    assert codebook.projection is None
    assert codebook.mean is None
    assert codebook.dimensions == centroids.size
    assert codebook.trained_on == images
    np.testing.assert_allclose(
        codebook.encode(features.descriptors), vlad_vector(features.descriptors, centroids)
    )


def test_enough_images_project_to_the_asked_dimensions(projected_codebook: Codebook) -> None:
    features = random_features(np.random.default_rng(12))

    vector = projected_codebook.encode(features.descriptors)

    assert projected_codebook.dimensions == 16
    assert vector.shape == (16,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_whitening_decorrelates_the_training_vectors(centroids: FloatArray) -> None:
    rng = np.random.default_rng(13)
    vlads = np.stack(
        [vlad_vector(random_features(rng, 100).descriptors, centroids) for _ in range(120)]
    )

    codebook = train_codebook(centroids, vlads, dimensions=8)

    assert codebook.mean is not None
    assert codebook.projection is not None
    whitened = (vlads - codebook.mean) @ codebook.projection
    covariance = np.cov(whitened, rowvar=False)
    # Unit variance along each kept axis (less the regularisation), no correlation.
    assert np.diag(covariance) == pytest.approx(np.ones(8), abs=0.05)
    off_diagonal = covariance - np.diag(np.diag(covariance))
    assert np.abs(off_diagonal).max() < 1e-3


# --- regional vectors ------------------------------------------------------------------------


@pytest.mark.parametrize("whitened", [False, True], ids=["unprojected", "projected"])
def test_a_region_covering_the_whole_image_encodes_like_the_image(
    centroids: FloatArray, projected_codebook: Codebook, whitened: bool
) -> None:
    codebook = projected_codebook if whitened else Codebook(centroids, None, None, trained_on=1)
    features = random_features(np.random.default_rng(14))

    [regional] = codebook.encode_regions(features, [Region(0.0, 0.0, 1.0, 1.0)])

    np.testing.assert_allclose(regional, codebook.encode(features.descriptors), atol=1e-5)


def test_a_region_encodes_only_the_keypoints_inside_it(centroids: FloatArray) -> None:
    codebook = Codebook(centroids, None, None, trained_on=1)
    features = random_features(np.random.default_rng(15))
    left_half = Region(0.0, 0.0, 0.5, 1.0)
    inside = features.points[:, 0] < 0.5 * features.width

    [regional] = codebook.encode_regions(features, [left_half])

    np.testing.assert_allclose(
        regional, codebook.encode(features.descriptors[inside]), atol=1e-5
    )


def test_the_region_grid_has_nine_windows_per_scale_inside_the_picture() -> None:
    regions = region_grid((0.5, 0.7))

    assert len(regions) == 18
    assert len(set(regions)) == 18
    for region in regions:
        assert 0.0 <= region.left < region.right <= 1.0 + 1e-9
        assert 0.0 <= region.top < region.bottom <= 1.0 + 1e-9


# --- codebook files ----------------------------------------------------------------------------


@pytest.mark.parametrize("whitened", [False, True], ids=["unprojected", "projected"])
def test_a_saved_codebook_loads_back_identical(
    tmp_path: Path, centroids: FloatArray, projected_codebook: Codebook, whitened: bool
) -> None:
    codebook = projected_codebook if whitened else Codebook(centroids, None, None, trained_on=5)
    path = tmp_path / "codebook.npz"

    codebook.save(path)
    loaded = Codebook.load(path)

    assert loaded.id == codebook.id
    assert loaded.trained_on == codebook.trained_on
    assert loaded.dimensions == codebook.dimensions
    features = random_features(np.random.default_rng(16))
    np.testing.assert_array_equal(
        loaded.encode(features.descriptors), codebook.encode(features.descriptors)
    )


def test_codebook_ids_tell_codebooks_apart(
    centroids: FloatArray, projected_codebook: Codebook
) -> None:
    unprojected = Codebook(centroids, None, None, trained_on=1)
    moved = Codebook(centroids + np.float32(1e-3), None, None, trained_on=1)

    assert len({unprojected.id, moved.id, projected_codebook.id}) == 3
    assert Codebook(centroids.copy(), None, None, trained_on=99).id == unprojected.id


def load_outcome(path: Path) -> tuple[str, list[str]]:
    """Load a codebook; return what happened and the files it left open.

    Anything raised is turned into text here, so that its traceback (which would
    keep a leaked file object alive) is gone before the garbage collector runs:
    a leak then shows up as a ResourceWarning in this test, not in a later one.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            Codebook.load(path)
        except IndexCorruptError as error:
            outcome = type(error).__name__
        except Exception as error:  # any other type is the finding to report
            outcome = f"{type(error).__name__}: {error}"
        else:
            outcome = "loaded"
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    return outcome, leaks


@pytest.mark.parametrize(
    "damage",
    ["truncated", "garbage", "empty", "missing", "wrong_arrays"],
)
def test_a_damaged_codebook_file_is_reported_as_corrupt(
    tmp_path: Path, projected_codebook: Codebook, damage: str
) -> None:
    path = tmp_path / "codebook.npz"
    projected_codebook.save(path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(17).bytes(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing":
        path.unlink()
    else:
        np.savez(path, something_else=np.zeros(3))

    outcome, leaked_files = load_outcome(path)

    assert outcome == "IndexCorruptError"
    assert leaked_files == []
