"""A client's stream of submissions, against a scripted frontend in this
process: calls share one stream, answered in order; a refused call fails
alone with its status; calls a broken stream did not answer are made on
their own; a frontend without SubmitStream, or with no stream to spare,
gets calls of their own; one that answers nothing fails the call in its
deadline; an idle stream is closed."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

import dworkers
from dworkers import submitting
from dworkers.submitting import SubmitStream
from dworkers.v1 import frontend_pb2_grpc, work_pb2
from tests.helpers import wait_until

pytestmark = pytest.mark.unit


def answer(request: work_pb2.SubmitWorksRequest, duplicate: bool = False) -> work_pb2.SubmitWorksResponse:
    return work_pb2.SubmitWorksResponse(works=[work_pb2.SubmitWorkResponse(work_id=w.work_id, duplicate=duplicate)
                                               for w in request.works])


def request_of(*work_ids: str, kind: str = "k") -> work_pb2.SubmitWorksRequest:
    return work_pb2.SubmitWorksRequest(works=[work_pb2.SubmitWorkRequest(work_id=w, kind=kind, payload=b"p" * 4096)
                                              for w in work_ids], each_on_its_own=True)


class Frontend(frontend_pb2_grpc.FrontendServicer):
    """SubmitStream answers each request in order; a request with a work of
    kind "bad" is refused INVALID_ARGUMENT; one of kind "down" breaks the
    stream (UNAVAILABLE) once `wait_for` requests were read (so those after
    it were sent). Calls of their own answer duplicate."""

    def __init__(self, streams: bool = True, refuse: grpc.StatusCode | None = None, silent: bool = False):
        self.streams = streams
        self.refuse = refuse  # every stream is refused so, at once
        self.silent = silent  # streams and calls answer nothing
        self.opened = 0
        self.ended = 0
        self.streamed: list[list[str]] = []
        self.calls: list[list[str]] = []
        self.wait_for = 1
        self.release = threading.Event()

    def SubmitStream(self, request_iterator, context):
        if not self.streams:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self.opened += 1
        try:
            if self.refuse is not None:
                context.abort(self.refuse, "no stream to spare")
            read = []
            for request in request_iterator:
                read.append(request)
                self.streamed.append([w.work_id for w in request.works])
                if self.silent:
                    continue
                kinds = {w.kind for w in read[0].works}
                if "down" in kinds:
                    if len(read) < self.wait_for:
                        continue
                    context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
                if "bad" in kinds:
                    read.pop(0)
                    yield work_pb2.SubmitWorksResponse(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                       message="unknown kind 'bad'")
                    continue
                yield answer(read.pop(0))
        finally:
            self.ended += 1

    def SubmitWorks(self, request, context):
        self.calls.append([w.work_id for w in request.works])
        if self.silent:
            self.release.wait(10)
        return answer(request, duplicate=True)


@pytest.fixture
def serve():
    servers = []

    def start(servicer: Frontend):
        server = grpc.server(futures.ThreadPoolExecutor(8))
        frontend_pb2_grpc.add_FrontendServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append((server, servicer))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        return f"127.0.0.1:{port}", frontend_pb2_grpc.FrontendStub(channel)

    yield start
    for server, servicer in servers:
        servicer.release.set()
        server.stop(0)


def test_a_clients_submissions_share_one_stream_which_closes_when_idle(serve, monkeypatch):
    monkeypatch.setattr(submitting, "IDLE_SECONDS", 0.3)
    servicer = Frontend()
    address, _ = serve(servicer)
    with dworkers.Client(address, timeout=10) as client:
        handles = [client.submit("k", payload=b"x" * size) for size in (1, 1024, 64 * 1024, 256 * 1024) * 50]
        client.flush(10)
        assert all(h.accepted(0) is False for h in handles)  # answered on the stream: not duplicates
        assert sum(len(ids) for ids in servicer.streamed) == len(handles) and not servicer.calls
        assert servicer.opened == 1
        wait_until(lambda: servicer.ended == 1, 10, "the idle stream to close")
        client.submit("k", 1).accepted(10)  # a new one opens
        assert servicer.opened == 2 and not servicer.calls


def test_calls_on_one_stream_are_answered_in_order(serve):
    servicer = Frontend()
    _, stub = serve(servicer)
    stream = SubmitStream(stub)
    sent = [stream.send(request_of(f"a{i}", f"b{i}"), 10) for i in range(20)]
    assert [[w.work_id for w in f.result(10).works] for f in sent] == [[f"a{i}", f"b{i}"] for i in range(20)]
    stream.close()


def test_a_refused_call_fails_alone_with_its_status(serve):
    servicer = Frontend()
    _, stub = serve(servicer)
    stream = SubmitStream(stub)
    sent = [stream.send(request_of(w, kind=k), 10) for w, k in (("a", "k"), ("x", "bad"), ("b", "k"))]
    error = sent[1].exception(10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details() == "unknown kind 'bad'"
    assert [f.result(10).works[0].duplicate for f in (sent[0], sent[2])] == [False, False]
    assert servicer.opened == 1 and not servicer.calls
    stream.close()


def test_calls_a_broken_stream_did_not_answer_are_made_on_their_own(serve):
    servicer = Frontend()
    servicer.wait_for = 3  # it breaks once the calls after that one were sent on it
    _, stub = serve(servicer)
    stream = SubmitStream(stub)
    assert not stream.send(request_of("ok"), 10).result(10).works[0].duplicate
    sent = [stream.send(request_of(w, kind=k), 10) for w, k in (("x", "down"), ("y", "k"), ("z", "k"))]
    assert [f.result(10).works[0].duplicate for f in sent] == [True, True, True]  # answered on their own
    assert sorted(servicer.calls) == [["x"], ["y"], ["z"]]
    assert stream.send(request_of("w"), 10).result(10).works[0].duplicate is False  # it had answered: a new one
    assert servicer.opened == 2
    stream.close()


@pytest.mark.parametrize("servicer", [Frontend(streams=False), Frontend(refuse=grpc.StatusCode.RESOURCE_EXHAUSTED)],
                         ids=["no SubmitStream", "no stream to spare"])
def test_a_frontend_without_a_stream_for_it_gets_calls_of_their_own_for_a_while(serve, servicer):
    _, stub = serve(servicer)
    stream = SubmitStream(stub)
    answers = [stream.send(request_of(w), 10).result(10) for w in ("a", "b", "c")]
    assert [a.works[0].work_id for a in answers] == ["a", "b", "c"]
    assert servicer.calls == [["a"], ["b"], ["c"]]
    assert servicer.opened <= 1  # asked once
    stream.close()


def test_a_frontend_that_answers_nothing_fails_the_call_in_its_deadline(serve):
    servicer = Frontend(silent=True)
    _, stub = serve(servicer)
    stream = SubmitStream(stub)
    call = stream.send(request_of("a"), 0.5)
    assert call.exception(10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: servicer.ended == 1, 10, "the stream to end")
    assert servicer.streamed == [["a"]] and servicer.calls == [["a"]]
    stream.close()
