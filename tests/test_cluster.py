"""The whole work flow on a real ZooKeeper with real service processes."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import grpc
import pytest
from grpc_status import rpc_status

from dworkers import credentials
from dworkers.local_cluster import wait_serving
from dworkers.v1 import master_pb2, master_pb2_grpc, work_pb2
from tests.helpers import (
    ProtocolWorker,
    ResultCollector,
    assert_exactly_once,
    frontend,
    settle,
    submit_until_acked,
    wait_kind,
    wait_until,
)
from tests.journals import both_journals

# With TLS (mutual), access control and ZooKeeper ACLs on (conftest.py): the
# rest of the suite runs plaintext.
pytestmark = [pytest.mark.e2e, pytest.mark.secure]


@both_journals
def test_the_samples_scenario_with_a_flaky_worker(cluster):
    """3 workers and a flaky one; work 1, then 2..100: every result once."""
    cluster.start_master(wait=True)
    cluster.start_worker(3)
    cluster.start_worker(1, "--jobs", "tests.jobs_flaky")
    stub = frontend(cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "square")
    ids = [f"work-{n}" for n in range(1, 101)]
    submit_until_acked(stub, "square", b"1", ids[0])
    assert not results.wait_for(ids[:1], timeout=20)
    for n, work_id in enumerate(ids[1:], start=2):
        submit_until_acked(stub, "square", str(n).encode(), work_id)
    assert_exactly_once(results, ids, stub)
    by_id = {r.work_id: r for r in results.results}
    assert by_id["work-7"].result == b"7 * 7 = 49"
    assert all(r.state == work_pb2.DONE for r in results.results)
    results.stop()


@both_journals
def test_kill_9_of_the_master_with_200_works_in_flight(cluster):
    cluster.start_master(wait=True)
    cluster.start_master(wait=True)
    cluster.start_worker(4)
    stub = frontend(cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "sleep")
    acked: list[str] = []
    lock = threading.Lock()

    def produce(offset: int) -> None:
        for n in range(100):
            response = submit_until_acked(stub, "sleep", b"0.02", f"w{offset + n}")
            with lock:
                acked.append(response.work_id)

    producers = [threading.Thread(target=produce, args=(i * 100,)) for i in range(2)]
    for p in producers:
        p.start()
    wait_until(lambda: len(acked) >= 60, 60, "60 acked works", interval=0.01)
    old = cluster.active_master()
    old.kill()
    for p in producers:
        p.join(timeout=90)
    assert len(acked) == 200
    new = cluster.active_master()
    assert new is not old
    assert_exactly_once(results, acked, stub)
    results.stop()


@both_journals
def test_sigterm_hands_over_to_the_standby_at_once(zookeeper, tmp_path, journal):
    # A 10 s session: only a graceful resignation can be faster than that.
    from dworkers.local_cluster import LocalCluster

    cluster = LocalCluster(workdir=tmp_path, root=f"/graceful-{uuid.uuid4().hex[:6]}", session_timeout=10.0,
                           zookeeper=zookeeper, journal=journal)
    try:
        first = cluster.start_master(wait=True)
        second = cluster.start_master(wait=True)
        assert cluster.active_master() is first
        started = time.monotonic()
        first.signal(signal.SIGTERM)
        assert wait_serving(second.address, "dworkers.v1.Master", timeout=5)
        took = time.monotonic() - started
        assert first.process.wait(timeout=10) == 0
        assert took < 5, f"standby took {took:.1f} s"
    finally:
        cluster.stop()


@both_journals
def test_submit_is_idempotent(cluster):
    cluster.start_master(wait=True)
    cluster.start_worker(1)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    first = submit_until_acked(stub, "square", b"3", "same-id")
    again = submit_until_acked(stub, "square", b"3", "same-id")
    assert not first.duplicate and again.duplicate
    with pytest.raises(grpc.RpcError) as conflict:
        stub.SubmitWork(work_pb2.SubmitWorkRequest(work_id="same-id", kind="square", payload=b"4"), timeout=10)
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    results = ResultCollector(stub)
    assert not results.wait_for(["same-id"], timeout=20)
    assert submit_until_acked(stub, "square", b"3", "same-id").duplicate  # done: still a duplicate
    settle(results, stub)
    assert results.ids() == ["same-id"]
    results.stop()


def test_work_is_done_twice_is_acked_twice_and_recorded_once(cluster):
    master = cluster.start_master(wait=True)
    cluster.start_worker(1)  # declares the kinds
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    cluster.services[1].stop()  # no competing real worker
    probe = ProtocolWorker(master.address)
    probe.send(register=master_pb2.RegisterWorker(worker_ids=[probe.worker_id], host="probe", kinds=["square"]))
    submit_until_acked(stub, "square", b"5", "done-twice")
    probe.send(request_work=master_pb2.WorkerRequestsWork(worker_ids=[probe.worker_id]))
    works = probe.wait("works")
    assignment = works.works.assignments[0]
    assert assignment.work.work_id == "done-twice"
    done = master_pb2.WorkIsDone(completions=[master_pb2.Completion(
        worker_id=probe.worker_id, work_id="done-twice", result=b"25", attempt_token=assignment.attempt_token)])
    for _ in range(2):
        probe.send(done=done)
        assert list(probe.wait("ack").ack.attempt_tokens) == [assignment.attempt_token]
    results = ResultCollector(stub)
    assert not results.wait_for(["done-twice"], timeout=10)
    settle(results, stub)
    assert results.ids() == ["done-twice"]
    probe.close()
    results.stop()


def test_workers_started_before_any_master(cluster):
    worker = cluster.start_worker(2)
    wait_until(lambda: "waiting for a master" in worker.log(), 30, "the worker to wait for a master")
    cluster.start_master(wait=True)
    stub = frontend(cluster.start_frontend().address)
    response = submit_until_acked(stub, "square", b"9", deadline=30)
    results = ResultCollector(stub)
    assert not results.wait_for([response.work_id], timeout=30)
    assert results.results[0].result == b"9 * 9 = 81"
    results.stop()


def test_timed_out_work_is_requeued_and_completed_by_another_worker(cluster, tmp_path):
    cluster.start_master(wait=True)
    stuck = cluster.start_worker(1, "--jobs", "tests.jobs_for_tests", "--shutdown-grace", "1")  # it stops promptly
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "hang_once")
    marker = tmp_path / "hang-marker"
    response = submit_until_acked(stub, "hang_once", str(marker).encode(), timeout_seconds=2.0)
    wait_until(marker.exists, 20, "the job to start")
    stuck.signal(signal.SIGSTOP)  # its control loop is frozen: only the master's deadline can save the work
    try:
        cluster.start_worker(1, "--jobs", "tests.jobs_for_tests")
        results = ResultCollector(stub)
        assert not results.wait_for([response.work_id], timeout=30)
        result = results.results[0]
        assert result.state == work_pb2.DONE and result.attempts == 2
        results.stop()
    finally:
        stuck.signal(signal.SIGCONT)


def test_poison_work_ends_failed_after_max_attempts(cluster):
    cluster.start_master(wait=True)
    cluster.start_worker(2, "--jobs", "tests.jobs_for_tests")
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "fail")
    response = submit_until_acked(stub, "fail", b"poison", max_attempts=2)
    results = ResultCollector(stub)
    assert not results.wait_for([response.work_id], timeout=30)
    result = results.results[0]
    assert result.state == work_pb2.FAILED and result.attempts == 2
    assert "RuntimeError: cannot handle 'poison'" in result.error
    status = stub.GetWork(work_pb2.GetWorkRequest(work_id=response.work_id), timeout=10)
    assert status.state == work_pb2.FAILED
    results.stop()


@pytest.mark.parametrize("request_fields, fragment", [
    ({"kind": ""}, "kind is empty"),
    ({"kind": "no_such_kind"}, "unknown kind 'no_such_kind'"),
    ({"kind": "square", "payload": b"x" * (256 * 1024 + 1)}, "exceeds the limit"),
    ({"kind": "square", "work_id": "bad id with spaces"}, "malformed work_id"),
    ({"kind": "square", "max_attempts": 1000}, "max_attempts"),
    ({"kind": "square", "timeout_seconds": -1}, "timeout_seconds"),
])
def test_bad_input_is_refused_and_changes_nothing(cluster, request_fields, fragment):
    master = cluster.start_master(wait=True)
    cluster.start_worker(1)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    request = work_pb2.SubmitWorkRequest(**{"payload": b"2", **request_fields})
    for target in (stub, master_pb2_grpc.MasterStub(credentials.channel(master.address))):
        with pytest.raises(grpc.RpcError) as error:
            if isinstance(target, master_pb2_grpc.MasterStub):
                target.SubmitWorks(work_pb2.SubmitWorksRequest(works=[request]), timeout=10)
            else:
                target.SubmitWork(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in error.value.details()
    info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
    assert info.pending == 0 and info.in_progress == 0 and info.last_sequence == 0
    assert submit_until_acked(stub, "square", b"2").work_id  # still serving


def test_standby_refuses_with_the_masters_address(cluster):
    active = cluster.start_master(wait=True)
    standby = cluster.start_master(wait=True)
    assert cluster.active_master() is active
    stub = master_pb2_grpc.MasterStub(credentials.channel(standby.address))

    def refusal():
        try:
            stub.GetWork(work_pb2.GetWorkRequest(work_id="x"), timeout=5)
        except grpc.RpcError as error:
            return error if error.code() == grpc.StatusCode.FAILED_PRECONDITION else None
    error = wait_until(refusal, 20, "the standby to know the master")
    assert dict(error.trailing_metadata())["dworkers-master"] == active.address
    [details] = rpc_status.from_call(error).details  # the same, structured
    hint = master_pb2.ActiveMaster()
    assert details.Unpack(hint) and hint.address == active.address
