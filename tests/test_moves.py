"""Moving slots between shards, in the domain: a source and a target master
driven without processes (the live move runs in tests/test_shards.py)."""

from __future__ import annotations

import pytest

from dworkers.common.errors import Conflict
from dworkers.common.shards import Move, slot_of
from dworkers.master.domain.effects import HandOut, Send
from dworkers.master.domain.listing import list_works
from dworkers.master.domain.master import CoreSettings, Master
from dworkers.master.domain.moves import export_part, ids_to_move, running_in
from dworkers.master.domain.state import WorkState
from dworkers.master.journal.postgresql import Apart, take_apart
from dworkers.v1 import journal_pb2, master_pb2, work_pb2

pytestmark = pytest.mark.unit

SETTINGS = CoreSettings()
IDS = [f"w{i:04d}" for i in range(600)]
SLOTS = sorted({slot_of(w) for w in IDS})
MOVE = Move(0, SLOTS[len(SLOTS) // 2], 0, 1, since=7)  # about half the works' slots


def moving(work_id: str) -> bool:
    return MOVE.covers(slot_of(work_id))


class Journaled:
    """A master whose recorded events are kept (its journal)."""

    def __init__(self, payloads_apart: bool = False):
        self.master = Master(WorkState(strict=True, payloads_apart=payloads_apart), SETTINGS)
        self.events: list[journal_pb2.Event] = []
        self.effects: list = []

    @property
    def state(self) -> WorkState:
        return self.master.state

    def do(self, decision):
        answer = decision(self.master, 0.0)
        step = self.master.take()
        self.events += step.events
        self.effects += step.effects
        return answer

    def replayed(self) -> WorkState:
        state = WorkState(strict=True, payloads_apart=self.state.payloads_apart)
        for event in self.events:
            copy = journal_pb2.Event()
            copy.CopyFrom(event)
            state.apply(copy)
        return state


def work(work_id: str, delay: float = 0.0) -> work_pb2.Work:
    return work_pb2.Work(work_id=work_id, kind="k", payload=work_id.encode() * 3, max_attempts=3, not_before=delay)


def finish(source: Journaled, work_id: str, ok: bool = True) -> None:
    entry = source.state.pending.pop(work_id)
    source.state.pending.push_new(entry)  # back where it was: start() takes it from the queue
    token = 1000 + IDS.index(work_id)
    source.state.start(work_id, token)
    source.events.append(journal_pb2.Event(work_started=journal_pb2.WorkStarted(work_id=work_id, attempt_token=token)))
    if ok:
        event = journal_pb2.Event(work_completed=journal_pb2.WorkCompleted(
            work_id=work_id, result=b"r-" + work_id.encode(), attempt_token=token))
    else:
        event = journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(
            work_id=work_id, error="no", attempt_token=token, permanent=True))
    source.do(lambda m, now: m._record([event], now))


def a_source_with_works() -> Journaled:
    source = Journaled()
    source.do(lambda m, now: m.submit([work(w, delay=4e9 if i % 10 == 3 else 0.0) for i, w in enumerate(IDS)], now))
    for w in IDS[:100]:
        if w in source.state.pending:
            finish(source, w, ok=IDS.index(w) % 7 != 0)
    return source


def copy_all(source: Journaled, target: Journaled, ids: list[str], stop_after: int | None = None) -> int:
    start, parts = 0, 0
    while start < len(ids) and (stop_after is None or parts < stop_after):
        request, start = export_part(source.state, ids, start, MOVE.key, MOVE.source)
        request = master_pb2.ImportWorksRequest.FromString(request.SerializeToString())  # over the wire
        target.do(lambda m, now, r=request: m.import_works(r, now))
        parts += 1
    return start


def test_a_move_carries_pending_scheduled_retryable_and_finished_works_and_nothing_else():
    source, target = a_source_with_works(), Journaled()
    before = {w: source.state.status(w) for w in IDS}
    assert source.do(lambda m, now: m.start_move(MOVE, now))
    held = set(source.state.held)
    assert held and all(moving(w) for w in held)
    assert not any(moving(w) for w in source.state.pending)
    assert not any(moving(e.work_id) for e in source.state.scheduled.values())
    assert running_in(source.state, MOVE.first, MOVE.last) == 0
    ids = ids_to_move(source.state, MOVE.first, MOVE.last)
    assert set(ids) == {w for w in IDS if moving(w)}
    copy_all(source, target, ids)
    source.do(lambda m, now: m.release_move(ids, now))
    assert source.state.leaving is None and not source.state.held and source.state.last_released == MOVE.key
    assert not any(moving(w) for w in source.state.retryable)
    for w in IDS:
        if not moving(w):
            continue
        was, now = before[w], target.state.status(w)
        assert (now.state, now.attempts, now.error, now.result) == (was.state, was.attempts, was.error, was.result), w
    # Resubmitting a moved id is a duplicate; with another payload, a conflict.
    assert target.do(lambda m, now: m.submit([work(w) for w in ids], now)) == [True] * len(ids)
    with pytest.raises(Conflict):
        target.do(lambda m, now: m.submit([work_pb2.Work(work_id=ids[0], kind="k", payload=b"other", max_attempts=3)],
                                          now))
    # The target's stream does not publish the imported results again.
    assert target.state.results_after(0, 10_000) == []
    # A FAILED work that moved can be retried on the target.
    failed = [w for w in ids if before[w].state == work_pb2.FAILED]
    assert failed
    target.do(lambda m, now: m.retry(failed[:1], now))
    assert target.state.status(failed[0]).state in (work_pb2.PENDING, work_pb2.IN_PROGRESS)
    # Byte totals match what is held, on both sides.
    for side in (source, target):
        state = side.state
        assert state.unfinished_bytes == sum(e.size for e in (*state.pending.entries(), *state.scheduled.values(),
                                                              *state.in_progress.values()))
    # Recovery gives the live state, on both sides.
    for side in (source, target):
        again = side.replayed()
        assert {w: again.status(w) for w in IDS} == {w: side.state.status(w) for w in IDS}


def test_a_part_sent_again_or_resumed_after_a_crash_is_taken_once():
    source, target = a_source_with_works(), Journaled()
    source.do(lambda m, now: m.start_move(MOVE, now))
    ids = ids_to_move(source.state, MOVE.first, MOVE.last)
    request, after = export_part(source.state, ids, 0, MOVE.key, MOVE.source)
    assert 0 < after < len(ids) or len(ids) <= 1000
    first = target.do(lambda m, now: m.import_works(request, now))
    # The target runs an imported work to the end; the same part comes again.
    taken = next(w for w in ids[:after] if w in target.state.pending)
    token = 42
    target.state.start(taken, token)
    target.do(lambda m, now: m._record([journal_pb2.Event(work_completed=journal_pb2.WorkCompleted(
        work_id=taken, result=b"x", attempt_token=token))], now))
    assert target.do(lambda m, now: m.import_works(request, now)) == first
    assert target.state.status(taken).state == work_pb2.DONE
    # A snapshot of each side mid-move, restored, goes on the same.
    source_again = WorkState.from_snapshot(source.state.to_snapshot())
    target_again = WorkState.from_snapshot(target.state.to_snapshot())
    assert set(source_again.held) == set(source.state.held) and source_again.leaving == source.state.leaving
    assert target_again.imports == target.state.imports and target_again.imported == target.state.imported
    assert {w: target_again.status(w) for w in IDS} == {w: target.state.status(w) for w in IDS}


def test_held_works_are_not_handed_out_and_running_ones_come_back_held():
    source = Journaled()
    source.do(lambda m, now: m.submit([work(w) for w in IDS], now))
    running = next(w for w in IDS if moving(w))
    source.state.start(running, 9)
    source.do(lambda m, now: m.start_move(MOVE, now))
    assert running_in(source.state, MOVE.first, MOVE.last) == 1
    source.do(lambda m, now: m._record([journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(
        work_id=running, error="boom", attempt_token=9))], now))
    assert running in source.state.held and running_in(source.state, MOVE.first, MOVE.last) == 0
    assert all(not moving(w) for w in source.state.pending)
    # Submissions of works of moving slots are refused before the domain (by the
    # service, from the shard map); a work that arrives anyway is held too.
    extra = next(f"x{i}" for i in range(1000) if moving(f"x{i}"))
    source.do(lambda m, now: m.submit([work(extra)], now))
    assert extra in source.state.held


