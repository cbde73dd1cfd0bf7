"""GroupCommitter's ordering rules, with a journal whose writes the test
completes by hand (the ZooKeeper journal itself is tested in test_journal)."""

from __future__ import annotations

import asyncio

import pytest

from dworkers.master.journal import GroupCommitter, JournalError
from dworkers.v1 import journal_pb2, work_pb2
from tests.fakes import HeldJournal

pytestmark = pytest.mark.unit


def event(i: int) -> journal_pb2.Event:
    return journal_pb2.Event(work_accepted=journal_pb2.WorkAccepted(work=work_pb2.Work(work_id=f"w{i}")))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_batch_that_lands_after_a_failed_one_is_not_vouched_for():
    async def main():
        journal, failures = HeldJournal(), []
        committer = GroupCommitter(journal, epoch=1, on_failure=failures.append, max_in_flight=2)
        first = committer.append([event(1)])
        await settle()
        second = committer.append([event(2)])
        await settle()
        assert len(journal.pending) == 2  # both in flight
        journal.settle_first(JournalError("connection lost"))
        journal.settle_first(7)  # landed after the gap
        await settle()
        with pytest.raises(JournalError):
            await first
        with pytest.raises(JournalError):
            await second
        assert len(failures) == 1

    asyncio.run(main())


def test_events_appended_in_one_loop_step_share_a_batch_and_resolve_to_its_position():
    async def main():
        journal = HeldJournal()
        committer = GroupCommitter(journal, epoch=1, on_failure=lambda exc: None)
        waiters = [committer.append([event(i)]) for i in range(10)]
        cut = committer.cut()
        await settle()
        assert len(journal.pending) == 1
        journal.settle_first(42)
        assert await asyncio.gather(*waiters) == [42] * 10
        assert await cut == 42 and committer.last_position == 42

    asyncio.run(main())


def test_stop_fails_every_waiting_caller():
    async def main():
        journal = HeldJournal()
        committer = GroupCommitter(journal, epoch=1, on_failure=lambda exc: None, max_in_flight=1)
        in_flight = committer.append([event(1)])
        await settle()
        queued = committer.append([event(2)])
        committer.stop(JournalError("stepping down"))
        for waiter in (in_flight, queued):
            with pytest.raises(JournalError):
                await waiter

    asyncio.run(main())
