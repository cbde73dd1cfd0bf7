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
from kazoo.exceptions import BadVersionError, NoNodeError

from dworkers.v1 import journal_pb2

log = logging.getLogger(__name__)

# ZooKeeper refuses requests above jute.maxbuffer (1 MB by default): keep
# every batch well below it.
MAX_BATCH_BYTES = 900_000
BATCH_PREFIX = "b-"
SNAPSHOT_PREFIX = "s-"
DELETES_PER_TXN = 200


class JournalError(Exception):
    """An append did not become durable (the writer may have been deposed)."""


class JournalBusy(JournalError):
    """Too many events are waiting to be written: back off."""


class FencedError(JournalError):
    """The writer's election znode is gone: it is no longer the master."""


class Journal(ABC):
    @abstractmethod
    def append(self, batch: journal_pb2.JournalBatch) -> concurrent.futures.Future:
        """Appends one batch, fenced; the future resolves to its position once durable."""

    @abstractmethod
    def read(self, after: int = -1) -> Iterator[tuple[int, journal_pb2.JournalBatch]]:
        """Yields (position, batch) in order for positions above `after`."""

    @abstractmethod
    def write_snapshot(self, position: int, data: bytes) -> None:
        """Stores a snapshot of the state after batch `position` (fenced); once
        this returns, recovery starts from it."""

    @abstractmethod
    def read_snapshot(self) -> tuple[int, bytes] | None:
        """The latest complete snapshot as (position, data), or None."""

    @abstractmethod
    def compact(self) -> int:
        """Deletes the batches and older snapshots the latest snapshot covers
        (fenced); returns how many znodes were deleted."""


def position_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


class ZooKeeperJournal(Journal):
    """Batches are sequential znodes under `path`; snapshots live under
    `path`-snapshots/s-<position> (split into chunk znodes), and the pointer
    znode `path`-snapshots-latest names the latest complete one. A crash
    between any two steps leaves a state that replays: an unfinished snapshot
    is not pointed to, and batches are deleted only after the pointer moved
    past them."""

    def __init__(self, client: KazooClient, path: str, fence_path: str | None = None,
                 read_parallelism: int = 64):
        self.client = client
        self.path = path.rstrip("/")
        self.snapshots = self.path + "-snapshots"
        self.pointer = self.snapshots + "-latest"
        self.fence_path = fence_path
        self.read_parallelism = read_parallelism
        for node in (self.path, self.snapshots, self.pointer):
            client.ensure_path(node)

    # --- fenced writes -----------------------------------------------------

    def _txn(self):
        txn = self.client.transaction()
        if self.fence_path is not None:
            txn.check(self.fence_path, version=0)
        return txn

    def _commit(self, txn, what: str) -> list:
        outcome = txn.commit()
        if any(isinstance(r, Exception) for r in outcome):
            if self.fence_path is not None and isinstance(outcome[0], (NoNodeError, BadVersionError)):
                raise FencedError(f"{what}: election znode is gone: this master was deposed")
            raise JournalError(f"{what} failed: {outcome!r}")
        return outcome

    def append(self, batch: journal_pb2.JournalBatch) -> concurrent.futures.Future:
        data = batch.SerializeToString()
        if len(data) > MAX_BATCH_BYTES + 100_000:
            raise JournalError(f"journal batch of {len(data)} bytes exceeds ZooKeeper's node limit")
        future: concurrent.futures.Future = concurrent.futures.Future()
        txn = self._txn()
        txn.create(f"{self.path}/{BATCH_PREFIX}", data, sequence=True)
        try:
            result = txn.commit_async()
        except Exception as exc:  # e.g. the client is stopped
            future.set_exception(JournalError(str(exc)))
            return future
        result.rawlink(lambda r: _settle(future, r, self.fence_path is not None))
        return future

    def write_snapshot(self, position: int, data: bytes) -> None:
        base = f"{self.snapshots}/{SNAPSHOT_PREFIX}{position:020d}"
        chunks = [data[i:i + MAX_BATCH_BYTES] for i in range(0, len(data), MAX_BATCH_BYTES)] or [b""]
        txn = self._txn()
        txn.create(base, b"")
        self._commit(txn, "snapshot")
        for i, chunk in enumerate(chunks):  # one chunk per request keeps each under the limit
            txn = self._txn()
            txn.create(f"{base}/c-{i:06d}", chunk)
            self._commit(txn, "snapshot chunk")
        txn = self._txn()
        txn.set_data(self.pointer, f"{position}:{len(chunks)}".encode())
        self._commit(txn, "snapshot pointer")

    def compact(self) -> int:
        latest = self._pointer()
        if latest is None:
            return 0
        doomed = [f"{self.path}/{n}" for n in self._batches() if position_of(n) <= latest[0]]
        for name in self.client.get_children(self.snapshots):
            if name.startswith(SNAPSHOT_PREFIX) and position_of(name) != latest[0]:
                base = f"{self.snapshots}/{name}"
                doomed += [f"{base}/{c}" for c in sorted(self.client.get_children(base))] + [base]
        for start in range(0, len(doomed), DELETES_PER_TXN):
            txn = self._txn()
            for path in doomed[start:start + DELETES_PER_TXN]:
                txn.delete(path)
            self._commit(txn, "compaction")
        return len(doomed)

    # --- reads ---------------------------------------------------------------

    def _get_all(self, paths: list[str]) -> Iterator[bytes]:
        # One round trip per znode is the cost: fetch a window at once.
        for start in range(0, len(paths), self.read_parallelism):
            requests = [self.client.get_async(p) for p in paths[start:start + self.read_parallelism]]
            for request in requests:
                yield request.get(timeout=30)[0]

    def _batches(self) -> list[str]:
        return sorted((n for n in self.client.get_children(self.path) if n.startswith(BATCH_PREFIX)),
                      key=position_of)

    def _pointer(self) -> tuple[int, int] | None:
        data, _ = self.client.get(self.pointer)
        if not data:
            return None
        position, chunks = data.decode().split(":")
        return int(position), int(chunks)

    def read(self, after: int = -1) -> Iterator[tuple[int, journal_pb2.JournalBatch]]:
        names = [n for n in self._batches() if position_of(n) > after]
        for name, data in zip(names, self._get_all([f"{self.path}/{n}" for n in names])):
            yield position_of(name), journal_pb2.JournalBatch.FromString(data)

    def read_snapshot(self) -> tuple[int, bytes] | None:
        latest = self._pointer()
        if latest is None:
            return None
        position, count = latest
        base = f"{self.snapshots}/{SNAPSHOT_PREFIX}{position:020d}"
        return position, b"".join(self._get_all([f"{base}/c-{i:06d}" for i in range(count)]))


