"""Mapped files: the index's arrays and Annoy's trees are read a page at a time, at random."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_ann import loaded, unit_rows, write_generation
from test_postings import lists_of, random_images
from test_postings import unit_rows as unit_descriptors

from indexer.ann import ANNOY_FILE, GenerationStore
from indexer.mapped import PageCacheWarmer, advise_random_reads, available_memory, cgroup_memory
from indexer.postings import load_lists, save_lists
from indexer.vocabulary import train_vocabulary

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


@linux_only
def test_postings_are_read_at_random_and_their_words_in_order(tmp_path: Path) -> None:
    vocabulary = train_vocabulary(
        unit_descriptors(np.random.default_rng(1), 2000), half_words=16, trained_on=4
    )
    images = random_images(vocabulary, seed=11, count=40)
    save_lists(lists_of(images), tmp_path)
    loaded = load_lists(tmp_path)

    # "rr": the kernel reads no pages ahead of a fault.
    assert [("rr" in flags) for flags in mapping_flags(tmp_path / "docs.npy")] == [True]
    assert [("rr" in flags) for flags in mapping_flags(tmp_path / "signatures.npy")] == [True]
    assert [("rr" in flags) for flags in mapping_flags(tmp_path / "words.npy")] == [False]
    assert not loaded.docs.flags.writeable


@linux_only
def test_a_loaded_annoy_generation_is_read_at_random(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    store = GenerationStore(tmp_path)
    write_generation(store, unit_rows(rng.normal(size=(300, 16))))
    generation = loaded(store)

    flags = mapping_flags(generation.path / ANNOY_FILE)

    assert flags  # Annoy maps its file
    assert all("rr" in f for f in flags)
    assert advise_random_reads([tmp_path / "not-mapped.bin"]) == 0


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
