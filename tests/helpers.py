"""Test clients for a live cluster: submitting through a frontend, collecting
the result stream, waiting for conditions (never for fixed times), and a
worker that speaks the protocol by hand."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections import Counter

import grpc

from dworkers import credentials
from dworkers.v1 import frontend_pb2_grpc, master_pb2, master_pb2_grpc, work_pb2


def frontend(address: str) -> frontend_pb2_grpc.FrontendStub:
    """A stub (TLS and token from the environment, as the SDK's: see conftest's --secure)."""
    return frontend_pb2_grpc.FrontendStub(credentials.channel(address))


def submit_until_acked(stub, kind: str, payload: bytes, work_id: str | None = None, deadline: float = 60.0,
                       **fields) -> work_pb2.SubmitWorkResponse:
    """Submits like a well-behaved client: the same id again until acked."""
    request = work_pb2.SubmitWorkRequest(work_id=work_id or str(uuid.uuid4()), kind=kind, payload=payload, **fields)
    end = time.monotonic() + deadline
    while True:
        try:
            return stub.SubmitWork(request, timeout=10)
        except grpc.RpcError as error:
            # ABORTED: its slot was moving to another shard for longer than the call's deadline
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED) \
                    or time.monotonic() > end:
                raise
            time.sleep(0.1)


class Producer:
    """Submits works in a thread until stopped; remembers which were acked."""

    def __init__(self, stub, kind: str = "square", payload: bytes = b"3", prefix: str = "p"):
        self.stub, self.kind, self.payload, self.prefix = stub, kind, payload, prefix
        self.acked: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            response = submit_until_acked(self.stub, self.kind, self.payload, f"{self.prefix}-{n}", deadline=90)
            self.acked.append(response.work_id)
            time.sleep(0.01)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=100)
        return self.acked


class ResultCollector:
    """Watches WatchResults from the start in a thread, reconnecting as a
    client would: after the last sequence, or (`by_token`, a cluster of
    several shards) with the last response's resume token."""

    def __init__(self, stub, by_token: bool = False):
        self.stub = stub
        self.by_token = by_token
        self.token = ""
        self.results: list[work_pb2.WorkResult] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.by_token:
                request = work_pb2.WatchResultsRequest(resume_token=self.token)
            else:
                request = work_pb2.WatchResultsRequest(after_sequence=self.results[-1].sequence if self.results else 0)
            stream = self.stub.WatchResults(request)
            self._stream = stream
            try:
                for batch in stream:
                    with self._cond:
                        self.results.extend(batch.results)
                        self.token = batch.resume_token
                        self._cond.notify_all()
            except grpc.RpcError:
                time.sleep(0.2)

    def ids(self) -> list[str]:
        with self._cond:
            return [r.work_id for r in self.results]

    def wait_for(self, work_ids, timeout: float) -> set[str]:
        """Waits until every id has a result; returns the ids still missing."""
        wanted = set(work_ids)
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                missing = wanted - {r.work_id for r in self.results}
                remaining = end - time.monotonic()
                if not missing or remaining <= 0:
                    return missing
                self._cond.wait(min(remaining, 0.5))

    def stop(self) -> None:
        self._stop.set()
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.cancel()


def wait_until(predicate, timeout: float, what: str = "condition", interval: float = 0.05):
    """Polls `predicate` until it returns something true; fails the test with
    `what` when `timeout` seconds pass first. Returns the predicate's value."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class ProtocolWorker:
    """Speaks the worker protocol directly to a master, as a worker process would."""

    def __init__(self, address: str, worker_id: str = "probe-0", token: str | None = None):
        self.worker_id = worker_id
        self.outbox: list = []
        self.cond = threading.Condition()
        self.channel = credentials.channel(address, token=token)
        self.received: list[master_pb2.MasterMessage] = []
        self.error: grpc.RpcError | None = None  # how the master ended the stream
        self.done = threading.Event()
        self.stream = master_pb2_grpc.MasterStub(self.channel).Connect(self._requests())
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.outbox)
                message = self.outbox.pop(0)
            if message is None:
                return
            yield message

    def _read(self):
        try:
            for message in self.stream:
                with self.cond:
                    self.received.append(message)
                    self.cond.notify_all()
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.done.set()

    def send(self, **kw):
        with self.cond:
            self.outbox.append(master_pb2.WorkerMessage(**kw))
            self.cond.notify_all()

    def wait(self, kind: str, timeout: float = 10.0) -> master_pb2.MasterMessage:
        with self.cond:
            assert self.cond.wait_for(lambda: any(m.HasField(kind) for m in self.received), timeout)
            message = next(m for m in self.received if m.HasField(kind))
            self.received.remove(message)
            return message

    def close(self):
        self.stream.cancel()
        self.channel.close()


def wait_kind(stub, kind: str, timeout: float = 30.0) -> None:
    """Waits until a live worker runs `kind` (and so the master knows it)."""
    def live():
        try:
            info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
        except grpc.RpcError:
            return False
        return any(k.kind == kind and k.slots for k in info.kinds)
    wait_until(live, timeout, f"a worker that runs {kind!r}")


def wait_running(stub, count: int = 1, timeout: float = 30.0) -> None:
    """Waits until `count` works are in progress."""
    wait_until(lambda: stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10).in_progress >= count,
               timeout, f"{count} works in progress")


def settle(results: ResultCollector, stub, timeout: float = 30.0) -> None:
    """Waits until the collector holds every result the master has numbered
    so far: a duplicate or extra result among them would be seen now."""
    last = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10).last_sequence
    wait_until(lambda: last == 0 or (results.results and results.results[-1].sequence >= last), timeout,
               f"results up to sequence {last}")


def assert_exactly_once(results: ResultCollector, acked, stub, timeout: float = 60.0) -> None:
    """Every acked work finished exactly once, and nothing else did."""
    assert not results.wait_for(acked, timeout=timeout), "acked works never finished"
    settle(results, stub)
    counts = Counter(results.ids())
    assert not [i for i in acked if counts[i] != 1], "acked works not finished exactly once"
    assert set(counts) == set(acked), "results for works that were never acked"


def http_get(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode()
    except OSError:
        return ""
