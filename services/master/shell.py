"""The active master's shell: one asyncio loop that feeds inputs (calls,
worker messages, the clock) to the domain's decisions, journals the events
they record, and performs their effects and answers only once those events
are durable. Every effect of a decision waits for the journal batch that
holds its events, or, if it recorded none, for everything journaled before
it: no caller has to remember to wait.

If a journal write fails, the master can no longer vouch for its state: it
stops acting (`closed`) and the node steps down and recovers afresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dworkers.common.errors import Forgotten, NotFound, NotServing, Overloaded, WrongShard, WrongState
from dworkers.common.memory import freeze_survivors, release_free_memory
from dworkers.common.validation import MAX_BATCH_WORKS, MAX_REPORTS_PER_MESSAGE, MAX_STREAM_MESSAGE_BYTES
from dworkers.master.domain.effects import DeclareKinds, Disconnect, HandOut, Send, Step
from dworkers.master.domain.master import CoreSettings, Master, hand_outs
from dworkers.master.domain.state import WorkState
from dworkers.master.journal import FencedError, GroupCommitter, Journal, JournalError
from dworkers.master.recent import RecentBytes
from dworkers.v1 import journal_pb2, work_pb2

log = logging.getLogger(__name__)

RESULTS_PER_MESSAGE = 500
RESULTS_PER_READ = 64  # results read from a journal that keeps them apart, at once (at most 16 MiB)
RESULT_CACHE_BYTES = 32 * 1024 * 1024
TRIM_AFTER_SNAPSHOT_BYTES = 32 * 1024 * 1024  # smaller snapshots leave too little to give back to be worth it
# After this many journaled bytes (payloads pass through the master on their
# way to the journal) freed memory goes back to the system: at the end of a
# burst (a tick with nothing appended), or every TRIM_INTERVAL meanwhile.
TRIM_AFTER_BYTES = 64 * 1024 * 1024
TRIM_INTERVAL = 30.0
# The most events one input can record (a full SubmitWorks with its starts, a
# worker message full of reports, a tick that ends every attempt): the shell
# takes an input only if the journal's buffer has room for it.
MAX_EVENTS_PER_INPUT = 2 * MAX_BATCH_WORKS + MAX_REPORTS_PER_MESSAGE
@dataclass(frozen=True)
class Moved:
    """Told to the calls waiting for a work that went to another shard."""
    work_id: str


def recover_state(journal: Journal) -> tuple[WorkState, int, int]:
    """Rebuilds WorkState from the latest snapshot and the batches after it.
    Returns the state, the last position it covers and the events replayed."""
    apart = journal.keeps_payloads
    state, position, count = WorkState(payloads_apart=apart), -1, 0
    snapshot = journal.read_snapshot()
    if snapshot is not None:
        position, data = snapshot
        state = WorkState.from_snapshot(journal_pb2.Snapshot.FromString(data), payloads_apart=apart)
    last = position
    for last, batch in journal.read(after=position):  # noqa: B007 (the last position read is returned)
        for event in batch.events:
            state.apply(event)
            count += 1
    return state, last, count


class MasterShell:
    def __init__(self, journal: Journal, epoch: int, settings: CoreSettings,
                 on_failure: Callable[[Exception], None], metrics=None,
                 confirm_leadership: Callable[[], Awaitable[None]] | None = None,
                 on_kinds: Callable[[frozenset[str], tuple], None] | None = None, cluster_id: str = "",
                 rate_limits: Mapping[str, float] | None = None):
        self.journal = journal
        self.epoch = epoch
        self.cluster_id = cluster_id
        self.settings = settings
        self.metrics = metrics
        self.rate_limits = rate_limits
        self.master = Master(WorkState(), settings, epoch, cluster_id, rate_limits=rate_limits)
        self.durable_sequence = 0  # results up to here are durable: they may be streamed
        self.node = ""  # the election znode that fences this master's writes
        self.closed: str | None = None  # why it stopped acting
        self._on_failure = on_failure
        self._confirm_leadership = confirm_leadership
        self._on_kinds = on_kinds
        self._results_ready = asyncio.Event()
        # WaitWorks calls, by the work ids they wait for; told when a result is durable.
        self._waiting: dict[str, list[asyncio.Queue]] = {}
        self.committer: GroupCommitter | None = None  # set once recovered
        self._ticker: asyncio.Task | None = None
        self._events_since_snapshot = 0
        self._batches_at_snapshot = 0
        self._bytes_at_snapshot = 0  # journal bytes appended when the last snapshot was cut
        self._bytes_at_last_complete = 0  # ...and when the last stored one was cut
        self._last_snapshot = time.monotonic()
        self._snapshotting = False
        self._trim = (0, 0, time.monotonic())  # bytes appended at the last trim, at the last tick; the trim's time
        # With a journal that keeps payloads and results apart: the recent ones.
        self._payloads = RecentBytes()
        self._results = RecentBytes(RESULT_CACHE_BYTES)

    @property
    def state(self) -> WorkState:
        return self.master.state

    # --- life --------------------------------------------------------------

    async def recover(self) -> None:
        """Replays the journal, then resets work in progress (durably)."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        state, position, count = await loop.run_in_executor(None, recover_state, self.journal)
        release_free_memory()  # what reading the snapshot and the batches took
        freeze_survivors(collect=False)  # the recovered state: no collection walks it again
        self.master = Master(state, self.settings, self.epoch, self.cluster_id, rate_limits=self.rate_limits)
        self.durable_sequence = state.last_sequence
        await loop.run_in_executor(None, self.journal.discard_after, position)
        self.committer = GroupCommitter(self.journal, self.epoch, self._journal_failed,
                                        on_batch=self.metrics and self.metrics.journal_batch, after=position,
                                        max_in_flight=self.journal.appends_in_flight)
        self.master.recovered(time.monotonic())
        await self._durable(self._commit(self.master.take()))
        self._ticker = asyncio.create_task(self._tick_forever())
        log.info("recovered %d events in %.3f s: %d pending, %d results", count,
                 time.monotonic() - started, len(state.pending), state.last_sequence,
                 extra={"epoch": self.epoch})
        if self.metrics:  # a failover if a master wrote the journal before
            self.metrics.recovered(time.monotonic() - started, failover=position >= 0)

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
        for queues in self._waiting.values():
            for queue in queues:
                queue.put_nowait(None)
        self.journal.close()
        for slot in list(self.master.scheduler.slots.values()):
            slot.connection.close(reason)

    def _journal_failed(self, exc: Exception) -> None:
        if self.closed is not None:  # it stopped acting already (a later master may be this process's)
            return
        log.error("journal append failed, stepping down: %s", exc, extra={"epoch": self.epoch})
        self.close(f"journal append failed: {exc}")
        self._on_failure(exc)

    def pause(self) -> None:
        if self.committer is not None:
            self.committer.pause()

    def resume(self) -> None:
        if self.committer is not None and self.closed is None:
            self.committer.resume()
            self._decide(lambda now: self.master.announce(now))  # requests that arrived while paused

    def check_serving(self) -> None:
        if self.closed is not None:
            raise NotServing(self.closed)
        if self.committer is None:
            raise NotServing("recovering")
        if self.committer.paused:
            raise NotServing("lost contact with ZooKeeper; waiting to learn whether it is still master")

    # --- persist, then act -------------------------------------------------

    def _journal(self) -> GroupCommitter:
        if self.committer is None:
            raise NotServing("recovering")
        return self.committer

    def _commit(self, step: Step) -> asyncio.Future:
        """Journals a step's events; performs its effects once they (and all
        before them) are durable. Returns the future of that."""
        committer = self._journal()
        if self.state.payloads_apart:  # results are read soon after they are written
            for event in step.events:
                if event.HasField("work_completed") and event.work_completed.sequence:
                    self._results.put(event.work_completed.sequence, event.work_completed.result)
        durable = committer.append(step.events) if step.events else committer.barrier()
        self._events_since_snapshot += len(step.events)
        started = self._started_by_kind(step) if self.metrics else {}
        durable.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self._perform(step, started))
        return durable

    def _started_by_kind(self, step: Step) -> dict[str, int]:
        """The step's hand-outs by kind (for metrics; read now, while the state has them running)."""
        started: dict[str, int] = {}
        running = self.state.in_progress
        for event in step.events:
            if event.HasField("work_started"):
                entry = running.get(event.work_started.work_id)
                kind = entry.kind if entry is not None else ""
                started[kind] = started.get(kind, 0) + 1
        return started

    def _perform(self, step: Step, started_by_kind: dict[str, int] | None = None) -> None:
        hand_outs_apart = []
        later: list[Send] = []
        for effect in step.effects:
            if isinstance(effect, Send):
                if effect.after_results:
                    later.append(effect)
                else:
                    effect.connection.send(effect.message, effect.size)
            elif isinstance(effect, HandOut):
                hand_outs_apart.append(effect)
            elif isinstance(effect, DeclareKinds) and self._on_kinds is not None:
                self._on_kinds(effect.kinds, effect.defaults)
            elif isinstance(effect, Disconnect):
                effect.connection.close(effect.reason)
        if hand_outs_apart:
            self._hand_out_with_payloads(hand_outs_apart)
        if step.last_sequence > self.durable_sequence:
            if self._waiting:
                self._deliver(self.durable_sequence + 1, step.last_sequence)
            self.durable_sequence = step.last_sequence
            self._wake_results()
        for effect in later:  # the waiters' streams are woken first
            effect.connection.send(effect.message, effect.size)
        if self.metrics:
            self.metrics.recorded(step, started_by_kind or {})

    def _hand_out_with_payloads(self, effects: list[HandOut]) -> None:
        """Sends hand-outs whose payloads the journal keeps: at once from the
        cache of recent payloads, or after reading the others in one query."""
        payloads: dict[str, bytes] = {}
        missing = []
        for effect in effects:
            for assignment in effect.assignments:
                work_id = assignment.work.work_id
                cached = self._payloads.take(work_id)
                if cached is None:
                    missing.append(work_id)
                else:
                    payloads[work_id] = cached
        if missing:
            asyncio.ensure_future(self._read_payloads_and_hand_out(effects, payloads, missing))
        else:
            self._send_hand_outs(effects, payloads)

    async def _read_payloads_and_hand_out(self, effects: list[HandOut], payloads: dict[str, bytes],
                                          missing: list[str]) -> None:
        """Unreadable payloads mean the journal is unreachable: step down."""
        try:
            payloads.update(await asyncio.get_running_loop().run_in_executor(None, self.journal.payloads, missing))
        except JournalError as exc:
            self._journal_failed(exc)
            return
        if self.closed is None:
            self._send_hand_outs(effects, payloads)

    def _send_hand_outs(self, effects: list[HandOut], payloads: dict[str, bytes]) -> None:
        for effect in effects:
            ready = []
            running = self.master.scheduler.running
            for assignment in effect.assignments:
                if assignment.attempt_token not in running:
                    continue  # cancelled (or lost) while its payload was read: the slot no longer holds it
                payload = payloads.get(assignment.work.work_id)
                if payload is None:  # the attempt times out and is retried
                    log.error("no payload stored for a work handed out", extra={
                        "work_id": assignment.work.work_id, "epoch": self.epoch})
                    continue
                assignment.work.payload = payload
                ready.append(assignment)
            for message, size in hand_outs(ready, self.epoch, self.cluster_id):
                effect.connection.send(message, size)

    def _decide(self, decision: Callable[[float], Any], records: bool = True) -> Any:
        """Runs one decision of the domain and commits what it recorded;
        returns its answer. Inputs that arrive while the master is closed or
        the journal is backed up are left alone: worker messages are resent,
        and housekeeping runs again (but decisions that record no events,
        `records=False`, always run)."""
        if self.closed is not None or self.committer is None or self.committer.failed is not None:
            return None
        if records and not self.committer.has_room(MAX_EVENTS_PER_INPUT, MAX_STREAM_MESSAGE_BYTES * 8):
            log.warning("the journal is backed up: an input waits", extra={"epoch": self.epoch})
            return None
        answer = decision(self._now())
        step = self.master.take()
        if step.events or step.effects or step.last_sequence > self.durable_sequence:
            self._commit(step)
        return answer

    def _now(self) -> float:
        """The decisions' clock (monotonic), with the Unix time's offset from it set."""
        now = time.monotonic()
        self.master.wall_offset = time.time() - now
        return now

    async def _durable(self, future: asyncio.Future) -> None:
        try:
            await future
        except JournalError as exc:
            raise NotServing(str(exc)) from None

    async def _answerable(self) -> None:
        """Makes a read taken just now safe to answer: everything it saw is
        durable, and this master still leads (a master resumed after a pause
        past its session must not answer from stale state)."""
        await self._durable(self._journal().barrier())
        if self._confirm_leadership is not None:
            try:
                await self._confirm_leadership()
            except Exception as exc:
                raise NotServing(f"cannot confirm it is still the master: {exc}") from None
        self.check_serving()

    def _deliver(self, first: int, last: int) -> None:
        """Hands the results numbered first..last, now durable, to the
        WaitWorks calls waiting for them."""
        results = self.state.results
        for sequence in range(first, last + 1):
            result = results.get(sequence)
            if result is not None:
                for queue in self._waiting.pop(result.work_id, ()):
                    queue.put_nowait(result)

    def _wake_results(self) -> None:
        self._results_ready.set()
        self._results_ready = asyncio.Event()

    # --- frontend operations ----------------------------------------------

    async def submit(self, works: list[work_pb2.Work], each_on_its_own: bool = False,
                     size: int | None = None) -> list:
        """Accepts works durably; returns, for each, whether it was a duplicate
        (or, with `each_on_its_own`, its Conflict)."""
        self.check_serving()
        committer = self._journal()
        behind = committer.bytes_appended - self._bytes_at_last_complete
        if not self.state.payloads_apart and behind > 2 * self.settings.snapshot_bytes:
            # the ZooKeeper journal lives in its heap; PostgreSQL's is on disk
            raise Overloaded(f"{behind:,} journal bytes wait for compaction (over twice --snapshot-bytes); "
                             "retry later")
        if not committer.has_room(2 * len(works), 2 * (size or 0)):
            raise Overloaded(f"{committer.queued} events are waiting for the journal; retry later")
        answers = self.master.submit(works, self._now(), each_on_its_own, size)
        step = self.master.take()
        if self.state.payloads_apart:  # hand-outs in this step and soon after find them here
            for event in step.events:
                if event.HasField("work_accepted"):
                    work = event.work_accepted.work
                    self._payloads.put(work.work_id, work.payload)
        accepted: dict[str, int] = {}
        for event in step.events:
            if event.HasField("work_accepted"):
                kind = event.work_accepted.work.kind
                accepted[kind] = accepted.get(kind, 0) + 1
        await self._durable(self._commit(step))
        if self.metrics:
            self.metrics.accepted(accepted)
        return answers

    async def retry(self, work_ids: list[str]) -> list[work_pb2.WorkStatus]:
        """Queues failed and cancelled works again, durably (see Master.retry)."""
        return await self._control(self.master.retry, work_ids, 2 * len(work_ids))  # each retried, maybe started

    async def cancel(self, work_ids: list[str]) -> list[work_pb2.WorkStatus]:
        """Cancels works durably (see Master.cancel); their statuses after it."""
        return await self._control(self.master.cancel, work_ids, len(work_ids))

    async def _control(self, decision, work_ids: list[str], events: int) -> list[work_pb2.WorkStatus]:
        """Runs a decision about given works and answers once it is durable;
        a refusal is answered from durable state too."""
        self.check_serving()
        if not self._journal().has_room(events, 0):
            raise Overloaded(f"{self._journal().queued} events are waiting for the journal; retry later")
        try:
            statuses = decision(work_ids, self._now())
        except (NotFound, WrongState):
            await self._answerable()  # a refusal says what the journal holds, not what it may lose
            raise
        await self._durable(self._commit(self.master.take()))
        return statuses

    async def status(self, work_id: str) -> work_pb2.WorkStatus | None:
        self.check_serving()
        status = self.master.status(work_id)
        await self._answerable()
        if status is not None and status.state == work_pb2.DONE and self.state.payloads_apart:
            status.result = (await self._result_bytes([status.sequence])).get(status.sequence, b"")
        return status

    async def _result_bytes(self, sequences: list[int]) -> dict[int, bytes]:
        """Results kept apart by the journal: recent ones from memory, the
        others in one query."""
        found: dict[int, bytes] = {}
        missing = []
        for sequence in sequences:
            cached = self._results.get(sequence)
            if cached is None:
                missing.append(sequence)
            else:
                found[sequence] = cached
        if missing:
            try:
                found.update(await asyncio.get_running_loop().run_in_executor(None, self.journal.results, missing))
            except JournalError as exc:
                raise NotServing(str(exc)) from None
        return found

    async def _with_result_bytes(self, batch: list[work_pb2.WorkResult]) -> list[work_pb2.WorkResult]:
        """Copies of results with their bytes, as many as fit one stream message."""
        found = await self._result_bytes([r.sequence for r in batch if r.state == work_pb2.DONE])
        filled: list[work_pb2.WorkResult] = []
        size = 0
        for result in batch:
            copy = work_pb2.WorkResult()
            copy.CopyFrom(result)
            if result.state == work_pb2.DONE:
                copy.result = found.get(result.sequence, b"")
            size += copy.ByteSize() + 8
            if filled and size > MAX_STREAM_MESSAGE_BYTES - 64 * 1024:
                break
            filled.append(copy)
        return filled

    async def list_works(self, which: int, kind: str, token: str, size: int) -> work_pb2.ListWorksResponse:
        """A page of works in one state, answered like any read: from durable state."""
        self.check_serving()
        works, next_token = self.master.list_works(which, kind, token, size)
        await self._answerable()
        return work_pb2.ListWorksResponse(works=works, next_page_token=next_token)

    async def cluster_counts(self) -> dict:
        """Counts for ClusterInfo, answered like any read: from durable state."""
        self.check_serving()
        counts = self.master.counts()
        await self._answerable()
        return counts

    async def results(self, after: int):
        """Yields batches of durable results after `after`, forever; each
        batch fits one stream message."""
        cursor = after
        while True:
            if self.closed is not None:
                raise NotServing(self.closed)
            state = self.state
            if cursor and cursor < state.forgotten_up_to:
                raise Forgotten(f"results up to sequence {state.forgotten_up_to} left the retention "
                                f"window; resume after it (asked for after {cursor})")
            if cursor < self.durable_sequence:
                first = max(cursor, state.forgotten_up_to)
                limit = min(self.durable_sequence - first, RESULTS_PER_MESSAGE)
                if state.payloads_apart:
                    limit = min(limit, RESULTS_PER_READ)
                    batch = await self._with_result_bytes(state.results_after(cursor, limit))
                else:
                    batch = state.results_after(cursor, limit, MAX_STREAM_MESSAGE_BYTES - 64 * 1024)
                # none: every number looked at was imported by a move (not published here)
                cursor = batch[-1].sequence if batch else first + limit
                if batch:
                    yield batch
                continue
            await self._results_ready.wait()

    async def wait_works(self, work_ids: list[str]):
        """Yields batches of the durable results of `work_ids` as they finish
        (at once for those finished), each fitting one stream message; ends
        when all have come. Ids not known (never accepted, or whose results
        left the retention window) are refused before anything is sent."""
        queue: asyncio.Queue = asyncio.Queue()
        ids = list(dict.fromkeys(work_ids))
        ready, unknown = self.await_works(queue, ids)
        waiting = set(ids).difference(r.work_id for r in ready).difference(unknown)
        if unknown:
            self.forget_waits(queue, waiting)
            raise NotFound(not_found(unknown))
        try:
            while True:
                while ready:
                    batch = await self.stream_batch(ready)
                    del ready[:len(batch)]
                    yield batch
                if not waiting:
                    return
                result = await queue.get()
                while True:
                    if result is None:
                        raise NotServing(self.closed or "master stopped")
                    if isinstance(result, Moved):
                        raise WrongShard("works awaited here moved to another shard: ask again with the new shard map")
                    waiting.discard(result.work_id)
                    ready.append(result)
                    if queue.empty():
                        break
                    result = queue.get_nowait()
        finally:
            self.forget_waits(queue, waiting)

    def await_works(self, queue: asyncio.Queue, work_ids: Iterable[str]) -> tuple[list[work_pb2.WorkResult], list[str]]:
        """Returns the durable results of those of `work_ids` finished, and
        the ids not known here (never accepted, or past retention); the
        others' results (or Moved) come on `queue`, once each."""
        self.check_serving()
        state = self.state
        ready: list[work_pb2.WorkResult] = []
        unknown = []
        for work_id in work_ids:
            result = state.finished.get(work_id)
            if result is not None and result.sequence <= self.durable_sequence:
                ready.append(result)
            elif state.is_known(work_id):
                queues = self._waiting.setdefault(work_id, [])
                if queue not in queues:
                    queues.append(queue)
            else:
                unknown.append(work_id)
        return ready, unknown

    def forget_waits(self, queue: asyncio.Queue, work_ids: Iterable[str]) -> None:
        for work_id in work_ids:
            queues = self._waiting.get(work_id)
            if queues is not None and queue in queues:
                queues.remove(queue)
                if not queues:
                    del self._waiting[work_id]

    async def stream_batch(self, results: list[work_pb2.WorkResult]) -> list[work_pb2.WorkResult]:
        """The first of `results` (at least one) that fit one stream message,
        with their bytes."""
        if self.state.payloads_apart:
            return await self._with_result_bytes(results[:RESULTS_PER_READ])
        batch: list[work_pb2.WorkResult] = []
        size = 0
        for result in results[:RESULTS_PER_MESSAGE]:
            size += result.ByteSize() + 8
            if batch and size > MAX_STREAM_MESSAGE_BYTES - 64 * 1024:
                break
            batch.append(result)
        return batch

    # --- moving slots (see domain/moves.py and mover.py) --------------------

    async def _record_durably(self, decision: Callable[[float], Any]) -> Any:
        """Runs a decision and answers once what it recorded is durable."""
        self.check_serving()
        answer = decision(self._now())
        await self._durable(self._commit(self.master.take()))
        return answer

    async def start_move(self, move) -> bool:
        """The source's first step, durably (see Master.start_move)."""
        return await self._record_durably(lambda now: self.master.start_move(move, now))

    async def import_works(self, request) -> str:
        """The target takes a part of a move's works, durably; how far it got."""
        self.check_serving()
        if not self._journal().has_room(len(request.entries) + len(request.results) + 1, request.ByteSize()):
            raise Overloaded(f"{self._journal().queued} events are waiting for the journal; retry later")
        return await self._record_durably(lambda now: self.master.import_works(request, now))

    async def fill_apart(self, request) -> None:
        """Adds the payloads and results the journal keeps apart to a part of
        a move; leaves out what left the retention window while they were read."""
        state = self.state
        if not state.payloads_apart:
            return
        ids = [e.work.work_id for e in request.entries]
        done = [r.sequence for r in request.results if r.state == work_pb2.DONE]
        try:
            payloads = await asyncio.get_running_loop().run_in_executor(None, self.journal.payloads, ids) \
                if ids else {}
        except JournalError as exc:
            raise NotServing(str(exc)) from None
        found = await self._result_bytes(done)
        entries, results, prints = [], [], []
        for e in request.entries:
            if e.retryable_until_forgotten and e.work.work_id not in state.retryable:
                continue  # forgotten meanwhile, with its result
            payload = payloads.get(e.work.work_id)
            if payload is None:
                raise JournalError(f"the journal holds no payload for work {e.work.work_id!r}")
            e.work.payload = payload
            entries.append(e)
        for r, print_ in zip(request.results, request.result_fingerprints):
            kept = state.finished.get(r.work_id)
            if kept is None or kept.sequence != r.sequence:
                continue  # forgotten meanwhile
            if r.state == work_pb2.DONE:
                if r.sequence not in found:
                    raise JournalError(f"the journal holds no result for work {r.work_id!r}")
                r.result = found[r.sequence]
            results.append(r)
            prints.append(print_)
        del request.entries[:], request.results[:], request.result_fingerprints[:]
        request.entries.extend(entries)
        request.results.extend(results)
        request.result_fingerprints.extend(prints)

    async def release_move(self, work_ids: list[str]) -> None:
        """The source's last journaled step: the moved works go from here,
        and calls waiting for them are told to ask the new shard."""
        await self._record_durably(lambda now: self.master.release_move(work_ids, now))
        for work_id in work_ids:
            for queue in self._waiting.pop(work_id, ()):
                queue.put_nowait(Moved(work_id))

    # --- the worker protocol ----------------------------------------------

    def register(self, connection, message) -> None:
        self._decide(lambda now: self.master.register(connection, message, now))

    def request_work(self, connection, worker_ids) -> None:
        self._decide(lambda now: self.master.request_work(connection, worker_ids, now))

    def withdraw_work(self, connection, worker_ids) -> None:
        self._decide(lambda now: self.master.withdraw_work(connection, worker_ids), records=False)

    def report(self, connection, completions, failures) -> None:
        self._decide(lambda now: self.master.report(connection, completions, failures, now))

    def rate_limits_changed(self) -> None:
        """Works held back by a limit that was raised or removed may start now."""
        self._decide(lambda now: self.master.announce(now))

    def heartbeat(self, connection, heartbeats) -> None:
        self._decide(lambda now: self.master.heartbeat(connection, heartbeats, now))

    def disconnected(self, connection) -> None:
        self._decide(lambda now: self.master.disconnected(connection, now))

    # --- housekeeping ------------------------------------------------------

    async def _tick_forever(self) -> None:
        interval = max(0.1, min(1.0, self.settings.work_timeout / 2))
        committer = self._journal()
        while self.closed is None:
            due = self.master.next_due(time.monotonic())  # a scheduled work may be due before the next tick
            if due is None or committer.paused:
                await asyncio.sleep(interval)
            else:
                await asyncio.sleep(min(interval, max(0.01, due - time.monotonic())))
            if committer.paused or committer.failed is not None:
                continue
            overdue = self._decide(lambda now: self.master.tick(now, self.durable_sequence)) or []
            for slot, work_id in overdue:
                log.warning("work timed out on its worker", extra={"work_id": work_id, "worker_id": slot.worker_id})
                if self.metrics:
                    entry = self.state.unfinished(work_id)
                    result = self.state.finished.get(work_id)
                    self.metrics.timed_out(entry.kind if entry else result.kind if result else "")
            self._maybe_snapshot(time.monotonic())
            self._maybe_trim(time.monotonic())

    def _maybe_trim(self, now: float) -> None:
        """Gives freed memory back to the system after a burst of journaled
        bytes (glibc keeps what Python frees, so a master that took a
        backlog would otherwise stay as large as at its peak)."""
        appended = self._journal().bytes_appended
        trimmed, last_tick, when = self._trim
        if appended - trimmed >= TRIM_AFTER_BYTES and (appended == last_tick or now - when >= TRIM_INTERVAL):
            self._trim = (appended, appended, now)
            asyncio.get_running_loop().run_in_executor(None, release_free_memory)  # off the loop: it walks the heap
        else:
            self._trim = (trimmed, appended, when)

    def _maybe_snapshot(self, now: float) -> None:
        s, committer, state = self.settings, self._journal(), self.state
        if self._snapshotting or not self._events_since_snapshot:
            return
        if state.payloads_apart and self._events_since_snapshot < self._state_size() // 4:
            # A snapshot costs time and writes in proportion to the state (a
            # backlog, kept results): take one only per quarter of it in
            # events. Replaying PostgreSQL's batches is one streamed query,
            # so their count need not be kept low (ZooKeeper reads a znode
            # per batch, and holds them in its heap: its bounds stay).
            return
        if (self._events_since_snapshot >= s.snapshot_every
                or committer.batches_written - self._batches_at_snapshot >= s.snapshot_batches
                or committer.bytes_appended - self._bytes_at_snapshot >= s.snapshot_bytes
                or now - self._last_snapshot >= s.snapshot_interval):
            self._snapshotting = True
            asyncio.create_task(self.snapshot())

    def _state_size(self) -> int:
        state = self.state
        return len(state.pending) + len(state.scheduled) + len(state.in_progress) + len(state.results)

    async def snapshot(self) -> int:
        """Writes a snapshot of the state and compacts the journal it covers.
        Returns the position covered."""
        self._snapshotting = True
        committer = self._journal()
        try:
            covered = committer.cut()
            capture = self.state.capture()  # the state as of the cut: same loop step
            cut_bytes = committer.bytes_appended
            self._events_since_snapshot = 0
            self._batches_at_snapshot = committer.batches_written
            self._bytes_at_snapshot = cut_bytes
            self._last_snapshot = time.monotonic()
            position = await covered
            started = time.monotonic()
            parts = []
            for part in capture.parts():
                parts.append(part)
                await asyncio.sleep(0)  # calls and worker messages go on between parts
            entries, results = capture.counts()
            del capture
            loop = asyncio.get_running_loop()
            size = sum(map(len, parts))
            await loop.run_in_executor(None, self._store_snapshot, position, parts)
            del parts
            if size >= TRIM_AFTER_SNAPSHOT_BYTES:  # its memory, back to the system; off the loop, as that walks
                await loop.run_in_executor(None, release_free_memory)  # the heap (holding malloc's locks)
            self._bytes_at_last_complete = cut_bytes
            log.info("snapshot at journal position %d: %d pending, %d results, %.2f s", position,
                     entries, results, time.monotonic() - started,
                     extra={"epoch": self.epoch})
            return position
        except JournalError as exc:
            if isinstance(exc, FencedError):
                self._journal_failed(exc)
            log.warning("snapshot failed: %s", exc, extra={"epoch": self.epoch})
            raise
        finally:
            self._snapshotting = False

    def _store_snapshot(self, position: int, parts: list[bytes]) -> None:
        if self.closed is not None:
            return
        self.journal.write_snapshot(position, b"".join(parts))
        if self.closed is None:
            self.journal.compact()

    def counts(self) -> dict:
        counts = self.master.counts()
        counts["oldest_pending_seconds"] = self.master.oldest_pending_age(time.monotonic())
        return counts


def not_found(unknown: list[str]) -> str:
    shown = ", ".join(repr(w) for w in unknown[:5])
    if len(unknown) > 5:
        shown += f" and {len(unknown) - 5} more"
    return f"no work {shown}: never accepted, or its result left the retention window"
