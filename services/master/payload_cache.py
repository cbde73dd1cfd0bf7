"""Payloads of recently accepted works, for a journal that keeps payloads
apart (PostgreSQL): most works are handed out soon after they are accepted,
so most hand-outs need no query. Bounded in bytes, oldest out first; a
payload leaves when its work is handed out (a retry reads it back)."""

from __future__ import annotations

from collections import OrderedDict

CACHE_BYTES = 16 * 1024 * 1024


class PayloadCache:
    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size(self) -> int:
        """Bytes held."""
        return self._bytes

    def put(self, work_id: str, payload: bytes) -> None:
        if len(payload) > self.max_bytes // 4:
            return  # a few large payloads would push out many small ones
        old = self._items.pop(work_id, None)
        if old is not None:
            self._bytes -= len(old)
        self._items[work_id] = payload
        self._bytes += len(payload)
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)

    def take(self, work_id: str) -> bytes | None:
        payload = self._items.pop(work_id, None)
        if payload is not None:
            self._bytes -= len(payload)
        return payload
