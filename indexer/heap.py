"""How the process's allocator keeps the memory a query frees, for the next query.

A query allocates and frees the same large buffers every time: OpenCV's KAZE
scale space (tens of MB for a photo), numpy's temporaries of a MB or more in
the vocabulary's assignment and in verification. glibc's malloc hands such
memory back to the kernel as soon as it is free: a block above its mmap
threshold (128 KB at first, raised with use to 32 MB at most), and free memory
at the top of a heap beyond twice that. So the next query takes every one of
those pages again as a page fault: about 16,000 faults, and more than a quarter
of a query's time, at a million images (docs/BENCHMARKS.md, "Memory a query
frees"). Keeping up to a few hundred MB of freed memory in the process costs
nothing the engine does not use again within the next query.
"""

from __future__ import annotations

import ctypes
import os

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Free memory at the top of a heap is given back only beyond this.
TRIM_THRESHOLD = 256 << 20
# Allocations up to this size come from the heap, where freed memory is kept,
# not from mappings of their own, which are unmapped when freed. glibc accepts
# at most 32 MB on 64-bit systems.
MMAP_THRESHOLD = 32 << 20
# Set to 0, the allocator is left as the C library set it: for a process that
# must give memory back as soon as it is free, and for the benchmark's baseline.
SWITCH = "INDEXER_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Ask the C allocator to keep freed memory for reuse rather than give it back.

    Returns whether the allocator took the advice: ``False`` when the
    environment's ``INDEXER_KEEP_FREED_MEMORY`` is ``0``, or where the C
    library is not glibc (musl, macOS); nothing else changes then.
    """
    if os.environ.get(SWITCH, "1").strip() == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    )
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
