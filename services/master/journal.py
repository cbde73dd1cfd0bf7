"""The master's event journal: fenced, group-committed batches in ZooKeeper.

`Journal` is the storage interface (append a batch, read from a position);
`ZooKeeperJournal` stores each batch as one sequential znode, written in one
multi-op that also checks the writer's election znode, so a deposed master
can never append. `GroupCommitter` turns many small appends from the master's
event loop into few large, pipelined writes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import deque
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

from kazoo.client import KazooClient

from dworkers.v1 import journal_pb2

log = logging.getLogger(__name__)

# ZooKeeper refuses requests above jute.maxbuffer (1 MB by default): keep
# every batch well below it.
MAX_BATCH_BYTES = 900_000
BATCH_PREFIX = "b-"


class JournalError(Exception):
    """An append did not become durable (the writer may have been deposed)."""


class JournalBusy(JournalError):
    """Too many events are waiting to be written: back off."""


class FencedError(JournalError):
    """The writer's election znode is gone: it is no longer the master."""


class Journal(ABC):
    @abstractmethod
    def append(self, batch: journal_pb2.JournalBatch) -> concurrent.futures.Future:
        """Appends one batch, fenced; the future resolves once it is durable."""

    @abstractmethod
    def read(self, after: int = -1) -> Iterator[tuple[int, journal_pb2.JournalBatch]]:
        """Yields (position, batch) in order for positions above `after`."""


def position_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


class ZooKeeperJournal(Journal):
    def __init__(self, client: KazooClient, path: str, fence_path: str | None = None,
                 read_parallelism: int = 64):
        self.client = client
        self.path = path.rstrip("/")
        self.fence_path = fence_path
        self.read_parallelism = read_parallelism
        client.ensure_path(self.path)

    def append(self, batch: journal_pb2.JournalBatch) -> concurrent.futures.Future:
        data = batch.SerializeToString()
        if len(data) > MAX_BATCH_BYTES + 100_000:
            raise JournalError(f"journal batch of {len(data)} bytes exceeds ZooKeeper's node limit")
        future: concurrent.futures.Future = concurrent.futures.Future()
        txn = self.client.transaction()
        if self.fence_path is not None:
            txn.check(self.fence_path, version=0)
        txn.create(f"{self.path}/{BATCH_PREFIX}", data, sequence=True)
        try:
            result = txn.commit_async()
        except Exception as exc:  # e.g. the client is stopped
            future.set_exception(JournalError(str(exc)))
            return future
        result.rawlink(lambda r: _settle(future, r, self.fence_path is not None))
        return future

    def read(self, after: int = -1) -> Iterator[tuple[int, journal_pb2.JournalBatch]]:
        names = sorted(
            (n for n in self.client.get_children(self.path) if n.startswith(BATCH_PREFIX)),
            key=position_of,
        )
        names = [n for n in names if position_of(n) > after]
        # Fetch a window of znodes at once: one round trip each is the cost.
        for start in range(0, len(names), self.read_parallelism):
            window = names[start:start + self.read_parallelism]
            requests = [self.client.get_async(f"{self.path}/{n}") for n in window]
            for name, request in zip(window, requests):
                data, _stat = request.get(timeout=30)
                yield position_of(name), journal_pb2.JournalBatch.FromString(data)


def _settle(future: concurrent.futures.Future, result, fenced: bool) -> None:
    try:
        outcome = result.get()
    except Exception as exc:
        future.set_exception(JournalError(f"journal append failed: {exc!r}"))
        return
    created = outcome[-1]
    if isinstance(created, str):
        future.set_result(position_of(created))
    elif fenced and not isinstance(outcome[0], bool):
        future.set_exception(FencedError("election znode is gone: this master was deposed"))
    else:
        future.set_exception(JournalError(f"journal append failed: {outcome!r}"))


