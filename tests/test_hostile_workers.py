"""Workers that misbehave, speaking the worker protocol directly to a real
master: streams that never register, forged and stale reports, oversized
fields. The master refuses the stream or ignores the report; it never
records a result no one was handed, and never steps down for it."""

from __future__ import annotations

import grpc
import pytest

from dworkers.common.validation import MAX_HAND_BACKS
from dworkers.v1 import master_pb2, work_pb2
from tests.helpers import (
    ProtocolWorker,
    frontend,
    submit_until_acked,
    wait_kind,
    wait_until,
)

pytestmark = pytest.mark.e2e


def setup_without_workers(cluster, *master_args: str):
    """A master and a frontend; `square` declared by a worker that then left."""
    master = cluster.start_master(None, *master_args, wait=True)
    declarer = cluster.start_worker(1)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    declarer.stop()
    return master, stub


def status(stub, work_id: str) -> work_pb2.WorkStatus:
    return stub.GetWork(work_pb2.GetWorkRequest(work_id=work_id), timeout=10)


def stream_error(probe: ProtocolWorker) -> grpc.RpcError:
    probe.done.wait(10)
    assert probe.error is not None, "the master kept the stream open"
    return probe.error


def test_a_stream_that_never_registered_cannot_report(cluster):
    _master, stub = setup_without_workers(cluster)
    submit_until_acked(stub, "square", b"4", "victim")
    probe = ProtocolWorker(cluster.masters()[0].address)
    probe.send(done=master_pb2.WorkIsDone(completions=[master_pb2.Completion(
        worker_id="stranger-0", work_id="victim", result=b"forged")]))
    error = stream_error(probe)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "register" in error.details()
    assert status(stub, "victim").state == work_pb2.PENDING
    probe.close()


def test_reports_on_attempts_a_stream_was_not_handed_are_ignored(cluster):
    _master, stub = setup_without_workers(cluster)
    submit_until_acked(stub, "square", b"4", "victim")
    probe = ProtocolWorker(cluster.masters()[0].address)
    probe.send(register=master_pb2.RegisterWorker(worker_ids=[probe.worker_id], host="probe"))  # runs no kind
    for token in (0, 12345):
        probe.send(done=master_pb2.WorkIsDone(completions=[master_pb2.Completion(
            worker_id=probe.worker_id, work_id="victim", result=b"forged", attempt_token=token)]),
            failed=master_pb2.WorkFailed(failures=[master_pb2.Failure(
                worker_id=probe.worker_id, work_id="victim", error="forged", attempt_token=token)]))
        probe.wait("ack")  # acked as stale: the worker stops resending
    victim = status(stub, "victim")
    assert victim.state == work_pb2.PENDING and victim.attempts == 0 and not victim.error
    probe.close()


@pytest.mark.parametrize("field", ["worker_id", "slots", "kind", "defaults"])
def test_an_oversized_or_malformed_registration_is_refused_and_the_master_stays(cluster, field):
    master, stub = setup_without_workers(cluster)
    epoch = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10).master.epoch
    register = {
        "defaults": master_pb2.RegisterWorker(worker_ids=["w-0"], host="probe", kinds=["square"], defaults=[
            master_pb2.KindDefaults(kind="square", max_attempts=1_000_000)]),
        "worker_id": master_pb2.RegisterWorker(worker_ids=["w" * 1_200_000], host="probe"),
        "slots": master_pb2.RegisterWorker(worker_ids=[f"w-{i}" for i in range(5000)], host="probe"),
        "kind": master_pb2.RegisterWorker(worker_ids=["w-0"], host="probe", kinds=["no spaces allowed"]),
    }[field]
    probe = ProtocolWorker(master.address)
    probe.send(register=register)
    error = stream_error(probe)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    probe.close()
    submit_until_acked(stub, "square", b"2", "still-serving")
    assert stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10).master.epoch == epoch
    assert "stepping down" not in master.log()


def test_a_stale_report_cannot_complete_a_new_work_with_the_same_id(cluster):
    """W1 is handed work X and goes quiet; X times out, W2 finishes it, the
    result leaves the retention window and X is submitted again with another
    payload. W1 comes back and resends its report: X (the new one) must not
    end DONE with W1's old result."""
    _master, stub = setup_without_workers(cluster, "--retention-count", "0")
    first = ProtocolWorker(cluster.masters()[0].address, "w1-0")
    first.send(register=master_pb2.RegisterWorker(worker_ids=["w1-0"], host="w1", kinds=["square"]),
               request_work=master_pb2.WorkerRequestsWork(worker_ids=["w1-0"]))
    submit_until_acked(stub, "square", b"1", "reused", timeout_seconds=1.0)
    stale = first.wait("works").works.assignments[0]
    assert stale.work.payload == b"1"
    wait_until(lambda: status(stub, "reused").state == work_pb2.PENDING, 30, "the attempt to time out")

    second = ProtocolWorker(cluster.masters()[0].address, "w2-0")
    second.send(register=master_pb2.RegisterWorker(worker_ids=["w2-0"], host="w2", kinds=["square"]),
                request_work=master_pb2.WorkerRequestsWork(worker_ids=["w2-0"]))
    fresh = second.wait("works").works.assignments[0]
    second.send(done=master_pb2.WorkIsDone(completions=[master_pb2.Completion(
        worker_id="w2-0", work_id="reused", result=b"1 * 1 = 1", attempt_token=fresh.attempt_token)]))
    second.wait("ack")

    def forgotten():
        try:
            status(stub, "reused")
            return False
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND
    wait_until(forgotten, 30, "the result to leave the retention window")
    assert not submit_until_acked(stub, "square", b"2", "reused").duplicate

    first.send(register=master_pb2.RegisterWorker(worker_ids=["w1-0"], host="w1", kinds=["square"]),
               done=master_pb2.WorkIsDone(completions=[master_pb2.Completion(
                   worker_id="w1-0", work_id="reused", result=b"stale", attempt=stale.attempt,
                   attempt_token=stale.attempt_token)]))
    assert list(first.wait("ack").ack.attempt_tokens) == [stale.attempt_token]
    again = status(stub, "reused")
    assert again.state == work_pb2.PENDING and again.attempts == 0
    first.close()
    second.close()


