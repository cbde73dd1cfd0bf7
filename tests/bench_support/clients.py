"""Load clients for the benchmark: submitters (one work per call or batches)
and a WatchResults subscriber that timestamps every result."""

from __future__ import annotations

import itertools
import threading
import time
import uuid

import grpc

from dworkers import credentials
from dworkers.common.shards import encode_cursors
from dworkers.v1 import frontend_pb2_grpc, work_pb2

RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


def stub(address: str) -> tuple[grpc.Channel, frontend_pb2_grpc.FrontendStub]:
    """A stub (TLS and a token from the environment, as the SDK's: bench --secure sets them)."""
    channel = credentials.channel(address)
    return channel, frontend_pb2_grpc.FrontendStub(channel)


def requests(count: int, kind: str = "square", tag: str = "") -> list[work_pb2.SubmitWorkRequest]:
    """`count` works with UUID ids (like the frontend's) and small payloads."""
    return [work_pb2.SubmitWorkRequest(work_id=str(uuid.uuid4()), kind=kind, payload=str(i % 1000).encode())
            for i in range(count)]


def batches(reqs: list[work_pb2.SubmitWorkRequest], size: int) -> list[work_pb2.SubmitWorksRequest]:
    return [work_pb2.SubmitWorksRequest(works=reqs[i:i + size]) for i in range(0, len(reqs), size)]


def percentile(values, p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


class Submitters:
    """`threads` threads, each taking the next item (one SubmitWorkRequest or
    one SubmitWorksRequest) and calling the frontend until acked; until the
    items run out, `duration` passes or stop() is called. Records each
    call's (start, end, works) and the errors retried."""

    def __init__(self, stub, items, threads: int, batched: bool, duration: float | None = None,
                 call_timeout: float = 10.0, give_up_after: float = 60.0, pace: float = 0.0):
        self.stub = stub
        self._items = iter(items)
        self._lock = threading.Lock()
        self.batched = batched
        self.duration = duration
        self.call_timeout = call_timeout
        self.give_up_after = give_up_after
        self.pace = pace  # seconds between calls of one thread (0: back to back)
        self.calls: list[tuple[float, float, int]] = []  # (start, end, works) of acked calls
        self.acked: dict[str, float] = {}  # work id -> when its ack arrived
        self.errors: dict[str, int] = {}
        self.failed = 0  # items given up on
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"submit-{i}") for i in range(threads)]

    def start(self) -> Submitters:
        self.started = time.monotonic()
        self.deadline = self.started + self.duration if self.duration else None
        for t in self._threads:
            t.start()
        return self

    def _next(self):
        with self._lock:
            return next(self._items, None)

    def _run(self) -> None:
        method = self.stub.SubmitWorks if self.batched else self.stub.SubmitWork
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return
            if self.pace:
                next_at += self.pace
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            item = self._next()
            if item is None:
                return
            give_up = time.monotonic() + self.give_up_after
            while True:
                t0 = time.monotonic()
                try:
                    reply = method(item, timeout=self.call_timeout)
                except grpc.RpcError as error:
                    name = error.code().name
                    with self._lock:
                        self.errors[name] = self.errors.get(name, 0) + 1
                    if error.code() not in RETRY_CODES or time.monotonic() > give_up or self._stop.is_set():
                        with self._lock:
                            self.failed += 1
                        break
                    time.sleep(0.05)
                    continue
                t1 = time.monotonic()
                ids = [w.work_id for w in reply.works] if self.batched else [reply.work_id]
                with self._lock:
                    self.calls.append((t0, t1, len(ids)))
                    for work_id in ids:
                        self.acked[work_id] = t1
                break

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        alive = any(t.is_alive() for t in self._threads)
        if alive:
            self._stop.set()
        self.finished = time.monotonic()
        return not alive

    @property
    def works(self) -> int:
        return sum(n for _, _, n in self.calls)

    def rate(self, since: float | None = None) -> float:
        """Works acked per second from start to the last ack."""
        if not self.calls:
            return 0.0
        start = since if since is not None else self.started
        end = max(c[1] for c in self.calls)
        return self.works / max(1e-9, end - start)

    def latencies(self) -> list[float]:
        return [t1 - t0 for t0, t1, _ in self.calls]


class Subscriber:
    """WatchResults through the frontend from `after`, in a thread: counts
    results and records when each arrived (time.monotonic())."""

    def __init__(self, stub, after: int | dict[int, int], record_ids: bool = True):
        """`after`: a sequence, or (a cluster of several shards) one per shard."""
        self.stub = stub
        self.after = after
        self.cursors = dict(after) if isinstance(after, dict) else None
        self.record_ids = record_ids
        self.arrived: dict[str, float] = {}
        self.count = 0
        self.done = 0
        self.last_sequence = after if isinstance(after, int) else 0
        self.error: str | None = None
        self._cond = threading.Condition()
        self._stream = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="subscriber")
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            cursors = self.cursors
            self._stream = self.stub.WatchResults(
                work_pb2.WatchResultsRequest(after_sequence=self.last_sequence) if cursors is None
                else work_pb2.WatchResultsRequest(resume_token=encode_cursors(cursors)))
            try:
                for response in self._stream:
                    now = time.monotonic()
                    with self._cond:
                        for r in response.results:
                            if cursors is None:
                                if r.sequence <= self.last_sequence:
                                    continue
                                self.last_sequence = r.sequence
                            else:
                                if r.sequence <= cursors.get(r.shard, 0):
                                    continue
                                cursors[r.shard] = r.sequence
                            self.count += 1
                            if r.state == work_pb2.DONE:
                                self.done += 1
                            if self.record_ids:
                                self.arrived[r.work_id] = now
                        self._cond.notify_all()
            except grpc.RpcError as error:
                if self._stopped:
                    return
                self.error = f"{error.code().name}: {error.details()}"
                time.sleep(0.1)  # resume after the last sequence seen

    def wait_count(self, count: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while self.count < count:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.5))
            return True

    def wait_id(self, work_id: str, timeout: float) -> float | None:
        end = time.monotonic() + timeout
        with self._cond:
            while work_id not in self.arrived:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self.arrived[work_id]

    def wait_ids(self, work_ids, timeout: float) -> set[str]:
        """Waits until every id arrived; returns the missing ones."""
        end = time.monotonic() + timeout
        wanted = set(work_ids)
        with self._cond:
            while True:
                missing = {w for w in wanted if w not in self.arrived}
                remaining = end - time.monotonic()
                if not missing or remaining <= 0:
                    return missing
                wanted = missing
                self._cond.wait(min(remaining, 0.5))

    def stop(self) -> None:
        self._stopped = True
        if self._stream is not None:
            self._stream.cancel()
        self._thread.join(timeout=5)


def counter_ids(prefix: str):
    """Unique work ids prefix-0, prefix-1, ... (for open-ended loads)."""
    return (f"{prefix}-{i}" for i in itertools.count())
