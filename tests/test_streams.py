"""Result streams against the clients people really have: ones that wait
through a master's pause, ones that give up within milliseconds, and ones
that stop reading."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from dworkers import credentials
from dworkers.v1 import master_pb2_grpc, work_pb2
from tests.helpers import (
    ResultCollector,
    frontend,
    submit_until_acked,
    wait_kind,
    wait_until,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def test_a_waiting_client_gets_its_result_when_the_only_backend_comes_back(cluster):
    """The only backend pauses past its session and rejoins at the same
    address: `submit --wait` still prints the result (the stream resumes; it
    never ends with OK while results are due)."""
    master = cluster.start_master(wait=True)
    cluster.start_worker(1)
    front = cluster.start_frontend()
    stub = frontend(front.address)
    wait_kind(stub, "sleep")
    waiting = subprocess.Popen(
        [sys.executable, "-m", "dworkers.cli", "submit", "sleep", "4", "--wait", "--frontend", front.address,
         "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_until(lambda: stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10).in_progress == 1, 30,
               "the work to start")
    master.signal(signal.SIGSTOP)
    time.sleep(cluster.session_timeout + 1.5)  # past its session: ZooKeeper drops its election znode
    master.signal(signal.SIGCONT)
    out, err = waiting.communicate(timeout=90)
    assert waiting.returncode == 0, err
    assert "slept 4 s" in out


def test_clients_that_give_up_at_once_do_not_use_up_the_result_streams(cluster):
    """Thousands of WatchResults calls with deadlines of a few milliseconds
    (the client is gone before the frontend starts the stream): every slot
    comes back, and the frontend's threads do not grow."""
    cluster.start_master(wait=True)
    cluster.start_worker(1)
    front = cluster.start_frontend(None, "--max-watchers", "2", "--threads", "8", "--max-submit-streams", "1")
    stub = frontend(front.address)
    wait_kind(stub, "square")
    submit_until_acked(stub, "square", b"2")  # its stream of submissions to the master is open
    threads_before = thread_count(front.pid)

    def hammer(offset: int) -> None:
        for n in range(750):
            try:
                for _ in stub.WatchResults(work_pb2.WatchResultsRequest(), timeout=0.001 * (1 + (n + offset) % 5)):
                    pass
            except grpc.RpcError:
                pass

    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    # Both slots serve real subscribers again.
    collectors = [ResultCollector(stub), ResultCollector(stub)]
    response = submit_until_acked(stub, "square", b"3")
    for collector in collectors:
        assert not collector.wait_for([response.work_id], timeout=30)
        collector.stop()
    assert thread_count(front.pid) <= threads_before + 12
    assert front.alive()


def test_subscribers_that_stop_reading_are_dropped_and_free_their_slots(cluster):
    cluster.start_master(None, "--subscriber-timeout", "120", wait=True)
    cluster.start_worker(2, "--jobs", "tests.jobs_for_tests", "--executor", "thread")
    front = cluster.start_frontend(None, "--max-watchers", "2", "--subscriber-timeout", "2")
    stub = frontend(front.address)
    wait_kind(stub, "blob")
    stalled = [stub.WatchResults(work_pb2.WatchResultsRequest()) for _ in range(2)]  # never read
    for n in range(80):  # 8 MB of results: more than any flow-control window holds
        submit_until_acked(stub, "blob", b"100000", f"stall-{n}")

    def a_third_subscriber_is_served():
        stream = stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=79))
        try:
            next(stream)
            return True
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            return False
        finally:
            stream.cancel()

    submit_until_acked(stub, "blob", b"10", "after-stall")
    wait_until(a_third_subscriber_is_served, 30, "a free result stream slot", interval=0.5)
    for stream in stalled:
        code = None
        try:
            for _ in stream:
                pass
        except grpc.RpcError as error:
            code = error.code()
        assert code == grpc.StatusCode.CANCELLED


