"""The master's decisions: submit, hand out, take reports, notice lost and
late attempts, forget old results. Pure: the time comes in as `now`, and
nothing here does I/O.

Each decision records events, applied to the state at once (so the next
decision sees them), and effects. The shell takes them as a Step, journals
the events, and performs the effects and answers only once those events are
durable; if they never become durable the master stops acting, so nothing
decided on them is ever seen.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from dworkers.common.errors import Conflict, NotFound, Overloaded, WrongState
from dworkers.common.limits import MAX_DELAY_SECONDS
from dworkers.common.settings import setting
from dworkers.common.shards import Move
from dworkers.common.validation import (
    MAX_ERROR_CHARS,
    MAX_HAND_BACKS,
    MAX_RESULT_BYTES,
    MAX_STREAM_MESSAGE_BYTES,
    valid_content_type,
)
from dworkers.master.domain.effects import DeclareKinds, Disconnect, HandOut, Send, Step
from dworkers.master.domain.listing import list_works
from dworkers.master.domain.moves import RELEASED_PER_EVENT
from dworkers.master.domain.scheduler import Scheduler, Slot, owner_of
from dworkers.master.domain.state import Entry, WorkState, fingerprint
from dworkers.v1 import journal_pb2, master_pb2, work_pb2

CONNECTION_LOST_ERROR = "worker connection lost"
SILENT_ERROR = "worker went silent"
MiB = 1024 * 1024
READY_PER_TICK = 10_000  # scheduled works queued by one tick at most (the next tick comes at once)
# WorkIsReady to one worker process at most this often: a worker serving
# several shards lends some slots' credit elsewhere, so the master would
# otherwise tell it after every report (the hint stands until it is used).
READY_INTERVAL = 0.02
MAX_TICKET_SAMPLES = 4096


def backoff_delay(backoff: tuple[float, float, float], retry: int, draw: float) -> float:
    """Seconds before the `retry`-th retry (1 for the first): the back-off's
    initial delay times its multiplier per retry before, capped, then
    jittered into its upper half by `draw` (0 to 1)."""
    initial, multiplier, cap = backoff
    delay = min(cap or MAX_DELAY_SECONDS, MAX_DELAY_SECONDS,
                initial * (multiplier or 2.0) ** min(retry - 1, 64))
    return delay / 2 + draw * delay / 2


@dataclass(frozen=True)
class CoreSettings:
    """What the decisions depend on: timeouts, bounds, retention, snapshots.
    The byte bounds keep what the journal holds within ZooKeeper's heap
    (which holds it twice while a snapshot is written): the defaults keep a
    512 MB ZooKeeper comfortable."""

    work_timeout: float = setting(30.0, "default seconds a work attempt may run before it is re-queued",
                                  above=0, high=24 * 3600)
    worker_timeout: float = setting(15.0, "seconds a silent worker slot is kept", above=0)
    max_pending: int = setting(1_000_000, "pending works beyond which submissions are refused", low=1)
    max_pending_bytes: int = setting(
        32 * MiB, "bytes of pending and running works (payloads and metadata) beyond which submissions are "
        "refused; the ZooKeeper journal keeps them in ZooKeeper's memory (the PostgreSQL journal keeps payloads "
        "on disk: there --max-pending bounds the master's memory)", low=1 * MiB)
    retention_bytes: int = setting(32 * MiB, "bytes of retained results beyond which the oldest are forgotten early",
                                   low=1 * MiB)
    snapshot_bytes: int = setting(32 * MiB, "journal bytes between snapshots (bounds the journal's size in ZooKeeper)",
                                  low=1 * MiB)
    snapshot_every: int = setting(50_000, "journal events between snapshots", low=1)
    snapshot_interval: float = setting(60.0, "seconds between snapshots (when anything changed)", above=0)
    snapshot_batches: int = setting(1_000, "journal batches between snapshots (bounds replay time)", low=1)
    retention_count: int = setting(100_000, "finished results kept at most (their ids stay deduplicated while kept)",
                                   low=0)
    retention_seconds: float = setting(3600.0, "finished results older than this are forgotten", low=0)


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


def hand_outs(assignments: list[master_pb2.Assignment], epoch: int, cluster_id: str) -> list[tuple]:
    """Hand-outs for one worker process as (message, size), each message
    below the stream limit."""
    limit = MAX_STREAM_MESSAGE_BYTES - 1024
    message = master_pb2.MasterMessage(epoch=epoch, cluster_id=cluster_id,
                                       works=master_pb2.Works(assignments=assignments))
    size = message.ByteSize()
    if size <= limit or len(assignments) == 1:
        return [(message, size)]
    half = len(assignments) // 2  # rare: large payloads to a wide worker
    return hand_outs(assignments[:half], epoch, cluster_id) + hand_outs(assignments[half:], epoch, cluster_id)


class Master:
    def __init__(self, state: WorkState, settings: CoreSettings, epoch: int = 0, cluster_id: str = "",
                 new_token=None, rng: random.Random | None = None, rate_limits: Mapping[str, float] | None = None):
        self.state = state
        self.scheduler = Scheduler()
        self.settings = settings
        self.epoch = epoch
        self.cluster_id = cluster_id
        self.new_token = new_token or Tokens().new
        self.rng = rng or random.Random()  # the jitter of back-offs (journaled: replays need none)
        # Decisions get `now` from a monotonic clock (deadlines survive clock
        # steps); times that outlive this master (a work's not_before, a
        # retry's back-off) are Unix times: now + wall_offset. The shell sets
        # it before each decision; with a fake clock it stays 0.
        self.wall_offset = 0.0
        # Starts per second allowed per kind (kept up to date by the kind
        # catalog; not journaled: a setting), and when each last started.
        self.rate_limits: Mapping[str, float] = rate_limits if rate_limits is not None else {}
        self._last_start: dict[str, float] = {}
        self._ready_sent: dict[int, float] = {}  # id(connection) -> when it was last told work is ready
        # When queue tickets were issued, sampled at each decision: how long a
        # pending work has waited, without a time per work (since it was
        # queued on this master: recovery queues anew). Parallel lists:
        # tickets from _sampled[i] on were issued at or after _sampled_at[i].
        self._sampled: list[int] = []
        self._sampled_at: list[float] = []
        self._step = Step()
        self._finished_at: deque[tuple[int, float]] = deque()  # (sequence, when) for retention by age
        # Works held by a move are being copied to their new shard: late
        # reports about them no longer count here (not journaled: a new
        # master waits for the attempts its workers still run before copying).
        self.exporting = False

    def take(self) -> Step:
        """What was decided since the last call: for the shell to journal and perform."""
        step, self._step = self._step, Step()
        step.last_sequence = self.state.last_sequence
        return step

    def _record(self, events: list[journal_pb2.Event], now: float) -> None:
        self._sample_tickets(now)
        step = self._step
        for event in events:
            result = self.state.apply(event)
            if result is not None:
                step.results.append(result)
                self._finished_at.append((result.sequence, now))
                if result.state == work_pb2.FAILED:  # the journal may drop the payload of a work that ended
                    failure = event.worker_failed if event.HasField("worker_failed") else event.worker_timed_out
                    failure.final = True
                elif result.state == work_pb2.DONE and self.state.payloads_apart:
                    # the journal stores the result under its number
                    event.work_completed.sequence = result.sequence
            elif event.HasField("works_imported"):  # kept as long as the results made here now
                self._finished_at.extend((r.sequence, now) for r in event.works_imported.results if r.sequence)
        step.events += events

    def _failed(self, entry: Entry, token: int, error: str, now: float,
                permanent: bool = False) -> journal_pb2.Event:
        """The event of a failed attempt: retried after its back-off, if it has one and attempts left."""
        return journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(
            work_id=entry.work_id, error=error, attempt_token=token, permanent=permanent,
            retry_at=0.0 if permanent else self._retry_at(entry, now)))

    def _timed_out(self, entry: Entry, token: int, now: float) -> journal_pb2.Event:
        return journal_pb2.Event(worker_timed_out=journal_pb2.WorkerTimedOut(
            work_id=entry.work_id, attempt_token=token, retry_at=self._retry_at(entry, now)))

    def _retry_at(self, entry: Entry, now: float) -> float:
        retry = entry.failures + 1  # the failure being recorded is the retry's cause
        if entry.backoff is None or retry >= entry.max_attempts:
            return 0.0
        return now + self.wall_offset + backoff_delay(entry.backoff, retry, self.rng.random())

    def _send(self, connection, message: master_pb2.MasterMessage, size: int, after_results: bool = False) -> None:
        self._step.effects.append(Send(connection, message, size, after_results))

    def _message(self, **parts) -> master_pb2.MasterMessage:
        return master_pb2.MasterMessage(epoch=self.epoch, cluster_id=self.cluster_id, **parts)

    # --- recovery ------------------------------------------------------------

    def recovered(self, now: float) -> None:
        """After replaying the journal: work in progress goes back to the
        queue (its workers may still report on it), and results' ages restart."""
        self._finished_at.extend((sequence, now) for sequence in self.state.results)
        self._sampled, self._sampled_at = [0], [now]  # what it replayed counts as queued now
        if self.state.in_progress:
            self._record([journal_pb2.Event(work_in_progress_reset=journal_pb2.WorkInProgressReset())], now)

    # --- submissions ---------------------------------------------------------

    def submit(self, works: list[work_pb2.Work], now: float, each_on_its_own: bool = False,
               size: int | None = None) -> list[bool | Conflict]:
        """Accepts works; returns, for each, whether it was a duplicate. A
        conflicting work fails the whole call, or with `each_on_its_own` only
        itself (its answer is the Conflict). `size` bounds the works' bytes if
        the caller knows it cheaply. Nothing is recorded if it raises."""
        answers: list[bool | Conflict] = []
        events = []
        state = self.state
        for work in works:
            if state.conflicts(work):
                conflict = Conflict(f"work_id {work.work_id!r} was already accepted with a different kind or payload")
                if not each_on_its_own:
                    raise conflict
                answers.append(conflict)
                continue
            known = state.is_known(work.work_id)
            answers.append(known)
            if not known:
                accepted = journal_pb2.WorkAccepted(work=work)
                if state.payloads_apart:
                    accepted.fingerprint = fingerprint(work.kind, work.payload)
                events.append(journal_pb2.Event(work_accepted=accepted))
        if events:
            self._check_room(events, size if size is not None else sum(w.ByteSize() for w in works))
            self._record(events, now)
            self.announce(now)  # starts go into the same journal batch as the accepts
        return answers

    def _check_room(self, events: list[journal_pb2.Event], at_most: int) -> None:
        """Refuses works beyond the bounds; `at_most` bounds their bytes (the
        request's size: one cheap call), counted exactly only when it matters."""
        s, state = self.settings, self.state
        if len(state.pending) + len(events) > s.max_pending:
            raise Overloaded(f"{len(state.pending)} works are pending (limit --max-pending {s.max_pending}); "
                             "retry later")
        if state.payloads_apart or state.unfinished_bytes + at_most <= s.max_pending_bytes:
            return  # payloads on disk: --max-pending bounds the master's memory
        size = sum(e.work_accepted.work.ByteSize() for e in events)
        if state.unfinished_bytes + size > s.max_pending_bytes:
            raise Overloaded(
                f"unfinished works hold {state.unfinished_bytes:,} bytes and these {size:,} more would pass "
                f"--max-pending-bytes ({s.max_pending_bytes:,}), which keeps the master and the journal within "
                "memory; retry later, or raise it: on the ZooKeeper journal only if ZooKeeper has heap to spare "
                "(the PostgreSQL journal, --journal postgresql://..., keeps backlogs on disk)")

    # --- the worker protocol ---------------------------------------------------

    def register(self, connection, message: master_pb2.RegisterWorker, now: float) -> None:
        kinds = frozenset(message.kinds)
        known = len(self.scheduler)
        owner = owner_of(connection)
        running = [a for a in message.running if self._may_hold(a.work_id, a.attempt_token, owner)]
        dropped = self.scheduler.register(connection, message.worker_ids, message.host, kinds, now,
                                          capacity=1 + message.prefetch, running=running)
        self._record([e for slot in dropped for e in self._attempts_lost(slot, CONNECTION_LOST_ERROR, now)], now)
        if len(self.scheduler) > known or dropped:
            self._step.effects.append(DeclareKinds(kinds, tuple(message.defaults)))
            self.announce(now)  # new idle slots: tell them work is ready

    def _may_hold(self, work_id: str, token: int, owner: str) -> bool:
        """Whether a worker of identity `owner` may say it holds this attempt:
        not if it is the latest attempt of a work handed to another identity."""
        entry = self.state.unfinished(work_id)
        return entry is None or entry.token != token or entry.owner == owner

    def request_work(self, connection, worker_ids, now: float) -> None:
        """Records the credit of idle slots that ask for work, and serves them;
        a slot left without work keeps its credit."""
        scheduler = self.scheduler
        for worker_id in worker_ids:
            slot = scheduler.on(connection, worker_id)
            if slot is None:
                continue  # not registered (yet): it registers and asks again
            slot.last_seen = now
            scheduler.want(slot)
        self.dispatch(now)

    def withdraw_work(self, connection, worker_ids) -> None:
        """These slots take their credit back (lent to another shard now)."""
        scheduler = self.scheduler
        for worker_id in worker_ids:
            slot = scheduler.on(connection, worker_id)
            if slot is not None:
                scheduler.unwait(slot)
        # Confirmed after the hand-outs decided before it (effects leave in order).
        self._send(connection, self._message(withdrawn=master_pb2.WorkWithdrawn(worker_ids=worker_ids)),
                   16 + sum(len(w) + 2 for w in worker_ids))

    def dispatch(self, now: float) -> None:
        """Hands waiting slots the oldest pending works of the kinds they run,
        one at a time in turn, until each is full or nothing is left; a slot
        left with room keeps its credit."""
        scheduler, pending, state = self.scheduler, self.state.pending, self.state
        if not scheduler.waiting or not pending:
            return
        by_connection: dict = {}
        events = []
        limits, last_start = self.rate_limits, self._last_start
        held_back = self._held_back(now) if last_start else set()
        for kinds in list(scheduler.waiting):
            while kinds in scheduler.waiting:
                entry = pending.oldest(kinds, held_back)
                if entry is None:
                    break  # these slots keep their credit
                if limits and limits.get(entry.kind):  # starts evenly spaced: the next one 1/rate later
                    last_start[entry.kind] = now
                    held_back.add(entry.kind)
                slot = scheduler.next_waiting(kinds)
                worker_id, token = slot.worker_id, self.new_token()
                work_id = entry.work_id
                timeout = entry.timeout_seconds or self.settings.work_timeout
                lease = entry.heartbeat_timeout or timeout  # what the slot's clock runs on
                events.append(journal_pb2.Event(work_started=journal_pb2.WorkStarted(
                    work_id=work_id, worker_id=worker_id, attempt_token=token, worker_owner=slot.owner)))
                queued_at = self._queued_at(entry.ticket)
                if queued_at is not None:
                    self._step.queue_waits.append(now - queued_at)
                state.start(work_id, token, slot.owner)  # as the event does: the next pick must not see it
                scheduler.start(slot, work_id, token, lease, now)
                scheduler.want(slot)  # its turn again after the others, if it has room
                assignment = master_pb2.Assignment(worker_id=worker_id, timeout_seconds=timeout,
                                                   attempt=entry.attempts, attempt_token=token)
                entry.fill(assignment.work)
                by_connection.setdefault(slot.connection, []).append(assignment)
        if not events:
            return
        self._step.events += events
        for connection, assignments in by_connection.items():
            if state.payloads_apart:
                self._step.effects.append(HandOut(connection, assignments))
                continue
            for message, size in hand_outs(assignments, self.epoch, self.cluster_id):
                self._send(connection, message, size)

    def report(self, connection, completions, failures, now: float) -> None:
        """Records what slots of this stream report on the attempts they were
        handed. A report counts only if it carries the token of the work's
        latest attempt, handed to this slot (or, when no slot holds it any
        more, to its worker identity); anything else (resent, stale, about an
        earlier work with the same id, another slot's) is acked and ignored. Reports of slots not registered on this
        stream are ignored unacked: the worker registers and resends them."""
        events, acks, seen = [], [], set()
        requeued = False
        state, scheduler = self.state, self.scheduler
        for report in itertools.chain(completions, failures):
            slot = scheduler.on(connection, report.worker_id)
            if slot is None:
                continue
            token = report.attempt_token
            holder = scheduler.running.get(token)
            if (holder is not None and holder is not slot) or \
                    (holder is None and not self._may_hold(report.work_id, token, slot.owner)):
                acks.append(token)
                continue  # not handed to this slot (the one it was handed to holds it) or to its identity
            scheduler.finish(slot, token, now)
            if isinstance(report, master_pb2.Failure) and report.returned:
                scheduler.unwait(slot)  # its worker is leaving: hand it nothing more
            acks.append(token)
            work_id = report.work_id
            entry = state.unfinished(work_id)
            if not token or token in seen or entry is None or entry.token != token:
                continue
            if self.exporting and work_id in state.held:
                continue  # copied to another shard already, which runs it again (its result comes from there)
            seen.add(token)
            running = work_id in state.in_progress
            if isinstance(report, master_pb2.Completion):
                result = report.result
                if not valid_content_type(report.content_type):
                    if running:
                        events.append(self._failed(
                            entry, token, f"the worker reported a malformed content type {report.content_type[:64]!r}",
                            now))
                        requeued = True
                elif len(result) <= MAX_RESULT_BYTES:
                    events.append(journal_pb2.Event(work_completed=journal_pb2.WorkCompleted(
                        work_id=work_id, result=result, attempt_token=token, content_type=report.content_type)))
                elif running:  # it cannot be journaled: the attempt fails
                    events.append(self._failed(
                        entry, token, f"result of {len(result)} bytes exceeds the limit of {MAX_RESULT_BYTES}", now))
                    requeued = True
            elif running and report.returned:
                if entry.hand_backs >= MAX_HAND_BACKS:
                    events.append(self._failed(
                        entry, token, f"handed back unfinished more than {MAX_HAND_BACKS} times: this time counts "
                        "as a failed attempt", now))
                else:
                    events.append(journal_pb2.Event(work_returned=journal_pb2.WorkReturned(
                        work_id=work_id, attempt_token=token, by_worker=True)))
                requeued = True
            elif running:
                events.append(self._failed(entry, token, report.error[:MAX_ERROR_CHARS], now, report.permanent))
                requeued = True
        self._record(events, now)
        if acks:  # tokens are varints of at most 10 bytes
            self._send(connection, self._message(ack=master_pb2.Ack(attempt_tokens=acks)), 11 * len(acks) + 64,
                       after_results=True)
        if requeued:
            self.announce(now)

    def heartbeat(self, connection, heartbeats, now: float) -> None:
        """Jobs said they are alive: their attempts' leases are renewed (no
        event: after a failover the worker's registration tells the new
        master how long each attempt has left)."""
        scheduler, running = self.scheduler, self.state.in_progress
        for beat in heartbeats:
            slot = scheduler.on(connection, beat.worker_id)
            if slot is None:
                continue
            slot.last_seen = now
            entry = running.get(slot.work_id)
            lease = entry.heartbeat_timeout if entry is not None and entry.token == beat.attempt_token else 0.0
            scheduler.heartbeat(slot, beat.attempt_token, lease, now,
                                beat.progress if beat.HasField("progress") else None, beat.details)

    def disconnected(self, connection, now: float) -> None:
        """A worker process's stream ended: its running work goes back to the queue."""
        lost = self.scheduler.forget(connection)
        self._ready_sent.pop(id(connection), None)
        events = [e for slot in lost for e in self._attempts_lost(slot, CONNECTION_LOST_ERROR, now)]
        if events:
            self._record(events, now)
            self.announce(now)

    def _attempts_lost(self, slot: Slot, error: str, now: float) -> list[journal_pb2.Event]:
        """The events that end the attempts a dropped slot held, those that
        still count: the one it ran failed; those prefetched behind it never
        ran, so they go back to the queue as returned (not a failed attempt)."""
        events = []
        for i, held in enumerate(slot.held):
            entry = self.state.in_progress.get(held.work_id)
            if entry is None or entry.token != held.token:
                continue
            if i:
                events.append(journal_pb2.Event(work_returned=journal_pb2.WorkReturned(
                    work_id=held.work_id, attempt_token=held.token)))
            else:
                events.append(self._failed(entry, held.token, error, now))
        return events

    def announce(self, now: float) -> None:
        """Serves waiting slots; if work is still pending, tells every process
        with an idle slot that runs its kind that work is ready (it pulls)."""
        self.dispatch(now)
        scheduler = self.scheduler
        if not self.state.pending or scheduler.waiting_count >= scheduler.room_count:
            return  # every slot with room already holds a request
        kinds_pending = self.state.pending.counts()
        ready = self._message(work_is_ready=master_pb2.WorkIsReady())
        sent = self._ready_sent
        for connection, kinds in scheduler.idle_connections():
            if any(kind in kinds_pending for kind in kinds) and now - sent.get(id(connection), -1.0) >= READY_INTERVAL:
                sent[id(connection)] = now
                self._send(connection, ready, 16)

    # --- housekeeping ----------------------------------------------------------

    def tick(self, now: float, durable_sequence: int) -> list[tuple[Slot, str]]:
        """Ends attempts past their deadline, drops silent slots, queues
        scheduled works whose time came, forgets old results (up to
        `durable_sequence`, those already published); returns the slots whose
        attempt timed out, with its work id (for the shell's log and metrics)."""
        scheduler, events = self.scheduler, []
        overdue = []
        for slot in scheduler.overdue(now):
            # The slot stays: its worker times the attempt out too, reports it
            # failed, and runs the next one it holds, whose clock starts now.
            # It gets nothing more until it asks again (a frozen worker never does).
            late = slot.held[0]
            scheduler.finish(slot, late.token, now)
            scheduler.unwait(slot)
            overdue.append((slot, late.work_id))
            entry = self.state.in_progress.get(late.work_id)
            if entry is not None and entry.token == late.token:
                events.append(self._timed_out(entry, late.token, now))
        silent: dict = {}
        for slot in scheduler.silent(now, self.settings.worker_timeout):
            scheduler.drop(slot)
            events += self._attempts_lost(slot, SILENT_ERROR, now)
            silent[id(slot.connection)] = slot.connection
        for connection in silent.values():
            self._step.effects.append(Disconnect(connection, SILENT_ERROR))
        # Work whose attempt no slot runs any more (its loss could not be
        # recorded at the time) must not wait for ever.
        handled = {e.worker_timed_out.work_id or e.worker_failed.work_id or e.work_returned.work_id for e in events}
        for work_id, entry in self.state.in_progress.items():
            if entry.token not in scheduler.running and work_id not in handled:
                events.append(self._failed(entry, entry.token, CONNECTION_LOST_ERROR, now))
        self._trim_samples()
        due = self.state.scheduled.due(now + self.wall_offset, READY_PER_TICK)
        if due:
            events.append(journal_pb2.Event(works_ready=journal_pb2.WorksReady(work_ids=due)))
        self._record(events, now)
        self.announce(now)  # e.g. requests that waited while the journal was backed up
        self.forget_old_results(now, durable_sequence)
        return overdue

    def forget_old_results(self, now: float, durable_sequence: int) -> None:
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
                kept = state.retryable.get(result.work_id)
                if kept is not None and kept[0] == sequence:  # a failed work kept to be retried goes with it
                    excess -= kept[1].size
                cutoff = max(cutoff, sequence)
        cutoff = min(cutoff, durable_sequence)
        if cutoff > state.forgotten_up_to:
            forgotten = journal_pb2.ResultsForgotten(up_to_sequence=cutoff)
            for sequence in range(state.forgotten_up_to + 1, cutoff + 1):  # the journal drops their payloads
                result = state.results.get(sequence)
                kept = state.retryable.get(result.work_id) if result is not None else None
                if kept is not None and kept[0] == sequence:
                    forgotten.retryable_work_ids.append(result.work_id)
            self._record([journal_pb2.Event(results_forgotten=forgotten)], now)

    def retry(self, work_ids: list[str], now: float) -> list[work_pb2.WorkStatus]:
        """Queues FAILED and CANCELLED works again with fresh attempts (all or
        none): an id unknown or past the retention window, or a work in any
        other state, refuses the call."""
        state = self.state
        work_ids = list(dict.fromkeys(work_ids))
        unknown = [w for w in work_ids if not state.is_known(w)]
        if unknown:
            raise NotFound(f"no work {_listed(unknown)}: never accepted, or its result left the retention window")
        if len(state.pending) + len(work_ids) > self.settings.max_pending:
            raise Overloaded(f"{len(state.pending)} works are pending (limit --max-pending "
                             f"{self.settings.max_pending}); retry later")
        wrong = [(w, state.status(w)) for w in work_ids if w not in state.retryable]
        if wrong:
            raise WrongState("only FAILED and CANCELLED works can be retried: " + ", ".join(
                f"work {w!r} is {work_pb2.State.Name(s.state) if s else 'unknown'}" for w, s in wrong[:5]))
        self._record([journal_pb2.Event(work_retried=journal_pb2.WorkRetried(work_id=w)) for w in work_ids], now)
        queued = [state.status(w) for w in work_ids]  # as they are queued, before a slot takes them
        self.announce(now)
        return queued

    def _sample_tickets(self, now: float) -> None:
        """Notes that the tickets from the next one on are issued from now on."""
        tickets, times, ticket = self._sampled, self._sampled_at, self.state.pending.next_ticket
        if tickets and tickets[-1] == ticket:
            times[-1] = now  # none issued since: the later time is as true, and tighter
        else:
            tickets.append(ticket)
            times.append(now)

    def _trim_samples(self) -> None:
        """Drops the samples before the oldest pending work's; thins the rest
        out if there are many (a wait then reads high by up to a gap)."""
        tickets, oldest = self._sampled, self.state.pending.oldest_ticket()
        drop = len(tickets) - 1 if oldest is None else bisect.bisect_right(tickets, oldest) - 1
        if drop > 0:
            del tickets[:drop], self._sampled_at[:drop]
        if len(tickets) > MAX_TICKET_SAMPLES:
            keep = [0, *range(1, len(tickets) - 1, 2), len(tickets) - 1]
            self._sampled = [tickets[i] for i in keep]
            self._sampled_at = [self._sampled_at[i] for i in keep]

    def _queued_at(self, ticket: int) -> float | None:
        """When the work with this ticket was queued, at the latest (None: unknown)."""
        i = bisect.bisect_right(self._sampled, ticket) - 1
        return self._sampled_at[i] if i >= 0 else None

    def oldest_pending_age(self, now: float) -> float:
        """Seconds the oldest pending work has waited in the queue (0: none pending)."""
        oldest = self.state.pending.oldest_ticket()
        since = None if oldest is None else self._queued_at(oldest)
        return 0.0 if since is None else max(0.0, now - since)

    def next_due(self, now: float) -> float | None:
        """When (in `now`'s clock) the next scheduled work is due, or a kind
        held back by its rate limit may start again while its works wait for
        a waiting slot that runs it; None if neither."""
        due = self.state.scheduled.next_time()
        times = [] if due is None else [due - self.wall_offset]
        if self._last_start and self.scheduler.waiting:
            counts, limits = self.state.pending.counts(), self.rate_limits
            for kind, last in self._last_start.items():
                rate = limits.get(kind)  # read once: the catalog may change it meanwhile
                if rate and kind in counts and last + 1.0 / rate > now \
                        and any(kind in kinds for kinds in self.scheduler.waiting):
                    times.append(last + 1.0 / rate)
        return min(times, default=None)

    def _held_back(self, now: float) -> set[str]:
        """Kinds that may not start now: their last start was less than 1/rate ago."""
        held = set()
        for kind, last in self._last_start.items():
            rate = self.rate_limits.get(kind)  # read once: the catalog may change it meanwhile
            if rate and now < last + 1.0 / rate:
                held.add(kind)
        return held

    # --- control ---------------------------------------------------------------

    def cancel(self, work_ids: list[str], now: float) -> list[work_pb2.WorkStatus]:
        """Cancels works (all or none): pending and scheduled ones end at
        once; running ones too, and their slots are told to stop them (the
        slot's next attempt runs from now). Cancelling a cancelled work again
        is fine; an unknown or otherwise finished one refuses the call."""
        state, scheduler = self.state, self.scheduler
        work_ids = list(dict.fromkeys(work_ids))
        unknown, finished = [], []
        for work_id in work_ids:
            if state.unfinished(work_id) is None:
                result = state.finished.get(work_id)
                if result is None:
                    unknown.append(work_id)
                elif result.state != work_pb2.CANCELLED:
                    finished.append(result)
        if unknown:
            raise NotFound(f"no work {_listed(unknown)}: never accepted, or its result left the retention window")
        if finished:
            raise WrongState("cannot cancel " + ", ".join(
                f"work {r.work_id!r}: it already finished {work_pb2.State.Name(r.state)}" for r in finished[:5]))
        events = []
        stops: dict[int, tuple] = {}  # by connection: (connection, tokens)
        for work_id in work_ids:
            entry = state.unfinished(work_id)
            if entry is None:
                continue  # cancelled already
            # running, or queued again by a failover while its slot still runs it
            slot = scheduler.running.get(entry.token) if entry.token else None
            if slot is not None:
                scheduler.finish(slot, entry.token, now)
                stops.setdefault(id(slot.connection), (slot.connection, []))[1].append(entry.token)
            events.append(journal_pb2.Event(work_cancelled=journal_pb2.WorkCancelled(work_id=work_id)))
        self._record(events, now)
        for connection, tokens in stops.values():
            self._send(connection, self._message(cancel=master_pb2.Cancel(attempt_tokens=tokens)),
                       11 * len(tokens) + 64)
        return [state.status(work_id) for work_id in work_ids]

    # --- moving slots (see moves.py) ---------------------------------------------

    def start_move(self, move: Move, now: float) -> bool:
        """Holds the moving slots' works apart (the source's first step);
        False if this shard released them already (what is left is the map)."""
        state = self.state
        if state.last_released == move.key:
            return False
        if state.leaving is None:
            self._record([journal_pb2.Event(move_started=journal_pb2.MoveStarted(
                move_key=move.key, first_slot=move.first, last_slot=move.last, target_shard=move.target))], now)
        return True

    def import_works(self, request: master_pb2.ImportWorksRequest, now: float) -> str:
        """Takes a part of a move's works (the target's side); returns the
        last id it holds of the move. A part sent again is taken once."""
        state = self.state
        cursor = state.imports.get(request.move_key, "")
        if request.last_id > cursor:
            # only what this shard does not hold yet (the journal stores the payloads it is given)
            imported = journal_pb2.WorksImported(move_key=request.move_key, last_id=request.last_id)
            for result, print_ in zip(request.results, request.result_fingerprints):
                if result.work_id > cursor and state.unfinished(result.work_id) is None:
                    kept = imported.results.add()
                    kept.CopyFrom(result)
                    kept.sequence = 0  # numbered here, in this shard's stream
                    imported.result_fingerprints.append(print_)
            results = {r.work_id for r in imported.results}
            for entry in request.entries:
                work_id = entry.work.work_id
                if work_id <= cursor or state.unfinished(work_id) is not None:
                    continue
                if entry.retryable_until_forgotten and (work_id not in results or work_id in state.retryable):
                    continue  # kept to be retried only with its result (and the journal stores its payload)
                imported.entries.append(entry)
            self._record([journal_pb2.Event(works_imported=imported)], now)
            self.announce(now)
        return state.imports.get(request.move_key, cursor)

    def release_move(self, work_ids: list[str], now: float) -> None:
        """The target holds the moving works (`work_ids`, as ids_to_move gave
        them): those held here or kept to be retried go, and the move ends."""
        state = self.state
        key = state.leaving.move_key
        work_ids = [w for w in work_ids if w in state.held or (w in state.retryable and state.leaves(w))]
        self.exporting = False
        step = RELEASED_PER_EVENT
        parts = [work_ids[i:i + step] for i in range(0, len(work_ids), step)] or [[]]
        self._record([journal_pb2.Event(move_released=journal_pb2.MoveReleased(
            move_key=key, work_ids=part, done=i == len(parts) - 1)) for i, part in enumerate(parts)], now)

    # --- questions -------------------------------------------------------------

    def list_works(self, which: int, kind: str = "", token: str = "", size: int = 0
                   ) -> tuple[list[work_pb2.WorkStatus], str]:
        """A page of works in one state (see listing.py), with the progress of running ones."""
        statuses, next_token = list_works(self.state, which, kind, token, size)
        if which == work_pb2.IN_PROGRESS:
            statuses = [self.status(s.work_id) or s for s in statuses]
        return statuses, next_token

    def status(self, work_id: str) -> work_pb2.WorkStatus | None:
        status = self.state.status(work_id)
        if status is not None and status.state == work_pb2.IN_PROGRESS:
            entry = self.state.in_progress[work_id]
            slot = self.scheduler.running.get(entry.token)
            if slot is not None and slot.token == entry.token:
                running = slot.held[0]
                if running.progress is not None:
                    status.progress = running.progress
                status.progress_details = running.details
        return status

    def counts(self) -> dict:
        scheduler, pending = self.scheduler, self.state.pending
        waiting = pending.counts()
        return {
            # works of slots moving away count as pending (they are, on their way to another shard)
            "pending": len(pending) + len(self.state.held), "moving": len(self.state.held),
            "in_progress": len(self.state.in_progress),
            "scheduled": len(self.state.scheduled), "cancelled": self.state.cancelled_count,
            "done": self.state.done_count, "failed": self.state.failed_count,
            "last_sequence": self.state.last_sequence,
            "workers_busy": scheduler.busy_count,
            "worker_processes": scheduler.connection_count,
            "workers_idle": len(scheduler) - scheduler.busy_count,
            "pending_by_kind": waiting,
            "pending_without_worker": sum(n for kind, n in waiting.items() if kind not in scheduler.kind_slots),
            "slots_by_kind": dict(scheduler.kind_slots),
            "unfinished_bytes": self.state.unfinished_bytes,
            "result_bytes": self.state.result_bytes,
        }


def _listed(work_ids: list[str]) -> str:
    shown = ", ".join(repr(w) for w in work_ids[:5])
    return shown + (f" and {len(work_ids) - 5} more" if len(work_ids) > 5 else "")
