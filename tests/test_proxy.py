"""The proxy stub in one process, against fake backends (real gRPC servers
on loopback whose answers the test scripts): it follows a standby's hint,
rotates through contact points, refuses a deposed master's epoch unless the
cluster id changed, fails fast when backends are cut off from ZooKeeper, and
keeps a result stream going however its master stream ends."""

from __future__ import annotations

import threading
from collections import deque
from concurrent import futures

import grpc
import pytest
from prometheus_client import CollectorRegistry

from dworkers.common import server
from dworkers.common.errors import CutOff, NoMaster, NotServing, NotTheMaster
from dworkers.common.metrics import ServerMetrics
from dworkers.common.proxy import MasterProxy, StaticLocator, StreamHandle
from dworkers.common.wire import CLUSTER_KEY, EPOCH_KEY
from dworkers.v1 import master_pb2_grpc, work_pb2

pytestmark = pytest.mark.unit


class Backend(master_pb2_grpc.MasterServicer):
    """A scripted backend: each GetWork pops the next answer (an error to
    raise, or (epoch, cluster id) to answer with); WatchResults serves the
    next scripted stream (a list of batches, then an error or None)."""

    def __init__(self) -> None:
        self.answers: deque = deque()
        self.streams: deque = deque()
        self.calls = 0
        self.server, _health, port = server.build(
            [(self, master_pb2_grpc.add_MasterServicer_to_server, "dworkers.v1.Master")], "127.0.0.1:0",
            ServerMetrics(CollectorRegistry()), threads=8)
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def GetWork(self, request, context):
        self.calls += 1
        answer = self.answers.popleft() if self.answers else (1, "c1")
        if isinstance(answer, Exception):
            raise answer
        epoch, cluster = answer
        context.set_trailing_metadata(((EPOCH_KEY, str(epoch)), (CLUSTER_KEY, cluster)))
        return work_pb2.WorkStatus(work_id=request.work_id)

    def WatchResults(self, request, context):
        batches, end = self.streams.popleft() if self.streams else ([], NotServing("no stream scripted"))
        for sequences in batches:
            yield work_pb2.WatchResultsResponse(epoch=1, cluster_id="c1", results=[
                work_pb2.WorkResult(sequence=s, work_id=f"w{s}") for s in sequences if s > request.after_sequence])
        if end is not None:
            raise end

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def backends():
    made: list[Backend] = []

    def make(n: int) -> list[Backend]:
        made.extend(Backend() for _ in range(n))
        return made[-n:]

    yield make
    for backend in made:
        backend.stop()


def proxy_for(*backends: Backend, timeout: float = 5.0) -> MasterProxy:
    return MasterProxy(StaticLocator([b.address for b in backends]), timeout=timeout)


def ask(proxy: MasterProxy, timeout: float = 5.0):
    return proxy.call("GetWork", work_pb2.GetWorkRequest(work_id="x"), timeout=timeout)


def test_a_standby_hint_leads_to_the_master(backends):
    standby, master = backends(2)
    standby.answers.append(NotTheMaster(master.address, 4))
    proxy = proxy_for(standby)  # only the standby is known
    assert ask(proxy).work_id == "x"
    assert master.calls == 1


def test_a_dead_contact_point_is_skipped(backends):
    (alive,) = backends(1)
    dead = Backend()
    dead.stop()
    proxy = proxy_for(dead, alive)
    assert ask(proxy).work_id == "x" and alive.calls == 1


def test_a_deposed_masters_older_epoch_is_refused_until_the_cluster_id_changes(backends):
    (backend,) = backends(1)
    proxy = proxy_for(backend, timeout=1.0)
    backend.answers.append((5, "c1"))
    ask(proxy)
    backend.answers.extend([(3, "c1")] * 100)  # an older epoch of the same cluster: a deposed master
    with pytest.raises(NoMaster, match="stale epoch"):
        ask(proxy, timeout=1.0)
    backend.answers.clear()
    backend.answers.append((0, "c2"))  # ZooKeeper lost its data: epochs start again, under a new id
    assert ask(proxy).work_id == "x"
    assert proxy.epochs.cluster_id == "c2" and proxy.epochs.epoch == 0


def test_backends_cut_off_from_zookeeper_fail_fast_after_every_contact_point(backends):
    first, second = backends(2)
    for backend in (first, second):
        backend.answers.extend([CutOff("cut off")] * 10)
    proxy = proxy_for(first, second)
    with pytest.raises(grpc.RpcError) as error:
        ask(proxy, timeout=30.0)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert first.calls + second.calls <= 3  # not retried until the deadline


class _Cancelled(NotServing):
    """Ends a scripted stream the way a cancelled call does (the client sees CANCELLED)."""

    status = "CANCELLED"


def test_a_result_stream_resumes_after_any_end_and_stops_on_the_masters_final_answer(backends):
    (backend,) = backends(1)
    backend.streams.extend([
        ([[1, 2]], _Cancelled()),  # e.g. the backend came back at the same address
        ([[1, 2, 3]], NotServing("stepping down")),  # resumed after 2: 3 is new
        ([[4]], None),  # ended with OK: still not the end for the subscriber
        ([[5]], None),
    ])
    proxy = proxy_for(backend)
    handle = StreamHandle()
    seen = []
    for response in proxy.watch_results(0, handle=handle):
        seen += [r.sequence for r in response.results]
        if seen[-1] == 5:
            handle.cancel()
            break
    assert seen == [1, 2, 3, 4, 5]


def test_a_result_streams_final_answer_reaches_the_subscriber(backends):
    from dworkers.common.errors import Forgotten

    (backend,) = backends(1)
    backend.streams.append(([], Forgotten("results up to 9 left the retention window")))
    proxy = proxy_for(backend)
    with pytest.raises(grpc.RpcError) as error:
        for _ in proxy.watch_results(0):
            pass
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_calls_queued_at_a_dead_master_do_not_hang(backends):
    """Many callers at once while the only backend is down: each gets its
    error within its own deadline."""
    dead = Backend()
    dead.stop()
    proxy = proxy_for(dead, timeout=1.0)
    threads_before = threading.active_count()  # what earlier tests of this process left is not this one's
    errors = []
    with futures.ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(ask, proxy, 1.0) for _ in range(16)]:
            try:
                future.result(timeout=10)
            except Exception as exc:
                errors.append(type(exc).__name__)
    assert errors == ["NoMaster"] * 16
    assert threading.active_count() < threads_before + 16  # the callers' threads do not stay behind