def test_the_postgresql_journal_keeps_a_moves_payloads_and_results_apart():
    source, target = a_source_with_works(), Journaled(payloads_apart=True)
    source.do(lambda m, now: m.start_move(MOVE, now))
    ids = ids_to_move(source.state, MOVE.first, MOVE.last)
    copy_all(source, target, ids)
    apart = Apart()
    stored = journal_pb2.JournalBatch.FromString(take_apart(journal_pb2.JournalBatch(events=target.events), apart))
    imported = [e.works_imported for e in stored.events]
    assert all(not e.work.payload for i in imported for e in i.entries)
    assert all(not r.result for i in imported for r in i.results)
    done = {w for w in ids if source.state.finished.get(w) and source.state.finished[w].state == work_pb2.DONE}
    assert {work_id for work_id, _ in apart.results.values()} == done
    assert {w for w, p in apart.payloads.items() if p} == {w for w in ids if source.state.unfinished(w)
                                                           or w in source.state.retryable}
    released = Apart()
    source.do(lambda m, now: m.release_move(ids, now))
    take_apart(journal_pb2.JournalBatch(events=source.events[-1:]), released)
    assert released.payloads and all(p is None for p in released.payloads.values())


def test_slots_moved_back_carry_the_results_made_meanwhile():
    """A -> B, a moved work retried and finished again on B, then B -> A:
    A answers with B's result, not the one it kept from before."""
    a, b = a_source_with_works(), Journaled()
    a.do(lambda m, now: m.start_move(MOVE, now))
    ids = ids_to_move(a.state, MOVE.first, MOVE.last)
    copy_all(a, b, ids)
    a.do(lambda m, now: m.release_move(ids, now))
    failed = next(w for w in ids if b.state.status(w).state == work_pb2.FAILED)
    b.do(lambda m, now: m.retry([failed], now))
    token = 77
    b.state.start(failed, token)
    b.do(lambda m, now: m._record([journal_pb2.Event(work_completed=journal_pb2.WorkCompleted(
        work_id=failed, result=b"second", attempt_token=token))], now))
    back = Move(MOVE.first, MOVE.last, 1, 0, since=9)
    b.do(lambda m, now: m.start_move(back, now))
    ids_back = ids_to_move(b.state, back.first, back.last)
    start = 0
    while start < len(ids_back):
        request, start = export_part(b.state, ids_back, start, back.key, 1)
        a.do(lambda m, now, r=request: m.import_works(r, now))
    status = a.state.status(failed)
    assert (status.state, status.result) == (work_pb2.DONE, b"second")
    assert {w: a.replayed().status(w) for w in IDS} == {w: a.state.status(w) for w in IDS}


