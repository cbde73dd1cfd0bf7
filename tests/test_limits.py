"""Bounded state and resources: retention, snapshots that keep ZooKeeper
small, many concurrent streams, and contact points instead of ZooKeeper."""

from __future__ import annotations

import grpc
import pytest
from kazoo.exceptions import NoNodeError

from dworkers.common import zk
from dworkers.master.journal import ZooKeeperJournal
from dworkers.v1 import work_pb2
from tests.helpers import (
    ResultCollector,
    frontend,
    submit_until_acked,
    wait_kind,
    wait_until,
)
from tests.journals import both_journals

pytestmark = pytest.mark.e2e


def znode_count(cluster, path: str) -> int:
    client = zk.connect(cluster.zk, auth=cluster.zk_auth)
    try:
        def count(p):
            return 1 + sum(count(f"{p}/{c}") for c in client.get_children(p))
        return count(path)
    finally:
        client.stop()
        client.close()


def compacted(cluster) -> int:
    """Once the journal holds no batch a snapshot covers (a snapshot was taken
    and compacted): the cluster's znode count without the batches written
    since the snapshot (their number depends on timing, not on history); else 0."""
    client = zk.connect(cluster.zk, auth=cluster.zk_auth)
    try:
        journal = ZooKeeperJournal(client, zk.Paths(cluster.root).journal)
        snapshot = journal.read_snapshot()
        positions = [p for p, _ in journal.read()]
        if snapshot is None or len(client.get_children(journal.path)) != len(positions):
            return 0
        return znode_count(cluster, cluster.root) - len(positions)
    except NoNodeError:  # compacted while we read: look again
        return 0
    finally:
        client.stop()
        client.close()


def test_an_endless_stream_of_work_keeps_memory_and_zookeeper_bounded(cluster):
    cluster.start_master(None, "--retention-count", "50", "--snapshot-every", "300", "--snapshot-interval", "1",
                         wait=True)
    cluster.start_worker(2)
    stub = frontend(cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "square")
    sizes = []
    for round_ in range(4):
        batch = work_pb2.SubmitWorksRequest(works=[
            work_pb2.SubmitWorkRequest(work_id=f"r{round_}-{n}", kind="square", payload=b"6") for n in range(400)])
        ids = [w.work_id for w in stub.SubmitWorks(batch, timeout=30).works]
        assert not results.wait_for(ids, timeout=60)
        sizes.append(wait_until(lambda: compacted(cluster), 30, "a snapshot and a compaction"))
    assert max(sizes[1:]) <= sizes[0] + 10, f"ZooKeeper grows with history: {sizes}"
    info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
    assert info.last_sequence == 1600
    # Past the retention window an id is forgotten: it may be submitted as new work.
    with pytest.raises(grpc.RpcError) as error:
        stub.GetWork(work_pb2.GetWorkRequest(work_id="r0-0"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert not submit_until_acked(stub, "square", b"6", "r0-0").duplicate
    assert submit_until_acked(stub, "square", b"6", "r3-399").duplicate  # still inside the window
    # A subscriber asking for forgotten results is told so.
    with pytest.raises(grpc.RpcError) as error:
        next(iter(stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=5), timeout=10)))
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    results.stop()


@both_journals
def test_a_restarted_master_recovers_from_a_snapshot(cluster):
    first = cluster.start_master(None, "--snapshot-every", "100", "--snapshot-interval", "1", wait=True)
    cluster.start_master(wait=True)
    cluster.start_worker(1)
    stub = frontend(cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "square")
    ids = [submit_until_acked(stub, "square", str(n).encode(), f"s{n}").work_id for n in range(150)]
    assert not results.wait_for(ids, timeout=60)
    wait_until(lambda: "snapshot at journal position" in first.log(), 30, "a snapshot")
    first.kill()
    new = cluster.active_master(timeout=30)
    assert "recovered" in new.log()
    status = stub.GetWork(work_pb2.GetWorkRequest(work_id="s7"), timeout=15)
    assert status.state == work_pb2.DONE and status.result == b"7 * 7 = 49"
    assert submit_until_acked(stub, "square", b"7", "s7").duplicate
    results.stop()


def test_many_concurrent_result_streams_are_bounded(cluster):
    cluster.start_master(wait=True)
    cluster.start_worker(1)
    front = cluster.start_frontend(None, "--max-watchers", "8")
    channel = grpc.insecure_channel(front.address)
    stub = frontend(front.address)
    wait_kind(stub, "square")
    streams = [stub.WatchResults(work_pb2.WatchResultsRequest()) for _ in range(200)]
    refused = 0
    submit_until_acked(stub, "square", b"2", "one")
    for stream in streams:
        try:
            next(stream)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            refused += 1
    assert refused >= 150
    # unary calls still have threads
    assert stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10).last_sequence >= 0
    for stream in streams:
        stream.cancel()
    assert front.alive()
    channel.close()


def test_workers_and_frontends_given_contact_points_declare_kinds_and_fail_over(cluster):
    """No process but the backends uses ZooKeeper: the worker declares its
    kinds to the master, and both follow the master through a kill -9."""
    active = cluster.start_master(wait=True)
    standby = cluster.start_master(wait=True)
    contacts = f"{standby.address},{active.address}"  # the standby first: it points to the master
    cluster.start_worker(2, "--masters", contacts)
    stub = frontend(cluster.start_frontend(None, "--masters", contacts).address)
    wait_kind(stub, "square")
    results = ResultCollector(stub)
    first = submit_until_acked(stub, "square", b"11").work_id
    assert not results.wait_for([first], timeout=30)
    assert results.results[0].result == b"11 * 11 = 121"
    active.kill()
    after = [submit_until_acked(stub, "square", str(n).encode(), deadline=60).work_id for n in range(5)]
    assert not results.wait_for(after, timeout=60)
    assert cluster.active_master() is standby
    results.stop()