def test_a_result_with_a_malformed_content_type_fails_its_attempt(cluster):
    """The content type travels to every client: a worker cannot put
    arbitrary bytes there; the attempt fails instead, and the work is retried."""
    master, stub = setup_without_workers(cluster)
    probe = ProtocolWorker(master.address, "hostile-0")
    probe.send(register=master_pb2.RegisterWorker(worker_ids=["hostile-0"], host="probe", kinds=["square"]),
               request_work=master_pb2.WorkerRequestsWork(worker_ids=["hostile-0"]))
    submit_until_acked(stub, "square", b"3", "typed")
    handed = probe.wait("works").works.assignments[0]
    probe.send(done=master_pb2.WorkIsDone(completions=[master_pb2.Completion(
        worker_id="hostile-0", work_id="typed", result=b"9", attempt_token=handed.attempt_token,
        content_type="text/plain\n\x00" + "x" * 500)]))
    probe.wait("ack")
    wait_until(lambda: status(stub, "typed").state == work_pb2.PENDING, 30, "the attempt to fail")
    failed = status(stub, "typed")
    assert failed.attempts == 1 and "malformed content type" in failed.error
    probe.close()
    assert "stepping down" not in master.log()


def test_heartbeats_about_other_attempts_are_ignored_and_garbage_ones_refused(cluster):
    """A stream may only speak of what it was handed: a heartbeat naming
    another slot's attempt is ignored, a malformed one closes the stream."""
    master, stub = setup_without_workers(cluster)
    submit_until_acked(stub, "square", b"4", "victim")
    probe = ProtocolWorker(master.address)
    probe.send(register=master_pb2.RegisterWorker(worker_ids=[probe.worker_id], host="probe", kinds=["square"]),
               request_work=master_pb2.WorkerRequestsWork(worker_ids=[probe.worker_id]))
    handed = probe.wait("works").works.assignments[0]
    probe.send(heartbeats=master_pb2.Heartbeats(heartbeats=[
        master_pb2.Heartbeat(worker_id="someone-else-0", attempt_token=handed.attempt_token, progress=0.9),
        master_pb2.Heartbeat(worker_id=probe.worker_id, attempt_token=handed.attempt_token + 1, progress=0.9)]))
    probe.send(heartbeats=master_pb2.Heartbeats(heartbeats=[
        master_pb2.Heartbeat(worker_id=probe.worker_id, attempt_token=handed.attempt_token, progress=0.25)]))
    wait_until(lambda: status(stub, "victim").progress == 0.25, 10, "its own heartbeat's progress")
    probe.send(heartbeats=master_pb2.Heartbeats(heartbeats=[
        master_pb2.Heartbeat(worker_id=probe.worker_id, attempt_token=handed.attempt_token, progress=float("inf"))]))
    error = stream_error(probe)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "progress" in error.details()
    probe.close()
    submit_until_acked(stub, "square", b"2", "still-serving")
    assert "stepping down" not in master.log()


def test_a_work_handed_back_forever_ends_failed_instead_of_bouncing(cluster):
    """Hand-backs are free (a worker leaving returns what it holds), up to a
    bound per work: past it, one counts as a failed attempt."""
    master, stub = setup_without_workers(cluster)
    probe = ProtocolWorker(master.address, "bouncer-0")
    probe.send(register=master_pb2.RegisterWorker(worker_ids=["bouncer-0"], host="probe", kinds=["square"]),
               request_work=master_pb2.WorkerRequestsWork(worker_ids=["bouncer-0"]))
    submit_until_acked(stub, "square", b"3", "bounced", max_attempts=1)
    for returned in range(1, MAX_HAND_BACKS + 2):
        handed = probe.wait("works", timeout=30).works.assignments[0]
        assert handed.work.work_id == "bounced"
        probe.send(failed=master_pb2.WorkFailed(failures=[master_pb2.Failure(
            worker_id="bouncer-0", work_id="bounced", attempt_token=handed.attempt_token, returned=True)]))
        probe.wait("ack", timeout=30)
        probe.send(request_work=master_pb2.WorkerRequestsWork(worker_ids=["bouncer-0"]))
        if returned <= MAX_HAND_BACKS:
            wait_until(lambda: status(stub, "bounced").state in (work_pb2.PENDING, work_pb2.IN_PROGRESS), 30,
                       "the hand-back to be recorded")
            assert status(stub, "bounced").state != work_pb2.FAILED
    wait_until(lambda: status(stub, "bounced").state == work_pb2.FAILED, 30, "the work to fail")
    assert f"handed back unfinished more than {MAX_HAND_BACKS} times" in status(stub, "bounced").error
    probe.close()
