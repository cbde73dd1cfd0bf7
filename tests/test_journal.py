"""The ZooKeeper journal's own mechanics (batches in parts below the node
limit) and the election, against a real ZooKeeper server. What every
journal promises is in test_journal_contract.py."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from dworkers.common import zk
from dworkers.master.election import Election
from dworkers.master.journal import (
    FencedError,
    GroupCommitter,
    ZooKeeperJournal,
)
from dworkers.v1 import journal_pb2, work_pb2

pytestmark = pytest.mark.integration


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


def test_an_append_is_settled_on_the_connection_thread_while_callbacks_wait(client, paths):
    """The journal's completion does not queue behind kazoo's callback
    thread (a thread switch less per append): it settles even while that
    thread is held."""
    journal = ZooKeeperJournal(client, paths.journal)
    held, release = threading.Event(), threading.Event()
    client.handler.completion_queue.put(lambda: (held.set(), release.wait(30)))
    try:
        assert held.wait(10)
        batch = journal_pb2.JournalBatch(epoch=1, events=[event(0)])
        assert journal.append(0, batch).result(timeout=10) == 0
    finally:
        release.set()
    assert [b.events[0].work_accepted.work.work_id for _, b in journal.read()] == ["w0"]


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
        for i, e in enumerate(elections):
            e.start()
            wait(lambda i=i: views[i])
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


def all_znodes(client, path: str) -> dict[str, bytes]:
    """Every znode under `path` with its data."""
    found = {}
    for child in client.get_children(path):
        full = f"{path}/{child}"
        found[full] = client.get(full)[0]
        found.update(all_znodes(client, full))
    return found


def test_a_large_batch_is_written_in_parts_no_write_above_the_part_size(client, paths):
    from dworkers.master.journal.zookeeper import PART_BYTES

    journal = ZooKeeperJournal(client, paths.journal)
    big = journal_pb2.JournalBatch(epoch=1, events=[event(i, size=250_000) for i in range(4)])  # ~1 MB
    journal.append(0, big).result(timeout=10)
    journal.append(1, journal_pb2.JournalBatch(epoch=1, events=[event(9)])).result(timeout=10)
    assert [(p, b) for p, b in journal.read()] == [(0, big), (1, journal_pb2.JournalBatch(
        epoch=1, events=[event(9)]))]
    sizes = [len(data) for data in all_znodes(client, paths.root).values()]
    assert max(sizes) <= PART_BYTES and len(sizes) > 16


def test_an_unfinished_batch_in_parts_is_invisible_and_discarded(client, paths):
    client.ensure_path(paths.election)
    fence = client.create(f"{paths.election}/n-", ephemeral=True, sequence=True)
    journal = ZooKeeperJournal(client, paths.journal, fence_path=fence)
    journal.append(0, journal_pb2.JournalBatch(epoch=1, events=[event(1)])).result(timeout=10)
    # A crash after two parts of batch 1 were written, before its manifest.
    client.create(f"{journal.parts}/{1:020d}-deadwriter-000000", b"x" * 100)
    client.create(f"{journal.parts}/{1:020d}-deadwriter-000001", b"y" * 100)
    assert [p for p, _ in journal.read()] == [0]
    journal.discard_after(0)
    assert client.get_children(journal.parts) == []
    big = journal_pb2.JournalBatch(epoch=2, events=[event(i, size=100_000) for i in range(3)])
    journal.append(1, big).result(timeout=10)
    assert [b for _, b in journal.read(after=0)] == [big]


def test_a_deposed_writer_cannot_finish_a_batch_in_parts(client, paths):
    client.ensure_path(paths.election)
    fence = client.create(f"{paths.election}/n-", ephemeral=True, sequence=True)
    journal = ZooKeeperJournal(client, paths.journal, fence_path=fence)
    client.delete(fence)
    big = journal_pb2.JournalBatch(epoch=1, events=[event(i, size=100_000) for i in range(3)])
    with pytest.raises(FencedError):
        journal.append(0, big).result(timeout=10)
    assert list(journal.read()) == [] and client.get_children(journal.parts) == []
