"""The frontend's shared AwaitResults stream, in one process, over a master
the test plays: calls share it, each gets its own results and refusals, it
asks again for everything awaited when it is opened again, and a call that
reads slowly goes on on a stream of its own."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest

from dworkers.common.errors import NotFound, WrongShard
from dworkers.common.proxy import StreamHandle
from dworkers.frontend import awaits
from dworkers.frontend.awaits import ShardAwaits
from dworkers.v1 import work_pb2
from tests.fakes import Failed
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
    assert shared._unsupported_at is not None and proxy.own_streams == [["a"]]
    later = Call(shared, ["b"])
    assert later.done.wait(10) and later.got == ["b"]


class Shards:
    """A shard map the test sets: `owner[id]` (shard 0 if absent)."""

    def __init__(self):
        self.owner: dict[str, int] = {}
        self.map = type("Map", (), {"version": 1})()

    def split(self, ids):
        groups: dict[int, list[int]] = {}
        for i, work_id in enumerate(ids):
            groups.setdefault(self.owner.get(work_id, 0), []).append(i)
        return groups

    def wait_newer(self, version, deadline):
        return True


class Client:
    """A client's AwaitResults stream through ClientAwaits: its requests, and what came back."""

    def __init__(self, shards: Shards, proxies: dict[int, Proxy]):
        streams = {shard: ShardAwaits(proxy, shard) for shard, proxy in proxies.items()}
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.handle = StreamHandle()
        self.responses: list[work_pb2.AwaitResponse] = []
        self.error: Exception | None = None
        self.done = threading.Event()
        client = awaits.ClientAwaits(shards, streams.__getitem__)
        threading.Thread(target=self._run, args=(client,), daemon=True).start()

    def _run(self, client) -> None:
        try:
            for response in client.responses(iter(self.requests.get, None), self.handle):
                self.responses.append(response)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc
        self.done.set()

    def results(self) -> dict[str, int]:
        return {r.work_id: r.shard for response in list(self.responses) for r in response.results}

    def refused(self) -> dict[str, int]:
        return {r.work_id: r.code for response in list(self.responses) for r in response.refused}


def test_a_clients_stream_is_served_by_each_shards_stream_and_moved_ids_are_asked_again():
    shards, proxies = Shards(), {0: Proxy(), 1: Proxy()}
    shards.owner.update({"b": 1, "m": 0})
    client = Client(shards, proxies)
    client.requests.put(work_pb2.AwaitRequest(work_ids=["a", "b", "m", "gone"]))
    wait_until(lambda: proxies[0].streams and proxies[1].streams and len(proxies[0].streams[0].asked()) == 3
               and proxies[1].streams[0].asked() == ["b"], 10, "each shard asked for its ids")
    zero, one = proxies[0].streams[0], proxies[1].streams[0]
    shards.owner["m"] = 1  # moved: shard 0 refuses it, the newer map names shard 1
    zero.answer(refused=[
        work_pb2.WorkRefusal(work_id="gone", code=grpc.StatusCode.NOT_FOUND.value[0], message="past retention"),
        work_pb2.WorkRefusal(work_id="m", code=grpc.StatusCode.ABORTED.value[0], message="moving")])
    zero.answer(results=[result("a")])
    one.answer(results=[result("b")])
    wait_until(lambda: "m" in one.asked(), 10, "the moved id asked of its new shard")
    one.answer(results=[result("m")])
    wait_until(lambda: len(client.results()) == 3, 10, "three results")
    assert client.results() == {"a": 0, "b": 1, "m": 1}
    assert client.refused() == {"gone": grpc.StatusCode.NOT_FOUND.value[0]}  # ABORTED stays inside
    client.requests.put(work_pb2.AwaitRequest(work_ids=["c", "d"], forget=["d"]))
    wait_until(lambda: "c" in zero.asked(), 10, "the next request's id")
    assert "d" not in zero.asked()
    client.handle.cancel()
    assert client.done.wait(10) and client.error is None
    wait_until(lambda: "c" in zero.forgotten(), 10, "the client's ids forgotten once it left")


def test_a_client_awaiting_too_many_works_at_once_has_the_rest_refused(monkeypatch):
    monkeypatch.setattr(awaits.ClientAwaits, "MAX_AWAITED", 5)
    client = Client(Shards(), {0: Proxy()})
    client.requests.put(work_pb2.AwaitRequest(work_ids=[f"w{i}" for i in range(8)]))
    wait_until(lambda: len(client.refused()) == 3, 10, "the ids past the bound refused")
    assert set(client.refused()) == {"w5", "w6", "w7"}
    assert set(client.refused().values()) == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    client.requests.put(work_pb2.AwaitRequest(work_ids=["x" * 10_000]))  # malformed: the stream ends
    assert client.done.wait(10) and "work_id" in str(client.error)


def test_ids_refused_as_too_many_upstream_are_waited_for_on_a_call_of_their_own():
    proxy = Proxy()
    shared = ShardAwaits(proxy)
    call = Call(shared, ["a", "b"])
    wait_until(lambda: proxy.streams and len(proxy.streams[0].asked()) == 2, 10, "the ids asked")
    proxy.streams[0].answer(results=[result("a")])
    proxy.streams[0].answer(refused=[work_pb2.WorkRefusal(
        work_id="b", code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="too many")])
    assert call.done.wait(10) and call.error is None and sorted(call.got) == ["a", "b"]
    assert proxy.own_streams == [["b"]]
    shared.close()


def test_a_quiet_stream_that_breaks_long_after_it_opened_fails_no_call(monkeypatch):
    monkeypatch.setattr(awaits, "RECONNECT_TIMEOUT", 0.5)
    proxy = Proxy()
    shared = ShardAwaits(proxy)
    call = Call(shared, ["a"])
    wait_until(lambda: proxy.streams and proxy.streams[0].asked() == ["a"], 10, "the id asked")
    proxy.streams[0].answer()  # the master's first message: the stream is open
    time.sleep(1.0)  # quiet for longer than RECONNECT_TIMEOUT (the work runs long)
    proxy.streams[0].fail(grpc.StatusCode.UNAVAILABLE)
    wait_until(lambda: len(proxy.streams) == 2 and proxy.streams[1].asked() == ["a"], 10, "asked again")
    proxy.streams[1].answer(results=[result("a")])
    assert call.done.wait(10) and call.error is None and call.got == ["a"]
    shared.close()
