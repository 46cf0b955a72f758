"""Files mapped into memory, and advice to the kernel on how they are read.

The index's large files are mapped, not read: pages are loaded on demand,
cached once for every process that serves the index, and dropped by the kernel
under memory pressure. By default a fault also reads the pages around it (128 KB
or more). Posting lists and Annoy's tree nodes are read a few hundred bytes at a
time, at random, over gigabytes: that read-ahead reads 30 or more pages for each
one used, which a cold start pays in disk reads and a process under a memory
limit in page cache evicted for nothing (docs/BENCHMARKS.md, "Within a memory
limit"). ``MADV_RANDOM`` turns it off for a mapping, and where the files fit in
memory, :class:`PageCacheWarmer` reads them once in order after a start instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

_MAPS = Path("/proc/self/maps")


def advise_random_reads(paths: Iterable[Path]) -> int:
    """Tell the kernel that this process reads its mappings of ``paths`` at random
    (``MADV_RANDOM``), whoever mapped them: numpy (``np.load(..., mmap_mode="r")``)
    or a library (Annoy).

    Returns how many mappings were advised: none where the process does not map
    a path, or where the system lists no mappings (``/proc/self/maps``, Linux).

    Raises:
        OSError: the kernel refused the advice.
    """
    targets = {str(path.resolve()) for path in paths}
    if not targets or not _MAPS.exists():
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = 0
    for line in _MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)  # the last field, the path, may hold spaces
        if len(fields) < 6 or fields[5] not in targets:
            continue
        start, end = (int(address, 16) for address in fields[0].split("-"))
        if libc.madvise(start, end - start, mmap.MADV_RANDOM) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"madvise of {fields[5]}: {os.strerror(error)}")
        advised += 1
    return advised


# -- warming the page cache -------------------------------------------------------------

# Warm only when the files take at most this share of the memory still available:
# the rest is for the process, the catalog's pages and everything else on the machine.
WARM_SHARE = 0.5
_WARM_CHUNK = 4 << 20


class PageCacheWarmer:
    """Reads files once, in order, on a background thread, when they fit in memory.

    With ``MADV_RANDOM`` a query faults in only the pages it touches, so after a
    start a million-image index would warm up one 4 KB page at a time over
    hundreds of queries. Where the files fit in the memory available, reading
    them in order takes seconds and leaves every query after it as fast as on a
    warm index; where they do not (a process under a memory limit), reading
    them would only evict pages in use, and nothing is read.
    """

    def __init__(self, paths: Sequence[Path], *, share: float = WARM_SHARE) -> None:
        self.paths = list(paths)
        self.share = share
        self.bytes_read = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start reading if the files fit in ``share`` of the available memory;
        returns whether it started."""
        sizes = sum(path.stat().st_size for path in self.paths if path.exists())
        room = available_memory()
        if self._stop.is_set() or not sizes or room is None or sizes > self.share * room:
            return False
        self._thread = threading.Thread(target=self._read, name="page-cache-warmer", daemon=True)
        self._thread.start()
        return True

    def wait(self) -> None:
        """Wait until every file has been read (or reading was stopped)."""
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        """Stop reading (within one chunk) and wait for the thread; a warmer
        stopped before it starts never starts."""
        self._stop.set()
        self.wait()

    def _read(self) -> None:
        buffer = bytearray(_WARM_CHUNK)
        for path in self.paths:
            try:
                with path.open("rb", buffering=0) as file:
                    while not self._stop.is_set() and (count := file.readinto(buffer)):
                        self.bytes_read += count
            except OSError:
                continue  # a segment merged away meanwhile: nothing left to warm
            if self._stop.is_set():
                return


def available_memory() -> int | None:
    """Bytes this process could still fill: the kernel's MemAvailable, or less where
    its cgroup's memory limit leaves less; None where neither can be read (not Linux)."""
    room: int | None = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room = int(line.split()[1]) * 1024
    limited = cgroup_memory()
    if limited is not None:
        limit, usage = limited
        room = max(limit - usage, 0) if room is None else min(room, max(limit - usage, 0))
    return room


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, usage) in bytes of this process's memory cgroup (v2 ``memory.max``
    and ``memory.current``, v1 ``memory.limit_in_bytes`` and ``memory.usage_in_bytes``),
    or None where it has no limit or none can be read."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":
            folder = Path("/sys/fs/cgroup") / group.lstrip("/")
            names = ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / group.lstrip("/")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            limit, usage = ((folder / name).read_text().strip() for name in names)
        except OSError:
            continue
        if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
            return int(limit), int(usage)
    return None
