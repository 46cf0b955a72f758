"""Mapped files: the index's arrays and Annoy's trees are read a page at a time, at random."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_ann import loaded, unit_rows, write_generation

from indexer.ann import ANNOY_FILE, GenerationStore
from indexer.mapped import (
    PageCacheWarmer,
    advise_random_reads,
    available_memory,
    cgroup_memory,
    map_array,
)

linux_only = pytest.mark.skipif(
    not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps"
)


def mapping_flags(path: Path) -> list[set[str]]:
    """The VmFlags of each of this process's mappings of ``path``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    flags = []
    for number, line in enumerate(lines):
        if line.endswith(" " + str(path.resolve())):
            following = next(x for x in lines[number + 1 :] if x.startswith("VmFlags:"))
            flags.append(set(following.split()[1:]))
    return flags


@pytest.mark.parametrize("dtype", [np.uint32, np.int64, np.float32])
def test_a_mapped_array_equals_the_saved_one(tmp_path: Path, dtype: type) -> None:
    saved = np.arange(1000).astype(dtype)
    np.save(tmp_path / "a.npy", saved)

    mapped = map_array(tmp_path / "a.npy", random_access=True)

    np.testing.assert_array_equal(mapped, saved)
    assert mapped.dtype == saved.dtype
    assert not mapped.flags.writeable


def test_an_empty_array_maps_to_an_empty_array(tmp_path: Path) -> None:
    np.save(tmp_path / "empty.npy", np.empty(0, np.uint32))
    assert map_array(tmp_path / "empty.npy", random_access=False).shape == (0,)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-4], "truncated"),
        (lambda data: b"not an array at all", "magic"),
    ],
)
def test_a_damaged_file_is_reported_not_mapped(tmp_path: Path, damage, message: str) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.arange(100, dtype=np.uint32))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        map_array(path, random_access=True)


def test_objects_are_not_mapped(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="numbers"):
        map_array(tmp_path / "objects.npy", random_access=False)


@linux_only
def test_random_access_is_advised_only_where_asked(tmp_path: Path) -> None:
    np.save(tmp_path / "random.npy", np.arange(5000, dtype=np.uint32))
    np.save(tmp_path / "swept.npy", np.arange(5000, dtype=np.uint32))

    random = map_array(tmp_path / "random.npy", random_access=True)
    swept = map_array(tmp_path / "swept.npy", random_access=False)

    assert [("rr" in flags) for flags in mapping_flags(tmp_path / "random.npy")] == [True]
    assert [("rr" in flags) for flags in mapping_flags(tmp_path / "swept.npy")] == [False]
    assert random[4999] == swept[4999] == 4999


@linux_only
def test_a_loaded_annoy_generation_is_read_at_random(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    store = GenerationStore(tmp_path)
    write_generation(store, unit_rows(rng.normal(size=(300, 16))))
    generation = loaded(store)

    flags = mapping_flags(generation.path / ANNOY_FILE)

    assert flags  # Annoy maps its file
    assert all("rr" in f for f in flags)
    assert advise_random_reads(tmp_path / "not-mapped.bin") == 0


# -- warming the page cache ---------------------------------------------------------------


def files_of(tmp_path: Path, sizes: list[int]) -> list[Path]:
    paths = []
    for number, size in enumerate(sizes):
        path = tmp_path / f"f{number}.bin"
        path.write_bytes(bytes(size))
        paths.append(path)
    return paths


def test_files_that_fit_are_read_once_in_the_background(tmp_path: Path) -> None:
    paths = files_of(tmp_path, [5 << 20, 1000, 0])
    warmer = PageCacheWarmer([*paths, tmp_path / "merged-away.npy"])

    assert warmer.start()
    warmer.wait()

    assert warmer.bytes_read == (5 << 20) + 1000


def test_files_that_do_not_fit_are_not_read(tmp_path: Path) -> None:
    paths = files_of(tmp_path, [1 << 20])
    room = available_memory()
    assert room is not None
    assert room > 0
    warmer = PageCacheWarmer(paths, share=(1 << 20) / room / 2)  # half the room they need

    assert not warmer.start()
    warmer.stop()
    assert warmer.bytes_read == 0


def test_a_warmer_stopped_before_it_starts_reads_nothing(tmp_path: Path) -> None:
    warmer = PageCacheWarmer(files_of(tmp_path, [1 << 20]))
    warmer.stop()  # a service closed before its index was loaded

    assert not warmer.start()
    assert warmer.bytes_read == 0


@linux_only
def test_the_memory_available_is_the_kernels_or_less() -> None:
    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()
    )
    kernel = int(meminfo["MemAvailable"].split()[0]) * 1024
    room = available_memory()
    assert room is not None
    # Allow for what other processes free or take between the two reads.
    assert 0 <= room <= kernel * 1.1
    limited = cgroup_memory()
    if limited is not None:
        limit, usage = limited
        assert room <= max(limit - usage, 0) * 1.1