class GroupCommitter:
    """Collects events from the event loop into fenced journal batches.

    Every event appended while earlier batches are in flight goes into the
    next batch; up to `max_in_flight` batches are written at once (ZooKeeper
    applies one session's requests in order, so batch order is event order).
    After any failure the committer is dead and `on_failure` is called once:
    the master must step down, since it can no longer vouch for its state.
    """

    def __init__(self, journal: Journal, epoch: int, on_failure: Callable[[Exception], None],
                 on_batch: Callable[[int, float], None] | None = None,
                 max_in_flight: int = 4, max_buffered_events: int = 200_000):
        self.journal = journal
        self.epoch = epoch
        self.on_failure = on_failure
        self.on_batch = on_batch  # metrics: (events, seconds)
        self.max_in_flight = max_in_flight
        self.max_buffered_events = max_buffered_events
        self.loop = asyncio.get_running_loop()
        self._buffer: list[journal_pb2.Event] = []
        self._buffer_bytes = 0
        self._buffer_waiters: list[asyncio.Future] = []
        # Sealed batches wait here while max_in_flight batches are being written.
        self._sealed: deque[tuple[list, list]] = deque()
        self._in_flight = 0
        self._last: asyncio.Future | None = None
        self.paused = False
        self.failed: Exception | None = None

    @property
    def queued(self) -> int:
        """Events not yet handed to the journal."""
        return len(self._buffer) + sum(len(events) for events, _ in self._sealed)

    def append(self, events: list[journal_pb2.Event]) -> asyncio.Future:
        """Queues events; the returned future resolves when all are durable."""
        if self.failed is not None:
            raise JournalError(f"journal writer stopped: {self.failed}")
        if self.queued + len(events) > self.max_buffered_events:
            raise JournalBusy(f"{self.queued} events are waiting for the journal")
        waiter = self.loop.create_future()
        for event in events:
            size = event.ByteSize() + 8
            if self._buffer and self._buffer_bytes + size > MAX_BATCH_BYTES:
                self._seal()
            self._buffer.append(event)
            self._buffer_bytes += size
        self._buffer_waiters.append(waiter)
        self._last = waiter
        self._pump()
        return waiter

    def barrier(self) -> asyncio.Future:
        """A future that resolves when everything appended so far is durable."""
        if self._last is None or self._last.done():
            done = self.loop.create_future()
            if self.failed is not None:
                done.set_exception(JournalError(str(self.failed)))
            else:
                done.set_result(None)
            return done
        return asyncio.shield(self._last)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._pump()

    def _seal(self) -> None:
        if not self._buffer:
            return
        self._sealed.append((self._buffer, self._buffer_waiters))
        self._buffer, self._buffer_waiters, self._buffer_bytes = [], [], 0

    def _pump(self) -> None:
        sealed = self._sealed
        while not self.paused and self.failed is None and self._in_flight < self.max_in_flight:
            if not sealed:
                self._seal()
                if not sealed:
                    return
            events, waiters = sealed.popleft()
            self._write(events, waiters)

    def _write(self, events: list[journal_pb2.Event], waiters: list[asyncio.Future]) -> None:
        batch = journal_pb2.JournalBatch(epoch=self.epoch, events=events)
        started = self.loop.time()
        self._in_flight += 1
        try:
            cfuture = self.journal.append(batch)
        except Exception as exc:
            self._in_flight -= 1
            self._fail(exc, waiters)
            return

        def done(f: concurrent.futures.Future) -> None:
            self.loop.call_soon_threadsafe(self._written, f, len(events), started, waiters)

        cfuture.add_done_callback(done)

    def _written(self, f: concurrent.futures.Future, count: int, started: float,
                 waiters: list[asyncio.Future]) -> None:
        self._in_flight -= 1
        exc = f.exception()
        if exc is not None:
            self._fail(exc, waiters)
            return
        if self.on_batch is not None:
            self.on_batch(count, self.loop.time() - started)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._pump()

    def _fail(self, exc: Exception, waiters: list[asyncio.Future]) -> None:
        first = self.failed is None
        if first:
            self.failed = exc
        pending = waiters + self._buffer_waiters
        for _events, more in self._sealed:
            pending += more
        self._buffer, self._buffer_waiters = [], []
        self._sealed.clear()
        error = exc if isinstance(exc, JournalError) else JournalError(str(exc))
        for waiter in pending:
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # mark retrieved: callers may have gone
        if first:
            self.on_failure(exc)
