"""Bytes kept apart by the journal (PostgreSQL), recently written: most
works are handed out soon after they are accepted and most results are read
soon after they are written, so most of those reads need no query. Bounded
in bytes, oldest out first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

CACHE_BYTES = 16 * 1024 * 1024


class RecentBytes:
    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size(self) -> int:
        """Bytes held."""
        return self._bytes

    def put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.max_bytes // 4:
            return  # a few large ones would push out many small ones
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)

    def get(self, key: Hashable) -> bytes | None:
        return self._items.get(key)

    def take(self, key: Hashable) -> bytes | None:
        """Gets and forgets (a payload, once handed out)."""
        data = self._items.pop(key, None)
        if data is not None:
            self._bytes -= len(data)
        return data
