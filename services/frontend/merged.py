"""Several shards' result streams relayed as one.

A thread per shard reads its stream (the proxy's, which resumes across that
shard's failovers) into one bounded queue; the caller's thread takes from it.
A full queue holds the readers back, so a slow subscriber is felt by the
masters through gRPC's flow control, as with one shard.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator

from dworkers.common.proxy import StreamHandle
from dworkers.v1 import work_pb2

MAX_QUEUED_BATCHES = 4  # each below 2 MiB: what one subscriber holds here, with one per reader
_DONE = object()

Opener = Callable[[StreamHandle], Generator[work_pb2.WatchResultsResponse, None, None]]


class MergedStreams:
    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(MAX_QUEUED_BATCHES)
        self._handles: list[StreamHandle] = []
        self._lock = threading.Lock()
        self._open = 0
        self._closed = False
        self._carry: tuple[int, object] | None = None  # taken by ready() but not sent with its message

    def add(self, shard: int, opener: Opener) -> None:
        handle = StreamHandle()
        with self._lock:
            if self._closed:
                return
            self._handles.append(handle)
            self._open += 1
        threading.Thread(target=self._read, args=(shard, opener, handle), name=f"results-shard-{shard}",
                         daemon=True).start()

    def _put(self, item) -> bool:
        while not self._closed:
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, shard: int, opener: Opener, handle: StreamHandle) -> None:
        results = None
        try:
            results = opener(handle)
            for batch in results:
                if not self._put((shard, batch)):
                    return
            self._put((shard, _DONE))
        except BaseException as error:  # noqa: BLE001 - the subscriber gets it
            self._put((shard, error))
        finally:
            if results is not None:
                results.close()

    def __iter__(self) -> Iterator[tuple[int, work_pb2.WatchResultsResponse]]:
        """(shard, batch) as they come, until every stream ended; the first
        error of any stream ends all of them and is raised."""
        while True:
            with self._lock:
                if self._open == 0 or self._closed:
                    return
            if self._carry is not None:
                (shard, item), self._carry = self._carry, None
            else:
                try:
                    shard, item = self._queue.get(timeout=0.5)
                except queue.Empty:
                    continue  # closed meanwhile? (the caller went away, the server stops)
            if item is _DONE:
                with self._lock:
                    self._open -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield shard, item

    def ready(self, max_bytes: int) -> list[tuple[int, work_pb2.WatchResultsResponse]]:
        """Batches already queued, taken without waiting, of `max_bytes` in
        all at most: sent with the one just taken, in one message."""
        taken: list[tuple[int, work_pb2.WatchResultsResponse]] = []
        size = 0
        while self._carry is None:
            try:
                shard, item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _DONE or isinstance(item, BaseException) or size + item.ByteSize() > max_bytes:
                self._carry = (shard, item)  # read next by the iteration
                break
            taken.append((shard, item))
            size += item.ByteSize()
        return taken

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles = list(self._handles)
        for handle in handles:
            handle.cancel()

    cancel = close  # a StreamHandle ends it as it ends a gRPC stream
