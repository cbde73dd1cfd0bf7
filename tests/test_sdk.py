"""The Python SDK against a real cluster: dworkers.Client and AsyncClient,
JSON and bytes, remote errors, async jobs, ctx, pipelined submission and
waiting across failovers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import grpc
import pytest

import dworkers
from dworkers.client import SubmitError
from dworkers.common.zkserver import free_port
from dworkers.v1 import work_pb2
from tests.helpers import frontend, wait_kind, wait_until

pytestmark = pytest.mark.e2e
JOBS = ("--jobs", "tests.jobs_sdk")


@pytest.fixture
def live(cluster):
    cluster.start_master(None, wait=True)
    front = cluster.start_frontend()
    cluster.start_worker(2, *JOBS)
    wait_kind(frontend(front.address), "describe")
    with dworkers.Client(front.address, timeout=30) as client:
        yield cluster, client


def test_results_come_back_as_the_job_returned_them(live):
    _cluster, client = live
    assert client.submit("add", 2, 3).result(timeout=30) == 5
    assert client.submit("add", "a", b="b").result(timeout=30) == "ab"
    described = client.submit("describe", "x", tags=["t"], work_id="sdk-describe-1")
    value = described.result(timeout=30)
    # the job's @job options are the defaults of works submitted here (timeout 20 s)
    assert value["name"] == "x" and value["tags"] == ["t"] and value["kind"] == "describe"
    assert value["work_id"] == "sdk-describe-1" == described.id and value["attempt"] == 1
    assert 0 < value["seconds_left"] <= 30
    assert client.submit("async_double", 21).result(timeout=30) == 42
    assert client.submit("reverse", payload=b"\x00\x01abc").result(timeout=30) == b"cba\x01\x00"
    assert client.submit("square", payload="7").result(timeout=30) == "7 * 7 = 49"  # text in, text out
    status = described.status()
    assert status.state == work_pb2.DONE and status.content_type == "application/json"


def test_large_payloads_and_results_of_every_kind_travel_whole(live):
    """Bytes, text and JSON of 1 KiB to ~256 KiB each way, many at once."""
    _cluster, client = live
    blobs = [bytes(range(256)) * (4 * n) for n in (1, 16, 255)]  # 1 KiB, 16 KiB, 255 KiB
    reversed_ = [client.submit("reverse", payload=blob) for blob in blobs for _ in range(10)]
    texts = [client.submit("add", "é" * 60_000, "x") for _ in range(5)]  # ~120 KB of UTF-8 in JSON each way
    lists = [client.submit("add", list(range(n)), [n]) for n in (100, 20_000)]
    assert [h.result(timeout=60) for h in reversed_] == [blob[::-1] for blob in blobs for _ in range(10)]
    assert all(h.result(timeout=60) == "é" * 60_000 + "x" for h in texts)
    assert [h.result(timeout=60) for h in lists] == [list(range(n)) + [n] for n in (100, 20_000)]


def test_failures_raise_work_failed_with_the_remote_error(live):
    _cluster, client = live
    with pytest.raises(dworkers.WorkFailed) as failed:
        client.submit("reject", 7).result(timeout=30)
    assert "ValueError: bad input 7" in failed.value.error and failed.value.attempts == 1
    for kind, words in (("forgot_async", "declare it `async def`"), ("not_json", "not JSON-serializable")):
        with pytest.raises(dworkers.WorkFailed) as failed:
            client.submit(kind, max_attempts=1, **({"x": 1} if kind == "forgot_async" else {})).result(timeout=30)
        assert words in failed.value.error, failed.value.error
    with pytest.raises(SubmitError) as refused:
        client.submit("add", 1, 2, work_id="bad id!").accepted(timeout=30)
    assert refused.value.code == "INVALID_ARGUMENT" and "malformed work_id" in refused.value.message
    # result() waits from the start, before the ack: the submission's refusal is what it raises
    with pytest.raises(SubmitError) as refused:
        client.submit("add", 1, 2, work_id="bad id!").result(timeout=30)
    assert refused.value.code == "INVALID_ARGUMENT"
    with pytest.raises(SubmitError) as refused:
        client.submit("no-such-kind", 1).result(timeout=30)
    assert refused.value.code == "INVALID_ARGUMENT" and "unknown kind" in refused.value.message
    napping = client.submit("nap", 5)
    with pytest.raises(TimeoutError):
        napping.result(timeout=0.5)
    napping.cancel()  # the worker need not finish it when the cluster stops


def test_the_jobs_options_are_the_defaults_of_its_works_however_submitted(live):
    """The producer never imported the jobs module: the worker declared the
    options; a raw gRPC submission without max_attempts gets them too."""
    cluster, client = live
    stub = frontend(client.target)
    stub.SubmitWork(work_pb2.SubmitWorkRequest(work_id="raw-reject-1", kind="reject", payload=b"{}",
                                               content_type="application/json"), timeout=10)
    (result,) = client._wait(["raw-reject-1"], time.monotonic() + 30)
    assert result.state == "FAILED" and result.attempts == 1  # reject's max_attempts=1, not the cluster's 3
    assert "missing 1 required positional argument" in result.error  # the raw call passed no value


def test_waiting_for_an_unknown_work_says_so(live):
    cluster, client = live
    with pytest.raises(grpc.RpcError) as unknown:
        list(client._wait(["never-submitted-1"], time.monotonic() + 10))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "never-submitted-1" in unknown.value.details() and "retention" in unknown.value.details()


def test_one_thread_submitting_in_a_loop_is_pipelined(live):
    """2,000 works from one thread, one submit() call each: acknowledged in
    batches, every result exactly once and in any order via as_completed."""
    _cluster, client = live
    started = time.monotonic()
    handles = [client.submit("add", i, i) for i in range(2_000)]
    client.flush(timeout=60)
    submitted = time.monotonic() - started
    assert all(h.accepted(0) is False for h in handles)
    finished = {h.id: h.result(0) for h in client.as_completed(handles, timeout=120)}
    assert finished == {h.id: 2 * i for i, h in enumerate(handles)}
    print(f"2,000 submits from one thread acknowledged in {submitted:.2f} s")


def test_the_async_client(live):
    cluster, client = live
    target = client.target

    async def main() -> None:
        async with dworkers.AsyncClient(target) as aclient:
            first = await aclient.submit("add", 1, 2)
            assert await first.result(timeout=30) == 3
            many = await aclient.submit_many("async_double", range(50))
            await aclient.flush()
            got = {h.id: h._result.value async for h in aclient.as_completed(many, timeout=60)}
            assert got == {h.id: 2 * i for i, h in enumerate(many)}
            with pytest.raises(dworkers.WorkFailed, match="bad input 9"):
                await (await aclient.submit("reject", 9)).result(timeout=30)

    asyncio.run(main())


def naps_awaited_through(address: str, trouble) -> None:
    """Four works of 1.5 s awaited by a thread while `trouble(client)` runs:
    every result comes."""
    wait_kind(frontend(address), "nap")
    with dworkers.Client(address) as client:
        handles = [client.submit("nap", 1.5) for _ in range(4)]
        for h in handles:
            h.accepted(timeout=30)
        values: list = []
        waiter = threading.Thread(target=lambda: values.extend(h.result(timeout=90) for h in handles))
        waiter.start()
        wait_until(lambda: client._awaits._stream is not None, 30, "the result stream to open")
        trouble(client)
        waiter.join(timeout=120)
        assert values == [1.5] * 4


def test_results_are_awaited_across_kill_9_of_the_master(cluster):
    cluster.start_master(None, wait=True)
    cluster.start_master(None)
    front = cluster.start_frontend()
    cluster.start_worker(2, *JOBS)

    def kill_the_master(_client) -> None:
        time.sleep(0.3)  # the waits reach the master before it dies
        cluster.active_master().kill()

    naps_awaited_through(front.address, kill_the_master)


def test_results_are_awaited_across_kill_9_of_the_frontend(cluster):
    """The client's result stream breaks with its frontend; opened again on
    the frontend that comes back, it asks for every result still due."""
    cluster.start_master(None, wait=True)
    port = free_port()
    front = cluster.start_frontend(port)
    cluster.start_worker(2, *JOBS)

    def restart_the_frontend(_client) -> None:
        front.kill()
        cluster.start_frontend(port)

    naps_awaited_through(front.address, restart_the_frontend)


def test_pipelined_submission_through_a_failover_loses_and_doubles_nothing(cluster):
    """A thread submits in a loop while the master is killed: every work is
    either acknowledged and finishes exactly once, or its handle says it was
    not accepted (and then it may or may not have been: its id is known)."""
    cluster.start_master(None, wait=True)
    cluster.start_master(None)
    front = cluster.start_frontend()
    cluster.start_worker(4, *JOBS)
    wait_kind(frontend(front.address), "add")
    with dworkers.Client(front.address, timeout=30) as client:
        handles = []
        stop_at = time.monotonic() + 60
        killed = False
        while len(handles) < 3_000 and time.monotonic() < stop_at:
            handles.append(client.submit("add", len(handles), 1))
            if len(handles) == 1_000:
                cluster.active_master().kill()
                killed = True
        assert killed
        acked, refused = [], []
        for h in handles:
            try:
                h.accepted(timeout=60)
                acked.append(h)
            except SubmitError:
                refused.append(h)
        assert len(acked) >= 2_000, f"only {len(acked)} of {len(handles)} acknowledged"
        results = {h.id: h.result(0) for h in client.as_completed(acked, timeout=180)}
        for i, h in enumerate(handles):
            if h in acked:
                assert results[h.id] == i + 1
        last = frontend(front.address).ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10).last_sequence
        seen: Counter = Counter()
        for result in client.watch(0):
            seen[result.work_id] += 1
            if result.sequence >= last:
                break
        assert all(seen[h.id] == 1 for h in acked), "an acknowledged work did not finish exactly once"
        assert set(seen) <= {h.id for h in handles}


def test_job_options_survive_a_failover_with_no_worker_online(cluster):
    """The new master reads the kinds' stored options: a work submitted while
    no worker of its kind is connected still gets them."""
    cluster.start_master(None, wait=True)
    cluster.start_master(None)
    front = cluster.start_frontend()
    worker = cluster.start_worker(1, *JOBS)
    stub = frontend(front.address)
    wait_kind(stub, "reject")
    worker.stop()
    cluster.active_master().kill()
    request = work_pb2.SubmitWorkRequest(work_id="after-failover-reject", kind="reject",
                                         payload=b'{"args": [5]}', content_type="application/json")
    deadline = time.monotonic() + 60
    while True:  # until the standby serves
        try:
            stub.SubmitWork(request, timeout=10)
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "no master took over"
            time.sleep(0.2)
    cluster.start_worker(1, *JOBS)
    with dworkers.Client(front.address) as client:
        (result,) = client._wait(["after-failover-reject"], time.monotonic() + 60)
    assert result.state == "FAILED" and result.attempts == 1 and "bad input 5" in result.error
