"""Control over work on a real cluster: cancel (a running job's process is
killed), delayed works across a kill -9 failover, priority order after a
recovery, back-off measured between attempts, permanent errors, and the
job's defaults."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

import dworkers
from dworkers.client import Result
from dworkers.v1 import work_pb2
from tests.helpers import frontend, wait_kind, wait_running, wait_until
from tests.journals import both_journals
from tests.test_cli import assert_one_line_error, ok
from tests.test_cli import dworkers as cli

pytestmark = pytest.mark.e2e
JOBS = ("--jobs", "tests.jobs_control")


def start(cluster, masters: int = 1, concurrency: int = 2, *worker_args: str):
    cluster.start_master(None, wait=True)
    for _ in range(masters - 1):
        cluster.start_master(None)
    front = cluster.start_frontend()
    cluster.start_worker(concurrency, *JOBS, *worker_args)
    stub = frontend(front.address)
    wait_kind(stub, "nap")
    return front, stub


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


@both_journals
def test_cancelling_a_running_work_kills_its_job_process_and_frees_the_slot(cluster, tmp_path):
    front, stub = start(cluster, concurrency=1)
    pid_file = tmp_path / "nap.pid"
    with dworkers.Client(front.address, timeout=30) as client:
        napping = client.submit("nap", 30, str(pid_file))
        queued = client.submit("stamp", "after")  # waits behind it: one slot
        later = client.submit("stamp", "scheduled", delay=300)
        pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), 30, "the job to start"))
        assert alive(pid)
        called = time.monotonic()
        status = napping.cancel()
        assert status.state == work_pb2.CANCELLED
        wait_until(lambda: not alive(pid), 10, "the job's process to end")
        stopped = time.monotonic() - called
        print(f"cancel to job process gone: {stopped * 1000:.0f} ms")
        with pytest.raises(dworkers.WorkCancelled):
            napping.result(timeout=10)
        assert queued.result(timeout=30)["label"] == "after"  # the slot runs the next work
        assert later.status().state == work_pb2.SCHEDULED
        assert [s.state for s in client.cancel(later, napping)] == [work_pb2.CANCELLED] * 2  # twice is fine
        with pytest.raises(dworkers.WorkCancelled):
            later.result(timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            client.cancel(queued.id)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already finished DONE" in refused.value.details()
        with pytest.raises(grpc.RpcError) as unknown:
            client.cancel("never-submitted")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
        assert info.cancelled == 2 and info.scheduled == 0


@both_journals
def test_a_delayed_work_runs_on_time_after_a_kill_9_failover(cluster):
    front, stub = start(cluster, masters=2)
    with dworkers.Client(front.address, timeout=60) as client:
        submitted = time.time()
        delayed = client.submit("stamp", "delayed", delay=6)
        delayed.accepted(timeout=30)
        status = client.status(delayed.id)
        assert status.state == work_pb2.SCHEDULED and submitted + 6 <= status.not_before <= time.time() + 6
        cluster.active_master().kill()
        cluster.active_master(timeout=60)
        ran = delayed.result(timeout=60)["at"]
        assert ran >= status.not_before
        # on time: within the session timeout (2 s) that the failover takes, and scheduling slack
        print(f"ran {ran - status.not_before:.3f} s after its time")
        assert ran - status.not_before < 2.0 + 8.0


@both_journals
def test_priority_order_holds_after_a_recovery(cluster, tmp_path):
    front, stub = start(cluster, 2, 1, "--prefetch", "0")
    gate = tmp_path / "gate"
    with dworkers.Client(front.address, timeout=60) as client:
        blocker = client.submit("hold", str(gate))
        wait_running(stub, 1)
        priorities = [0, 5, -3, 5, 1, 0, 9, -3, 1, 9] * 3
        # one call, so that they are queued in this order (the SDK's pipelined calls may be accepted in any)
        stub.SubmitWorks(work_pb2.SubmitWorksRequest(works=[
            work_pb2.SubmitWorkRequest(work_id=f"prio-{i}", kind="stamp", priority=p,
                                       payload=json.dumps({"args": [f"{i}:{p}"], "kwargs": {}}).encode(),
                                       content_type="application/json")
            for i, p in enumerate(priorities)]), timeout=30)
        cluster.active_master().kill()
        cluster.active_master(timeout=60)
        gate.touch()
        assert blocker.result(timeout=60) == "released"
        values = [Result.of(r).unwrap() for response in stub.WaitWorks(work_pb2.WaitWorksRequest(
            work_ids=[f"prio-{i}" for i in range(len(priorities))]), timeout=60) for r in response.results]
        ran = sorted((v["at"], v["label"]) for v in values)
    order = [tuple(int(x) for x in label.split(":")) for _, label in ran]
    expected = sorted(((i, p) for i, p in enumerate(priorities)), key=lambda ip: (-ip[1], ip[0]))
    assert order == expected


def test_failed_attempts_wait_their_backoff_and_permanent_errors_end_at_once(cluster, tmp_path):
    front, stub = start(cluster)
    log = tmp_path / "attempts"
    with dworkers.Client(front.address, timeout=60) as client:
        flaky = client.submit("always_fails", str(log), max_attempts=3, backoff=(1.0, 2.0))
        hopeless = client.submit("hopeless", "this")
        picky = client.submit("picky", "that")
        with pytest.raises(dworkers.WorkFailed) as failed:
            flaky.result(timeout=60)
        assert failed.value.attempts == 3 and "ConnectionError: the service it needs is down" in failed.value.error
        times = [float(line) for line in log.read_text().split()]
        gaps = [b - a for a, b in zip(times, times[1:])]
        print(f"gaps between attempts: {[round(g, 3) for g in gaps]}")
        assert len(times) == 3 and gaps[0] >= 0.5 and gaps[1] >= 1.0  # 1 s then 2 s, jittered into [half, all]
        for handle, error in ((hopeless, "Permanent: this can never work"), (picky, "ValueError: bad input 'that'")):
            with pytest.raises(dworkers.WorkFailed) as failed:
                handle.result(timeout=60)
            assert failed.value.attempts == 1, "not retried, with attempts left"
            assert failed.value.error.startswith(error) and "Traceback (innermost" in failed.value.error


def test_a_jobs_options_are_the_defaults_of_its_works(cluster):
    front, stub = start(cluster)
    with dworkers.Client(front.address, timeout=30) as client:
        default = client.submit("urgent", delay=60)
        chosen = client.submit("urgent", priority=-1, delay=60)
        assert default.status().priority == 9 and chosen.status().priority == -1
        client.cancel(default, chosen)
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitWork(work_pb2.SubmitWorkRequest(kind="urgent", priority=5000), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority 5000" in refused.value.details()


def test_the_cli_submits_with_options_and_cancels(cluster):
    front, stub = start(cluster)
    address = ("--frontend", front.address)
    work_id = ok(cli("submit", "stamp", "x", "--delay", "120", "--priority", "3", *address)).stdout.strip()
    shown = ok(cli("status", work_id, *address)).stdout
    assert "SCHEDULED" in shown and "priority: 3" in shown and "not_before" in shown
    assert f"{work_id}  CANCELLED" in ok(cli("cancel", work_id, *address)).stdout
    assert_one_line_error(cli("cancel", "nope", *address), "NOT_FOUND", "'nope'")
    assert "cancelled 1" in ok(cli("cluster", *address)).stdout


def test_heartbeats_keep_a_long_job_alive_show_its_progress_and_a_silent_one_times_out(cluster, tmp_path):
    front, stub = start(cluster, 1, 2, "--prefetch", "0")
    gate = tmp_path / "gate"
    with dworkers.Client(front.address, timeout=30) as client:
        # its timeout is 1 s, its lease 1.5 s: it runs 4 s on heartbeats
        long = client.submit("beating", 4, str(gate), timeout=1)
        silent = client.submit("silent", 30)
        status = wait_until(lambda: (s := long.status()).HasField("progress") and s.progress > 0.1 and s, 30,
                            "its progress")
        assert status.state == work_pb2.IN_PROGRESS and status.progress_details == "working"
        info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
        assert any(w.work_id == long.id and w.HasField("progress") for w in info.workers)
        with pytest.raises(dworkers.WorkFailed) as failed:
            silent.result(timeout=30)
        assert "timed out" in failed.value.error and failed.value.attempts == 2  # re-queued once, then given up
        gate.touch()
        ran = float(long.result(timeout=30).split()[2])
        assert ran > 2.5, "it outlived its timeout (1 s) and its lease (1.5 s) on heartbeats"
        assert long.status().attempts == 1, "the heartbeating job was never timed out"


def test_a_rate_limit_holds_across_idle_slots_and_is_set_by_the_job_or_an_admin(cluster):
    front, stub = start(cluster, 1, 4)

    def kind(name: str) -> work_pb2.KindInfo:
        info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
        return next(k for k in info.kinds if k.kind == name)

    with dworkers.Client(front.address, timeout=60) as client:
        assert kind("throttled").rate_limit == 4 and not kind("throttled").rate_limit_set_by_admin
        info = client.set_rate_limit("stamp", 5)
        assert info.rate_limit == 5 and info.rate_limit_set_by_admin
        times = sorted(h.result(timeout=60)["at"] for h in [client.submit("stamp", str(i)) for i in range(16)])
        span = times[-1] - times[0]
        print(f"16 starts at 5/s with 4 idle slots: {span:.2f} s from first to last")
        assert span >= 15 * 0.2 * 0.8, "more than 5 a second"
        assert client.set_rate_limit("stamp", None).rate_limit == 0  # the job sets none
        started = time.monotonic()
        for h in [client.submit("stamp", str(i)) for i in range(16)]:
            h.result(timeout=60)
        assert time.monotonic() - started < span, "no limit any more"
        client.set_rate_limit("throttled", 0)  # an admin lifts the job's own limit
        assert kind("throttled").rate_limit == 0 and kind("throttled").rate_limit_set_by_admin
    with pytest.raises(grpc.RpcError) as refused:
        stub.SetRateLimit(work_pb2.SetRateLimitRequest(kind="no-such-kind", per_second=1), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown kind" in refused.value.details()


def test_listing_pages_through_10000_works_without_gaps_or_repeats_while_they_finish(cluster):
    cluster.start_master(None, wait=True)
    front = cluster.start_frontend()
    stub = frontend(front.address)
    declarer = cluster.start_worker(1, *JOBS)
    wait_kind(stub, "stamp")
    declarer.stop()
    count = 10_000
    with dworkers.Client(front.address, timeout=60) as client:
        handles = [client.submit("stamp", str(i), work_id=f"l{i:05}") for i in range(count)]
        client.flush()
        queued = [s.work_id for s in client.list_works("PENDING", page_size=1000)]  # the queue's order
        assert sorted(queued) == sorted(h.id for h in handles)
        order = {work_id: i for i, work_id in enumerate(queued)}
        cluster.start_worker(2, *JOBS, "--executor", "thread")

        def done_count() -> int:
            return stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10).done

        wait_until(lambda: done_count() >= 100, 60, "the worker to get going")
        before = done_count()
        pending = [s.work_id for s in client.list_works("PENDING", kind="stamp", page_size=100)]
        done_while = [s.sequence for s in client.list_works("DONE", page_size=100)]
        moved = done_count() - before
        assert moved > 0, "no work finished while the listing ran: the test proves nothing"
        positions = [order[w] for w in pending]
        assert positions == sorted(set(positions)), "pending works listed out of queue order, or twice"
        assert done_while == sorted(set(done_while)), "finished works listed out of order, or twice"
        wait_until(lambda: stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10).done >= count, 120,
                   "every work to finish")
        done = [s.work_id for s in client.list_works("DONE", page_size=333)]
    print(f"listed {len(pending)} pending and {len(done_while)} done while {moved} finished")
    assert sorted(done) == sorted(order) and len(done) == count, "a gap or a repeat in the finished works"
    with pytest.raises(grpc.RpcError) as refused:
        stub.ListWorks(work_pb2.ListWorksRequest(state=work_pb2.DONE, page_token="1:garbage"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@both_journals
def test_a_failed_work_is_retried_with_its_payload_and_a_cancelled_one_too(cluster, tmp_path):
    front, stub = start(cluster)
    with dworkers.Client(front.address, timeout=60) as client:
        hopeless = client.submit("hopeless", "x" * 100_000)  # a 100 KB payload, kept while it may be retried
        delayed = client.submit("stamp", "later", delay=600)
        with pytest.raises(dworkers.WorkFailed):
            hopeless.result(timeout=30)
        delayed.cancel()
        failed = [s.work_id for s in client.list_works("FAILED")]
        assert failed == [hopeless.id] and [s.work_id for s in client.list_works("CANCELLED")] == [delayed.id]
        statuses = client.retry(hopeless, delayed)
        assert [s.state for s in statuses] == [work_pb2.PENDING] * 2 and statuses[0].attempts == 0
        assert delayed.result(timeout=30)["label"] == "later"  # no delay the second time
        with pytest.raises(dworkers.WorkFailed) as again:
            hopeless.result(timeout=30)
        assert again.value.attempts == 1 and ("x" * 100) in again.value.error  # the same payload reached the job
        with pytest.raises(grpc.RpcError) as refused:
            client.retry(delayed)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is DONE" in refused.value.details()
    assert_one_line_error(cli("retry", "nope", "--frontend", front.address), "NOT_FOUND")
    listed = ok(cli("list", "failed", "--frontend", front.address)).stdout
    assert hopeless.id in listed and "Permanent" in listed
