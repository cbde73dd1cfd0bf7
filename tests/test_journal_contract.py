"""What every journal promises (services/master/journal/contract.py), on
each kind against its real server: fenced appends, order through group
commit, 64-bit positions, snapshots and compaction that replay to the same
state, large batches and snapshots."""

from __future__ import annotations

import asyncio

import pytest

from dworkers.master.domain.state import WorkState
from dworkers.master.journal import FencedError, GroupCommitter, JournalError
from dworkers.master.shell import recover_state
from dworkers.v1 import journal_pb2, work_pb2
from tests.journals import KINDS, PostgreSQLKind, open_kind
from tests.test_state import random_history

pytestmark = pytest.mark.integration


@pytest.fixture(params=KINDS)
def kind(request):
    opened = open_kind(request, request.param)
    yield opened
    opened.close()


def event(i: int, size: int = 10) -> journal_pb2.Event:
    return journal_pb2.Event(work_accepted=journal_pb2.WorkAccepted(
        work=work_pb2.Work(work_id=f"w{i}", kind="square", payload=b"x" * size, max_attempts=3)))


def batch(*events: journal_pb2.Event) -> journal_pb2.JournalBatch:
    return journal_pb2.JournalBatch(epoch=1, events=list(events))


def ids(journal, after: int = -1) -> list[str]:
    return [e.work_accepted.work.work_id for _, b in journal.read(after=after) for e in b.events]


def test_a_deposed_writer_cannot_append(kind):
    writer = kind.writer()
    writer.append(0, batch(event(1))).result(timeout=10)
    kind.depose(writer)
    with pytest.raises(FencedError):
        writer.append(1, batch(event(2))).result(timeout=10)
    assert ids(kind.reader()) == ["w1"]


def test_a_deposed_writer_cannot_snapshot_or_compact(kind):
    writer = kind.writer()
    writer.append(0, batch(event(1))).result(timeout=10)
    writer.write_snapshot(0, b"state at 0")
    kind.depose(writer)
    with pytest.raises(JournalError):
        writer.write_snapshot(0, b"a deposed writer's state")
    assert kind.reader().read_snapshot() == (0, b"state at 0")


def test_group_commit_keeps_the_order_of_events(kind):
    journal, failures = kind.writer(), []

    async def main():
        committer = GroupCommitter(journal, epoch=1, on_failure=failures.append)
        await asyncio.gather(*[committer.append([event(i, size=20_000)]) for i in range(200)])  # ~4 MB
        await committer.barrier()

    asyncio.run(main())
    assert not failures
    assert ids(kind.reader()) == [f"w{i}" for i in range(200)]


def test_the_committer_stops_after_a_fenced_write(kind):
    journal, failures = kind.writer(), []

    async def main():
        committer = GroupCommitter(journal, epoch=1, on_failure=failures.append)
        await committer.append([event(1)])
        kind.depose(journal)
        with pytest.raises(JournalError):
            await committer.append([event(2)])
        with pytest.raises(JournalError):
            committer.append([event(3)])

    asyncio.run(main())
    assert len(failures) == 1 and isinstance(failures[0], FencedError)


def test_positions_are_64_bit(kind):
    journal = kind.writer()
    first = 2**31 - 3
    for i in range(6):
        journal.append(first + i, batch(event(i))).result(timeout=10)
    assert [p for p, _ in journal.read()] == [first + i for i in range(6)]
    assert [p for p, _ in journal.read(after=2**31 - 1)] == [2**31, 2**31 + 1, 2**31 + 2]
    journal.write_snapshot(2**31, b"state")
    journal.compact()
    assert [p for p, _ in journal.read(after=2**31)] == [2**31 + 1, 2**31 + 2]
    assert journal.read_snapshot() == (2**31, b"state")
    far = 2**62
    journal.append(far, batch(event(9))).result(timeout=10)
    assert [p for p, _ in journal.read(after=2**31 + 2)] == [far]


def test_a_taken_position_is_refused(kind):
    journal = kind.writer()
    journal.append(7, batch(event(1))).result(timeout=10)
    with pytest.raises(JournalError, match="taken"):
        kind.writer().append(7, batch(event(2))).result(timeout=10)
    assert ids(kind.reader()) == ["w1"]


def test_large_batches_and_snapshots_come_back_whole(kind):
    journal = kind.writer()
    big = batch(*[event(i, size=250_000) for i in range(4)])  # ~1 MB
    journal.append(0, big).result(timeout=10)
    journal.append(1, batch(event(9))).result(timeout=10)
    snapshot = bytes(range(256)) * 40_000  # ~10 MB
    journal.write_snapshot(1, snapshot)
    reader = kind.reader()
    assert list(reader.read()) == [(0, kind.stored(big)), (1, kind.stored(batch(event(9))))]
    assert reader.read_snapshot() == (1, snapshot)


