"""The journal and the election against a real ZooKeeper server."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from dworkers.v1 import journal_pb2, work_pb2
from services.common import zk
from services.master.election import Election
from services.master.journal import FencedError, GroupCommitter, JournalError, ZooKeeperJournal


@pytest.fixture
def client(zookeeper):
    c = zk.connect(zookeeper.hosts, session_timeout=2.0)
    yield c
    c.stop()
    c.close()


@pytest.fixture
def paths():
    return zk.Paths(f"/journal-test-{uuid.uuid4().hex[:8]}")


def event(i: int, size: int = 10) -> journal_pb2.Event:
    return journal_pb2.Event(work_accepted=journal_pb2.WorkAccepted(
        work=work_pb2.Work(work_id=f"w{i}", kind="square", payload=b"x" * size, max_attempts=3)))


def test_append_is_fenced_by_the_writers_election_znode(client, paths):
    client.ensure_path(paths.election)
    fence = client.create(f"{paths.election}/n-", ephemeral=True, sequence=True)
    journal = ZooKeeperJournal(client, paths.journal, fence_path=fence)
    journal.append(journal_pb2.JournalBatch(epoch=1, events=[event(1)])).result(timeout=10)
    client.delete(fence)  # as when the session expires: the writer is deposed
    with pytest.raises(FencedError):
        journal.append(journal_pb2.JournalBatch(epoch=1, events=[event(2)])).result(timeout=10)
    assert [b.events[0].work_accepted.work.work_id for _, b in journal.read()] == ["w1"]


def test_group_commit_keeps_order_and_splits_below_the_node_limit(client, paths):
    journal = ZooKeeperJournal(client, paths.journal)
    failures = []

    async def main():
        committer = GroupCommitter(journal, epoch=1, on_failure=failures.append)
        futures = [committer.append([event(i, size=20_000)]) for i in range(200)]  # ~4 MB in all
        await asyncio.gather(*futures)
        await committer.barrier()

    asyncio.run(main())
    assert not failures
    batches = list(journal.read())
    ids = [e.work_accepted.work.work_id for _, b in batches for e in b.events]
    assert ids == [f"w{i}" for i in range(200)]
    assert 4 <= len(batches) < 200  # grouped, yet each batch under the node limit


def test_committer_stops_after_a_fenced_write(client, paths):
    client.ensure_path(paths.election)
    fence = client.create(f"{paths.election}/n-", ephemeral=True, sequence=True)
    journal = ZooKeeperJournal(client, paths.journal, fence_path=fence)
    failures = []

    async def main():
        committer = GroupCommitter(journal, epoch=1, on_failure=failures.append)
        await committer.append([event(1)])
        client.delete(fence)
        with pytest.raises(JournalError):
            await committer.append([event(2)])
        with pytest.raises(JournalError):
            committer.append([event(3)])

    asyncio.run(main())
    assert len(failures) == 1 and isinstance(failures[0], FencedError)


def test_oldest_backend_leads_and_its_successor_takes_over(zookeeper, paths):
    clients = [zk.connect(zookeeper.hosts, session_timeout=2.0) for _ in range(3)]
    views = [[] for _ in clients]
    changed = threading.Condition()

    def recorder(i):
        def record(view):
            with changed:
                views[i].append(view)
                changed.notify_all()
        return record

    def wait(predicate, timeout=10):
        with changed:
            assert changed.wait_for(predicate, timeout)

    elections = [Election(c, paths, zk.encode_member(f"b{i}"), recorder(i)) for i, c in enumerate(clients)]
    try:
        for e in elections:
            e.start()
            wait(lambda: views[elections.index(e)])
        wait(lambda: views[0][-1].leader and all(v and not v[-1].leader for v in views[1:]))
        assert views[1][-1].master_address == "b0"
        assert views[0][-1].epoch < views[1][-1].epoch < views[2][-1].epoch
        elections[0].resign()
        wait(lambda: views[1][-1].leader)
        assert not views[2][-1].leader
        clients[1].stop()  # its session ends: the next oldest leads
        wait(lambda: views[2][-1].leader)
    finally:
        for c in clients:
            c.stop()
            c.close()
