"""The master's decisions under any interleaving (a Hypothesis state machine,
in one process, with a fake clock): submissions and resubmissions (with
priorities, delays and back-offs), workers of different kinds (some
prefetching works ahead) that register, ask, report done, failed or failed
for good, hand work back, resend old reports and vanish, attempts that time
out, cancels, and failovers, some of them losing the last, undurable step.

Invariants: the state never meets an impossible event; the journal replays
to exactly the live state; nothing acknowledged is lost; no work finishes
twice; and once the machine stops, workers drain everything: every
acknowledged work finishes exactly once.

Run twice: with payloads in the state (the ZooKeeper journal), and with
payloads kept apart as the PostgreSQL journal keeps them (batches stored
without them, a payload store changed by the same batches): then every
hand-out finds its work's payload, and a drained queue leaves none behind.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dworkers.common.errors import Conflict, NotFound, WrongState
from dworkers.master.domain.effects import Disconnect, HandOut, Send
from dworkers.master.domain.master import CoreSettings, Master
from dworkers.master.domain.state import WorkState
from dworkers.master.journal.postgresql import Apart, take_apart
from dworkers.v1 import journal_pb2, master_pb2, work_pb2

pytestmark = pytest.mark.unit

KINDS = ("square", "blob")
SETTINGS = CoreSettings(work_timeout=10.0, worker_timeout=30.0, retention_count=10**6, retention_seconds=10**9)


class Connection:
    """A worker process's stream as the domain sees it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def send(self, message, size=0):  # the test delivers effects itself
        pass


class Worker:
    """A worker process: its slots, what it was handed, what it reported."""

    def __init__(self, name: str, kinds: tuple[str, ...], slots: int, prefetch: int = 0) -> None:
        self.name, self.kinds, self.prefetch = name, kinds, prefetch
        self.slot_ids = [f"{name}-{i}" for i in range(slots)]
        self.connection = Connection(name)
        self.running: dict[str, list[master_pb2.Assignment]] = {}  # slot -> what it holds, the first runs
        self.sent: list = []  # every report it ever sent (for resends)

    def register(self) -> master_pb2.RegisterWorker:
        running = [master_pb2.RunningAttempt(worker_id=slot, work_id=held[0].work.work_id,
                                             attempt_token=held[0].attempt_token, seconds_left=held[0].timeout_seconds)
                   for slot, held in self.running.items()]
        return master_pb2.RegisterWorker(worker_ids=self.slot_ids, host=self.name, kinds=list(self.kinds),
                                         prefetch=self.prefetch, running=running)

    def idle(self) -> list[str]:
        """The slots with room."""
        return [s for s in self.slot_ids if len(self.running.get(s, ())) < 1 + self.prefetch]

    def take(self, slot: str, i: int = 0) -> master_pb2.Assignment:
        held = self.running[slot]
        assignment = held.pop(i)
        if not held:
            del self.running[slot]
        return assignment


