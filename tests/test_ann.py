"""Tests of indexer.ann: Annoy generations on disk, their atomic naming and
checksums, Annoy's recall against exact search, and the exact fresh buffer."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from engine_fixtures import copy_of_shared_index

from indexer.ann import (
    ANNOY_FILE,
    CHECKSUM_CHUNK_BYTES,
    CODEBOOK_FILE,
    CURRENT_FILE,
    IDS_FILE,
    MANIFEST_FILE,
    SCOPES_FILE,
    ExactVectors,
    Generation,
    GenerationStore,
)
from indexer.catalog import Catalog
from indexer.encoding import Codebook
from indexer.errors import IndexCorruptError, IndexIncompatibleError
from indexer.search import CATALOG_FILE, GENERATIONS_DIR, REGIONS
from indexer.settings import EngineSettings

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]
DEFAULTS = EngineSettings()
RECALL_AT = 10
MIN_RECALL = 0.95


def unit_rows(rows: npt.NDArray[np.floating]) -> FloatArray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def flat_codebook(dimensions: int) -> Codebook:
    """A codebook whose vectors are ``dimensions`` long (one centroid, no projection)."""
    return Codebook(np.zeros((1, dimensions), np.float32), None, None, trained_on=0)


def clustered_vectors(
    rng: np.random.Generator, count: int, dimensions: int, clusters: int
) -> FloatArray:
    """Unit vectors in clusters that overlap enough for neighbours to be contested."""
    centres = unit_rows(rng.normal(size=(clusters, dimensions)))
    spread = 1.5 / np.sqrt(dimensions)
    members = centres[rng.integers(clusters, size=count)]
    return unit_rows(members + rng.normal(scale=spread, size=(count, dimensions)))


def write_generation(
    store: GenerationStore,
    vectors: FloatArray,
    ids: IdArray | None = None,
    scopes: IdArray | None = None,
    trees: int = DEFAULTS.annoy_build_trees,
) -> str:
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64) if ids is None else ids
    return store.write(
        codebook=flat_codebook(vectors.shape[1]),
        ids=ids,
        scopes=np.zeros(len(ids), np.int64) if scopes is None else scopes,
        vectors=iter(vectors),
        max_image_id=int(ids.max()) if len(ids) else 0,
        trees=trees,
    )


def loaded(store: GenerationStore) -> Generation:
    generation = store.load_current()
    assert generation is not None
    return generation


def recall_against_exact(
    generation: Generation,
    database: FloatArray,
    ids: IdArray,
    queries: FloatArray,
    search_k: int,
) -> float:
    """Mean share of the exact cosine top-k that Annoy's top-k finds."""
    exact = np.argsort(-(queries @ database.T), axis=1)[:, :RECALL_AT]
    found = 0
    for query, best in zip(queries, exact, strict=True):
        approximate = set(generation.search(query, RECALL_AT, search_k).ids.tolist())
        found += len(approximate & set(ids[best].tolist()))
    return found / (RECALL_AT * len(queries))


# --- recall ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered_generation(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Generation, FloatArray, IdArray, FloatArray]:
    rng = np.random.default_rng(20)
    database = clustered_vectors(rng, 20_000, DEFAULTS.dimensions, clusters=200)
    picked = database[rng.choice(len(database), 200, replace=False)]
    queries = unit_rows(picked + rng.normal(scale=0.05, size=picked.shape))
    # Sparse, shuffled-looking catalog ids: results must map back through ids.npy.
    ids = np.arange(len(database), dtype=np.int64) * 3 + 7
    store = GenerationStore(tmp_path_factory.mktemp("clustered") / GENERATIONS_DIR)
    write_generation(store, database, ids)
    return loaded(store), database, ids, queries


def test_annoy_recall_on_clustered_vectors_at_the_default_search_k(
    clustered_generation: tuple[Generation, FloatArray, IdArray, FloatArray],
) -> None:
    generation, database, ids, queries = clustered_generation

    recall = recall_against_exact(generation, database, ids, queries, DEFAULTS.search_k)

    assert recall >= MIN_RECALL


