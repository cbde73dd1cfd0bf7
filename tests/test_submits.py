"""The frontend's stream of submissions to a master, in one process, over a
master the test plays: calls share one stream and each gets its own answer
or refusal; whatever the stream does not answer (it broke, the master has
no SubmitStream, a deposed master's, a master silent for an attempt's time)
is answered by a call of its own; a caller whose deadline passes is told so
without ending the stream for the others."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from dworkers.common.errors import InvalidInput, NoMaster
from dworkers.common.wire import CLUSTER_KEY, EPOCH_KEY
from dworkers.frontend import submits
from dworkers.frontend.submits import SubmitStream
from dworkers.v1 import work_pb2
from tests.fakes import Failed
from tests.helpers import wait_until

pytestmark = pytest.mark.unit


class Stream:
    """One SubmitStream: the requests the frontend sent, and what the test answers."""

    def __init__(self, requests, epoch: int = 1):
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.answers: queue.SimpleQueue = queue.SimpleQueue()
        self.epoch = epoch
        self.cancelled = threading.Event()
        threading.Thread(target=self._read, args=(requests,), daemon=True).start()

    def _read(self, requests) -> None:
        for request in requests:
            self.requests.put(request)

    def initial_metadata(self):
        return ((EPOCH_KEY, str(self.epoch)), (CLUSTER_KEY, "c1"))

    def answer_next(self) -> work_pb2.SubmitWorksRequest:
        """Answers the next request as a master would (each work accepted)."""
        request = self.requests.get(timeout=10)
        self.answers.put(accepted(request))
        return request

    def refuse_next(self, code: grpc.StatusCode, message: str) -> None:
        self.requests.get(timeout=10)
        self.answers.put(work_pb2.SubmitWorksResponse(code=code.value[0], message=message))

    def fail(self, code: grpc.StatusCode) -> None:
        self.answers.put(code)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.answers.get()
        if isinstance(item, grpc.StatusCode):
            raise Failed(item)
        return item

    def cancel(self) -> None:
        self.cancelled.set()
        self.answers.put(grpc.StatusCode.CANCELLED)


def accepted(request: work_pb2.SubmitWorksRequest, duplicate: bool = False) -> work_pb2.SubmitWorksResponse:
    return work_pb2.SubmitWorksResponse(works=[work_pb2.SubmitWorkResponse(work_id=w.work_id, duplicate=duplicate)
                                               for w in request.works])


def request_of(*work_ids: str) -> work_pb2.SubmitWorksRequest:
    return work_pb2.SubmitWorksRequest(works=[work_pb2.SubmitWorkRequest(work_id=w, kind="square", payload=b"x" * 1024)
                                              for w in work_ids], each_on_its_own=True)


class Proxy:
    """A master proxy whose stub opens Streams; calls on their own are
    answered at once (duplicates: the stream's master had them)."""

    def __init__(self, implemented: bool = True, epoch: int = 1):
        self.streams: list[Stream] = []
        self.implemented = implemented
        self.epoch = epoch
        self.unary: list[list[str]] = []  # ids of calls made on their own
        self.hints: list[grpc.StatusCode] = []
        self.invalidated: list[str] = []
        self.newest_epoch = 1
        self.attempt_timeout = 3.0
        proxy = self

        class Locator:
            def __init__(self):
                self.listeners = []

            def current(self, timeout):
                return "master:1", 1

            def on_change(self, listener):
                self.listeners.append(listener)

            def remove_listener(self, listener):
                self.listeners.remove(listener)

            def invalidate(self, address):
                proxy.invalidated.append(address)

        class Stub:
            def SubmitStream(self, requests):
                stream = Stream(requests if proxy.implemented else iter(()), proxy.epoch)
                if not proxy.implemented:
                    stream.fail(grpc.StatusCode.UNIMPLEMENTED)
                proxy.streams.append(stream)
                return stream

        self.locator = Locator()
        self._stub = Stub()

    def stub(self, address):
        return self._stub

    def observe_epoch(self, epoch, cluster_id=""):
        self.newest_epoch = max(self.newest_epoch, epoch)
        return epoch >= self.newest_epoch

    def retry_hint(self, error, address):
        self.hints.append(error.code())
        return True

    def call(self, method, request, timeout=None):
        assert method == "SubmitWorks"
        self.unary.append([w.work_id for w in request.works])
        return accepted(request, duplicate=True)


def test_calls_share_one_stream_and_each_gets_its_own_answer():
    proxy = Proxy()
    stream = SubmitStream(proxy)
    with ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(stream.call, request_of(f"w{i}", f"v{i}"), 10) for i in range(8)]
        wait_until(lambda: proxy.streams, 10, "the stream to open")
        for _ in range(8):
            proxy.streams[0].answer_next()
        answers = [[w.work_id for w in call.result(10).works] for call in calls]
    assert answers == [[f"w{i}", f"v{i}"] for i in range(8)]
    assert len(proxy.streams) == 1 and not proxy.unary
    assert proxy.locator.listeners, "a stream ends when the master moves"


