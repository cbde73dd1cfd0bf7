"""dworkers.Client against a scripted frontend in this process: every handle
is settled whatever happens, and a batch never holds one id twice."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest

import dworkers
from dworkers import awaiting as awaiting_module
from dworkers.client import SubmitError
from dworkers.v1 import frontend_pb2_grpc, work_pb2
from tests.helpers import wait_until

pytestmark = pytest.mark.unit


class Frontend(frontend_pb2_grpc.FrontendServicer):
    """Answers SubmitWorks once `release` is set; records every call."""

    def __init__(self):
        self.release = threading.Event()
        self.calls: list[list[str]] = []
        self.waits: list[list[str]] = []
        self.per_message = 7  # results per message, as the master batches them
        self.trickle = 0.0  # seconds between messages: works finishing one after another
        self.unknown: set[str] = set()  # ids WaitWorks refuses, NOT_FOUND (past retention)

    def WaitWorks(self, request, context):
        """Every asked work finished already (or `trickle` apart), "done"."""
        self.waits.append(list(request.work_ids))
        unknown = self.unknown.intersection(request.work_ids)
        if unknown:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no work {sorted(unknown)[0]!r}")
        results = [work_pb2.WorkResult(work_id=w, state=work_pb2.DONE, result=b'"done"',
                                       content_type="application/json") for w in request.work_ids]
        for i in range(0, len(results), self.per_message):
            time.sleep(self.trickle)
            yield work_pb2.WatchResultsResponse(results=results[i:i + self.per_message])

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


def answering(frontend, per_message: int, every: float):
    """The scripted frontend, answering submissions at once and waits with
    `per_message` results a message, `every` seconds apart."""
    servicer, address = frontend
    servicer.release.set()
    servicer.per_message, servicer.trickle = per_message, every
    return servicer, address


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
    assert len(servicer.waits) == 2, "one call for the 100, read ahead; one for the work submitted later"
    assert set(servicer.waits[0]) == {h.id for h in handles}
    assert servicer.waits[-1] == [kept.id]  # the others have their results


def test_results_read_in_order_as_works_finish_one_by_one_come_on_one_stream(frontend):
    """The stream goes on after the first handle's result: the next handles'
    results come on it (a call per result would name every waiting id again)."""
    servicer, address = answering(frontend, per_message=1, every=0.002)
    with dworkers.Client(address, timeout=5) as client:
        handles = [client.submit("k", n) for n in range(300)]
        client.flush(10)
        assert [h.result(10) for h in handles] == ["done"] * 300
    assert len(servicer.waits) == 1


def test_a_work_past_retention_fails_only_its_own_wait(frontend):
    servicer, address = frontend
    servicer.release.set()
    with dworkers.Client(address, timeout=5) as client:
        kept, forgotten = client.submit("k", 1), client.submit("k", 2)
        client.flush(10)
        servicer.unknown.add(forgotten.id)
        assert kept.result(5) == "done"  # asked with the other, refused; then alone
        with pytest.raises(grpc.RpcError) as refused:
            forgotten.result(5)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_waiting_threads_share_the_streams_and_each_gets_its_own_result(frontend):
    servicer, address = answering(frontend, per_message=3, every=0.001)
    with dworkers.Client(address, timeout=5) as client:
        handles = [client.submit("k", n) for n in range(400)]
        client.flush(10)
        with futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda h: h.result(10), reversed(handles))) == ["done"] * 400
    assert len(servicer.waits) <= 8 + 1


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


def test_the_async_client_reads_results_as_they_come_on_one_stream(frontend):
    servicer, address = answering(frontend, per_message=1, every=0.002)

    async def main() -> tuple:
        async with dworkers.AsyncClient(address, timeout=5) as client:
            handles = [await client.submit("k", n) for n in range(200)]
            await client.flush()
            in_order = [await h.result(10) for h in handles]
            kept, forgotten = await client.submit("k", 1), await client.submit("k", 2)
            await client.flush()
            servicer.unknown.add(forgotten.id)
            alone = await kept.result(5)  # asked with the other, refused; then alone
            with pytest.raises(grpc.RpcError) as refused:
                await forgotten.result(5)
            return in_order, alone, refused.value.code()

    in_order, alone, code = asyncio.run(main())
    assert in_order == ["done"] * 200 and alone == "done" and code == grpc.StatusCode.NOT_FOUND
    assert len(servicer.waits) == 1 + 3  # the 200 on one stream; the two together, then each alone


class AwaitingFrontend(Frontend):
    """Also serves AwaitResults: every id asked is "done" at once (those in
    `unknown` refused NOT_FOUND); with `break_first`, the first stream ends
    UNAVAILABLE at its first request."""

    def __init__(self):
        super().__init__()
        self.streams: list[list[str]] = []  # the ids each AwaitResults stream asked for
        self.break_first = False
        self.hold = False  # ids asked from now on get no answer

    def AwaitResults(self, request_iterator, context):
        asked: list[str] = []
        self.streams.append(asked)
        first = len(self.streams) == 1
        for request in request_iterator:
            asked.extend(request.work_ids)
            if first and self.break_first:
                context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            ids = list(request.work_ids)
            if self.hold:
                continue  # never answered
            refused = [work_pb2.WorkRefusal(work_id=w, code=grpc.StatusCode.NOT_FOUND.value[0], message=f"no {w}")
                       for w in ids if w in self.unknown]
            if refused:
                yield work_pb2.AwaitResponse(refused=refused)
            yield work_pb2.AwaitResponse(results=[
                work_pb2.WorkResult(work_id=w, state=work_pb2.DONE, result=b'"done"', content_type="application/json")
                for w in ids if w not in self.unknown])


@pytest.fixture
def awaiting():
    servicer = AwaitingFrontend()
    servicer.release.set()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    frontend_pb2_grpc.add_FrontendServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_results_come_over_one_stream_each_id_asked_once(awaiting):
    servicer, address = awaiting
    with dworkers.Client(address, timeout=5) as client:
        handles = [client.submit("k", n) for n in range(300)]
        client.flush(10)
        with futures.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda h: h.result(10), handles)) == ["done"] * 300
        later = client.submit("k", 1)
        assert later.result(5) == "done"
    # One stream (read ahead: each id once), kept for the later work.
    assert [sorted(s) for s in servicer.streams] == [sorted([h.id for h in handles] + [later.id])]
    assert not servicer.waits


def test_a_stream_that_awaits_nothing_for_a_while_is_closed_and_opened_again_when_needed(awaiting, monkeypatch):
    monkeypatch.setattr(awaiting_module, "IDLE_SECONDS", 0.2)
    servicer, address = awaiting
    with dworkers.Client(address, timeout=5) as client:
        assert client.submit("k", 1).result(5) == "done"
        wait_until(lambda: client._awaits._stream is None, 10, "the idle stream to close")
        assert client.submit("k", 2).result(5) == "done"
    assert len(servicer.streams) == 2  # a frontend's stream slot is not held by an idle client


def test_a_refused_work_fails_only_its_own_wait_on_the_stream(awaiting):
    servicer, address = awaiting
    with dworkers.Client(address, timeout=5) as client:
        kept, forgotten = client.submit("k", 1), client.submit("k", 2)
        client.flush(10)
        servicer.unknown.add(forgotten.id)
        assert kept.result(5) == "done"
        with pytest.raises(grpc.RpcError) as refused:
            forgotten.result(5)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND and forgotten.id in refused.value.details()


def test_a_broken_stream_is_opened_again_asking_for_every_id_still_awaited(awaiting):
    servicer, address = awaiting
    servicer.break_first = True
    with dworkers.Client(address, timeout=5) as client:
        handles = [client.submit("k", n) for n in range(20)]
        client.flush(10)
        assert [h.result(10) for h in handles] == ["done"] * 20
    assert len(servicer.streams) == 2
    assert sorted(servicer.streams[1]) == sorted(h.id for h in handles)


def test_the_async_client_waits_over_one_stream_too(awaiting):
    servicer, address = awaiting

    async def main() -> tuple[list, object]:
        async with dworkers.AsyncClient(address, timeout=5) as client:
            handles = [await client.submit("k", n) for n in range(100)]
            await client.flush()
            servicer.unknown.add(handles[-1].id)
            values = await asyncio.gather(*(h.result(5) for h in handles[:-1]))
            with pytest.raises(grpc.RpcError) as refused:
                await handles[-1].result(5)
            return values, refused.value.code()

    values, code = asyncio.run(main())
    assert values == ["done"] * 99 and code == grpc.StatusCode.NOT_FOUND
    assert len(servicer.streams) == 1 and not servicer.waits
    assert len(servicer.streams[0]) == 100  # read ahead: each id asked once


def test_waits_of_a_closed_client_end_and_a_second_waiter_gets_the_refusal_too(awaiting):
    servicer, address = awaiting
    client = dworkers.Client(address, timeout=5)
    gone = client.submit("k", 1)
    gone.accepted(5)
    servicer.unknown.add(gone.id)
    with futures.ThreadPoolExecutor(2) as pool:  # two waiters on one handle: both are told
        for outcome in [pool.submit(gone.result, 5) for _ in range(2)]:
            with pytest.raises(grpc.RpcError) as refused:
                outcome.result(10)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    servicer.hold = True
    waiting = client.submit("k", 2)
    waiting.accepted(5)
    with futures.ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(waiting.result)  # no timeout: only the close ends it
        wait_until(lambda: waiting.id in servicer.streams[-1], 10, "the wait to be asked for")
        client.close()
        with pytest.raises(grpc.RpcError) as closed:
            outcome.result(10)
    assert closed.value.code() == grpc.StatusCode.CANCELLED


def test_the_async_clients_idle_stream_is_closed_and_opened_again_too(awaiting, monkeypatch):
    monkeypatch.setattr(awaiting_module, "IDLE_SECONDS", 0.2)
    servicer, address = awaiting

    async def main() -> list:
        async with dworkers.AsyncClient(address, timeout=5) as client:
            first = await (await client.submit("k", 1)).result(5)
            for _ in range(100):  # until the idle stream is closed (at most 10 s)
                if client._awaits._current is None:
                    break
                await asyncio.sleep(0.1)
            return [first, await (await client.submit("k", 2)).result(5)]

    assert asyncio.run(main()) == ["done", "done"]
    assert len(servicer.streams) == 2