def test_recall_measurement_notices_a_shallow_search(
    clustered_generation: tuple[Generation, FloatArray, IdArray, FloatArray],
) -> None:
    """The control: looking at a few dozen nodes must lose neighbours, or the
    recall test above could not fail."""
    generation, database, ids, queries = clustered_generation

    shallow = recall_against_exact(generation, database, ids, queries, search_k=20)

    assert shallow < MIN_RECALL


async def real_vectors(index: Path) -> FloatArray:
    """Real VLAD vectors of the test photos: each image's whole-picture vector and
    those of its sub-windows and mirrored sub-windows (18 + 18 + 1 per photo)."""
    codebook = loaded(GenerationStore(index / GENERATIONS_DIR)).codebook
    rows = []
    async with await Catalog.open(index / CATALOG_FILE) as catalog:
        async for _, _, features in catalog.iter_features():
            rows.append(codebook.encode(features.descriptors)[None])
            rows.append(codebook.encode_regions(features, REGIONS))
            rows.append(codebook.encode_regions(features.mirrored(), REGIONS))
    return np.concatenate(rows).astype(np.float32)


@pytest.fixture(scope="module")
def test_index(tmp_path_factory: pytest.TempPathFactory, photos_dir: Path) -> Path:
    return copy_of_shared_index(tmp_path_factory, photos_dir, "ann-real")


