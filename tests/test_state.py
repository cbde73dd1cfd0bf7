"""WorkState is pure: these tests need no ZooKeeper and no process."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dworkers.master.domain.state import TIMED_OUT_ERROR, WorkState
from dworkers.v1 import journal_pb2, work_pb2

pytestmark = pytest.mark.unit


def work(work_id: str, max_attempts: int = 3) -> work_pb2.Work:
    return work_pb2.Work(work_id=work_id, kind="square", payload=work_id.encode(), max_attempts=max_attempts)


def accepted(work_id: str, max_attempts: int = 3) -> journal_pb2.Event:
    return journal_pb2.Event(work_accepted=journal_pb2.WorkAccepted(work=work(work_id, max_attempts)))


def started(work_id: str, worker_id: str = "w1") -> journal_pb2.Event:
    return journal_pb2.Event(work_started=journal_pb2.WorkStarted(work_id=work_id, worker_id=worker_id))


def completed(work_id: str, result: bytes = b"ok") -> journal_pb2.Event:
    return journal_pb2.Event(work_completed=journal_pb2.WorkCompleted(work_id=work_id, result=result))


def failed(work_id: str, error: str = "boom") -> journal_pb2.Event:
    return journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(work_id=work_id, error=error))


def timed_out(work_id: str) -> journal_pb2.Event:
    return journal_pb2.Event(worker_timed_out=journal_pb2.WorkerTimedOut(work_id=work_id))


RESET = journal_pb2.Event(work_in_progress_reset=journal_pb2.WorkInProgressReset())


def apply_all(events) -> WorkState:
    state = WorkState()
    for event in events:
        state.apply(event)
    return state


def test_pending_queue_is_fifo_and_start_takes_the_head():
    state = apply_all([accepted("a"), accepted("b"), accepted("c")])
    assert list(state.pending) == ["a", "b", "c"]
    state.apply(started(state.head()))
    assert state.head() == "b"
    assert state.status("a").state == work_pb2.IN_PROGRESS
    assert state.status("a").attempts == 1


def test_completion_numbers_results_in_order():
    state = apply_all([accepted("a"), accepted("b"), started("a"), started("b"),
                       completed("b", b"B"), completed("a", b"A")])
    assert [(r.sequence, r.work_id, r.result) for r in state.results_after(0, 10)] == [(1, "b", b"B"), (2, "a", b"A")]
    assert state.status("a").state == work_pb2.DONE and state.status("a").result == b"A"
    assert not state.pending and not state.in_progress


def test_accepting_a_known_id_changes_nothing():
    state = apply_all([accepted("a"), started("a"), completed("a")])
    state.apply(accepted("a"))
    assert not state.pending and state.last_sequence == 1


def test_failed_attempt_requeues_until_max_attempts_then_fails():
    state = apply_all([accepted("p", max_attempts=2), started("p"), failed("p", "first")])
    assert list(state.pending) == ["p"] and state.status("p").error == "first"
    finished = [state.apply(e) for e in (started("p"), failed("p", "second"))][-1]
    assert finished.state == work_pb2.FAILED and finished.error == "second" and finished.attempts == 2
    assert state.status("p").state == work_pb2.FAILED


def test_timeout_counts_as_a_failed_attempt():
    state = apply_all([accepted("t", max_attempts=1), started("t"), timed_out("t")])
    assert state.status("t").state == work_pb2.FAILED
    assert state.status("t").error == TIMED_OUT_ERROR


def test_reset_moves_in_progress_back_to_pending_without_counting_a_failure():
    state = apply_all([accepted("a", max_attempts=1), accepted("b"), started("a"), RESET])
    assert set(state.pending) == {"a", "b"} and not state.in_progress
    state.apply(started("a"))
    assert state.status("a").attempts == 2  # handed out twice, failed never


def test_late_completion_after_reset_is_recorded_once():
    state = apply_all([accepted("a"), started("a", "old-worker"), RESET])
    assert state.apply(completed("a", b"late")).sequence == 1
    assert state.apply(completed("a", b"again")) is None
    assert state.last_sequence == 1 and not state.pending


def test_stale_failure_of_a_requeued_work_is_ignored():
    state = apply_all([accepted("a"), started("a"), timed_out("a")])
    assert state.apply(failed("a")) is None  # it is pending, not in progress
    assert list(state.pending) == ["a"]


def test_forgetting_results_drops_their_ids():
    state = apply_all([accepted("a"), accepted("b"), started("a"), completed("a"), started("b"), completed("b")])
    state.apply(journal_pb2.Event(results_forgotten=journal_pb2.ResultsForgotten(up_to_sequence=1)))
    assert not state.is_known("a") and state.is_known("b")
    assert [r.work_id for r in state.results_after(0, 10)] == ["b"]


def random_history(seed: int, count: int = 400) -> list[journal_pb2.Event]:
    """A plausible event sequence, as a live master would produce it."""
    rng = random.Random(seed)
    state, events, next_id = WorkState(), [], 0

    def emit(event):
        events.append(event)
        state.apply(event)

    for _ in range(count):
        roll = rng.random()
        if roll < 0.3:
            next_id += 1
            event = accepted(f"w{next_id}", max_attempts=rng.randint(1, 3))
            event.work_accepted.work.priority = rng.choice([0, 0, 1, 5])
            if rng.random() < 0.1:
                event.work_accepted.work.not_before = 1000.0 + next_id
            emit(event)
        elif roll < 0.5 and state.pending:
            emit(started(state.head(), f"worker{rng.randint(1, 4)}"))
        elif roll < 0.65 and state.in_progress:
            emit(completed(rng.choice(list(state.in_progress)), str(rng.random()).encode()))
        elif roll < 0.75 and state.in_progress:
            event = failed(rng.choice(list(state.in_progress)), "error")
            event.worker_failed.permanent = rng.random() < 0.2
            event.worker_failed.retry_at = rng.choice([0.0, 0.0, 2000.0 + rng.random()])
            emit(event)
        elif roll < 0.8 and state.in_progress:
            emit(timed_out(rng.choice(list(state.in_progress))))
        elif roll < 0.84 and state.scheduled:
            emit(journal_pb2.Event(works_ready=journal_pb2.WorksReady(
                work_ids=state.scheduled.due(float("inf"), rng.randint(1, 3)))))
        elif roll < 0.88 and (state.pending or state.in_progress or state.scheduled):
            unfinished = [*state.pending, *state.in_progress, *(e.work_id for e in state.scheduled.values())]
            emit(journal_pb2.Event(work_cancelled=journal_pb2.WorkCancelled(work_id=rng.choice(unfinished))))
        elif roll < 0.92 and state.retryable:
            emit(journal_pb2.Event(work_retried=journal_pb2.WorkRetried(work_id=rng.choice(sorted(state.retryable)))))
        elif roll < 0.95:
            emit(RESET)
        elif state.last_sequence > 5:
            emit(journal_pb2.Event(results_forgotten=journal_pb2.ResultsForgotten(
                up_to_sequence=state.last_sequence - 5)))
    return events


def test_replaying_a_recorded_history_gives_exactly_the_live_state():
    for seed in range(20):
        events = random_history(seed)
        live = WorkState()
        for event in events:
            live.apply(event)
        # What the journal stores is bytes: replay from serialized events.
        replayed = apply_all(journal_pb2.Event.FromString(e.SerializeToString()) for e in events)
        assert replayed.to_snapshot() == live.to_snapshot()
        assert list(replayed.pending) == list(live.pending)


def test_snapshot_round_trip_then_more_events_matches_full_replay():
    events = random_history(7, 600)
    middle = apply_all(events[:300])
    restored = WorkState.from_snapshot(journal_pb2.Snapshot.FromString(middle.to_snapshot().SerializeToString()))
    for event in events[300:]:
        restored.apply(event)
    assert restored.to_snapshot() == apply_all(events).to_snapshot()


def test_the_pending_queue_is_fifo_per_kind_and_overall_under_any_operations():
    """PendingQueue against a plain list: pushes, pops from anywhere,
    re-queues, and the oldest work of any set of kinds."""
    from dworkers.master.domain.state import Entry, PendingQueue

    for seed in range(30):
        rng = random.Random(seed)
        queue, model, taken, n = PendingQueue(), [], {}, 0
        for _ in range(300):
            roll = rng.random()
            if roll < 0.4:
                n += 1
                entry = Entry.of(work_pb2.Work(work_id=f"w{n}", kind=rng.choice("abc")))
                queue.push_new(entry)
                model.append(entry.work())
            elif roll < 0.7 and model:
                work = rng.choice(model)  # from anywhere, usually not the front
                model.remove(work)
                taken[work.work_id] = queue.pop(work.work_id)
            elif roll < 0.85 and taken:
                work_id = rng.choice(sorted(taken))
                queue.push(taken.pop(work_id))
                model.append(queue[work_id].work())
            kinds = rng.sample("abc", rng.randint(1, 3))
            expected = next((w.work_id for w in model if w.kind in kinds), None)
            oldest = queue.oldest(kinds)
            assert (oldest.work_id if oldest else None) == expected
            assert list(queue) == [w.work_id for w in model]
            assert queue.counts() == {k: c for k, c in Counter(w.kind for w in model).items()}


def test_byte_totals_are_what_the_works_and_results_hold_live_and_after_a_snapshot():
    """Unfinished works, and retained results with the failed works kept to be retried."""
    for seed in range(10):
        state = apply_all(random_history(seed))
        for candidate in (state, WorkState.from_snapshot(state.to_snapshot())):
            entries = [*candidate.pending.entries(), *candidate.in_progress.values(), *candidate.scheduled.values()]
            assert candidate.unfinished_bytes == sum(e.size for e in entries)
            # failed works are kept to be retried: their bytes count with their results
            assert candidate.result_bytes == sum(r.ByteSize() for r in candidate.results.values()) + sum(
                e.size for _, e in candidate.retryable.values())


def test_only_hand_backs_by_the_worker_count_and_a_snapshot_keeps_them():
    def returned(by_worker: bool) -> journal_pb2.Event:
        return journal_pb2.Event(work_returned=journal_pb2.WorkReturned(work_id="a", by_worker=by_worker))
    events = [accepted("a")]
    for by_worker in (False, True, False, True, True):  # lost with a stream, or handed back
        events += [started("a"), returned(by_worker)]
    state = apply_all(events)
    assert state.unfinished("a").hand_backs == 3
    assert WorkState.from_snapshot(state.to_snapshot()).unfinished("a").hand_backs == 3


def test_a_captured_snapshot_is_the_state_at_its_capture_whatever_happens_while_its_parts_are_written(
        monkeypatch):
    """The master captures the state at a journal cut and serializes it in
    parts while it goes on applying events: the parts make one snapshot of
    the state as captured."""
    from dworkers.master.domain.state import SnapshotCapture

    for seed in range(10):
        events = random_history(seed, 800)
        state = apply_all(events[:400])
        expected = state.to_snapshot()  # in one part per field: these states hold fewer than 1,000 of each
        assert len(list(state.capture().parts())) <= 3
        monkeypatch.setattr(SnapshotCapture, "PART_ITEMS", 2)
        capture = state.capture()
        for event in events[400:]:  # attempts, errors, tokens and results change under the capture
            state.apply(event)
        parts = list(capture.parts())
        assert len(parts) > 4  # the header, and several parts of entries and of results
        assert journal_pb2.Snapshot.FromString(b"".join(parts)) == expected
        monkeypatch.undo()