def test_an_await_stream_answers_each_awaited_work_once_and_refuses_what_it_cannot(cluster):
    """The master's side of the frontends' shared result stream, spoken to
    directly: refusals before results, forgotten ids never answered, every
    awaited work once, and a malformed request ends the stream with a
    reason."""
    master = cluster.start_master(wait=True)
    cluster.start_worker(2)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "sleep")
    finished = submit_until_acked(stub, "square", b"3").work_id
    list(stub.WaitWorks(work_pb2.WaitWorksRequest(work_ids=[finished]), timeout=30))
    running = [submit_until_acked(stub, "sleep", b"1").work_id for _ in range(2)]
    channel = credentials.channel(master.address)
    requests: queue.SimpleQueue = queue.SimpleQueue()
    stream = master_pb2_grpc.MasterStub(channel).AwaitResults(iter(requests.get, None), timeout=60)
    opened = next(stream)  # at once, empty: the stream is open (a frontend counts from here)
    assert not opened.results and not opened.refused and opened.cluster_id
    requests.put(work_pb2.AwaitRequest(work_ids=[finished, "never-accepted", *running]))
    first = next(stream)
    assert [(r.work_id, r.code) for r in first.refused] == [("never-accepted", grpc.StatusCode.NOT_FOUND.value[0])]
    assert not first.results
    assert [r.work_id for r in next(stream).results] == [finished]
    requests.put(work_pb2.AwaitRequest(forget=[running[0]], work_ids=[finished]))  # answered again: asked again
    assert [r.work_id for r in next(stream).results] == [finished]
    late = next(stream)
    assert [(r.work_id, r.result) for r in late.results] == [(running[1], b"slept 1 s")]
    requests.put(work_pb2.AwaitRequest(work_ids=["x" * 10_000]))
    with pytest.raises(grpc.RpcError) as refused:
        next(stream)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "work_id" in refused.value.details()
    requests.put(None)
    channel.close()


def test_a_masters_submit_stream_answers_each_request_in_order_with_its_answer_or_refusal(cluster):
    """The master's side of a frontend's stream of submissions, spoken to
    directly: the epoch comes first; requests sent at once (works of 1 B to
    256 KiB, a duplicate, a refused work judged on its own) are answered in
    order, as SubmitWorks answers them; a request SubmitWorks would fail is
    answered with that status, and the stream goes on; a standby refuses the
    stream with the master's address."""
    master = cluster.start_master(wait=True)
    cluster.start_worker(2)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    channel = credentials.channel(master.address)
    master_stub = master_pb2_grpc.MasterStub(channel)
    requests: queue.SimpleQueue = queue.SimpleQueue()
    stream = master_stub.SubmitStream(iter(requests.get, None), timeout=60)
    metadata = dict(stream.initial_metadata())
    _, call = master_stub.ClusterInfo.with_call(work_pb2.ClusterInfoRequest(), timeout=10)
    trailers = dict(call.trailing_metadata())  # what a unary call says
    assert metadata["dworkers-epoch"] == trailers["dworkers-epoch"] and metadata["dworkers-cluster"]
    assert metadata["dworkers-cluster"] == trailers["dworkers-cluster"]
    sizes = [1, 1024, 64 * 1024, 256 * 1024]
    batches = [[f"s{i}-{j}" for j in range(1 + i % 3)] for i in range(20)]
    for i, ids in enumerate(batches):
        works = [work_pb2.SubmitWorkRequest(work_id=w, kind="square", payload=b"3".ljust(sizes[(i + j) % 4]))
                 for j, w in enumerate(ids)]
        if i == 7:
            works.append(work_pb2.SubmitWorkRequest(work_id="s0-0", kind="square", payload=b"3"))  # again
            works.append(work_pb2.SubmitWorkRequest(work_id="unknown-kind", kind="no-such-kind", payload=b"3"))
        requests.put(work_pb2.SubmitWorksRequest(works=works, each_on_its_own=True))
    answers = [next(stream) for _ in batches]
    for i, (ids, answer) in enumerate(zip(batches, answers)):
        extra = ["s0-0", "unknown-kind"] if i == 7 else []
        assert [w.work_id for w in answer.works] == ids + extra
        assert all(w.code == 0 and not w.duplicate for w in answer.works[:len(ids)])
    duplicate, refused = answers[7].works[-2:]
    assert duplicate.duplicate and duplicate.code == 0
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "no-such-kind" in refused.message
    bad = work_pb2.SubmitWorksRequest(works=[work_pb2.SubmitWorkRequest(work_id="whole", kind="no-such-kind")])
    with pytest.raises(grpc.RpcError) as alone:
        master_stub.SubmitWorks(bad, timeout=10)
    requests.put(bad)
    requests.put(work_pb2.SubmitWorksRequest(works=[work_pb2.SubmitWorkRequest(work_id="after", kind="square",
                                                                               payload=b"4")]))
    refusal = next(stream)
    assert (refusal.code, refusal.message) == (alone.value.code().value[0], alone.value.details())
    assert not refusal.works and [w.work_id for w in next(stream).works] == ["after"]
    accepted = [w for ids in batches for w in ids] + ["after"]
    results = {r.work_id: r for batch in stub.WaitWorks(work_pb2.WaitWorksRequest(work_ids=accepted), timeout=60)
               for r in batch.results}
    assert sorted(results) == sorted(accepted) and all(r.state == work_pb2.DONE for r in results.values())
    standby = cluster.start_master(wait=True)
    refusal = master_pb2_grpc.MasterStub(credentials.channel(standby.address)).SubmitStream(iter(()), timeout=10)
    with pytest.raises(grpc.RpcError) as standing_by:
        next(refusal)
    assert standing_by.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(standing_by.value.trailing_metadata())["dworkers-master"] == master.address
    requests.put(None)
    channel.close()


