"""Giving freed memory back to the system.

glibc keeps memory freed by Python in its heaps; after a large transient
allocation (a snapshot of a million pending works is ~100 MB of protobuf)
the process would stay that much bigger. `malloc_trim` returns it."""

from __future__ import annotations

import ctypes
import ctypes.util

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
