"""Realistic sizes on a real cluster: payloads and results of 20-256 KiB.

ZooKeeper must survive any input (its heap holds the journal, and its last
500 writes), every stream message must fit the 4 MiB a stock gRPC client
accepts, and a worker must get its works in messages it can take."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import grpc
import pytest

from dworkers.common.zkserver import four_letter_word
from dworkers.local_cluster import LocalCluster
from dworkers.v1 import work_pb2
from tests.helpers import ResultCollector, frontend, submit_until_acked, wait_kind
from tests.journals import both_journals

pytestmark = pytest.mark.e2e

KiB = 1024


def stock_client(address: str):
    """A client with gRPC's default limits (4 MiB per received message), as
    any language's stock client has."""
    return frontend(address)


def zookeeper_data_bytes(cluster: LocalCluster) -> int:
    for line in four_letter_word(cluster.zookeeper.port, "mntr").splitlines():
        if line.startswith("zk_approximate_data_size"):
            return int(line.split()[1])
    raise AssertionError("ZooKeeper did not answer mntr")


def test_payloads_cannot_exhaust_zookeepers_heap(tmp_path):
    """ZooKeeper at the 512 MB heap deploy/ gives it; clients submit 256 KiB
    works as fast as they can. Beyond --max-pending-bytes they are told so;
    ZooKeeper never runs out of memory, through the flood, its drain with
    256 KiB results, and a steady stream of large works after it."""
    cluster = LocalCluster(workdir=tmp_path, root=f"/sizes-{uuid.uuid4().hex[:6]}", session_timeout=4.0)
    cluster.start_zookeeper()
    try:
        cluster.start_master(wait=True)
        declarer = cluster.start_worker(1, "--jobs", "tests.jobs_for_tests")
        stub = stock_client(cluster.start_frontend().address)
        wait_kind(stub, "echo")
        declarer.stop()  # nothing drains the queue while it fills

        payload = b"p" * (256 * KiB)
        accepted, refusal = [], None
        for call in range(400):  # up to 400 MiB offered
            ids = [f"flood-{call}-{i}" for i in range(4)]
            try:
                stub.SubmitWorks(work_pb2.SubmitWorksRequest(works=[
                    work_pb2.SubmitWorkRequest(work_id=i, kind="echo", payload=payload) for i in ids]), timeout=30)
                accepted += ids
            except grpc.RpcError as error:
                refusal = error
                break
        assert refusal is not None and refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal
        assert "--max-pending-bytes" in refusal.details()
        assert 60 <= len(accepted) <= 200  # 32 MiB of 256 KiB works
        assert cluster.zookeeper.process.poll() is None
        assert zookeeper_data_bytes(cluster) < 200 * 1024 * 1024

        results = ResultCollector(stub)
        cluster.start_worker(4, "--jobs", "tests.jobs_for_tests", "--executor", "thread")
        assert not results.wait_for(accepted, timeout=120)
        # A steady stream of large works: ~200 MB through the journal.
        steady = []
        for call in range(100):
            ids = [f"steady-{call}-{i}" for i in range(4)]
            submit = work_pb2.SubmitWorksRequest(works=[
                work_pb2.SubmitWorkRequest(work_id=i, kind="echo", payload=payload) for i in ids])
            deadline = time.monotonic() + 60
            while True:
                try:
                    stub.SubmitWorks(submit, timeout=30)
                    break
                except grpc.RpcError as error:  # full for a moment: back off, as a client should
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                    time.sleep(0.2)
            steady += ids
        assert not results.wait_for(steady, timeout=180)
        counts = Counter(results.ids())
        assert all(counts[i] == 1 for i in accepted + steady)
        assert all(len(r.result) == 256 * KiB for r in results.results)
        assert cluster.zookeeper.process.poll() is None, "ZooKeeper died"
        assert "OutOfMemoryError" not in (cluster.workdir / "zookeeper" / "zookeeper.log").read_text(errors="replace")
        results.stop()
    finally:
        cluster.stop()


def test_a_stock_client_gets_every_large_result(cluster):
    """300 results of 20 KB and 80 of 250 KB, read from the start by a client
    with gRPC's default 4 MiB message limit: every stream message fits."""
    cluster.start_master(wait=True)
    cluster.start_worker(4, "--jobs", "tests.jobs_for_tests", "--executor", "thread")
    stub = stock_client(cluster.start_frontend().address)
    wait_kind(stub, "echo")
    ids = []
    for size, count in ((20_000, 300), (250 * KiB, 80)):
        for start in range(0, count, 20):
            batch = [work_pb2.SubmitWorkRequest(work_id=f"r{size}-{n}", kind="echo", payload=b"r" * size)
                     for n in range(start, min(count, start + 20))]
            stub.SubmitWorks(work_pb2.SubmitWorksRequest(works=batch), timeout=30)
            ids += [w.work_id for w in batch]
    first = ResultCollector(stub)
    assert not first.wait_for(ids, timeout=120)
    first.stop()
    # Everything is finished now: a late subscriber reads the whole backlog.
    late = []
    for response in stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=0), timeout=60):
        assert response.ByteSize() < 4 * 1024 * 1024
        late += response.results
        if len(late) >= len(ids):
            break
    assert {r.work_id for r in late} >= set(ids)


def test_a_wide_worker_joining_a_backlog_of_large_works_runs_them_all(cluster):
    """70 works of 250 KiB wait; a worker with 70 slots joins: its hand-outs
    come in messages it can take, and every work runs once, first time."""
    cluster.start_master(wait=True)
    declarer = cluster.start_worker(1, "--jobs", "tests.jobs_for_tests")
    stub = stock_client(cluster.start_frontend().address)
    wait_kind(stub, "echo")
    declarer.stop()
    ids = [submit_until_acked(stub, "echo", bytes([65 + n % 26]) * (250 * KiB), f"wide-{n}",
                              max_attempts=1).work_id for n in range(70)]
    results = ResultCollector(stub)
    cluster.start_worker(70, "--jobs", "tests.jobs_for_tests", "--executor", "thread")
    assert not results.wait_for(ids, timeout=90)
    assert all(r.state == work_pb2.DONE and r.attempts == 1 for r in results.results if r.work_id in ids)
    results.stop()


@both_journals
@pytest.mark.parametrize("size", [1 * KiB, 64 * KiB, 200 * KiB])
def test_a_large_work_survives_a_failover(cluster, size):
    """Payload and result written in parts of the journal, read back by the standby."""
    first = cluster.start_master(wait=True)
    cluster.start_master(wait=True)
    declarer = cluster.start_worker(1, "--jobs", "tests.jobs_for_tests")
    stub = stock_client(cluster.start_frontend().address)
    wait_kind(stub, "echo")
    declarer.stop()
    payload = bytes(range(256)) * (size // 256)
    submit_until_acked(stub, "echo", payload, "big-before")
    first.kill()
    cluster.active_master(timeout=30)
    results = ResultCollector(stub)
    cluster.start_worker(1, "--jobs", "tests.jobs_for_tests")
    assert not results.wait_for(["big-before"], timeout=60)
    assert results.results[-1].result == payload
    results.stop()