def test_a_late_report_on_a_held_work_counts_until_the_copy_starts_and_never_after():
    """A work queued again by a failover while its worker still runs it is
    held by the move: its report counts (and the move waits for it); once
    the copy started, the target runs it again and the report is ignored."""
    source = Journaled()
    source.do(lambda m, now: m.submit([work(w) for w in IDS], now))
    stream = object()  # a worker stream, as the domain knows it
    source.do(lambda m, now: m.register(stream, master_pb2.RegisterWorker(worker_ids=["s0", "s1"], host="h",
                                                                         kinds=["k"]), now))
    source.do(lambda m, now: m.request_work(stream, ["s0", "s1"], now))
    handed = [a for effect in source.effects if isinstance(effect, (HandOut, Send))
              for a in (effect.assignments if isinstance(effect, HandOut) else effect.message.works.assignments)]
    assert len(handed) == 2
    moving_ones = [a for a in handed if moving(a.work.work_id)] or pytest.skip("no hand-out in a moving slot")
    first = moving_ones[0]
    source.do(lambda m, now: m._record([journal_pb2.Event(work_in_progress_reset=journal_pb2.WorkInProgressReset())],
                                       now))
    source.do(lambda m, now: m.start_move(MOVE, now))
    assert first.work.work_id in source.state.held
    scheduler = source.master.scheduler
    assert running_in(source.state, MOVE.first, MOVE.last, scheduler.running) >= 1  # the move waits for it
    done = master_pb2.Completion(worker_id=next(s for s in ("s0", "s1") if scheduler.running.get(
        first.attempt_token) is scheduler.on(stream, s)), work_id=first.work.work_id, result=b"late",
        attempt_token=first.attempt_token)
    source.master.exporting = True
    source.do(lambda m, now: m.report(stream, [done], [], now))
    assert first.work.work_id in source.state.held  # ignored: the target has it
    source.master.exporting = False
    source.do(lambda m, now: m.report(stream, [done], [], now))  # a resend, before the copy: it counts
    assert source.state.status(first.work.work_id).state == work_pb2.DONE
    assert first.work.work_id not in source.state.held


def test_results_of_released_slots_stay_in_the_stream_but_are_not_answered_for():
    source, target = a_source_with_works(), Journaled()
    streamed = [r.work_id for r in source.state.results_after(0, 10_000)]
    source.do(lambda m, now: m.start_move(MOVE, now))
    ids = ids_to_move(source.state, MOVE.first, MOVE.last)
    copy_all(source, target, ids)
    source.do(lambda m, now: m.release_move(ids, now))
    assert [r.work_id for r in source.state.results_after(0, 10_000)] == streamed
    assert all(source.state.status(w) is None for w in ids)
    assert not any(source.state.is_known(w) for w in ids)
    for again in (source.replayed(), WorkState.from_snapshot(source.state.to_snapshot())):
        assert all(again.status(w) is None for w in ids)
        assert {w: again.status(w) for w in IDS} == {w: source.state.status(w) for w in IDS}


def test_works_a_move_holds_are_listed_in_their_state_page_by_page():
    source = a_source_with_works()

    def listed(which: int) -> list[str]:
        ids, token = [], ""
        while True:
            page, token = list_works(source.state, which, token=token, size=7)
            ids += [s.work_id for s in page]
            assert all(s.state == which for s in page)
            if not token:
                return ids

    before = {which: sorted(listed(which)) for which in (work_pb2.PENDING, work_pb2.SCHEDULED)}
    source.do(lambda m, now: m.start_move(MOVE, now))
    assert any(e.ready_at for e in source.state.held.values()) and any(
        not e.ready_at for e in source.state.held.values())
    for which, ids in before.items():
        during = listed(which)
        assert len(during) == len(set(during)) and sorted(during) == ids  # each once, none missing
    ids = ids_to_move(source.state, MOVE.first, MOVE.last)
    copy_all(source, Journaled(), ids)
    source.do(lambda m, now: m.release_move(ids, now))
    for which, ids_before in before.items():
        assert sorted(listed(which)) == [w for w in ids_before if not moving(w)]
