"""The engine's processes keep the memory a query frees (indexer/heap.py).

Each case runs in a fresh interpreter: the allocator's settings are the
process's, and this one imported the engine long ago.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from indexer.heap import keep_freed_memory

# Twenty 4 MB buffers at once, as KAZE's scale space holds, freed and taken again.
_ROUNDS = """
import resource
import numpy as np

def round_trip():
    buffers = [np.ones(1 << 20, dtype=np.float32) for _ in range(20)]
    del buffers

round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(prelude: str, *, switch: str = "1") -> int:
    completed = subprocess.run(
        [sys.executable, "-c", prelude + _ROUNDS],
        env={**os.environ, "INDEXER_KEEP_FREED_MEMORY": switch},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(completed.stdout.split()[-1])


@pytest.mark.skipif(not keep_freed_memory(), reason="the C library is not glibc")
def test_importing_the_engine_keeps_freed_memory_for_reuse() -> None:
    plain = _page_faults("")
    with_engine = _page_faults("import indexer\n")

    # 80 MB freed and taken again five times: tens of thousands of page faults
    # when the allocator gives the memory back each time, next to none when it keeps it.
    assert plain > 10_000
    assert with_engine < plain // 20


@pytest.mark.skipif(not keep_freed_memory(), reason="the C library is not glibc")
def test_the_switch_leaves_the_allocator_as_the_c_library_set_it() -> None:
    plain = _page_faults("")
    switched_off = _page_faults("import indexer\n", switch="0")

    assert switched_off > plain // 2