class MasterMachine(RuleBasedStateMachine):
    APART = False  # payloads kept apart from the state and the stored batches

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[str, bytes] = {}  # the payloads the journal keeps apart, by work id
        self.result_store: dict[int, tuple[str, bytes]] = {}  # and the results, by sequence
        self.now = 1000.0
        self.journal: list = []  # every durable event, in order
        self.acked: set[str] = set()  # work ids a client was told are accepted
        self.retried: Counter = Counter()  # times each work was queued again after it ended
        self.payloads: dict[str, bytes] = {}
        self.reported: dict[str, set[bytes]] = {}  # the results workers reported for each work
        self.workers: list[Worker] = []
        self.count = 0
        self.failovers = 0
        self.master = self._new_master(recover=False)

    # --- the shell's part: commit a step, perform its effects -------------------

    def _new_master(self, recover: bool) -> Master:
        state = WorkState(strict=True, payloads_apart=self.APART)
        for recorded in self.journal:
            state.apply(recorded)
        master = Master(state, SETTINGS, epoch=len(self.journal), rng=random.Random(len(self.journal)))
        if recover:
            master.recovered(self.now)
            self._commit(master)
        return master

    def _commit(self, master: Master | None = None, lose: bool = False) -> list:
        step = (master or self.master).take()
        if lose:
            return []
        if self.APART:  # as stored: without payloads and results, which go to their tables
            apart = Apart()
            stored = journal_pb2.JournalBatch.FromString(take_apart(journal_pb2.JournalBatch(
                events=step.events), apart))
            for work_id, payload in apart.payloads.items():
                if payload is None:
                    self.store.pop(work_id, None)
                else:
                    self.store[work_id] = payload
            self.result_store.update(apart.results)
            for sequence in [s for s in self.result_store if s <= apart.forgotten_up_to]:
                del self.result_store[sequence]
            self.journal += stored.events
        else:
            self.journal += step.events
        silent: list[Worker] = []
        for effect in step.effects:
            assert not isinstance(effect, HandOut) or self.APART, "payloads are in the state: send them"
            if isinstance(effect, Disconnect):  # a silent worker's stream ends: it reconnects
                silent += [w for w in self.workers if w.connection is effect.connection]
                continue
            if isinstance(effect, HandOut):
                for assignment in effect.assignments:
                    assert not assignment.work.payload
                    assignment.work.payload = self.store[assignment.work.work_id]  # it must be there
                assignments = effect.assignments
            elif isinstance(effect, Send) and effect.message.HasField("works"):
                assignments = effect.message.works.assignments
            elif isinstance(effect, Send) and effect.message.HasField("cancel"):
                worker = next(w for w in self.workers if w.connection is effect.connection)
                self._stop(worker, set(effect.message.cancel.attempt_tokens), master or self.master)
                continue
            else:
                continue
            worker = next(w for w in self.workers if w.connection is effect.connection)
            for assignment in assignments:
                assert assignment.work.payload == self.payloads[assignment.work.work_id]
                assert assignment.work.kind in worker.kinds, "handed a work of a kind it does not run"
                held = worker.running.setdefault(assignment.worker_id, [])
                # what it runs may have just timed out: on the worker's clock too (see time_passes)
                live = [a for a in held if a.attempt_token in (master or self.master).scheduler.running]
                assert len(live) <= worker.prefetch, "handed a slot more works than it may hold"
                held.append(assignment)
        for worker in silent:
            (master or self.master).disconnected(worker.connection, self.now)
            self._reconnect(worker, master or self.master)
        if silent:
            return step.events + self._commit(master)
        return step.events

    def _stop(self, worker: Worker, tokens: set[int], master: Master) -> None:
        """A worker told to stop attempts: it drops them (a killed job reports
        failed, a report the master ignores)."""
        for slot in list(worker.running):
            for i, assignment in reversed(list(enumerate(worker.running[slot]))):
                if assignment.attempt_token in tokens:
                    worker.take(slot, i)
                    if i == 0:
                        master.report(worker.connection, [], [master_pb2.Failure(
                            worker_id=slot, work_id=assignment.work.work_id, attempt_token=assignment.attempt_token,
                            error="cancelled")], self.now)

    def _reconnect(self, worker: Worker, master: Master) -> None:
        """A new stream: it keeps running what it ran; what it held ahead went
        back to the queue with the old stream."""
        worker.connection = Connection(worker.name)
        worker.running = {slot: held[:1] for slot, held in worker.running.items()}
        master.register(worker.connection, worker.register(), self.now)

    def _find(self, name: str) -> Worker | None:
        return next((w for w in self.workers if w.name == name), None)

    # --- rules --------------------------------------------------------------------

    @rule(ids=st.lists(st.integers(0, 40), min_size=1, max_size=5), kind=st.sampled_from(KINDS),
          variant=st.sampled_from([b"1", b"2"]), priority=st.sampled_from([0, 0, 1, 5, -2]),
          delay=st.sampled_from([0.0, 0.0, 5.0, 50.0]), backoff=st.booleans())
    def submit(self, ids, kind, variant, priority, delay, backoff) -> None:
        works = [work_pb2.Work(work_id=f"w{i}", kind=kind, payload=variant, max_attempts=2, priority=priority,
                               not_before=self.now + delay if delay else 0.0) for i in dict.fromkeys(ids)]
        for work in works:
            if backoff:
                work.backoff.initial_seconds = 3.0
        try:
            duplicates = self.master.submit(works, self.now)
        except Conflict:
            self.master.take()  # nothing was recorded
            return
        for work, duplicate in zip(works, duplicates):
            if not duplicate:
                self.payloads[work.work_id] = work.payload
        self._commit()
        self.acked.update(work.work_id for work in works)

    @rule(kinds=st.sampled_from([("square",), ("blob",), KINDS]), slots=st.integers(1, 3),
          prefetch=st.sampled_from([0, 0, 1, 2]))
    def worker_starts(self, kinds, slots, prefetch) -> None:
        self.count += 1
        worker = Worker(f"p{self.count}", kinds, slots, prefetch)
        self.workers.append(worker)
        self.master.register(worker.connection, worker.register(), self.now)
        self.master.request_work(worker.connection, worker.idle(), self.now)
        self._commit()

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def worker_asks(self, data) -> None:
        worker = data.draw(st.sampled_from(self.workers))
        self.master.register(worker.connection, worker.register(), self.now)
        self.master.request_work(worker.connection, worker.idle(), self.now)
        self._commit()

    @precondition(lambda self: self.acked)
    @rule(data=st.data())
    def client_cancels(self, data) -> None:
        work_ids = data.draw(st.lists(st.sampled_from(sorted(self.acked)), min_size=1, max_size=3))
        state = self.master.state
        finished = [w for w in work_ids if w in state.finished and state.finished[w].state != work_pb2.CANCELLED]
        try:
            statuses = self.master.cancel(work_ids, self.now)
        except (NotFound, WrongState) as exc:
            assert finished or any(not state.is_known(w) for w in work_ids), exc
            assert not self.master.take().events, "a refused cancel recorded something"
            return
        assert not finished
        assert all(s.state == work_pb2.CANCELLED for s in statuses)
        self._commit()

    @precondition(lambda self: self.acked)
    @rule(data=st.data())
    def client_retries(self, data) -> None:
        work_ids = list(dict.fromkeys(data.draw(st.lists(st.sampled_from(sorted(self.acked)), min_size=1,
                                                         max_size=3))))
        state = self.master.state
        retryable = all(w in state.retryable for w in work_ids)
        try:
            statuses = self.master.retry(work_ids, self.now)
        except (NotFound, WrongState) as exc:
            assert not retryable, exc
            assert not self.master.take().events, "a refused retry recorded something"
            return
        assert retryable and all(s.state in (work_pb2.PENDING, work_pb2.IN_PROGRESS) for s in statuses)
        self._commit()
        self.retried.update(work_ids)

    @precondition(lambda self: any(w.running for w in self.workers))
    @rule(data=st.data(), outcome=st.sampled_from(["done", "failed", "failed for good", "returned"]),
          ask=st.booleans())
    def worker_reports(self, data, outcome, ask) -> None:
        """On the work a slot runs, or hands back one it holds ahead."""
        worker = data.draw(st.sampled_from([w for w in self.workers if w.running]))
        slot = data.draw(st.sampled_from(sorted(worker.running)))
        held = len(worker.running[slot])
        assignment = worker.take(slot, data.draw(st.integers(0, held - 1)) if outcome == "returned" else 0)
        work_id, token = assignment.work.work_id, assignment.attempt_token
        if outcome == "done":
            report = master_pb2.Completion(worker_id=slot, work_id=work_id, attempt_token=token,
                                           result=assignment.work.payload + b"!")
            self.reported.setdefault(work_id, set()).add(report.result)
            completions, failures = [report], []
        else:
            report = master_pb2.Failure(worker_id=slot, work_id=work_id, attempt_token=token, error="boom",
                                        returned=outcome == "returned", permanent=outcome == "failed for good")
            completions, failures = [], [report]
        worker.sent.append(report)
        self.master.report(worker.connection, completions, failures, self.now)
        if ask:
            self.master.request_work(worker.connection, [slot], self.now)
        self._commit()

    @precondition(lambda self: any(w.sent for w in self.workers))
    @rule(data=st.data())
    def worker_resends_an_old_report(self, data) -> None:
        worker = data.draw(st.sampled_from([w for w in self.workers if w.sent]))
        report = data.draw(st.sampled_from(worker.sent))
        self.master.register(worker.connection, worker.register(), self.now)
        if isinstance(report, master_pb2.Completion):
            self.master.report(worker.connection, [report], [], self.now)
        else:
            self.master.report(worker.connection, [], [report], self.now)
        self._commit()

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def worker_vanishes(self, data) -> None:
        """Its works go back to the queue; those it held ahead never ran:
        losing them is not a failed attempt."""
        worker = data.draw(st.sampled_from(self.workers))
        self.workers.remove(worker)
        state = self.master.state
        ahead = [a for held in worker.running.values() for a in held[1:]]
        failures = {a.work.work_id: state.in_progress[a.work.work_id].failures for a in ahead
                    if a.work.work_id in state.in_progress
                    and state.in_progress[a.work.work_id].token == a.attempt_token}
        self.master.disconnected(worker.connection, self.now)
        self._commit()
        for work_id, before in failures.items():  # back in the queue, or handed out again already
            entry = state.unfinished(work_id)
            if entry is None:
                assert state.finished[work_id].state == work_pb2.CANCELLED  # it was cancelled meanwhile
                continue
            assert entry.failures == before, "a work held ahead counted a failed attempt"

    @rule(seconds=st.sampled_from([1.0, 11.0, 40.0]))
    def time_passes(self, seconds) -> None:
        self.now += seconds
        self.master.tick(self.now, self.master.state.last_sequence)
        self._commit()
        self._workers_time_out()

    def _workers_time_out(self) -> None:
        """Workers time out what they run on the master's clock (their
        report is stale by then)."""
        running = self.master.scheduler.running
        for worker in self.workers:
            for slot in list(worker.running):
                token = worker.running[slot][0].attempt_token
                if token not in running:
                    late = worker.take(slot)
                    self.master.report(worker.connection, [], [master_pb2.Failure(
                        worker_id=slot, work_id=late.work.work_id, attempt_token=token, error="timed out")], self.now)
        self._commit()

    @rule(lose_last_step=st.booleans(), data=st.data())
    def failover(self, lose_last_step, data) -> None:
        if lose_last_step and self.workers:  # a decision whose batch never became durable
            worker = data.draw(st.sampled_from(self.workers))
            self.master.request_work(worker.connection, worker.idle(), self.now)
            self._commit(lose=True)
        self.master = self._new_master(recover=True)
        self.failovers += 1
        for worker in self.workers:
            self._reconnect(worker, self.master)
        self._commit()

    # --- invariants ---------------------------------------------------------------

    @invariant()
    def journal_replays_to_the_live_state(self) -> None:
        replayed = WorkState(strict=True, payloads_apart=self.APART)
        for recorded in self.journal:
            replayed.apply(recorded)
        assert replayed.to_snapshot() == self.master.state.to_snapshot()

    @invariant()
    def every_retained_result_is_stored_apart_and_nothing_else(self) -> None:
        if not self.APART:
            return
        state = self.master.state
        done = {s: r.work_id for s, r in state.results.items() if r.state == work_pb2.DONE}
        assert {s: w for s, (w, _) in self.result_store.items()} == done
        assert all(not r.result for r in state.results.values()), "result bytes held in memory"
        assert all(result in self.reported[w] for w, result in self.result_store.values())

    @invariant()
    def nothing_acknowledged_is_lost_and_nothing_finishes_twice(self) -> None:
        state = self.master.state
        assert all(state.is_known(work_id) for work_id in self.acked)
        finished = Counter(r.work_id for r in state.results.values())
        assert not [w for w, n in finished.items() if n > 1 + self.retried[w]]
        assert set(finished) <= self.acked

    def teardown(self) -> None:
        """Workers that run everything drain the queue: every acknowledged
        work ends exactly once."""
        drainer = Worker("drainer", KINDS, 4, prefetch=1)
        self.workers.append(drainer)
        for _ in range(400):
            state = self.master.state
            if not state.pending and not state.in_progress and not state.scheduled:
                break
            self.now += 11.0  # lost attempts time out
            self.master.tick(self.now, state.last_sequence)
            self._commit()
            self._workers_time_out()
            self.master.register(drainer.connection, drainer.register(), self.now)
            self.master.request_work(drainer.connection, drainer.idle(), self.now)
            self._commit()
            for slot in [s for s, held in drainer.running.items() for _ in held]:  # all it holds, in order
                assignment = drainer.take(slot)
                self.reported.setdefault(assignment.work.work_id, set()).add(b"drained")
                self.master.report(drainer.connection, [master_pb2.Completion(
                    worker_id=slot, work_id=assignment.work.work_id, attempt_token=assignment.attempt_token,
                    result=b"drained")], [], self.now)
                self._commit()
        state = self.master.state
        assert not state.pending and not state.in_progress and not state.scheduled
        finished = Counter(r.work_id for r in state.results.values())
        assert finished == Counter(self.acked) + self.retried, "every acknowledged work finishes exactly once " \
            "(and once more per retry)"
        assert not self.APART or set(self.store) == set(state.retryable), "payloads of finished works were left " \
            "behind, or the payloads of failed works, which may be retried, were not kept"
        event(f"acknowledged works: {len(self.acked) // 5 * 5}+")
        event(f"failovers: {min(self.failovers, 3)}{'+' if self.failovers >= 3 else ''}")


MasterMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestMasterDecisions = MasterMachine.TestCase


class PayloadsApartMachine(MasterMachine):
    APART = True


PayloadsApartMachine.TestCase.settings = MasterMachine.TestCase.settings
TestMasterDecisionsWithPayloadsApart = PayloadsApartMachine.TestCase
