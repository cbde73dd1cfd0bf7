"""Memory of a service process: freed memory given back to the system, and
a garbage collector that does not stall calls.

glibc keeps memory freed by Python in its heaps; after a large transient
allocation (a snapshot of a million pending works is ~100 MB of protobuf)
the process would stay that much bigger. `malloc_trim` returns it.

glibc also gives each thread that allocates its own heap (an arena), up to
eight per core; a service's threads (gRPC's, the journal's, ZooKeeper's)
then scatter short-lived buffers over many heaps, each keeping its freed
pages. Two arenas are enough for a process that allocates mostly under
Python's global lock: a master holding a million pending works measured 443
bytes per work with glibc's default, 400 with two.

CPython's collector stops the process to walk every object of a generation.
With its default thresholds a master taking 800 works/s ran a full
collection about twice a second, 25 ms each (80 ms with 40,000 results
kept): each one a stall of every call in flight. Two changes keep the walks
short and rare: what exists once a service is up (modules, classes, a
recovered state) goes to the permanent generation, which collections skip
(it is still freed by reference counting); and the youngest generation is
collected every 5,000 allocations instead of 700, so that objects of calls in
flight die young instead of being promoted and counted toward a full walk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

MALLOC_ARENAS = 2  # unless MALLOC_ARENA_MAX says otherwise
M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)
YOUNG_COLLECTION_THRESHOLD = 5_000  # allocations between collections of the youngest generation

_libc = None
try:
    _path = ctypes.util.find_library("c")
    if _path:
        _libc = ctypes.CDLL(_path)
        _libc.malloc_trim  # noqa: B018 (glibc only: other C libraries have none)
except (OSError, AttributeError):
    _libc = None


def release_free_memory() -> None:
    if _libc is not None:
        _libc.malloc_trim(0)


def limit_malloc_arenas() -> None:
    """Before the process starts threads (see above); a MALLOC_ARENA_MAX in
    the environment wins."""
    if _libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        _libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def tune_collector() -> None:
    """First thing in a service process."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


def freeze_survivors(collect: bool = True) -> None:
    """Once a service is up: what lives now lives as long as the process (or
    is freed by reference counting), so collections need not walk it again.
    `collect` first frees the start-up's cyclic garbage; a master that just
    recovered a large state skips that walk (its recovery made little)."""
    if collect:
        gc.collect()
    gc.freeze()