def test_a_frontends_submit_stream_answers_in_order_each_call_with_its_answer_or_refusal(cluster):
    """The public SubmitStream: calls sent at once (works of 1 B to 256 KiB,
    a duplicate, a work refused on its own) are answered in order, as
    SubmitWorks answers them, and each accepted work runs; a call the
    frontend refuses is answered with the status SubmitWorks fails with, and
    the stream goes on; the streams a frontend serves at once are bounded."""
    cluster.start_master(wait=True)
    cluster.start_worker(2)
    front = cluster.start_frontend(None, "--max-submit-streams", "1")
    stub = frontend(front.address)
    wait_kind(stub, "square")
    requests: queue.SimpleQueue = queue.SimpleQueue()
    stream = stub.SubmitStream(iter(requests.get, None), timeout=60)
    sizes = [1, 1024, 64 * 1024, 256 * 1024]
    batches = [[f"f{i}-{j}" for j in range(1 + i % 3)] for i in range(20)]
    for i, ids in enumerate(batches):
        works = [work_pb2.SubmitWorkRequest(work_id=w, kind="square", payload=b"3".ljust(sizes[(i + j) % 4]))
                 for j, w in enumerate(ids)]
        if i == 5:
            works.append(work_pb2.SubmitWorkRequest(work_id="f0-0", kind="square", payload=b"3"))
            works.append(work_pb2.SubmitWorkRequest(work_id="unknown-kind", kind="no-such-kind", payload=b"3"))
        requests.put(work_pb2.SubmitWorksRequest(works=works, each_on_its_own=True))
    answers = [next(stream) for _ in batches]
    for i, (ids, answer) in enumerate(zip(batches, answers)):
        assert [w.work_id for w in answer.works] == ids + (["f0-0", "unknown-kind"] if i == 5 else [])
    duplicate, refused = answers[5].works[-2:]
    assert duplicate.duplicate and refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    with pytest.raises(grpc.RpcError) as busy:  # its one stream slot is taken
        next(stub.SubmitStream(iter(()), timeout=10))
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    bad = work_pb2.SubmitWorksRequest(works=[work_pb2.SubmitWorkRequest(work_id="x" * 300, kind="square")])
    with pytest.raises(grpc.RpcError) as alone:
        stub.SubmitWorks(bad, timeout=10)
    requests.put(bad)
    refusal = next(stream)
    assert (refusal.code, refusal.message) == (alone.value.code().value[0], alone.value.details())
    requests.put(None)  # the client is done: the stream ends, its slot free
    assert list(stream) == []
    accepted = [w for ids in batches for w in ids]
    seen = [r.work_id for batch in stub.WaitWorks(work_pb2.WaitWorksRequest(work_ids=accepted), timeout=60)
            for r in batch.results if r.state == work_pb2.DONE]
    assert sorted(seen) == sorted(accepted)
    wait_until(lambda: _opens(stub), 30, "the ended stream's slot to be free again")


def _opens(stub) -> bool:
    requests: queue.SimpleQueue = queue.SimpleQueue()
    stream = stub.SubmitStream(iter(requests.get, None), timeout=10)
    requests.put(work_pb2.SubmitWorksRequest(works=[work_pb2.SubmitWorkRequest(kind="square", payload=b"2")]))
    try:
        return len(next(stream).works) == 1
    except grpc.RpcError:
        return False
    finally:
        requests.put(None)
        stream.cancel()
