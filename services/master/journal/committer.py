"""Group commit: many small appends from the master's event loop become
few large, pipelined, fenced journal writes at consecutive positions."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import deque
from collections.abc import Callable

from dworkers.master.journal.contract import Journal, JournalError
from dworkers.v1 import journal_pb2

MAX_BATCH_BYTES = 1_000_000  # events per batch, by size (a batch is written in parts when large)


class GroupCommitter:
    """Collects events from the event loop into fenced journal batches.

    Every event appended while earlier batches are in flight goes into the
    next batch; up to `max_in_flight` batches are written at once (ZooKeeper
    applies one session's requests in order, so batch order is event order).
    After any failure the committer is dead and `on_failure` is called once:
    the master must step down, since it can no longer vouch for its state.
    """

    def __init__(self, journal: Journal, epoch: int, on_failure: Callable[[Exception], None],
                 on_batch: Callable[[int, float], None] | None = None, after: int = -1,
                 max_in_flight: int = 2, max_buffered_events: int = 200_000,
                 max_buffered_bytes: int = 64 * 1024 * 1024):
        self.journal = journal
        self.epoch = epoch
        self.on_failure = on_failure
        self.on_batch = on_batch  # metrics: (events, seconds)
        self.max_in_flight = max_in_flight
        self.max_buffered_events = max_buffered_events
        self.max_buffered_bytes = max_buffered_bytes
        self.loop = asyncio.get_running_loop()
        self._buffer: list[journal_pb2.Event] = []
        self._buffer_bytes = 0
        self._buffer_waiters: list[asyncio.Future] = []
        # Sealed batches wait here while max_in_flight batches are being written.
        self._sealed: deque[tuple[list, list, int]] = deque()
        self._queued_events = 0  # in the buffer and sealed: not yet handed to the journal
        self._queued_bytes = 0
        self._in_flight = 0
        self._in_flight_waiters: list[list[asyncio.Future]] = []
        self._last: asyncio.Future | None = None
        self.last_position = after  # of the newest durable batch
        self._next_position = after + 1
        self.batches_written = 0
        self.bytes_appended = 0  # of every event ever appended (durable, in flight or queued)
        self._pump_scheduled = False
        self.paused = False
        self.failed: Exception | None = None

    @property
    def queued(self) -> int:
        """Events not yet handed to the journal."""
        return self._queued_events

    def append(self, events: list[journal_pb2.Event]) -> asyncio.Future:
        """Queues events; the returned future resolves when all are durable."""
        if self.failed is not None:
            raise JournalError(f"journal writer stopped: {self.failed}")
        sizes = [event.ByteSize() + 8 for event in events]  # callers check has_room first: the bound is theirs
        waiter = self.loop.create_future()
        for event, size in zip(events, sizes):
            if self._buffer and self._buffer_bytes + size > MAX_BATCH_BYTES:
                self._seal()
            self._buffer.append(event)
            self._buffer_bytes += size
        self._queued_events += len(events)
        self._queued_bytes += sum(sizes)
        self.bytes_appended += sum(sizes)
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

    def has_room(self, events: int, size: int = 0) -> bool:
        """Whether `events` more (of `size` bytes) fit the buffer's bounds."""
        return (self.failed is None and self._queued_events + events <= self.max_buffered_events
                and self._queued_bytes + size <= self.max_buffered_bytes)

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
        self._sealed.append((self._buffer, self._buffer_waiters, self._buffer_bytes))
        self._buffer, self._buffer_waiters, self._buffer_bytes = [], [], 0

    def _pump(self) -> None:
        sealed = self._sealed
        while not self.paused and self.failed is None and self._in_flight < self.max_in_flight:
            if not sealed:
                self._seal()
                if not sealed:
                    return
            events, waiters, size = sealed.popleft()
            self._queued_events -= len(events)
            self._queued_bytes -= size
            self._write(events, waiters)

    def _write(self, events: list[journal_pb2.Event], waiters: list[asyncio.Future]) -> None:
        batch = journal_pb2.JournalBatch(epoch=self.epoch, events=events)
        started = self.loop.time()
        position, self._next_position = self._next_position, self._next_position + 1
        self._in_flight += 1
        self._in_flight_waiters.append(waiters)
        try:
            appended = self.journal.append(position, batch)
        except Exception as exc:
            self._in_flight -= 1
            self._fail(exc, waiters)
            return
        if isinstance(appended, asyncio.Future):  # written on this loop
            appended.add_done_callback(lambda f: self._written(f, len(events), started, waiters))
            return

        def done(f: concurrent.futures.Future) -> None:
            self.loop.call_soon_threadsafe(self._written, f, len(events), started, waiters)

        appended.add_done_callback(done)

    def _written(self, f: concurrent.futures.Future | asyncio.Future, count: int, started: float,
                 waiters: list[asyncio.Future]) -> None:
        self._in_flight -= 1
        if waiters in self._in_flight_waiters:
            self._in_flight_waiters.remove(waiters)
        exc: BaseException | None = f.exception()
        if exc is None and self.failed is not None:
            # An earlier batch failed: this one may have landed after a gap,
            # so nothing in it may be acted on. The master steps down.
            exc = JournalError(f"an earlier journal batch failed: {self.failed}")
        if exc is not None:
            self._fail(exc if isinstance(exc, Exception) else JournalError(repr(exc)), waiters)
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
        for _events, more, _size in self._sealed:
            pending += more
        for more in self._in_flight_waiters:  # whatever lands after a failure is not vouched for
            pending += more
        self._in_flight_waiters = []
        self._buffer, self._buffer_waiters, self._buffer_bytes = [], [], 0
        self._sealed.clear()
        self._queued_events = self._queued_bytes = 0
        error = exc if isinstance(exc, JournalError) else JournalError(str(exc))
        for waiter in pending:
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # mark retrieved: callers may have gone
        if first:
            self.on_failure(exc)
