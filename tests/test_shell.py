"""The master's shell in one process, over a journal whose writes the test
settles by hand: what it answers, hands out and acks, and when."""

from __future__ import annotations

import asyncio

import pytest

from dworkers.common.errors import NotServing, Overloaded
from dworkers.master.domain.master import CoreSettings
from dworkers.master.journal import JournalError
from dworkers.master.shell import MasterShell
from dworkers.v1 import master_pb2, work_pb2
from tests.fakes import HeldJournal

pytestmark = pytest.mark.unit


class Connection:
    """A worker stream as the core sees it: what it was sent."""

    def __init__(self):
        self.sent: list[master_pb2.MasterMessage] = []
        self.closed = None

    def send(self, message, size=0):
        self.sent.append(message)

    def close(self, reason):
        self.closed = reason

    def assignments(self) -> list[master_pb2.Assignment]:
        return [a for m in self.sent for a in m.works.assignments]

    def acked_tokens(self) -> list[int]:
        return [t for m in self.sent for t in m.ack.attempt_tokens]


async def settle_loop() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def started_core(**settings) -> tuple[MasterShell, HeldJournal, list]:
    journal, failures = HeldJournal(), []
    core = MasterShell(journal, epoch=1, settings=CoreSettings(**settings), on_failure=failures.append)
    await core.recover()
    return core, journal, failures


def work(work_id: str, kind: str = "square", payload: bytes = b"3") -> work_pb2.Work:
    return work_pb2.Work(work_id=work_id, kind=kind, payload=payload, max_attempts=3)


async def durably(journal: HeldJournal, awaitable):
    """Awaits `awaitable`, settling every journal write it waits for."""
    task = asyncio.ensure_future(awaitable)
    while not task.done():
        await settle_loop()
        journal.settle()
    return await task


async def accept(core: MasterShell, journal: HeldJournal, *works: work_pb2.Work) -> None:
    await durably(journal, core.submit(list(works)))


def register(core: MasterShell, connection: Connection, slot: str, kinds=("square",)) -> None:
    core.register(connection, master_pb2.RegisterWorker(worker_ids=[slot], host="h", kinds=kinds))
    core.request_work(connection, [slot])


async def running(core: MasterShell, journal: HeldJournal, work_id: str = "a",
                  slot: str = "s0") -> tuple[Connection, master_pb2.Assignment]:
    """Accepts a work and hands it to a slot, durably; returns both."""
    await accept(core, journal, work(work_id))
    connection = Connection()
    register(core, connection, slot)
    await durably(journal, core.committer.barrier())
    await settle_loop()
    [assignment] = connection.assignments()
    return connection, assignment


def done(slot: str, assignment: master_pb2.Assignment, result: bytes = b"9") -> master_pb2.Completion:
    return master_pb2.Completion(worker_id=slot, work_id=assignment.work.work_id, result=result,
                                 attempt_token=assignment.attempt_token)


def test_get_work_answers_only_from_durable_state():
    """A completion still in flight when GetWork is asked must not show: the
    answer is what was durable when the call read it."""
    async def main():
        core, journal, _ = await started_core()
        connection, assignment = await running(core, journal)
        submitting = asyncio.ensure_future(core.submit([work("b")]))  # an earlier write in flight
        await settle_loop()
        asking = asyncio.ensure_future(core.status("a"))
        await settle_loop()
        core.report(connection, [done("s0", assignment)], [])  # WorkCompleted: in flight, not durable
        await settle_loop()
        journal.settle_first()  # only the earlier write becomes durable
        status = await asking
        assert status.state == work_pb2.IN_PROGRESS, "answered with a completion that was not durable"
        await submitting
        journal.settle(JournalError("connection lost"))  # the completion never becomes durable
        await settle_loop()
        assert core.closed is not None  # the master steps down rather than act on it

    asyncio.run(main())


def test_a_read_fails_if_what_it_saw_never_becomes_durable():
    async def main():
        core, journal, _ = await started_core()
        asking_about = asyncio.ensure_future(core.submit([work("a")]))
        await settle_loop()
        asking = asyncio.ensure_future(core.status("a"))  # sees "a" pending: not durable yet
        await settle_loop()
        assert not asking.done()
        journal.settle(JournalError("connection lost"))
        with pytest.raises(NotServing):
            await asking
        with pytest.raises(NotServing):
            await asking_about

    asyncio.run(main())


def test_a_durable_completion_is_answered_with_its_result():
    async def main():
        core, journal, _ = await started_core()
        connection, assignment = await running(core, journal)
        core.report(connection, [done("s0", assignment, b"3 * 3 = 9")], [])
        asking = asyncio.ensure_future(core.status("a"))
        await settle_loop()
        journal.settle()
        status = await asking
        assert status.state == work_pb2.DONE and status.result == b"3 * 3 = 9" and status.sequence == 1
        assert connection.acked_tokens() == [assignment.attempt_token]

    asyncio.run(main())


def test_nothing_is_handed_out_before_its_start_is_durable():
    async def main():
        core, journal, _ = await started_core()
        connection = Connection()
        register(core, connection, "s0")
        submitting = asyncio.ensure_future(core.submit([work("a")]))
        await settle_loop()
        assert connection.assignments() == []  # accept and start are in flight together
        journal.settle()
        await submitting
        await settle_loop()
        assert [a.work.work_id for a in connection.assignments()] == ["a"]

    asyncio.run(main())


