"""Faults injected into real processes: every acked work finishes exactly
once, through paused masters, killed workers and frontends, hung executors,
slow subscribers and a ZooKeeper restart."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import grpc
import pytest

from dworkers import credentials
from dworkers.local_cluster import LocalCluster, wait_serving
from dworkers.v1 import master_pb2_grpc, work_pb2
from tests.helpers import (
    Producer,
    ResultCollector,
    assert_exactly_once,
    frontend,
    submit_until_acked,
    wait_kind,
    wait_running,
    wait_until,
)
from tests.journals import both_journals, read_journal

# With TLS (mutual), access control and ZooKeeper ACLs on (conftest.py): the
# rest of the suite runs plaintext.
pytestmark = [pytest.mark.e2e, pytest.mark.secure]


@both_journals
def test_a_paused_master_is_fenced_and_rejoins_as_standby(cluster):
    old = cluster.start_master(wait=True)
    new = cluster.start_master(wait=True)
    cluster.start_worker(2)
    stub = frontend(cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "square")
    producer = Producer(stub)
    wait_until(lambda: len(producer.acked) >= 10, 30, "the first acked works")
    assert cluster.active_master() is old
    old.signal(signal.SIGSTOP)  # past its 2 s session: the standby takes over
    try:
        assert wait_serving(new.address, "dworkers.v1.Master", timeout=20)
        before = len(producer.acked)
        wait_until(lambda: len(producer.acked) >= before + 10, 30, "works acked by the new master")
    finally:
        old.signal(signal.SIGCONT)
    # The old master wakes up believing it leads, until ZooKeeper tells it.
    wait_until(lambda: "stepping down" in old.log(), 30, "the old master to step down")
    acked = producer.stop()
    assert len(acked) > 20
    assert_exactly_once(results, acked, stub)
    assert old.alive(), "the deposed master should stay up as a standby"
    assert not wait_serving(old.address, "dworkers.v1.Master", timeout=1)
    assert cluster.active_master() is new
    epochs = [batch.epoch for _, batch in read_journal(cluster)]
    assert epochs == sorted(epochs), "a deposed master appended after its successor"
    assert len(set(epochs)) >= 2
    results.stop()


def test_kill_9_of_a_worker_mid_job_requeues_its_work(cluster):
    cluster.start_master(wait=True)
    doomed = cluster.start_worker(1)
    stub = frontend(cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "sleep")
    response = submit_until_acked(stub, "sleep", b"3")
    wait_running(stub)  # on the only worker
    doomed.kill()
    cluster.start_worker(1)
    assert not results.wait_for([response.work_id], timeout=30)
    assert results.results[0].state == work_pb2.DONE and results.results[0].attempts == 2
    results.stop()


def test_a_hung_executor_is_killed_and_the_work_retried(cluster, tmp_path):
    cluster.start_master(wait=True)
    cluster.start_worker(1, "--jobs", "tests.jobs_for_tests")
    stub = frontend(cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "hang_once")
    response = submit_until_acked(stub, "hang_once", str(tmp_path / "marker").encode(), timeout_seconds=1.5)
    assert not results.wait_for([response.work_id], timeout=30)
    result = results.results[0]
    assert result.state == work_pb2.DONE and result.attempts == 2
    results.stop()


def test_a_client_retrying_through_another_frontend_gets_one_work(cluster):
    cluster.start_master(wait=True)
    cluster.start_worker(2)
    first, second = cluster.start_frontend(), cluster.start_frontend()
    stub_a, stub_b = frontend(first.address), frontend(second.address)
    results = ResultCollector(stub_b)
    wait_kind(stub_b, "square")
    ids = [f"retry-{n}" for n in range(60)]
    killer = threading.Timer(0.3, first.kill)
    killer.start()
    for work_id in ids:
        request = work_pb2.SubmitWorkRequest(work_id=work_id, kind="square", payload=b"2")
        try:
            stub_a.SubmitWork(request, timeout=2)
        except grpc.RpcError:
            pass  # the frontend died: was it accepted? the client cannot know
        # so it retries the same id through the other frontend
        submit_until_acked(stub_b, "square", b"2", work_id)
    killer.join()
    assert not first.alive()
    assert_exactly_once(results, ids, stub_b)
    results.stop()


def test_a_subscriber_that_stops_reading_is_dropped(cluster):
    master = cluster.start_master(None, "--subscriber-timeout", "2", wait=True)
    cluster.start_worker(2, "--jobs", "tests.jobs_for_tests")
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "blob")

    channel = credentials.channel(master.address)
    stalled = master_pb2_grpc.MasterStub(channel).WatchResults(work_pb2.WatchResultsRequest())
    reader = ResultCollector(stub)
    ids = [submit_until_acked(stub, "blob", b"200000").work_id for _ in range(60)]  # 12 MB of results
    assert not reader.wait_for(ids, timeout=60)  # others are not held up by it
    time.sleep(4.0)  # the scenario is time itself: twice the subscriber timeout without reading
    with pytest.raises(grpc.RpcError) as error:
        for _ in stalled:
            pass
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "read nothing" in error.value.details()
    reader.stop()
    channel.close()


def test_max_pending_sheds_load_with_resource_exhausted(cluster):
    cluster.start_master(None, "--max-pending", "5", wait=True)
    worker = cluster.start_worker(1)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    worker.stop()  # kinds stay declared; nothing drains the queue
    for n in range(5):
        submit_until_acked(stub, "square", str(n).encode(), f"q{n}")
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitWork(work_pb2.SubmitWorkRequest(work_id="q5", kind="square", payload=b"5"), timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
    assert info.pending == 5


def test_zookeeper_restart_while_work_flows(tmp_path):
    cluster = LocalCluster(workdir=tmp_path, root=f"/zk-restart-{uuid.uuid4().hex[:6]}", session_timeout=4.0)
    cluster.start_zookeeper()
    try:
        cluster.start_master(wait=True)
        cluster.start_master(wait=True)
        cluster.start_worker(2)
        stub = frontend(cluster.start_frontend().address)
        results = ResultCollector(stub)
        wait_kind(stub, "square")
        producer = Producer(stub, prefix="zk")
        wait_until(lambda: len(producer.acked) >= 10, 30, "the first acked works")
        cluster.zookeeper.stop(kill=True)
        # Submissions fail fast with UNAVAILABLE (not at the 20 s deadline)
        # once the cluster noticed ZooKeeper is gone.
        with pytest.raises(grpc.RpcError) as error:
            stub.SubmitWork(work_pb2.SubmitWorkRequest(kind="square", payload=b"1"), timeout=20)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value
        cluster.zookeeper.start()
        before = len(producer.acked)
        wait_until(lambda: len(producer.acked) >= before + 10, 90, "works acked after the restart")
        acked = producer.stop()
        after = [submit_until_acked(stub, "square", b"4", f"after-{n}", deadline=60).work_id for n in range(10)]
        assert_exactly_once(results, acked + after, stub, timeout=90)
        results.stop()
    finally:
        cluster.stop()


def test_a_stopping_worker_hands_back_unfinished_work(cluster):
    cluster.start_master(wait=True)
    leaving = cluster.start_worker(1, "--shutdown-grace", "1")
    stub = frontend(cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "sleep")
    # One attempt allowed: handing it back must not count as a failed one.
    response = submit_until_acked(stub, "sleep", b"4", max_attempts=1)
    wait_running(stub)
    assert leaving.stop() == 0
    cluster.start_worker(1)
    assert not results.wait_for([response.work_id], timeout=30)
    result = results.results[0]
    assert result.state == work_pb2.DONE and result.attempts == 2
    results.stop()


@both_journals
def test_works_held_ahead_by_a_killed_worker_run_elsewhere_without_spending_an_attempt(cluster):
    cluster.start_master(wait=True)
    doomed = cluster.start_worker(1, "--prefetch", "2")
    stub = frontend(cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "sleep")
    # One attempt each: the two held behind the running one never ran, so
    # losing them with their worker must not count as a failed attempt.
    running = submit_until_acked(stub, "sleep", b"30", max_attempts=1)
    wait_running(stub)
    ahead = [submit_until_acked(stub, "square", str(n).encode(), max_attempts=1) for n in (4, 5)]
    wait_running(stub, 3, 20)  # the slot holds all three
    doomed.kill()
    cluster.start_worker(1)
    ids = [running.work_id] + [r.work_id for r in ahead]
    assert not results.wait_for(ids, timeout=60)
    by_id = {r.work_id: r for r in results.results}
    assert by_id[running.work_id].state == work_pb2.FAILED  # it ran: its one attempt is spent
    for response in ahead:
        result = by_id[response.work_id]
        assert result.state == work_pb2.DONE and result.attempts == 2, result
    results.stop()
