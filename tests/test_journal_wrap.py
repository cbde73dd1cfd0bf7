"""A long-lived cluster's journal: positions past ZooKeeper's 32-bit sequence
counter, through failovers and compaction, on a real cluster."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from kazoo.exceptions import NoNodeError

from dworkers.common import zk
from dworkers.local_cluster import LocalCluster
from dworkers.master.domain.state import WorkState
from dworkers.master.journal import ZooKeeperJournal
from dworkers.v1 import journal_pb2, work_pb2
from tests.helpers import ResultCollector, frontend, submit_until_acked, wait_kind, wait_until
from tests.zookeeper_surgery import set_cversion

pytestmark = pytest.mark.e2e


def test_a_journal_past_the_32_bit_limit_keeps_every_acked_work_through_failovers(tmp_path):
    """The journal of a long-lived cluster: its positions and ZooKeeper's
    sequence counter on the journal's znode are about to pass 2^31 - 1, where
    the counter stops (every sequential create fails from then on). Crafted:
    a snapshot, one batch, and the counter set in ZooKeeper's own snapshot."""
    cluster = LocalCluster(workdir=tmp_path, root=f"/wrap-{uuid.uuid4().hex[:6]}", session_timeout=2.0)
    cluster.start_zookeeper()
    try:
        path = zk.Paths(cluster.root).journal
        client = zk.connect(cluster.zk, auth=cluster.zk_auth)
        try:
            journal = ZooKeeperJournal(client, path)
            old = WorkState()
            old.apply(journal_pb2.Event(work_accepted=journal_pb2.WorkAccepted(
                work=work_pb2.Work(work_id="old-1", kind="square", payload=b"5", max_attempts=3))))
            journal.write_snapshot(2**31 - 8, old.to_snapshot().SerializeToString())
            batch = journal_pb2.JournalBatch(epoch=1, events=[journal_pb2.Event(work_accepted=journal_pb2.WorkAccepted(
                work=work_pb2.Work(work_id="old-2", kind="square", payload=b"6", max_attempts=3)))])
            client.create(f"{path}/b-{2**31 - 2}", batch.SerializeToString())  # as ZooKeeper numbered it
        finally:
            client.stop()
            client.close()
        set_cversion(cluster.zookeeper, path, 2**31 - 1)

        first = cluster.start_master(None, "--snapshot-interval", "1", wait=True)
        cluster.start_master(None, "--snapshot-interval", "1", wait=True)
        cluster.start_worker(2)
        stub = frontend(cluster.start_frontend().address)
        wait_kind(stub, "square")  # declared by the worker: until then the master refuses the kind
        results = ResultCollector(stub)
        acked = ["old-1", "old-2"] + [submit_until_acked(stub, "square", str(n).encode(), f"a{n}",
                                                         deadline=20).work_id for n in range(40)]
        assert not results.wait_for(acked, timeout=60)
        first.kill()
        cluster.active_master(timeout=30)
        for work_id in acked:
            assert stub.GetWork(work_pb2.GetWorkRequest(work_id=work_id), timeout=15).state == work_pb2.DONE
        more = [submit_until_acked(stub, "square", str(n).encode(), f"b{n}", deadline=20).work_id for n in range(20)]
        assert not results.wait_for(more, timeout=60)
        assert sorted(Counter(results.ids()).values()) == [1] * len(acked + more)
        results.stop()
        client = zk.connect(cluster.zk, auth=cluster.zk_auth)
        try:
            journal = ZooKeeperJournal(client, path)

            def compacted_past_the_limit() -> bool:
                try:
                    return journal.read_snapshot()[0] > 2**31 and all(p > 2**31 for p, _ in journal.read())
                except NoNodeError:  # the live master compacted a batch while we read: look again
                    return False

            wait_until(compacted_past_the_limit, 30, "a snapshot past 2^31 and the journal before it compacted")
        finally:
            client.stop()
            client.close()
    finally:
        cluster.stop()