def append_history(journal, events, size=40, after=-1) -> int:
    position = after
    for start in range(0, len(events), size):
        position = journal.append(position + 1, batch(*events[start:start + size])).result(timeout=10)
    return position


def state_of(kind, events) -> journal_pb2.Snapshot:
    """The state the events give, as a master reading them back has it."""
    state = WorkState(payloads_apart=kind.apart)
    for e in kind.stored(batch(*events)).events:
        state.apply(e)
    return state.to_snapshot()


def test_recovery_from_a_snapshot_and_the_batches_after_it_is_the_live_state(kind):
    events = random_history(seed=5, count=1500)
    first, second = events[:900], events[900:]
    journal = kind.writer()
    covered = append_history(journal, first)
    assert recover_state(kind.reader())[0].to_snapshot() == state_of(kind, first)
    journal = kind.writer()  # the reader took over (PostgreSQL): write as the newest master
    journal.write_snapshot(covered, state_of(kind, first).SerializeToString())
    append_history(journal, second, after=covered)
    expected = state_of(kind, events)
    state, _, replayed = recover_state(kind.reader())
    assert state.to_snapshot() == expected and replayed == len(second)
    journal = kind.writer()
    assert journal.compact() > 0
    state, position, replayed = recover_state(kind.reader())
    assert state.to_snapshot() == expected and replayed == len(second)
    assert [p for p, _ in kind.reader().read()] == list(range(covered + 1, position + 1))


def test_payloads_kept_apart_live_until_their_work_is_done_or_its_failure_forgotten(postgresql):
    """A failed (or cancelled) work may be retried: its payload stays until its result is forgotten."""
    kind = PostgreSQLKind(postgresql)
    try:
        journal = kind.writer()
        works = {f"w{i}": bytes([i]) * (1000 * i) for i in range(5)}  # w0's payload is empty
        journal.append(0, batch(*[journal_pb2.Event(work_accepted=journal_pb2.WorkAccepted(
            work=work_pb2.Work(work_id=w, kind="square", payload=p))) for w, p in works.items()])).result(timeout=10)
        assert journal.payloads(list(works) + ["unknown"]) == works
        assert all(not e.work_accepted.work.payload for _, b in journal.read() for e in b.events)
        journal.append(1, batch(
            journal_pb2.Event(work_completed=journal_pb2.WorkCompleted(work_id="w1")),
            journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(work_id="w2", error="retried")),
            journal_pb2.Event(worker_failed=journal_pb2.WorkerFailed(work_id="w3", error="last", final=True)),
            journal_pb2.Event(worker_timed_out=journal_pb2.WorkerTimedOut(work_id="w4", final=True)),
        )).result(timeout=10)
        assert journal.payloads(list(works)) == {"w0": b"", "w2": works["w2"], "w3": works["w3"], "w4": works["w4"]}
        journal.append(2, batch(journal_pb2.Event(results_forgotten=journal_pb2.ResultsForgotten(
            up_to_sequence=9, retryable_work_ids=["w3", "w4"])))).result(timeout=10)
        assert journal.payloads(list(works)) == {"w0": b"", "w2": works["w2"]}
        # An id accepted again (its result forgotten) keeps its new payload.
        journal.append(3, batch(journal_pb2.Event(work_accepted=journal_pb2.WorkAccepted(
            work=work_pb2.Work(work_id="w1", kind="square", payload=b"again"))))).result(timeout=10)
        assert journal.payloads(["w1"]) == {"w1": b"again"}
        deposed = journal
        kind.depose(deposed)
        with pytest.raises(FencedError):
            deposed.append(4, batch(journal_pb2.Event(work_completed=journal_pb2.WorkCompleted(
                work_id="w2")))).result(timeout=10)
        assert kind.reader().payloads(["w2"]) == {"w2": works["w2"]}
    finally:
        kind.close()


def test_results_kept_apart_live_until_they_are_forgotten(postgresql):
    kind = PostgreSQLKind(postgresql)
    try:
        journal = kind.writer()
        done = [journal_pb2.Event(work_completed=journal_pb2.WorkCompleted(
            work_id=f"w{s}", result=bytes([s]) * 100_000, sequence=s)) for s in range(1, 6)]
        journal.append(0, batch(*done)).result(timeout=10)
        assert journal.results([1, 3, 5, 9]) == {s: bytes([s]) * 100_000 for s in (1, 3, 5)}
        assert all(not e.work_completed.result for _, b in journal.read() for e in b.events)
        journal.append(2, batch(journal_pb2.Event(results_forgotten=journal_pb2.ResultsForgotten(
            up_to_sequence=3)))).result(timeout=10)
        assert set(journal.results(list(range(1, 6)))) == {4, 5}
        kind.depose(journal)
        with pytest.raises(FencedError):
            journal.append(2, batch(journal_pb2.Event(results_forgotten=journal_pb2.ResultsForgotten(
                up_to_sequence=5)))).result(timeout=10)
        assert set(kind.reader().results([4, 5])) == {4, 5}
    finally:
        kind.close()
