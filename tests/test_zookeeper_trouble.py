"""When ZooKeeper misbehaves: it goes away (every service still stops on
SIGTERM), it loses its data (epochs start again and everyone follows), and a
master wakes from a pause past its session (it must not answer from its
stale state)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid

import grpc
import pytest

from dworkers.local_cluster import LocalCluster, wait_serving
from dworkers.v1 import master_pb2_grpc, work_pb2
from tests.helpers import (
    ResultCollector,
    frontend,
    submit_until_acked,
    wait_kind,
    wait_until,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_cluster(tmp_path, request):
    """A cluster with a ZooKeeper of its own (the test stops or wipes it)."""
    cluster = LocalCluster(workdir=tmp_path, root=f"/trouble-{uuid.uuid4().hex[:6]}", session_timeout=2.0)
    cluster.start_zookeeper()
    yield cluster
    cluster.stop()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        cluster.print_logs()


def test_every_service_stops_on_sigterm_while_zookeeper_is_gone(own_cluster):
    cluster = own_cluster
    cluster.start_master(wait=True)
    cluster.start_master(wait=True)
    cluster.start_worker(2)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    results = ResultCollector(stub)
    assert not results.wait_for([submit_until_acked(stub, "square", b"3").work_id], timeout=30)
    results.stop()
    cluster.zookeeper.stop(kill=True)

    def refused():
        try:
            stub.SubmitWork(work_pb2.SubmitWorkRequest(kind="square", payload=b"1"), timeout=10)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAVAILABLE
        return False
    wait_until(refused, 30, "the cluster to notice ZooKeeper is gone")
    services = [s for s in cluster.services if s.alive()]
    for service in services:
        service.signal(signal.SIGTERM)
    for service in services:  # each within its grace period and the margin (worker: 30 + 10 s)
        try:
            service.process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{service.role} {service.pid} ignored SIGTERM while ZooKeeper was gone:\n"
                        f"{service.log()[-2000:]}")
    # Stopped by itself, not cut short by its deadline (exit status 1, "did
    # not stop within"): nothing waits for the ZooKeeper that is gone.
    for service in services:
        assert service.process.returncode == 0, f"{service.role}: {service.log()[-2000:]}"


def test_everyone_follows_a_zookeeper_that_lost_its_data(own_cluster):
    """Epochs start again from 0 in an empty ZooKeeper; workers and
    frontends that saw higher epochs must not ignore the new master."""
    cluster = own_cluster
    first = cluster.start_master(wait=True)
    cluster.start_master(wait=True)
    cluster.start_worker(2)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    first.kill()  # the standby leads, with a higher epoch
    results = ResultCollector(stub)
    before = submit_until_acked(stub, "square", b"2", deadline=60).work_id
    assert not results.wait_for([before], timeout=30)
    results.stop()

    cluster.zookeeper.stop(kill=True)
    shutil.rmtree(cluster.zookeeper.workdir / "data")
    cluster.zookeeper.start()
    cluster.restart(first)  # a backend with a fresh process too

    def square_runs():
        try:
            return any(k.kind == "square" and k.slots for k in
                       stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10).kinds)
        except grpc.RpcError:
            return False
    wait_until(square_runs, 90, "the worker to find the new master", interval=0.5)
    results = ResultCollector(stub)
    after = submit_until_acked(stub, "square", b"7", deadline=90).work_id
    assert not results.wait_for([after], timeout=60)
    assert [r.result for r in results.results if r.work_id == after] == [b"7 * 7 = 49"]
    results.stop()


def test_a_master_resumed_after_its_session_does_not_answer_from_stale_state(cluster):
    old = cluster.start_master(wait=True)
    new = cluster.start_master(wait=True)
    cluster.start_worker(1)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    channel = grpc.insecure_channel(old.address)  # connected before the pause, as a client would be
    assert _answer(master_pb2_grpc.MasterStub(channel).GetWork.future(
        work_pb2.GetWorkRequest(work_id="before"), timeout=10)) == grpc.StatusCode.NOT_FOUND
    old.signal(signal.SIGSTOP)
    try:
        assert wait_serving(new.address, "dworkers.v1.Master", timeout=30)
        submit_until_acked(stub, "square", b"5", "while-paused", deadline=60)
        # Asked while it sleeps, answered the moment it wakes up.
        calls = [master_pb2_grpc.MasterStub(channel).GetWork.future(
            work_pb2.GetWorkRequest(work_id="while-paused"), timeout=20) for _ in range(50)]
        time.sleep(0.5)  # the calls are on their way, queued at the paused process
    finally:
        old.signal(signal.SIGCONT)
    answers = [_answer(call) for call in calls]
    channel.close()
    assert grpc.StatusCode.NOT_FOUND not in answers, "a deposed master answered from its stale state"
    for answer in answers:
        assert answer in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION) or \
            answer.work_id == "while-paused"


def _answer(call):
    try:
        return call.result()
    except grpc.RpcError as error:
        return error.code()