def test_a_report_with_another_attempts_token_is_acked_and_ignored():
    async def main():
        core, journal, _ = await started_core()
        connection, assignment = await running(core, journal)
        forged = master_pb2.Completion(worker_id="s0", work_id="a", result=b"forged",
                                       attempt_token=assignment.attempt_token + 1)
        core.report(connection, [forged], [])
        await settle_loop()
        journal.settle()
        await settle_loop()
        assert connection.acked_tokens() == [forged.attempt_token]
        assert core.state.status("a").state == work_pb2.IN_PROGRESS

    asyncio.run(main())


def test_reports_of_slots_registered_on_another_stream_are_ignored():
    async def main():
        core, journal, _ = await started_core()
        owner, assignment = await running(core, journal)
        stranger = Connection()
        core.register(stranger, master_pb2.RegisterWorker(worker_ids=["x0"], host="h", kinds=["square"]))
        core.report(stranger, [done("s0", assignment)], [])  # right token, wrong stream
        await settle_loop()
        assert stranger.sent == [] and core.state.status("a").state == work_pb2.IN_PROGRESS

    asyncio.run(main())


def test_each_slot_gets_only_work_of_its_kinds_oldest_first():
    async def main():
        core, journal, _ = await started_core()
        await accept(core, journal, work("b1", "blob"), work("s1"), work("b2", "blob"), work("s2"))
        squares, blobs = Connection(), Connection()
        register(core, squares, "sq0")
        register(core, blobs, "bl0", kinds=("blob", "square"))
        await settle_loop()
        journal.settle()
        await settle_loop()
        assert [a.work.work_id for a in squares.assignments()] == ["s1"]
        assert [a.work.work_id for a in blobs.assignments()] == ["b1"]
        assert core.counts()["pending_by_kind"] == {"blob": 1, "square": 1}

    asyncio.run(main())


def test_hand_outs_to_one_worker_are_split_below_the_stream_limit():
    async def main():
        core, journal, _ = await started_core()
        big = [work(f"w{i}", payload=b"x" * 250_000) for i in range(20)]  # 5 MB
        await accept(core, journal, *big)
        connection = Connection()
        slots = [f"s{i}" for i in range(20)]
        core.register(connection, master_pb2.RegisterWorker(worker_ids=slots, host="h", kinds=["square"]))
        core.request_work(connection, slots)
        await durably(journal, core.committer.barrier())
        await settle_loop()
        assert len(connection.assignments()) == 20
        assert len(connection.sent) >= 3 and all(m.ByteSize() < 2 * 1024 * 1024 for m in connection.sent)

    asyncio.run(main())


def test_submissions_beyond_the_byte_bound_are_refused_with_the_flag_to_change():
    async def main():
        core, journal, _ = await started_core(max_pending_bytes=1024 * 1024)
        await accept(core, journal, *[work(f"w{i}", payload=b"x" * 200_000) for i in range(5)])
        with pytest.raises(Overloaded, match="--max-pending-bytes"):
            await core.submit([work("one-more", payload=b"x" * 200_000)])
        await core.submit([work("w0", payload=b"x" * 200_000)])  # a duplicate costs nothing

    asyncio.run(main())


def test_the_payload_cache_is_bounded_in_bytes_and_lets_go_of_what_it_hands_out():
    from dworkers.master.recent import RecentBytes

    cache = RecentBytes(max_bytes=1000)
    for i in range(10):
        cache.put(f"w{i}", bytes(200))
    assert cache.size <= 1000 and len(cache) == 5
    assert cache.take("w0") is None  # the oldest went first
    assert cache.take("w9") == bytes(200) and cache.take("w9") is None
    cache.put("big", bytes(600))  # over a quarter of the bound: not kept
    assert cache.take("big") is None and cache.size == 800


def test_the_result_stream_passes_over_results_a_move_imported():
    """Results imported by a slot move are numbered here but were published
    by their source: the stream skips them, however many come in a row."""
    async def main():
        core, journal, _ = await started_core()
        imported = master_pb2.ImportWorksRequest(move_key="k", source_shard=1, last_id="m999")
        for i in range(600):
            imported.results.add(work_id=f"m{i:03d}", kind="square", state=work_pb2.DONE, result=b"old", sequence=i + 1)
            imported.result_fingerprints.append(b"f")
        await durably(journal, core.import_works(imported))
        connection, assignment = await running(core, journal)
        core.report(connection, [done("s0", assignment)], [])
        await durably(journal, core.committer.barrier())
        stream = core.results(0)
        batch = await asyncio.wait_for(stream.__anext__(), 5)
        assert [(r.work_id, r.sequence) for r in batch] == [("a", 601)]
        await stream.aclose()

    asyncio.run(main())


def test_a_result_reaches_its_waiters_before_the_worker_is_acked():
    """Once a completion is durable its waiters come first (a caller waits
    on them); the worker's ack, which nothing waits on, follows."""
    async def main():
        core, journal, _ = await started_core()
        waiting: asyncio.Queue = asyncio.Queue()
        connection, assignment = await running(core, journal)
        ready, unknown = core.await_works(waiting, ["a"])
        assert (ready, unknown) == ([], [])
        queued_when_acked = []
        connection.send = lambda message, size=0: queued_when_acked.append(  # type: ignore[method-assign]
            (list(message.ack.attempt_tokens), waiting.qsize()))
        core.report(connection, [done("s0", assignment)], [])
        await durably(journal, core.committer.barrier())
        assert queued_when_acked == [([assignment.attempt_token], 1)]
        assert (await waiting.get()).work_id == "a"

    asyncio.run(main())
