"""The frontend's shared AwaitResults stream, in one process, over a master
the test plays: calls share it, each gets its own results and refusals, it
asks again for everything awaited when it is opened again, and a call that
reads slowly goes on on a stream of its own."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest

from dworkers.common.errors import NotFound, WrongShard
from dworkers.common.proxy import StreamHandle
from dworkers.frontend import awaits
from dworkers.frontend.awaits import ShardAwaits
from dworkers.v1 import work_pb2
from tests.helpers import wait_until

pytestmark = pytest.mark.unit


class Stream:
    """One AwaitResults stream: the requests the frontend sent, and what the test answers."""

    def __init__(self, requests):
        self.requests: list[work_pb2.AwaitRequest] = []
        self.answers: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(requests,), daemon=True).start()

    def _read(self, requests) -> None:
        for request in requests:
            self.requests.append(request)

    def asked(self) -> list[str]:
        return [w for r in list(self.requests) for w in r.work_ids]

    def forgotten(self) -> list[str]:
        return [w for r in list(self.requests) for w in r.forget]

    def answer(self, results=(), refused=()) -> None:
        self.answers.put(work_pb2.AwaitResponse(results=list(results), refused=list(refused), epoch=1))

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
        self.answers.put(grpc.StatusCode.CANCELLED)


class Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return self._code.name


class Proxy:
    """A master proxy whose stub opens Streams (or, unimplemented, refuses to)."""

    def __init__(self, implemented: bool = True):
        self.streams: list[Stream] = []
        self.implemented = implemented
        self.own_streams: list[list[str]] = []  # ids of WaitWorks calls of their own
        proxy = self

        class Locator:
            def current(self, timeout):
                return "master:1", 1

            def on_change(self, listener):
                pass

            def remove_listener(self, listener):
                pass

        class Stub:
            def AwaitResults(self, requests):
                if not proxy.implemented:
                    stream = Stream(iter(()))
                    stream.fail(grpc.StatusCode.UNIMPLEMENTED)
                    return stream
                stream = Stream(requests)
                proxy.streams.append(stream)
                return stream

        self.locator = Locator()
        self._stub = Stub()

    def stub(self, address):
        return self._stub

    def observe_epoch(self, epoch, cluster_id=""):
        return True

    def retry_hint(self, error, address):
        return True

    def wait_works(self, work_ids, handle=None):
        self.own_streams.append(sorted(work_ids))
        yield work_pb2.WatchResultsResponse(results=[result(w) for w in work_ids])


def result(work_id: str, size: int = 1) -> work_pb2.WorkResult:
    return work_pb2.WorkResult(work_id=work_id, state=work_pb2.DONE, result=b"x" * size)


class Call:
    """A WaitWorks call on its own thread: what it got, and how it ended."""

    def __init__(self, awaits_: ShardAwaits, ids: list[str], read: threading.Event | None = None):
        self.handle = StreamHandle()
        self.got: list[str] = []
        self.error: Exception | None = None
        self.done = threading.Event()
        self._read = read
        threading.Thread(target=self._run, args=(awaits_, ids), daemon=True).start()

    def _run(self, awaits_, ids) -> None:
        try:
            for batch in awaits_.wait(ids, self.handle):
                if self._read is not None:
                    self._read.wait(30)
                self.got += [r.work_id for r in batch.results]
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc
        self.done.set()


def test_calls_share_one_stream_and_each_gets_its_own_results():
    proxy = Proxy()
    shared = ShardAwaits(proxy)
    first, second = Call(shared, ["a", "b"]), Call(shared, ["b", "c"])
    wait_until(lambda: proxy.streams and sorted(proxy.streams[0].asked()) == ["a", "b", "c"], 10, "the ids asked")
    stream = proxy.streams[0]
    stream.answer(results=[result("b"), result("a"), result("zzz")])
    stream.answer(results=[result("c")])
    assert first.done.wait(10) and second.done.wait(10)
    assert (sorted(first.got), sorted(second.got), first.error, second.error) == (["a", "b"], ["b", "c"], None, None)
    assert len(proxy.streams) == 1 and sorted(stream.asked()) == ["a", "b", "c"]  # "b" asked once
    shared.close()


def test_refusals_end_the_call_with_the_masters_reason():
    proxy = Proxy()
    shared = ShardAwaits(proxy)
    unknown, moved = Call(shared, ["x", "y", "ok"]), Call(shared, ["m"])
    wait_until(lambda: proxy.streams and len(proxy.streams[0].asked()) == 4, 10, "the ids asked")
    stream = proxy.streams[0]
    stream.answer(refused=[work_pb2.WorkRefusal(work_id=w, code=grpc.StatusCode.NOT_FOUND.value[0], message="no")
                           for w in ("x", "y")] +
                  [work_pb2.WorkRefusal(work_id="m", code=grpc.StatusCode.ABORTED.value[0], message="moved")])
    assert unknown.done.wait(10) and moved.done.wait(10)
    assert isinstance(unknown.error, NotFound) and "'x', 'y'" in str(unknown.error) and unknown.got == []
    assert isinstance(moved.error, WrongShard)
    wait_until(lambda: stream.forgotten() == ["ok"], 10, "the refused call's other id forgotten")
    shared.close()


def test_a_stream_opened_again_asks_for_every_id_still_awaited():
    proxy = Proxy()
    shared = ShardAwaits(proxy)
    call = Call(shared, ["a", "b"])
    wait_until(lambda: proxy.streams and len(proxy.streams[0].asked()) == 2, 10, "the ids asked")
    proxy.streams[0].answer(results=[result("a")])
    proxy.streams[0].fail(grpc.StatusCode.UNAVAILABLE)  # a failover
    wait_until(lambda: len(proxy.streams) == 2 and proxy.streams[1].asked() == ["b"], 10, "the new stream's ids")
    proxy.streams[1].answer(results=[result("b")])
    assert call.done.wait(10) and call.error is None and call.got == ["a", "b"]
    shared.close()


def test_a_call_whose_client_left_is_forgotten():
    proxy = Proxy()
    shared = ShardAwaits(proxy)
    call = Call(shared, ["a", "b"])
    wait_until(lambda: proxy.streams and len(proxy.streams[0].asked()) == 2, 10, "the ids asked")
    call.handle.cancel()
    assert call.done.wait(10) and call.error is None
    wait_until(lambda: sorted(proxy.streams[0].forgotten()) == ["a", "b"], 10, "its ids forgotten")
    shared.close()


def test_a_slow_reader_goes_on_on_a_stream_of_its_own(monkeypatch):
    monkeypatch.setattr(awaits, "MAX_BUFFERED_BYTES", 10_000)
    proxy = Proxy()
    shared = ShardAwaits(proxy)
    read = threading.Event()
    slow = Call(shared, [f"w{i}" for i in range(10)], read=read)
    wait_until(lambda: proxy.streams and len(proxy.streams[0].asked()) == 10, 10, "the ids asked")
    stream = proxy.streams[0]
    for i in range(3):  # 12 KB given to a call that reads nothing: past the bound
        stream.answer(results=[result(f"w{i}", 4_000)])
    wait_until(lambda: sorted(stream.forgotten()) == [f"w{i}" for i in range(3, 10)], 10,
               "the rest forgotten on the shared stream")
    read.set()
    assert slow.done.wait(10) and slow.error is None
    assert proxy.own_streams == [[f"w{i}" for i in range(3, 10)]]
    assert sorted(slow.got) == [f"w{i}" for i in range(10)]
    shared.close()


def test_a_master_without_await_streams_is_waited_on_per_call():
    proxy = Proxy(implemented=False)
    shared = ShardAwaits(proxy)
    call = Call(shared, ["a"])
    assert call.done.wait(10) and call.error is None and call.got == ["a"]
    assert shared.unsupported and proxy.own_streams == [["a"]]
    later = Call(shared, ["b"])
    assert later.done.wait(10) and later.got == ["b"]
