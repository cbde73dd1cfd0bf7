"""The active master's logic: one asyncio loop owns WorkState and the worker
registry; every change is an event queued for the journal and applied at
once, and every visible action (ack, hand-out, published result) waits until
its event is durable.

If a journal write fails, the master can no longer vouch for its state: it
stops acting (`closed`) and the node steps down and recovers afresh.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from dworkers.v1 import journal_pb2, master_pb2, work_pb2
from services.master.journal import FencedError, GroupCommitter, Journal, JournalError
from services.common.validation import MAX_ERROR_CHARS, MAX_RESULT_BYTES
from services.master.state import WorkState
from services.master.workers import Slot, WorkerRegistry

log = logging.getLogger(__name__)

RESULTS_PER_MESSAGE = 500
CONNECTION_LOST_ERROR = "worker connection lost"


class NotServing(Exception):
    """This master cannot act now (stepped down, paused or overloaded)."""


class Overloaded(Exception):
    """Too much pending work: the client should back off."""


class Forgotten(Exception):
    """The results asked for fell out of the retention window."""


class Conflict(Exception):
    """A known work id was submitted again with a different job."""


@dataclass(frozen=True)
class CoreSettings:
    work_timeout: float = 30.0  # default per attempt
    worker_timeout: float = 15.0  # a slot silent this long is dropped
    max_pending: int = 1_000_000
    snapshot_every: int = 50_000  # events between snapshots
    snapshot_interval: float = 60.0  # seconds between snapshots (if anything changed)
    snapshot_batches: int = 1_000  # journal batches between snapshots: replay time grows with them
    retention_count: int = 100_000  # finished results kept (the deduplication window)...
    retention_seconds: float = 3600.0  # ...and for at least this long, unless over the count


def recover_state(journal: Journal) -> tuple[WorkState, int, int]:
    """Rebuilds WorkState from the latest snapshot and the batches after it.
    Returns the state, the last position it covers and the events replayed."""
    state, position, count = WorkState(), -1, 0
    snapshot = journal.read_snapshot()
    if snapshot is not None:
        position, data = snapshot
        state = WorkState.from_snapshot(journal_pb2.Snapshot.FromString(data))
    for position, batch in journal.read(after=position):
        for event in batch.events:
            state.apply(event)
            count += 1
    return state, position, count


class MasterCore:
    def __init__(self, journal: Journal, epoch: int, settings: CoreSettings,
                 on_failure: Callable[[Exception], None], metrics=None):
        self.journal = journal
        self.epoch = epoch
        self.settings = settings
        self.metrics = metrics
        self.state = WorkState()
        self.registry = WorkerRegistry()
        self.durable_sequence = 0
        self.node = ""  # the election znode that fences this master's writes
        self.closed: str | None = None  # why it stopped acting
        self._on_failure = on_failure
        self._results_ready = asyncio.Event()
        self.committer: GroupCommitter | None = None
        self._ticker: asyncio.Task | None = None
        self._finished_at: deque[tuple[int, float]] = deque()  # (sequence, when) for retention by age
        self._waiting: OrderedDict[str, None] = OrderedDict()  # idle slots holding a request (credit)
        self._events_since_snapshot = 0
        self._batches_at_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._snapshotting = False

    # --- life --------------------------------------------------------------

    async def recover(self) -> None:
        """Replays the journal, then resets work in progress (durably)."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        self.state, position, count = await loop.run_in_executor(None, recover_state, self.journal)
        self.durable_sequence = self.state.last_sequence
        now = time.monotonic()
        self._finished_at.extend((s, now) for s in self.state.results)  # ages restart at recovery
        self.committer = GroupCommitter(self.journal, self.epoch, self._journal_failed,
                                        on_batch=self.metrics and self.metrics.journal_batch)
        self.committer.last_position = position
        if self.state.in_progress:
            await self._record([journal_pb2.Event(work_in_progress_reset=journal_pb2.WorkInProgressReset())])
        self._ticker = asyncio.create_task(self._tick_forever())
        log.info("recovered %d events in %.3f s: %d pending, %d results", count,
                 time.monotonic() - started, len(self.state.pending), self.state.last_sequence,
                 extra={"epoch": self.epoch})
        if self.metrics:
            self.metrics.recovered(time.monotonic() - started)

    def close(self, reason: str) -> None:
        if self.closed is not None:
            return
        self.closed = reason
        if self._ticker is not None:
            self._ticker.cancel()
        if self.committer is not None and self.committer.failed is None:
            self.committer.on_failure = lambda _exc: None  # stepping down already
            self.committer.stop(JournalError(f"master stopped: {reason}"))
        self._wake_results()
        for slot in list(self.registry.slots.values()):
            slot.connection.close(reason)

    def _journal_failed(self, exc: Exception) -> None:
        log.error("journal append failed, stepping down: %s", exc, extra={"epoch": self.epoch})
        self.close(f"journal append failed: {exc}")
        self._on_failure(exc)

    def pause(self) -> None:
        if self.committer is not None:
            self.committer.pause()

    def resume(self) -> None:
        if self.committer is not None and self.closed is None:
            self.committer.resume()
            self._announce_work()  # requests that arrived while paused

    def check_serving(self) -> None:
        if self.closed is not None:
            raise NotServing(self.closed)
        if self.committer is None:
            raise NotServing("recovering")
        if self.committer.paused:
            raise NotServing("lost contact with ZooKeeper; waiting to learn whether it is still master")

    # --- persist, then act -------------------------------------------------

    def _record(self, events: list[journal_pb2.Event]) -> asyncio.Future:
        """Queues events for the journal and applies them; the future says
        when they are durable. Results they finish are published then."""
        durable = self.committer.append(events)  # raises before any change when it refuses
        self._events_since_snapshot += len(events)
        last = 0
        for event in events:
            result = self.state.apply(event)
            if result is not None:
                last = result.sequence
                self._finished_at.append((last, time.monotonic()))
                if self.metrics:
                    self.metrics.finished(result.state)
        if last:
            durable.add_done_callback(lambda f: f.cancelled() or f.exception() or self._publish(last))
        return durable

    async def _durable(self, future: asyncio.Future) -> None:
        try:
            await future
        except JournalError as exc:
            raise NotServing(str(exc)) from None

    def _publish(self, sequence: int) -> None:
        if sequence > self.durable_sequence:
            self.durable_sequence = sequence
            self._wake_results()

    def _wake_results(self) -> None:
        self._results_ready.set()
        self._results_ready = asyncio.Event()

    # --- frontend operations ----------------------------------------------

    async def submit(self, works: list[work_pb2.Work]) -> list[bool]:
        """Accepts works durably; returns, for each, whether it was a duplicate."""
        self.check_serving()
        duplicates, events = [], []
        for work in works:
            if self.state.conflicts(work):
                raise Conflict(f"work_id {work.work_id!r} was already accepted with a different kind or payload")
            known = self.state.is_known(work.work_id)
            duplicates.append(known)
            if not known:
                events.append(journal_pb2.Event(work_accepted=journal_pb2.WorkAccepted(work=work)))
        if len(self.state.pending) + len(events) > self.settings.max_pending:
            raise Overloaded(f"{len(self.state.pending)} works are pending (limit {self.settings.max_pending}); retry later")
        if events:
            try:
                durable = self._record(events)
            except JournalError as exc:
                raise Overloaded(str(exc)) from None
            # Starts go into the same journal batch; the hand-out still waits for it.
            self._dispatch()
            await self._durable(durable)
            if self.metrics:
                self.metrics.accepted(len(events))
            if log.isEnabledFor(logging.DEBUG):  # per-work lines only when asked for
                for e in events:
                    log.debug("accepted work", extra={"work_id": e.work_accepted.work.work_id, "epoch": self.epoch})
            self._announce_work()
        else:
            await self._durable(self.committer.barrier())  # an earlier accept may be in flight
        return duplicates

    async def status(self, work_id: str) -> work_pb2.WorkStatus | None:
        self.check_serving()
        await self._durable(self.committer.barrier())
        return self.state.status(work_id)

    async def results(self, after: int):
        """Yields batches of durable results after `after`, forever."""
        cursor = after
        while True:
            if self.closed is not None:
                raise NotServing(self.closed)
            if cursor and cursor < self.state.forgotten_up_to:
                raise Forgotten(f"results up to sequence {self.state.forgotten_up_to} left the retention "
                                f"window; resume after it (asked for after {cursor})")
            if cursor < self.durable_sequence:
                first = max(cursor, self.state.forgotten_up_to)
                limit = min(self.durable_sequence - first, RESULTS_PER_MESSAGE)
                batch = self.state.results_after(cursor, limit)
                cursor = batch[-1].sequence if batch else self.durable_sequence
                if batch:
                    yield batch
                continue
            await self._results_ready.wait()

    # --- the worker protocol ----------------------------------------------

    def register(self, connection, message: master_pb2.RegisterWorker) -> None:
        known = len(self.registry)
        self.registry.register(connection, message.worker_ids, message.host, time.monotonic())
        if len(self.registry) > known and self.state.pending and self.committer is not None:
            self._announce_work()  # a new (or re-admitted) idle slot: tell it work is ready

    def request_work(self, connection, worker_ids) -> None:
        """Records the credit of idle slots that ask for work, and serves them
        from the head of the queue; a slot left without work keeps its credit."""
        if self.closed is not None or self.committer is None:
            return
        now = time.monotonic()
        for worker_id in worker_ids:
            slot = self.registry.get(worker_id)
            if slot is None or slot.connection is not connection:
                continue  # not registered (yet): it registers and asks again
            slot.last_seen = now
            if not slot.busy:
                self._waiting[worker_id] = None
        self._dispatch()

    def _dispatch(self) -> None:
        """Hands pending work to waiting slots, oldest request first. The hand-out
        waits until WorkStarted is durable."""
        if not self._waiting or not self.state.pending or self.committer.paused or self.closed is not None:
            return
        if not self.committer.has_room(len(self._waiting)):
            return  # the journal is backed up: hand out later (the tick announces again)
        now = time.monotonic()
        by_connection: dict = {}
        events = []
        pending = iter(list(itertools.islice(self.state.pending, len(self._waiting))))
        while self._waiting:
            work_id = next(pending, None)
            if work_id is None:
                break
            worker_id, _ = self._waiting.popitem(last=False)
            slot = self.registry.get(worker_id)
            if slot is None or slot.busy:
                pending = itertools.chain([work_id], pending)
                continue
            work = self.state.pending[work_id].work
            timeout = work.timeout_seconds or self.settings.work_timeout
            self.registry.start(slot, work_id, now + timeout)
            events.append(journal_pb2.Event(work_started=journal_pb2.WorkStarted(work_id=work_id, worker_id=worker_id)))
            by_connection.setdefault(slot.connection, []).append((worker_id, work, timeout))
        if not events:
            return
        durable = self._record(events)
        if self.metrics:
            self.metrics.started(len(events))
        for connection, assigned in by_connection.items():
            works = master_pb2.MasterMessage(epoch=self.epoch, works=master_pb2.Works(assignments=[
                master_pb2.Assignment(worker_id=worker_id, work=work, timeout_seconds=timeout,
                                      attempt=self.state.in_progress[work.work_id].attempts)
                for worker_id, work, timeout in assigned
            ]))
            durable.add_done_callback(
                lambda f, c=connection, m=works: f.cancelled() or f.exception() or self._hand_out(c, m))

    def _hand_out(self, connection, works: master_pb2.MasterMessage) -> None:
        connection.send(works)
        if log.isEnabledFor(logging.DEBUG):
            for a in works.works.assignments:
                log.debug("given to worker", extra={"work_id": a.work.work_id, "worker_id": a.worker_id})

    def work_done(self, connection, completions) -> None:
        events, acks, seen = [], [], set()
        for c in completions:
            slot = self.registry.get(c.worker_id)
            if slot is not None and slot.work_id == c.work_id and self._current(c):
                self.registry.finish(slot)
            acks.append(c.work_id)
            if c.work_id in seen or c.work_id in self.state.finished or not self.state.is_known(c.work_id):
                continue  # done already (the ack was lost), or forgotten: ack again
            seen.add(c.work_id)
            if len(c.result) > MAX_RESULT_BYTES:  # it could not be journaled: the attempt fails
                entry = self.state.in_progress.get(c.work_id)
                if entry is not None and entry.worker_id == c.worker_id:
                    events.append(journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(
                        work_id=c.work_id, error=f"result of {len(c.result)} bytes exceeds the limit")))
                continue
            events.append(journal_pb2.Event(work_completed=journal_pb2.WorkCompleted(work_id=c.work_id, result=c.result)))
        self._ack_when_durable(connection, events, acks)

    def work_failed(self, connection, failures) -> None:
        events, acks = [], []
        for f in failures:
            slot = self.registry.get(f.worker_id)
            current = self._current(f)
            if slot is not None and slot.work_id == f.work_id and current:
                self.registry.finish(slot)
            acks.append(f.work_id)
            entry = self.state.in_progress.get(f.work_id)
            if entry is not None and entry.worker_id == f.worker_id and current:  # not a stale attempt
                if f.returned:
                    events.append(journal_pb2.Event(work_returned=journal_pb2.WorkReturned(work_id=f.work_id)))
                else:
                    events.append(journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(
                        work_id=f.work_id, error=f.error[:MAX_ERROR_CHARS])))
        self._ack_when_durable(connection, events, acks)
        if events:
            self._announce_work()

    def _current(self, report) -> bool:
        """Whether a report is about the attempt now in progress (not a resent
        report of an earlier attempt of the same work on the same slot)."""
        entry = self.state.in_progress.get(report.work_id)
        return entry is None or not report.attempt or report.attempt == entry.attempts

    def _ack_when_durable(self, connection, events, acks) -> None:
        if self.closed is not None or self.committer is None:
            return
        durable = self._record(events) if events else self.committer.barrier()
        ack = master_pb2.MasterMessage(epoch=self.epoch, ack=master_pb2.Ack(work_ids=acks))
        durable.add_done_callback(lambda f: f.cancelled() or f.exception() or connection.send(ack))

    def disconnected(self, connection) -> None:
        """A worker process's stream ended: its running work goes back to the queue."""
        events = []
        for slot in self.registry.of_connection(connection):
            self.registry.drop(slot.worker_id)
            self._waiting.pop(slot.worker_id, None)
            events += self._attempt_lost(slot, CONNECTION_LOST_ERROR)
        if events and self.closed is None and self.committer is not None and self.committer.failed is None:
            try:
                self._record(events)
            except JournalError as exc:  # the journal is backed up; the tick retries via timeouts
                log.warning("could not re-queue work of a lost worker: %s", exc)
                return
            self._announce_work()

    def _attempt_lost(self, slot: Slot, error: str, timed_out: bool = False) -> list[journal_pb2.Event]:
        entry = self.state.in_progress.get(slot.work_id) if slot.work_id else None
        if entry is None or entry.worker_id != slot.worker_id:
            return []
        if timed_out:
            return [journal_pb2.Event(worker_timed_out=journal_pb2.WorkerTimedOut(work_id=slot.work_id))]
        return [journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(work_id=slot.work_id, error=error))]

    def _announce_work(self) -> None:
        """Serves waiting slots; if work is still pending, tells every process
        with an idle slot that work is ready (it pulls)."""
        self._dispatch()
        if not self.state.pending or len(self._waiting) >= len(self.registry) - self.registry.busy_count:
            return  # every idle slot already holds a request
        ready = master_pb2.MasterMessage(epoch=self.epoch, work_is_ready=master_pb2.WorkIsReady())
        for connection in self.registry.idle_connections():
            connection.send(ready)

    # --- housekeeping ------------------------------------------------------

    async def _tick_forever(self) -> None:
        interval = max(0.1, min(1.0, self.settings.work_timeout / 2))
        while self.closed is None:
            await asyncio.sleep(interval)
            if self.committer is not None and not self.committer.paused and self.committer.failed is None:
                try:
                    self.tick(time.monotonic())
                except JournalError as exc:  # backed up: the next tick tries again
                    log.warning("housekeeping skipped: %s", exc, extra={"epoch": self.epoch})

    def tick(self, now: float) -> None:
        """Drops busy slots past their work's deadline and silent slots."""
        events = []
        for slot in self.registry.overdue(now):
            log.warning("work timed out on its worker", extra={"work_id": slot.work_id, "worker_id": slot.worker_id})
            self.registry.drop(slot.worker_id)
            self._waiting.pop(slot.worker_id, None)
            events += self._attempt_lost(slot, "", timed_out=True)
            if self.metrics:
                self.metrics.timed_out()
        for slot in self.registry.silent(now, self.settings.worker_timeout):
            self.registry.drop(slot.worker_id)
            self._waiting.pop(slot.worker_id, None)
            events += self._attempt_lost(slot, "worker went silent")
        # Work whose slot no longer holds it (its loss could not be recorded
        # at the time, e.g. the journal was backed up) must not wait forever.
        handled = {e.worker_timed_out.work_id or e.worker_failed.work_id for e in events}
        for work_id, entry in self.state.in_progress.items():
            slot = self.registry.get(entry.worker_id)
            if (slot is None or slot.work_id != work_id) and work_id not in handled:
                events.append(journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(
                    work_id=work_id, error=CONNECTION_LOST_ERROR)))
        if events:
            self._record(events)
            self._announce_work()
        elif self._waiting and self.state.pending:
            self._dispatch()  # e.g. held back while the journal was backed up
        self._forget_old_results(now)
        batches = self.committer.batches_written - self._batches_at_snapshot
        if not self._snapshotting and self._events_since_snapshot and (
                self._events_since_snapshot >= self.settings.snapshot_every
                or batches >= self.settings.snapshot_batches
                or now - self._last_snapshot >= self.settings.snapshot_interval):
            self._snapshotting = True
            asyncio.create_task(self.snapshot())

    def _forget_old_results(self, now: float) -> None:
        """Keeps finished results (and so their ids' deduplication) within the
        retention window: by count, and by age."""
        cutoff = self.state.last_sequence - self.settings.retention_count
        horizon = now - self.settings.retention_seconds
        while self._finished_at and (self._finished_at[0][0] <= cutoff or self._finished_at[0][1] < horizon):
            cutoff = max(cutoff, self._finished_at.popleft()[0])
        cutoff = min(cutoff, self.durable_sequence)
        if cutoff > self.state.forgotten_up_to:
            self._record([journal_pb2.Event(results_forgotten=journal_pb2.ResultsForgotten(up_to_sequence=cutoff))])

    async def snapshot(self) -> int:
        """Writes a snapshot of the state and compacts the journal it covers.
        Returns the position covered."""
        self._snapshotting = True
        try:
            covered = self.committer.cut()
            snapshot = self.state.to_snapshot()  # the state as of the cut: same loop step
            self._events_since_snapshot = 0
            self._batches_at_snapshot = self.committer.batches_written
            self._last_snapshot = time.monotonic()
            position = await covered
            started = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, self._store_snapshot, position, snapshot)
            log.info("snapshot at journal position %d: %d pending, %d results, %.2f s", position,
                     len(snapshot.entries), len(snapshot.results), time.monotonic() - started,
                     extra={"epoch": self.epoch})
            return position
        except JournalError as exc:
            if isinstance(exc, FencedError):
                self._journal_failed(exc)
            log.warning("snapshot failed: %s", exc, extra={"epoch": self.epoch})
            raise
        finally:
            self._snapshotting = False

    def _store_snapshot(self, position: int, snapshot: journal_pb2.Snapshot) -> None:
        if self.closed is not None:
            return
        self.journal.write_snapshot(position, snapshot.SerializeToString())
        if self.closed is None:
            self.journal.compact()

    def counts(self) -> dict:
        return {
            "pending": len(self.state.pending), "in_progress": len(self.state.in_progress),
            "done": self.state.done_count, "failed": self.state.failed_count,
            "last_sequence": self.state.last_sequence,
            "workers_busy": self.registry.busy_count,
            "workers_idle": len(self.registry) - self.registry.busy_count,
        }