def _settle(future: concurrent.futures.Future, result, fenced: bool) -> None:
    try:
        outcome = result.get()
    except Exception as exc:
        future.set_exception(JournalError(f"journal append failed: {exc!r}"))
        return
    created = outcome[-1]
    if isinstance(created, str):
        future.set_result(position_of(created))
    elif fenced and isinstance(outcome[0], (NoNodeError, BadVersionError)):
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
                 max_in_flight: int = 2, max_buffered_events: int = 200_000):
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
        self._in_flight_waiters: list[list[asyncio.Future]] = []
        self._last: asyncio.Future | None = None
        self.last_position = -1  # of the newest durable batch
        self.batches_written = 0
        self._pump_scheduled = False
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
        # Write once this loop iteration is over: everything appended by the
        # handlers that run in it goes into the same batch.
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self.loop.call_soon(self._scheduled_pump)
        return waiter

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        self._pump()

    def has_room(self, events: int) -> bool:
        """Whether `events` more can be appended without JournalBusy."""
        return self.failed is None and self.queued + events <= self.max_buffered_events

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

    def cut(self) -> asyncio.Future:
        """Ends the current batch here; the future resolves to the position
        of the batch holding everything appended so far, once durable. A
        snapshot taken now covers the journal up to that position."""
        self._seal()
        if self._last is None or self._last.done() and self.failed is None:
            done = self.loop.create_future()
            done.set_result(self.last_position)
            return done
        return asyncio.shield(self._last)

    def stop(self, exc: Exception) -> None:
        """Stops for good: every waiting caller is failed with `exc`."""
        self._fail(exc, [])

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
        self._in_flight_waiters.append(waiters)
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
        if waiters in self._in_flight_waiters:
            self._in_flight_waiters.remove(waiters)
        exc = f.exception()
        if exc is None and self.failed is not None:
            # An earlier batch failed: this one may have landed after a gap,
            # so nothing in it may be acted on. The master steps down.
            exc = JournalError(f"an earlier journal batch failed: {self.failed}")
        if exc is not None:
            self._fail(exc, waiters)
            return
        if self.on_batch is not None:
            self.on_batch(count, self.loop.time() - started)
        position = f.result()
        self.last_position = max(self.last_position, position)
        self.batches_written += 1
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(position)
        self._pump()

    def _fail(self, exc: Exception, waiters: list[asyncio.Future]) -> None:
        first = self.failed is None
        if first:
            self.failed = exc
        pending = waiters + self._buffer_waiters
        for _events, more in self._sealed:
            pending += more
        for more in self._in_flight_waiters:  # whatever lands after a failure is not vouched for
            pending += more
        self._in_flight_waiters = []
        self._buffer, self._buffer_waiters = [], []
        self._sealed.clear()
        error = exc if isinstance(exc, JournalError) else JournalError(str(exc))
        for waiter in pending:
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # mark retrieved: callers may have gone
        if first:
            self.on_failure(exc)
