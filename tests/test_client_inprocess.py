"""dworkers.Client against a scripted frontend in this process: every handle
is settled whatever happens, and a batch never holds one id twice."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest

import dworkers
from dworkers.client import SubmitError
from dworkers.v1 import frontend_pb2_grpc, work_pb2

pytestmark = pytest.mark.unit


class Frontend(frontend_pb2_grpc.FrontendServicer):
    """Answers SubmitWorks once `release` is set; records every call."""

    def __init__(self):
        self.release = threading.Event()
        self.calls: list[list[str]] = []
        self.waits: list[list[str]] = []

    def WaitWorks(self, request, context):
        """Every asked work finished already, "done"; the results come in
        messages of 7 (as the master batches them)."""
        self.waits.append(list(request.work_ids))
        results = [work_pb2.WorkResult(work_id=w, state=work_pb2.DONE, result=b'"done"',
                                       content_type="application/json") for w in request.work_ids]
        for i in range(0, len(results), 7):
            yield work_pb2.WatchResultsResponse(results=results[i:i + 7])

    def SubmitWorks(self, request, context):
        self.calls.append([w.work_id for w in request.works])
        self.release.wait(5)
        return work_pb2.SubmitWorksResponse(works=[work_pb2.SubmitWorkResponse(work_id=w.work_id)
                                                   for w in request.works])


@pytest.fixture
def frontend():
    servicer = Frontend()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    frontend_pb2_grpc.add_FrontendServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    servicer.release.set()
    server.stop(0)


def test_closing_settles_every_handle(frontend):
    servicer, address = frontend
    client = dworkers.Client(address, timeout=5)
    handles = [client.submit("k", n) for n in range(50)]  # the first calls hang on the frontend
    with pytest.raises(TimeoutError):
        client.close(timeout=0.3)
    for handle in handles:
        with pytest.raises(SubmitError) as refused:
            handle.accepted(timeout=5)
        assert refused.value.code == "CANCELLED"
    with pytest.raises(RuntimeError, match="closed"):
        client.submit("k", 1)


def test_an_id_submitted_twice_never_shares_a_call(frontend):
    servicer, address = frontend
    servicer.release.set()
    with dworkers.Client(address, timeout=5) as client:
        handles = [client.submit("k", n, work_id=f"w{n % 7}") for n in range(200)]
        client.flush(10)
        assert all(h.accepted(0) is False for h in handles)
    assert all(len(call) == len(set(call)) for call in servicer.calls)
    assert sum(len(call) for call in servicer.calls) == 200


def test_reading_results_in_order_takes_the_finished_ones_of_other_handles_in_the_same_call(frontend):
    servicer, address = frontend
    servicer.release.set()
    with dworkers.Client(address, timeout=5) as client:
        handles = [client.submit("k", n) for n in range(100)]
        client.flush(10)
        assert [h.result(5) for h in handles] == ["done"] * 100
        kept = client.submit("k", 1)
        assert kept.result(5) == "done"
    assert len(servicer.waits) <= 1 + 100 // 7 + 1, "at most one call per message of results, not one per work"
    assert set(servicer.waits[0]) == {h.id for h in handles}
    assert servicer.waits[-1] == [kept.id]  # the others have their results


def test_the_async_client_reads_ahead_the_same_way(frontend):
    servicer, address = frontend
    servicer.release.set()

    async def main() -> list:
        async with dworkers.AsyncClient(address, timeout=5) as client:
            handles = [await client.submit("k", n) for n in range(50)]
            await client.flush()
            return [await h.result(5) for h in handles]

    assert asyncio.run(main()) == ["done"] * 50
    assert len(servicer.waits) <= 1 + 50 // 7, "at most one call per message of results, not one per work"
    assert len(servicer.waits[0]) == 50
