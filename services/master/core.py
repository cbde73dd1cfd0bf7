"""The active master's logic: one asyncio loop owns WorkState and the worker
registry; every change is an event queued for the journal and applied at
once, and every visible action (ack, hand-out, published result, answer)
waits until its event is durable.

If a journal write fails, the master can no longer vouch for its state: it
stops acting (`closed`) and the node steps down and recovers afresh.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dworkers.v1 import journal_pb2, master_pb2, work_pb2
from services.common.validation import MAX_ERROR_CHARS, MAX_RESULT_BYTES, MAX_STREAM_MESSAGE_BYTES
from services.master.journal import FencedError, GroupCommitter, Journal, JournalError
from services.master.state import WorkState
from services.master.workers import Slot, WorkerRegistry

log = logging.getLogger(__name__)

RESULTS_PER_MESSAGE = 500
CONNECTION_LOST_ERROR = "worker connection lost"
MiB = 1024 * 1024


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
    # Bytes the journal must hold, which ZooKeeper keeps in its heap (twice,
    # while a snapshot is written): the defaults keep a 512 MB ZooKeeper
    # comfortable. Unfinished works (payloads and metadata) beyond the first...
    max_pending_bytes: int = 32 * MiB
    retention_bytes: int = 32 * MiB  # ...retained results beyond this are forgotten early...
    snapshot_bytes: int = 32 * MiB  # ...and the journal since the last snapshot is compacted past this
    snapshot_every: int = 50_000  # events between snapshots
    snapshot_interval: float = 60.0  # seconds between snapshots (if anything changed)
    snapshot_batches: int = 1_000  # journal batches between snapshots: replay time grows with them
    retention_count: int = 100_000  # finished results kept (the deduplication window)...
    retention_seconds: float = 3600.0  # ...and for at least this long, unless over the count or bytes


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


class Tokens:
    """Attempt tokens: random (from the OS), so that only the slot an attempt
    was handed to can report on it, and never 0 (which journal events written
    before tokens existed use for 'any'). Drawn 512 at a time: one system
    call per hand-out would cost more than the rest of it."""

    def __init__(self) -> None:
        self._pool: list[int] = []

    def new(self) -> int:
        if not self._pool:
            data = os.urandom(8 * 512)
            self._pool = [(int.from_bytes(data[i:i + 8], "big") >> 1) + 1 for i in range(0, len(data), 8)]
        return self._pool.pop()


new_token = Tokens().new


def split_assignments(assignments: list[master_pb2.Assignment], epoch: int,
                      cluster_id: str) -> list[tuple[master_pb2.MasterMessage, int]]:
    """Hand-outs for one worker process, in messages below the stream limit,
    each with its size."""
    limit = MAX_STREAM_MESSAGE_BYTES - 1024
    message = master_pb2.MasterMessage(epoch=epoch, cluster_id=cluster_id,
                                       works=master_pb2.Works(assignments=assignments))
    size = message.ByteSize()
    if size <= limit or len(assignments) == 1:
        return [(message, size)]
    half = len(assignments) // 2  # rare: large payloads to a wide worker
    return (split_assignments(assignments[:half], epoch, cluster_id)
            + split_assignments(assignments[half:], epoch, cluster_id))


class MasterCore:
    def __init__(self, journal: Journal, epoch: int, settings: CoreSettings,
                 on_failure: Callable[[Exception], None], metrics=None,
                 confirm_leadership: Callable[[], Awaitable[None]] | None = None,
                 on_kinds: Callable[[frozenset[str]], None] | None = None, cluster_id: str = ""):
        self.journal = journal
        self.epoch = epoch
        self.cluster_id = cluster_id
        self.settings = settings
        self.metrics = metrics
        self.state = WorkState()
        self.registry = WorkerRegistry()
        self.durable_sequence = 0
        self.node = ""  # the election znode that fences this master's writes
        self.closed: str | None = None  # why it stopped acting
        self._on_failure = on_failure
        self._confirm_leadership = confirm_leadership
        self._on_kinds = on_kinds  # kinds a worker declared: the node records them
        self._results_ready = asyncio.Event()
        self.committer: GroupCommitter | None = None
        self._ticker: asyncio.Task | None = None
        self._finished_at: deque[tuple[int, float]] = deque()  # (sequence, when) for retention by age
        self._events_since_snapshot = 0
        self._batches_at_snapshot = 0
        self._bytes_at_snapshot = 0  # journal bytes written when the last snapshot was cut
        self._bytes_at_last_complete = 0  # ...and when the last stored one was cut
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
        await loop.run_in_executor(None, self.journal.discard_after, position)
        self.committer = GroupCommitter(self.journal, self.epoch, self._journal_failed,
                                        on_batch=self.metrics and self.metrics.journal_batch, after=position)
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

    async def _answerable(self) -> None:
        """Makes a read taken just now safe to answer: everything it saw is
        durable, and this master still leads (a master resumed after a pause
        past its session must not answer from stale state)."""
        await self._durable(self.committer.barrier())
        if self._confirm_leadership is not None:
            try:
                await self._confirm_leadership()
            except Exception as exc:
                raise NotServing(f"cannot confirm it is still the master: {exc}") from None
        self.check_serving()

    def _publish(self, sequence: int) -> None:
        if sequence > self.durable_sequence:
            self.durable_sequence = sequence
            self._wake_results()

    def _wake_results(self) -> None:
        self._results_ready.set()
        self._results_ready = asyncio.Event()

    # --- frontend operations ----------------------------------------------

    def _check_room(self, events: list[journal_pb2.Event], at_most: int) -> None:
        """Refuses works beyond the bounds; `at_most` bounds their bytes (the
        request's size: one cheap call), counted exactly only when it matters."""
        s, state = self.settings, self.state
        if len(state.pending) + len(events) > s.max_pending:
            raise Overloaded(f"{len(state.pending)} works are pending (limit --max-pending {s.max_pending}); "
                             "retry later")
        if state.unfinished_bytes + at_most <= s.max_pending_bytes:
            size = at_most
        else:
            size = sum(e.work_accepted.work.ByteSize() for e in events)
        if state.unfinished_bytes + size > s.max_pending_bytes:
            raise Overloaded(
                f"unfinished works hold {state.unfinished_bytes:,} bytes and these {size:,} more would pass "
                f"--max-pending-bytes ({s.max_pending_bytes:,}), which keeps the journal's store (ZooKeeper) "
                "within its memory; retry later, or raise it if ZooKeeper has heap to spare")
        behind = self.committer.bytes_appended - self._bytes_at_last_complete
        if behind > 2 * s.snapshot_bytes:
            raise Overloaded(f"{behind:,} journal bytes wait for compaction (over twice --snapshot-bytes); "
                             "retry later")

    async def submit(self, works: list[work_pb2.Work], each_on_its_own: bool = False,
                     size: int | None = None) -> list[bool | Conflict]:
        """Accepts works durably; returns, for each, whether it was a
        duplicate. A conflicting work fails the whole call, or with
        `each_on_its_own` only itself (its answer is the Conflict). `size`
        bounds the works' bytes if the caller knows it cheaply."""
        self.check_serving()
        duplicates: list[bool | Conflict] = []
        events = []
        for work in works:
            if self.state.conflicts(work):
                conflict = Conflict(f"work_id {work.work_id!r} was already accepted with a different kind or payload")
                if not each_on_its_own:
                    raise conflict
                duplicates.append(conflict)
                continue
            known = self.state.is_known(work.work_id)
            duplicates.append(known)
            if not known:
                events.append(journal_pb2.Event(work_accepted=journal_pb2.WorkAccepted(work=work)))
        if events:
            self._check_room(events, size if size is not None else sum(w.ByteSize() for w in works))
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
        status = self.state.status(work_id)
        await self._answerable()
        return status

    async def cluster_counts(self) -> dict:
        """Counts for ClusterInfo, answered like any read: from durable state."""
        self.check_serving()
        counts = self.counts()
        await self._answerable()
        return counts

    async def results(self, after: int):
        """Yields batches of durable results after `after`, forever; each
        batch fits one stream message."""
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
                batch = self.state.results_after(cursor, limit, MAX_STREAM_MESSAGE_BYTES - 64 * 1024)
                cursor = batch[-1].sequence if batch else self.durable_sequence
                if batch:
                    yield batch
                continue
            await self._results_ready.wait()

    # --- the worker protocol ----------------------------------------------

    def register(self, connection, message: master_pb2.RegisterWorker) -> None:
        kinds = frozenset(message.kinds)
        added = self.registry.register(connection, message.worker_ids, message.host, kinds, time.monotonic())
        if added and self._on_kinds is not None:
            self._on_kinds(kinds)
        if added and self.state.pending and self.committer is not None:
            self._announce_work()  # a new (or re-admitted) idle slot: tell it work is ready

    def request_work(self, connection, worker_ids) -> None:
        """Records the credit of idle slots that ask for work, and serves them
        from the head of the queue; a slot left without work keeps its credit."""
        if self.closed is not None or self.committer is None:
            return
        now = time.monotonic()
        for worker_id in worker_ids:
            slot = self.registry.on(connection, worker_id)
            if slot is None:
                continue  # not registered (yet): it registers and asks again
            slot.last_seen = now
            self.registry.want(slot)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hands each waiting slot the oldest pending work of a kind it runs.
        The hand-out waits until WorkStarted is durable."""
        registry, pending = self.registry, self.state.pending
        if not registry.waiting or not pending or self.committer.paused or self.closed is not None:
            return
        if not self.committer.has_room(registry.waiting_count):
            return  # the journal is backed up: hand out later (the tick dispatches again)
        now = time.monotonic()
        by_connection: dict = {}
        events = []
        for kinds in list(registry.waiting):
            while kinds in registry.waiting:
                entry = pending.oldest(kinds)
                if entry is None:
                    break  # these slots keep their credit
                slot = registry.next_waiting(kinds)
                work, worker_id, token = entry.work, slot.worker_id, new_token()
                work_id = work.work_id
                timeout = work.timeout_seconds or self.settings.work_timeout
                events.append(journal_pb2.Event(work_started=journal_pb2.WorkStarted(
                    work_id=work_id, worker_id=worker_id, attempt_token=token)))
                self.state.start(work_id, worker_id, token)  # as the event does: the next pick must not see it
                registry.start(slot, work_id, token, now + timeout, waiting=False)
                by_connection.setdefault(slot.connection, []).append(master_pb2.Assignment(
                    worker_id=worker_id, work=work, timeout_seconds=timeout, attempt=entry.attempts,
                    attempt_token=token))
        if not events:
            return
        durable = self.committer.append(events)
        self._events_since_snapshot += len(events)
        if self.metrics:
            self.metrics.started(len(events))
        for connection, assignments in by_connection.items():
            for message, size in split_assignments(assignments, self.epoch, self.cluster_id):
                durable.add_done_callback(
                    lambda f, c=connection, m=message, n=size: f.cancelled() or f.exception() or self._hand_out(c, m, n))

    def _hand_out(self, connection, works: master_pb2.MasterMessage, size: int) -> None:
        connection.send(works, size)
        if log.isEnabledFor(logging.DEBUG):
            for a in works.works.assignments:
                log.debug("given to worker", extra={"work_id": a.work.work_id, "worker_id": a.worker_id})

    def report(self, connection, completions, failures) -> None:
        """Records what slots of this stream report on the attempts they were
        handed. A report counts only if it carries the token of the work's
        latest attempt; anything else (resent, stale, about an earlier work
        with the same id) is acked and ignored. Reports of slots not
        registered on this stream are ignored unacked: the worker registers
        and resends them."""
        events, acks, seen = [], [], set()
        requeued = False
        state, registry = self.state, self.registry
        for report in itertools.chain(completions, failures):
            slot = registry.on(connection, report.worker_id)
            if slot is None:
                continue
            token = report.attempt_token
            if slot.token == token:
                registry.finish(slot)
            acks.append(token)
            work_id = report.work_id
            entry = state.unfinished(work_id)
            if not token or token in seen or entry is None or entry.token != token:
                continue
            seen.add(token)
            running = work_id in state.in_progress
            if isinstance(report, master_pb2.Completion):
                result = report.result
                if len(result) <= MAX_RESULT_BYTES:
                    events.append(journal_pb2.Event(work_completed=journal_pb2.WorkCompleted(
                        work_id=work_id, result=result, attempt_token=token)))
                elif running:  # it cannot be journaled: the attempt fails
                    events.append(journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(
                        work_id=work_id, attempt_token=token,
                        error=f"result of {len(result)} bytes exceeds the limit of {MAX_RESULT_BYTES}")))
            elif running and report.returned:
                events.append(journal_pb2.Event(work_returned=journal_pb2.WorkReturned(
                    work_id=work_id, attempt_token=token)))
                requeued = True
            elif running:
                events.append(journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(
                    work_id=work_id, error=report.error[:MAX_ERROR_CHARS], attempt_token=token)))
                requeued = True
        self._ack_when_durable(connection, events, acks)
        if requeued:
            self._announce_work()

    def _ack_when_durable(self, connection, events, tokens) -> None:
        if self.closed is not None or self.committer is None or not tokens:
            return
        durable = self._record(events) if events else self.committer.barrier()
        ack = master_pb2.MasterMessage(epoch=self.epoch, cluster_id=self.cluster_id,
                                       ack=master_pb2.Ack(attempt_tokens=tokens))
        size = 11 * len(tokens) + 64  # tokens are varints of at most 10 bytes
        durable.add_done_callback(lambda f: f.cancelled() or f.exception() or connection.send(ack, size))

    def disconnected(self, connection) -> None:
        """A worker process's stream ended: its running work goes back to the queue."""
        events = []
        for slot in self.registry.forget(connection):
            events += self._attempt_lost(slot, CONNECTION_LOST_ERROR)
        if events and self.closed is None and self.committer is not None and self.committer.failed is None:
            try:
                self._record(events)
            except JournalError as exc:  # the journal is backed up; the tick re-queues it
                log.warning("could not re-queue work of a lost worker: %s", exc)
                return
            self._announce_work()

    def _attempt_lost(self, slot: Slot, error: str, timed_out: bool = False) -> list[journal_pb2.Event]:
        entry = self.state.in_progress.get(slot.work_id) if slot.work_id else None
        if entry is None or entry.token != slot.token:
            return []
        if timed_out:
            return [journal_pb2.Event(worker_timed_out=journal_pb2.WorkerTimedOut(
                work_id=slot.work_id, attempt_token=slot.token))]
        return [journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(
            work_id=slot.work_id, error=error, attempt_token=slot.token))]

    def _announce_work(self) -> None:
        """Serves waiting slots; if work is still pending, tells every process
        with an idle slot that runs its kind that work is ready (it pulls)."""
        self._dispatch()
        registry = self.registry
        if not self.state.pending or registry.waiting_count >= len(registry) - registry.busy_count:
            return  # every idle slot already holds a request
        kinds_pending = self.state.pending.counts()
        ready = master_pb2.MasterMessage(epoch=self.epoch, cluster_id=self.cluster_id,
                                         work_is_ready=master_pb2.WorkIsReady())
        for connection, kinds in registry.idle_connections():
            if any(kind in kinds_pending for kind in kinds):
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
            events += self._attempt_lost(slot, "", timed_out=True)
            if self.metrics:
                self.metrics.timed_out()
        for slot in self.registry.silent(now, self.settings.worker_timeout):
            self.registry.drop(slot.worker_id)
            events += self._attempt_lost(slot, "worker went silent")
        # Work whose slot no longer runs its attempt (its loss could not be
        # recorded at the time, e.g. the journal was backed up) must not wait forever.
        handled = {e.worker_timed_out.work_id or e.worker_failed.work_id for e in events}
        for work_id, entry in self.state.in_progress.items():
            slot = self.registry.get(entry.worker_id)
            if (slot is None or slot.token != entry.token) and work_id not in handled:
                events.append(journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(
                    work_id=work_id, error=CONNECTION_LOST_ERROR, attempt_token=entry.token)))
        if events:
            self._record(events)
            self._announce_work()
        elif self.registry.waiting and self.state.pending:
            self._dispatch()  # e.g. held back while the journal was backed up
        self._forget_old_results(now)
        self._maybe_snapshot(now)

    def _maybe_snapshot(self, now: float) -> None:
        s, committer = self.settings, self.committer
        if self._snapshotting or not self._events_since_snapshot:
            return
        if (self._events_since_snapshot >= s.snapshot_every
                or committer.batches_written - self._batches_at_snapshot >= s.snapshot_batches
                or committer.bytes_appended - self._bytes_at_snapshot >= s.snapshot_bytes
                or now - self._last_snapshot >= s.snapshot_interval):
            self._snapshotting = True
            asyncio.create_task(self.snapshot())

    def _forget_old_results(self, now: float) -> None:
        """Keeps finished results (and so their ids' deduplication) within the
        retention window: by count, by age, and by bytes."""
        state, s = self.state, self.settings
        cutoff = state.last_sequence - s.retention_count
        horizon = now - s.retention_seconds
        while self._finished_at and (self._finished_at[0][0] <= cutoff or self._finished_at[0][1] < horizon):
            cutoff = max(cutoff, self._finished_at.popleft()[0])
        excess = state.result_bytes - s.retention_bytes
        if excess > 0:
            for sequence, result in state.results.items():
                if excess <= 0:
                    break
                excess -= result.ByteSize()
                cutoff = max(cutoff, sequence)
        cutoff = min(cutoff, self.durable_sequence)
        if cutoff > state.forgotten_up_to:
            self._record([journal_pb2.Event(results_forgotten=journal_pb2.ResultsForgotten(up_to_sequence=cutoff))])

    async def snapshot(self) -> int:
        """Writes a snapshot of the state and compacts the journal it covers.
        Returns the position covered."""
        self._snapshotting = True
        try:
            covered = self.committer.cut()
            snapshot = self.state.to_snapshot()  # the state as of the cut: same loop step
            cut_bytes = self.committer.bytes_appended
            self._events_since_snapshot = 0
            self._batches_at_snapshot = self.committer.batches_written
            self._bytes_at_snapshot = cut_bytes
            self._last_snapshot = time.monotonic()
            position = await covered
            started = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, self._store_snapshot, position, snapshot)
            self._bytes_at_last_complete = cut_bytes
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
        registry, pending = self.registry, self.state.pending
        waiting = pending.counts()
        return {
            "pending": len(pending), "in_progress": len(self.state.in_progress),
            "done": self.state.done_count, "failed": self.state.failed_count,
            "last_sequence": self.state.last_sequence,
            "workers_busy": registry.busy_count,
            "workers_idle": len(registry) - registry.busy_count,
            "pending_by_kind": waiting,
            "pending_without_worker": sum(n for kind, n in waiting.items() if kind not in registry.kind_slots),
            "slots_by_kind": dict(registry.kind_slots),
            "unfinished_bytes": self.state.unfinished_bytes,
            "result_bytes": self.state.result_bytes,
        }
