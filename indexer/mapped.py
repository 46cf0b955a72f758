"""Files mapped into memory, and advice to the kernel on how they are read.

The index's large files are mapped, not read: pages are loaded on demand,
cached once for every process that serves the index, and dropped by the kernel
under memory pressure. By default a fault also reads the pages around it (128 KB
or more). Posting lists and Annoy's tree nodes are read a few hundred bytes at a
time, at random, over gigabytes: that read-ahead reads 30 or more pages for each
one used, which a cold start pays in disk reads and a process under a memory
limit in page cache evicted for nothing (docs/BENCHMARKS.md, "Within a memory
limit"). ``MADV_RANDOM`` turns it off for a mapping.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

_MAPS = Path("/proc/self/maps")


def map_array(path: Path, *, random_access: bool) -> npt.NDArray[Any]:
    """The array saved in ``path`` by ``np.save``, mapped read-only.

    With ``random_access`` the kernel reads only the pages a fault touches.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not a .npy file this reads, or it is truncated.
    """
    with path.open("rb") as file:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            raise ValueError(f"{path.name}: .npy version {version} is not supported")
        if (fortran_order and len(shape) > 1) or dtype.hasobject:
            raise ValueError(f"{path.name}: not a flat array of numbers")
        offset = file.tell()
        count = math.prod(shape)
        available = os.fstat(file.fileno()).st_size - offset
        if count * dtype.itemsize > available:
            raise ValueError(f"{path.name} is truncated")
        if not count:
            return np.empty(shape, dtype)
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    if random_access:
        mapping.madvise(mmap.MADV_RANDOM)
    # The array keeps the mapping alive; it is closed when the array is collected.
    return np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape)


def advise_random_reads(path: Path) -> int:
    """Tell the kernel that this process reads its mappings of ``path`` at random
    (``MADV_RANDOM``): for a file a library mapped itself, such as Annoy's.

    Returns how many mappings were advised: 0 where the process does not map
    ``path``, or where the system lists no mappings (``/proc/self/maps``, Linux).

    Raises:
        OSError: the kernel refused the advice.
    """
    if not _MAPS.exists():
        return 0
    target = str(path.resolve())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = 0
    for line in _MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)  # the last field, the path, may hold spaces
        if len(fields) < 6 or fields[5] != target:
            continue
        start, end = (int(address, 16) for address in fields[0].split("-"))
        if libc.madvise(start, end - start, mmap.MADV_RANDOM) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"madvise of {path.name}: {os.strerror(error)}")
        advised += 1
    return advised