async def test_annoy_recall_on_the_real_vectors_of_the_test_index(
    test_index: Path, tmp_path: Path
) -> None:
    vectors = await real_vectors(test_index)
    rng = np.random.default_rng(21)
    held_out = np.zeros(len(vectors), dtype=bool)
    held_out[rng.choice(len(vectors), len(vectors) // 5, replace=False)] = True
    database, queries = vectors[~held_out], vectors[held_out]
    ids = np.arange(1, len(database) + 1, dtype=np.int64)
    store = GenerationStore(tmp_path / GENERATIONS_DIR)
    write_generation(store, database, ids)

    recall = recall_against_exact(loaded(store), database, ids, queries, DEFAULTS.search_k)

    assert len(database) > 300
    assert recall >= MIN_RECALL


# --- a generation's contents ----------------------------------------------------------------


def test_a_vector_finds_itself_with_its_catalog_id_and_scope(tmp_path: Path) -> None:
    rng = np.random.default_rng(22)
    vectors = unit_rows(rng.normal(size=(50, 32)))
    ids = np.sort(rng.choice(10_000, 50, replace=False)).astype(np.int64)
    scopes = rng.choice([0, -100123, 555], 50).astype(np.int64)
    store = GenerationStore(tmp_path)
    write_generation(store, vectors, ids, scopes)
    generation = loaded(store)

    for position in (0, 17, 49):
        found = generation.search(vectors[position], 3, DEFAULTS.search_k)
        assert found.ids[0] == ids[position]
        assert found.scopes[0] == scopes[position]
        assert found.similarities[0] == pytest.approx(1.0, abs=1e-4)
        assert list(found.similarities) == sorted(found.similarities, reverse=True)


def test_similarities_are_cosines(tmp_path: Path) -> None:
    rng = np.random.default_rng(23)
    vectors = unit_rows(rng.normal(size=(30, 16)))
    query = unit_rows(rng.normal(size=(1, 16)))[0]
    store = GenerationStore(tmp_path)
    write_generation(store, vectors)

    found = loaded(store).search(query, 30, DEFAULTS.search_k)

    expected = vectors[found.ids - 1] @ query
    np.testing.assert_allclose(found.similarities, expected, atol=1e-4)


def test_the_manifest_describes_the_generation(tmp_path: Path) -> None:
    vectors = unit_rows(np.random.default_rng(24).normal(size=(20, 8)))
    ids = np.arange(20, dtype=np.int64) + 100
    store = GenerationStore(tmp_path)

    name = store.write(
        codebook=flat_codebook(8),
        ids=ids,
        scopes=np.zeros(20, np.int64),
        vectors=iter(vectors),
        max_image_id=140,
        trees=4,
    )
    generation = loaded(store)

    assert generation.name == name == store.current_name()
    assert generation.manifest["items"] == 20
    assert generation.manifest["dimensions"] == 8
    assert generation.manifest["codebook_id"] == flat_codebook(8).id
    assert generation.max_image_id == 140
    assert set(generation.manifest["files"]) == {ANNOY_FILE, IDS_FILE, SCOPES_FILE, CODEBOOK_FILE}
    assert len(generation) == 20


def test_an_empty_generation_finds_nothing(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path)
    write_generation(store, np.empty((0, 8), np.float32))

    generation = loaded(store)

    assert len(generation) == 0
    assert len(generation.search(np.ones(8, np.float32) / np.sqrt(8), 5, 100).ids) == 0


def test_no_current_file_means_no_generation_yet(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path / "never-built")

    assert store.current_name() is None
    assert store.load_current() is None


# --- atomic replacement ------------------------------------------------------------------------


def generation_folders(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def test_a_new_generation_replaces_the_old_one_and_leftovers_are_removed(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(25)
    store = GenerationStore(tmp_path)
    first = write_generation(store, unit_rows(rng.normal(size=(10, 8))))
    # What a build killed half-way two hours ago leaves behind, and what another
    # process's build still in progress looks like.
    abandoned, in_progress = tmp_path / ".building-g0001", tmp_path / ".building-g0002"
    for folder in (abandoned, in_progress):
        folder.mkdir()
        (folder / ANNOY_FILE).write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(abandoned, (two_hours_ago, two_hours_ago))

    second = write_generation(store, unit_rows(rng.normal(size=(12, 8))))
    third = write_generation(store, unit_rows(rng.normal(size=(12, 8))))

    assert len({first, second, third}) == 3
    assert store.current_name() == third
    assert (tmp_path / CURRENT_FILE).read_text(encoding="utf-8").strip() == third
    folders = generation_folders(tmp_path)
    assert ".building-g0001" not in folders
    assert ".building-g0002" in folders
    # The current generation and the one before it (a reader may be opening it).
    assert first not in folders
    assert {second, third} <= set(folders)
    assert len(loaded(store)) == 12


def test_a_generation_read_just_before_a_swap_can_still_be_opened(tmp_path: Path) -> None:
    """Another process (the bot) resolves CURRENT, then opens that generation's
    files. If a build swaps generations in between and deletes the superseded one
    at once, the reader finds its generation gone: it saw neither the old nor the
    new one. The generation CURRENT named a moment ago must survive one swap."""
    rng = np.random.default_rng(26)
    store = GenerationStore(tmp_path)
    write_generation(store, unit_rows(rng.normal(size=(10, 8))))
    resolved_by_reader = store.current_name()

    write_generation(store, unit_rows(rng.normal(size=(10, 8))))

    assert resolved_by_reader is not None
    manifest = tmp_path / resolved_by_reader / MANIFEST_FILE
    assert manifest.exists(), "the generation a reader just resolved was deleted under it"
    for file_name, expected in json.loads(manifest.read_text(encoding="utf-8"))["files"].items():
        assert (tmp_path / resolved_by_reader / file_name).stat().st_size == expected["size"]


# --- damaged generations -----------------------------------------------------------------------


@pytest.fixture
def written_store(tmp_path: Path) -> GenerationStore:
    store = GenerationStore(tmp_path)
    write_generation(store, unit_rows(np.random.default_rng(27).normal(size=(40, 16))))
    return store


def current_folder(store: GenerationStore) -> Path:
    name = store.current_name()
    assert name is not None
    return store.root / name


def flip_one_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file_name", [IDS_FILE, SCOPES_FILE, CODEBOOK_FILE])
def test_an_altered_byte_fails_the_checksum(written_store: GenerationStore, file_name: str) -> None:
    path = current_folder(written_store) / file_name
    flip_one_byte(path, path.stat().st_size - 3)

    with pytest.raises(IndexCorruptError, match="checksum"):
        written_store.load_current()


def test_an_altered_annoy_file_opens_but_is_never_searched(written_store: GenerationStore) -> None:
    path = current_folder(written_store) / ANNOY_FILE
    flip_one_byte(path, path.stat().st_size - 3)

    generation = written_store.load_current()  # the Annoy file is checked when first needed
    assert generation is not None
    vector = np.ones(generation.dimensions, np.float32) / np.sqrt(generation.dimensions)

    assert not generation.check_annoy_file()
    assert len(generation.search(vector, 5, search_k=100).ids) == 0
    assert len(generation.vectors([1, 2, 3])[0]) == 0


def test_stored_vectors_of_an_annoy_file_not_yet_checked_are_never_overflowing(
    written_store: GenerationStore,
) -> None:
    generation = written_store.load_current()
    assert generation is not None
    intact_ids, intact = generation.vectors(list(range(1, 41)))
    # Every float of the file 3.4e38: their squares overflow, as a damaged file's may.
    path = current_folder(written_store) / ANNOY_FILE
    path.write_bytes(b"\x7f" * path.stat().st_size)
    damaged = written_store.load_current()
    assert damaged is not None

    ids, rows = damaged.vectors(list(range(1, 41)))  # read before the check has run

    assert len(intact_ids) == 40
    assert np.allclose(np.linalg.norm(intact, axis=1), 1.0, atol=1e-4)
    assert (len(ids), len(rows)) == (0, 0)


def test_an_intact_annoy_file_is_checked_before_its_first_search(
    written_store: GenerationStore,
) -> None:
    generation = written_store.load_current()
    assert generation is not None
    vector = np.ones(generation.dimensions, np.float32) / np.sqrt(generation.dimensions)

    assert len(generation.search(vector, 5, search_k=100).ids) == 5  # checks, then searches
    assert generation.check_annoy_file()
    trusted = written_store.load_current(verify_checksums=False)
    assert trusted is not None
    flip_one_byte(current_folder(written_store) / ANNOY_FILE, 100)
    assert trusted.check_annoy_file()  # trusted: written by this process, never hashed


@pytest.mark.parametrize("file_name", [ANNOY_FILE, IDS_FILE, SCOPES_FILE, CODEBOOK_FILE])
def test_a_truncated_file_is_corrupt_even_without_checksums(
    written_store: GenerationStore, file_name: str
) -> None:
    path = current_folder(written_store) / file_name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(IndexCorruptError):
        written_store.load_current(verify_checksums=False)


@pytest.mark.parametrize("file_name", [ANNOY_FILE, IDS_FILE, MANIFEST_FILE])
def test_a_missing_file_is_corrupt(written_store: GenerationStore, file_name: str) -> None:
    (current_folder(written_store) / file_name).unlink()

    with pytest.raises(IndexCorruptError):
        written_store.load_current()


def test_a_garbled_manifest_is_corrupt(written_store: GenerationStore) -> None:
    (current_folder(written_store) / MANIFEST_FILE).write_text("{not json", encoding="utf-8")

    with pytest.raises(IndexCorruptError):
        written_store.load_current()


def test_current_naming_a_missing_generation_is_corrupt(written_store: GenerationStore) -> None:
    (written_store.root / CURRENT_FILE).write_text("g00000000000000000001", encoding="utf-8")

    with pytest.raises(IndexCorruptError):
        written_store.load_current()


def test_a_generation_of_another_format_is_incompatible(written_store: GenerationStore) -> None:
    manifest_path = current_folder(written_store) / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["format"] = 99
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")

    with pytest.raises(IndexIncompatibleError):
        written_store.load_current()


def as_format_1(store: GenerationStore) -> None:
    """Rewrite the current manifest as the first format wrote it: one sha256 a file."""
    folder = current_folder(store)
    manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    manifest["format"] = 1
    for file_name, entry in manifest["files"].items():
        del entry["sha256_chunks"]
        entry["sha256"] = hashlib.sha256((folder / file_name).read_bytes()).hexdigest()
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")


def test_a_generation_of_the_first_format_is_still_read(written_store: GenerationStore) -> None:
    as_format_1(written_store)
    assert len(written_store.load_current() or ()) == 40


def test_a_generation_of_the_first_format_is_still_checked(written_store: GenerationStore) -> None:
    as_format_1(written_store)
    flip_one_byte(current_folder(written_store) / ANNOY_FILE, 100)
    generation = written_store.load_current()
    assert generation is not None
    assert not generation.check_annoy_file()

    flip_one_byte(current_folder(written_store) / IDS_FILE, 100)
    with pytest.raises(IndexCorruptError, match="checksum"):
        written_store.load_current()


def test_each_chunk_of_a_file_has_its_own_checksum(written_store: GenerationStore) -> None:
    folder = current_folder(written_store)
    manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    for file_name, entry in manifest["files"].items():
        chunks = -(-entry["size"] // CHECKSUM_CHUNK_BYTES)
        assert len(entry["sha256_chunks"]) == max(chunks, 1), file_name
        first = (folder / file_name).read_bytes()[:CHECKSUM_CHUNK_BYTES]
        assert entry["sha256_chunks"][0] == hashlib.sha256(first).hexdigest()


def test_discarding_the_current_generation_forgets_it(written_store: GenerationStore) -> None:
    written_store.discard_current()
    written_store.discard_current()  # twice is harmless

    assert written_store.load_current() is None


# --- the exact buffer ---------------------------------------------------------------------------


def test_exact_vectors_rank_by_cosine_and_keep_scopes() -> None:
    rng = np.random.default_rng(28)
    vectors = unit_rows(rng.normal(size=(6, 8)))
    fresh = ExactVectors(8)
    for position, vector in enumerate(vectors):
        fresh.add(100 + position, position % 2, vector)
    query = vectors[4]

    found = fresh.search(query, 3)

    expected_order = np.argsort(-(vectors @ query))[:3]
    assert found.ids.tolist() == (100 + expected_order).tolist()
    assert found.scopes.tolist() == (expected_order % 2).tolist()
    assert found.similarities[0] == pytest.approx(1.0, abs=1e-5)
    assert len(fresh) == 6
    assert sorted(fresh.search(query, 10).ids.tolist()) == [100, 101, 102, 103, 104, 105]


def test_exact_vectors_keep_growing_past_their_first_capacity() -> None:
    rng = np.random.default_rng(30)
    vectors = unit_rows(rng.normal(size=(100, 8)))
    fresh = ExactVectors(8)
    for position, vector in enumerate(vectors):
        fresh.add(1000 + position, -position, vector)

    for position in (0, 15, 16, 17, 63, 99):
        found = fresh.search(vectors[position], 1)
        assert (found.ids[0], found.scopes[0]) == (1000 + position, -position)
    assert len(fresh) == 100


def test_a_discarded_vector_is_no_longer_found() -> None:
    vectors = unit_rows(np.random.default_rng(29).normal(size=(4, 8)))
    fresh = ExactVectors(8)
    for position, vector in enumerate(vectors):
        fresh.add(position + 1, 0, vector)
    fresh.search(vectors[0], 4)  # builds the cached matrix that discard must drop

    fresh.discard(1)
    fresh.discard(999)  # unknown ids are ignored

    found = fresh.search(vectors[0], 4)
    assert 1 not in found.ids.tolist()
    assert sorted(found.ids.tolist()) == [2, 3, 4]
    assert len(fresh) == 3
    fresh.add(5, 0, vectors[0])  # adding after a discard still works
    assert fresh.search(vectors[0], 1).ids.tolist() == [5]


def test_an_empty_exact_buffer_finds_nothing() -> None:
    assert len(ExactVectors(8).search(np.ones(8, np.float32), 5).ids) == 0
