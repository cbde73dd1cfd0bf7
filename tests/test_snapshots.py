"""Snapshots and compaction of the journal, on a real ZooKeeper: a crash
between any two steps leaves a journal that replays to the same state."""

from __future__ import annotations

import uuid

import pytest

from dworkers.common import zk
from dworkers.master.domain.state import WorkState
from dworkers.master.journal import ZooKeeperJournal
from dworkers.master.shell import recover_state
from dworkers.v1 import journal_pb2
from tests.test_state import random_history

pytestmark = pytest.mark.integration


@pytest.fixture
def journal(zookeeper):
    client = zk.connect(zookeeper.hosts, session_timeout=2.0)
    yield ZooKeeperJournal(client, f"/snap-{uuid.uuid4().hex[:8]}/journal")
    client.stop()
    client.close()


def append_batches(journal, events, size=40, after=-1) -> int:
    position = after
    for start in range(0, len(events), size):
        batch = journal_pb2.JournalBatch(epoch=1, events=events[start:start + size])
        position = journal.append(position + 1, batch).result(timeout=10)
    return position


def state_of(events) -> journal_pb2.Snapshot:
    state = WorkState()
    for event in events:
        state.apply(event)
    return state.to_snapshot()


def test_recovery_is_the_same_after_a_crash_between_each_step(journal):
    events = random_history(seed=3, count=1200)
    first, second = events[:700], events[700:]
    covered = append_batches(journal, first)
    expected_first = state_of(first)

    # 1. crash while writing a snapshot: its chunks exist, the pointer does not name it
    client = journal.client
    orphan = f"{journal.snapshots}/s-{covered:020d}"
    client.create(orphan, b"")
    client.create(f"{orphan}/c-000000", b"garbage, never pointed to")
    state, position, _ = recover_state(journal)
    assert state.to_snapshot() == expected_first and position == covered
    client.delete(orphan, recursive=True)

    # 2. crash after the snapshot is complete, before compaction
    journal.write_snapshot(covered, WorkState.from_snapshot(expected_first).to_snapshot().SerializeToString())
    append_batches(journal, second, after=covered)
    expected_all = state_of(events)
    state, _, replayed = recover_state(journal)
    assert state.to_snapshot() == expected_all
    assert replayed == len(second)  # only what came after the snapshot

    # 3. crash half way through compaction
    batches = journal._batches()
    for name in batches[: len(batches) // 4]:
        client.delete(f"{journal.path}/{name}")
    assert recover_state(journal)[0].to_snapshot() == expected_all

    # 4. compaction finished: only the batches after the snapshot remain
    journal.compact()
    assert recover_state(journal)[0].to_snapshot() == expected_all
    assert len(journal._batches()) == -(-len(second) // 40)


def test_a_large_snapshot_is_split_below_the_node_limit(journal):
    state = WorkState()
    for i in range(30_000):
        state.apply(journal_pb2.Event(work_accepted=journal_pb2.WorkAccepted(work=journal_pb2.WorkAccepted().work.__class__(
            work_id=f"w{i}", kind="square", payload=b"p" * 64, max_attempts=3))))
    data = state.to_snapshot().SerializeToString()
    assert len(data) > 2_000_000
    journal.write_snapshot(5, data)
    position, read = journal.read_snapshot()
    assert position == 5 and read == data
    chunks = journal.client.get_children(f"{journal.snapshots}/s-{5:020d}")
    assert len(chunks) >= 3