def test_calls_the_stream_did_not_answer_are_made_on_their_own_and_a_new_stream_opens():
    proxy = Proxy()
    stream = SubmitStream(proxy)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(stream.call, request_of("a"), 10)
        wait_until(lambda: proxy.streams, 10, "the stream to open")
        proxy.streams[0].answer_next()
        assert not first.result(10).works[0].duplicate
        waiting = [pool.submit(stream.call, request_of(w), 10) for w in ("b", "c")]
        for _ in waiting:
            proxy.streams[0].requests.get(timeout=10)  # sent, never answered
        proxy.streams[0].fail(grpc.StatusCode.UNAVAILABLE)  # the master died
        assert [call.result(10).works[0].duplicate for call in waiting] == [True, True]
    assert sorted(proxy.unary) == [["b"], ["c"]]
    assert proxy.hints == [grpc.StatusCode.UNAVAILABLE]
    assert not proxy.locator.listeners
    with ThreadPoolExecutor(1) as pool:  # it had answered: the next call opens a stream at once
        later = pool.submit(stream.call, request_of("d"), 10)
        wait_until(lambda: len(proxy.streams) == 2, 10, "a second stream")
        proxy.streams[1].answer_next()
        assert not later.result(10).works[0].duplicate


def test_a_master_without_submit_stream_gets_calls_of_their_own_for_a_while():
    proxy = Proxy(implemented=False)
    stream = SubmitStream(proxy)
    assert stream.call(request_of("a"), 10).works[0].duplicate
    assert [stream.call(request_of(w), 10).works[0].work_id for w in ("b", "c")] == ["b", "c"]
    assert len(proxy.streams) == 1 and proxy.unary == [["a"], ["b"], ["c"]]
    assert proxy.hints == [grpc.StatusCode.UNIMPLEMENTED]


def test_a_stream_that_broke_before_answering_is_not_opened_again_at_once():
    proxy = Proxy()
    stream = SubmitStream(proxy)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(stream.call, request_of("a"), 10)
        wait_until(lambda: proxy.streams, 10, "the stream to open")
        proxy.streams[0].requests.get(timeout=10)
        proxy.streams[0].fail(grpc.StatusCode.UNAVAILABLE)
        assert call.result(10).works[0].duplicate
    stream.call(request_of("b"), 10)
    assert len(proxy.streams) == 1 and proxy.unary == [["a"], ["b"]]


def test_a_deposed_masters_stream_answers_nothing():
    proxy = Proxy(epoch=3)
    proxy.newest_epoch = 4  # a newer master was seen
    stream = SubmitStream(proxy)
    assert stream.call(request_of("a"), 10).works[0].duplicate
    assert proxy.streams[0].cancelled.is_set() and proxy.unary == [["a"]]
    assert proxy.invalidated == ["master:1"]  # not asked again until the locator says it leads


def test_a_refused_call_is_told_why_and_the_stream_goes_on():
    proxy = Proxy()
    stream = SubmitStream(proxy)
    with ThreadPoolExecutor(2) as pool:
        refused = pool.submit(stream.call, request_of("a"), 10)
        wait_until(lambda: proxy.streams, 10, "the stream to open")
        proxy.streams[0].refuse_next(grpc.StatusCode.INVALID_ARGUMENT, "unknown kind 'k'")
        with pytest.raises(InvalidInput, match="unknown kind 'k'"):
            refused.result(10)
        later = pool.submit(stream.call, request_of("b"), 10)
        proxy.streams[0].answer_next()
        assert not later.result(10).works[0].duplicate
    assert len(proxy.streams) == 1 and not proxy.unary


def test_a_caller_whose_deadline_passes_is_told_so_and_the_stream_goes_on():
    proxy = Proxy()
    stream = SubmitStream(proxy)
    with pytest.raises(NoMaster):
        stream.call(request_of("a"), 0.3)
    assert not proxy.streams[0].cancelled.is_set() and not proxy.unary
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(stream.call, request_of("b"), 10)
        proxy.streams[0].answer_next()  # the late caller's
        proxy.streams[0].answer_next()
        assert [w.work_id for w in later.result(10).works] == ["b"]


def test_a_master_silent_for_an_attempts_time_gets_the_call_on_its_own_and_later_ones_too():
    proxy = Proxy()
    proxy.attempt_timeout = 0.3
    stream = SubmitStream(proxy)
    assert stream.call(request_of("a"), 10).works[0].duplicate  # answered on its own
    assert proxy.streams[0].cancelled.is_set()
    assert stream.call(request_of("b"), 10).works[0].duplicate
    assert len(proxy.streams) == 1 and proxy.unary == [["a"], ["b"]]


def test_after_close_calls_go_on_their_own(monkeypatch):
    monkeypatch.setattr(submits, "RETRY_BROKEN", 0.0)
    proxy = Proxy()
    stream = SubmitStream(proxy)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(stream.call, request_of("a"), 10)
        wait_until(lambda: proxy.streams, 10, "the stream to open")
        proxy.streams[0].requests.get(timeout=10)
        stream.close()
        assert call.result(10).works[0].duplicate
    assert proxy.streams[0].cancelled.is_set()
    stream.call(request_of("b"), 10)
    assert len(proxy.streams) == 1 and proxy.unary == [["a"], ["b"]]
