"""The Python client: submit works, get their results.

    client = dworkers.Client("127.0.0.1:7000")
    handle = client.submit("square", 3)      # JSON arguments; payload=b"..." for bytes
    handle.result(timeout=10)                # 9, or raises WorkFailed / TimeoutError

`submit` does not wait for the work to be durable: submissions are
pipelined (batched into SubmitWorks calls, a few in flight, sent as messages
on one SubmitStream) by a sender thread, so one thread submitting in a loop
is not held up by each durable write. `handle.accepted()` waits for that
acknowledgement; `result()` waits for it and then for the result (over the
client's one AwaitResults stream: no polling, no call per result). Work ids
are fixed when submitted, so a batch retried after a failover is idempotent.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from dworkers import codec, credentials
from dworkers.awaiting import AwaitStream
from dworkers.common.errors import status_name
from dworkers.common.shards import decode_cursors, encode_cursors
from dworkers.common.validation import MAX_BATCH_WORKS, MAX_PAYLOAD_BYTES, new_work_id
from dworkers.common.wire import MAX_MESSAGE_BYTES
from dworkers.credentials import Tls
from dworkers.submitting import SubmitStream
from dworkers.v1 import frontend_pb2_grpc, work_pb2

DEFAULT_TARGET = "127.0.0.1:7000"
BATCH_WORKS = 500  # per SubmitWorks call
BATCH_BYTES = 4 * 1024 * 1024  # per SubmitWorks call (gRPC's limit here is 16 MiB)
CALLS_IN_FLIGHT = 4
MAX_QUEUED_WORKS = 20_000  # submit() blocks beyond these, until acknowledgements make room
MAX_QUEUED_BYTES = 64 * 1024 * 1024
# Answers after which a batch is sent again (same ids: idempotent) until the submit timeout.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
# A result stream that ends so is opened again (the frontend went away, or was busy).
STREAM_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
STATE_NAMES = {v: k for k, v in work_pb2.State.items()}


class WorkFailed(Exception):
    """The work ended FAILED: `error` is the last attempt's error, as the
    worker reported it (exception type, message and where)."""

    def __init__(self, work_id: str, error: str, attempts: int, kind: str = ""):
        super().__init__(f"work {work_id} ({kind}) failed after {attempts} attempts: {error}")
        self.work_id, self.error, self.attempts, self.kind = work_id, error, attempts, kind


class WorkCancelled(WorkFailed):
    """The work was cancelled (CancelWork) before it finished."""

    def __init__(self, work_id: str, attempts: int, kind: str = ""):
        Exception.__init__(self, f"work {work_id} ({kind}) was cancelled")
        self.work_id, self.error, self.attempts, self.kind = work_id, "cancelled", attempts, kind


class SubmitError(Exception):
    """A work was not accepted: refused (e.g. INVALID_ARGUMENT, ALREADY_EXISTS
    with another payload) or not acknowledged within the submit timeout."""

    def __init__(self, work_id: str, code: str, message: str):
        super().__init__(f"work {work_id} not accepted: {code}: {message}")
        self.work_id, self.code, self.message = work_id, code, message


@dataclass(frozen=True)
class Result:
    """A finished work, decoded: `value` as the job returned it."""

    work_id: str
    kind: str
    state: str  # DONE or FAILED
    value: Any
    error: str
    attempts: int
    sequence: int  # within its shard
    shard: int = 0
    resume_token: str = ""  # watch(resume_token=...) goes on after this result (a cluster of several shards)

    @classmethod
    def of(cls, r: work_pb2.WorkResult, resume_token: str = "") -> Result:
        value, error = None, r.error
        if r.state == work_pb2.DONE:
            try:
                value = codec.decode_result(r.result, r.content_type)
            except ValueError as exc:  # e.g. a worker in another language sent bad JSON: keep the bytes
                value, error = r.result, f"result not decodable as {r.content_type}: {exc}"
        return cls(r.work_id, r.kind, STATE_NAMES.get(r.state, str(r.state)), value, error, r.attempts,
                   r.sequence, r.shard, resume_token)

    def unwrap(self) -> Any:
        if self.state == "CANCELLED":
            raise WorkCancelled(self.work_id, self.attempts, self.kind)
        if self.state != "DONE":
            raise WorkFailed(self.work_id, self.error, self.attempts, self.kind)
        return self.value


class WatchCursor:
    """Where a result stream is: after a sequence (one shard), or after a
    sequence per shard (several: their responses carry resume tokens)."""

    def __init__(self, after: int = 0, resume_token: str = ""):
        self.after = after
        self.cursors = decode_cursors(resume_token) if resume_token else None

    def request(self) -> work_pb2.WatchResultsRequest:
        if self.cursors is not None:
            return work_pb2.WatchResultsRequest(resume_token=encode_cursors(self.cursors))
        return work_pb2.WatchResultsRequest(after_sequence=self.after)

    def fresh(self, response: work_pb2.WatchResultsResponse) -> list[Result]:
        """The results not seen yet, each with the token that resumes after it."""
        if not response.resume_token and self.cursors is None:
            new = [r for r in response.results if r.sequence > self.after]
            if new:
                self.after = new[-1].sequence
            return [Result.of(r) for r in new]
        if self.cursors is None:  # the cluster has several shards now: `after` was shard 0's
            self.cursors = {0: self.after} if self.after else {}
        cursors = self.cursors
        out = []
        for r in response.results:
            if r.sequence > cursors.get(r.shard, 0):
                cursors[r.shard] = r.sequence
                out.append(Result.of(r, encode_cursors(cursors)))
        return out


class Handle:
    """A submitted work."""

    def __init__(self, client: Client, work_id: str, kind: str):
        self.id, self.kind = work_id, kind
        self._client = client
        self._accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._result: Result | None = None

    def __repr__(self) -> str:
        return f"<Handle {self.id} {self.kind}>"

    def accepted(self, timeout: float | None = None) -> bool:
        """Waits until the work is durably accepted; True if it was a
        duplicate of an earlier submission. Raises SubmitError if refused."""
        try:
            return self._accepted.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"work {self.id} not acknowledged within {timeout:g} s") from None

    def result(self, timeout: float | None = None) -> Any:
        """The job's return value (decoded); raises WorkFailed if the work
        failed, TimeoutError if it did not finish within `timeout` seconds."""
        if self._result is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            self.accepted(timeout)
            self._client._resolve(self, deadline)
        assert self._result is not None
        return self._result.unwrap()

    def status(self) -> work_pb2.WorkStatus:
        """The work's state now (GetWork), once it is accepted."""
        self.accepted(self._client.timeout)
        return self._client.status(self.id)

    def cancel(self) -> work_pb2.WorkStatus:
        """Cancels the work (see Client.cancel)."""
        self.accepted()
        return self._client.cancel(self.id)[0]

    def done(self) -> bool:
        return self._result is not None


class Unresolved:
    """A client's accepted handles still without a result, oldest first, held
    weakly (a handle nobody keeps is forgotten). Waiting for one result asks
    for up to 10,000 of them: one WaitWorks call then serves every result
    that finished meanwhile, so a producer reading results in order makes one
    call per catch-up, not one per work."""

    def __init__(self) -> None:
        self._handles: OrderedDict[str, weakref.ref] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, handle) -> None:
        with self._lock:
            self._handles[handle.id] = weakref.ref(handle)

    def ids_with(self, handle) -> list[str]:
        """`handle`'s id first, then the oldest others still waiting."""
        ids = [handle.id]
        with self._lock:
            for work_id, ref in list(self._handles.items()):
                if len(ids) >= MAX_BATCH_WORKS:
                    break
                other = ref()
                if other is None or other._result is not None:
                    del self._handles[work_id]
                elif other is not handle:
                    ids.append(work_id)
        return ids

    def to_read_ahead(self, handle, covered: Container[str]) -> list[str]:
        """What a new stream for `handle` asks for: its id, then those of the
        oldest other handles still waiting that no running stream covers."""
        self.add(handle)  # a handle retried since its first result is there again
        return [work_id for work_id in self.ids_with(handle) if work_id not in covered]

    def store(self, results: list[Result], handle=None) -> None:
        """Gives each result to its handle (`handle`, or another one still alive)."""
        for result in results:
            with self._lock:
                ref = self._handles.pop(result.work_id, None)
            other = handle if handle is not None and result.work_id == handle.id else \
                ref() if ref is not None else None
            if other is not None and other._result is None:
                other._result = result


class Feeds:
    """Result streams read ahead for a client's handles. Waiting for a
    handle not yet covered starts a stream (WaitWorks, on a thread of its
    own) for it and the oldest other unresolved handles, up to 10,000; the
    stream gives results to their handles until all came, whoever waits. A
    producer reading results in order thus opens one stream per 10,000
    works (one that cancelled its stream once its own result came opened a
    new one at almost every result, each naming thousands of ids)."""

    MAX_STREAMS = 8  # read ahead at once; beyond, a waiter reads its own result itself

    def __init__(self, unresolved: Unresolved, stream: Callable[[list[str], float | None], Iterator[list[Result]]]):
        self._unresolved = unresolved
        self._stream = stream  # the results of ids as they finish (by a deadline), resumed across failovers
        self._cond = threading.Condition()
        self._covering: dict[str, Feed] = {}  # id -> the running feed that waits for it
        self._feeds = 0

    def wait(self, handle, deadline: float | None) -> None:
        with self._cond:
            while handle._result is None:
                feed = self._covering.get(handle.id)
                if feed is None:
                    if self._feeds >= self.MAX_STREAMS:
                        break
                    ids = self._unresolved.to_read_ahead(handle, self._covering)
                    if len(ids) == 1:
                        break  # nothing to read ahead
                    feed = self._start(ids)
                while handle._result is None and not feed.ended:
                    remaining = left(deadline)
                    if remaining == 0:
                        raise TimeoutError(f"work {handle.id} not finished in time")
                    self._cond.wait(remaining)
                if handle._result is None and feed.error is not None:
                    break  # perhaps another id made the call fail (e.g. past retention): ask alone
        if handle._result is None:  # alone (or every feed is busy): read its result here, by its deadline
            for results in self._stream([handle.id], deadline):
                self._unresolved.store(results, handle)

    def _start(self, ids: list[str]) -> Feed:
        feed = Feed(ids)
        for work_id in ids:
            self._covering[work_id] = feed
        self._feeds += 1
        threading.Thread(target=self._read, args=(feed,), name="dworkers-results", daemon=True).start()
        return feed

    def _read(self, feed: Feed) -> None:
        try:
            for results in self._stream(feed.ids, None):
                self._unresolved.store(results)
                with self._cond:
                    for result in results:
                        if self._covering.get(result.work_id) is feed:
                            del self._covering[result.work_id]
                    self._cond.notify_all()
        except Exception as exc:  # noqa: BLE001 - raised to whoever waits for these ids
            feed.error = exc
        with self._cond:
            feed.ended = True
            self._feeds -= 1
            for work_id in feed.ids:
                if self._covering.get(work_id) is feed:
                    del self._covering[work_id]
            self._cond.notify_all()


class Feed:
    """One stream read ahead: the ids it asked for, and how it ended."""

    def __init__(self, ids: list[str]):
        self.ids = ids
        self.ended = False
        self.error: Exception | None = None


@dataclass
class _Pending:
    handle: Handle
    request: work_pb2.SubmitWorkRequest
    size: int


class Client:
    """A connection to a frontend (thread-safe). Close it, or use `with`."""

    def __init__(self, target: str | None = None, *, timeout: float = 30.0, batch_works: int = BATCH_WORKS,
                 channel: grpc.Channel | None = None, tls: Tls | bool | None = None, token: str | None = None):
        """`tls`: a dworkers.Tls, True (the system's CAs), False (plaintext),
        or None: from the environment. `token`: a bearer token for frontends
        that check access; None: DWORKERS_TOKEN or DWORKERS_TOKEN_FILE
        (dworkers.credentials)."""
        self.target = target or os.environ.get("DWORKERS_FRONTEND", DEFAULT_TARGET)
        self.timeout = timeout  # per call, and for a submission to be acknowledged
        self.batch_works = max(1, min(batch_works, MAX_BATCH_WORKS))  # per SubmitWorks call (and BATCH_BYTES)
        self._channel = channel or credentials.channel(self.target, tls, token=token)
        self.stub = frontend_pb2_grpc.FrontendStub(self._channel)
        self._submits = SubmitStream(self.stub)  # the calls' way to the frontend
        self._queue: deque[_Pending] = deque()
        self._queued_bytes = 0
        self._unacked = 0  # queued or in flight
        self._in_flight = 0  # SubmitWorks calls
        self._cond = threading.Condition()
        self._closed = False
        self._unresolved = Unresolved()
        self._feeds = Feeds(self._unresolved, self._wait_responses)  # if the frontend has no AwaitResults
        self._awaits = AwaitStream(self.stub, self._unresolved.to_read_ahead,
                                   lambda results: self._unresolved.store([Result.of(r) for r in results]))
        self._sender = threading.Thread(target=self._send_forever, name="dworkers-submit", daemon=True)
        self._sender.start()

    # --- submitting --------------------------------------------------------

    def submit(self, kind: str, *args, payload: bytes | bytearray | str | None = None, **options) -> Handle:
        """Submits one work: JSON arguments (`*args, **kwargs`), or `payload`
        bytes (or str, sent as text). Options (OPTIONS): `work_id`,
        `max_attempts`, `timeout`, `content_type`, `priority` (higher first),
        `delay` (seconds) or `not_before` (a Unix time or an aware datetime),
        `backoff` ((initial, multiplier[, max]) seconds between failed
        attempts), `heartbeat_timeout` (seconds the job may go without
        ctx.heartbeat(), instead of a timeout); unset, the cluster applies the job's (`@job`) or its own
        defaults. Returns at once with a handle."""
        request = submission(kind, args, payload, options)
        handle = Handle(self, request.work_id, kind)
        self._enqueue(_Pending(handle, request, request.ByteSize() + 8))
        return handle

    def submit_many(self, kind: str, calls: Iterable[Any]) -> list[Handle]:
        """One work per item: a tuple of arguments, a dict of keyword
        arguments, bytes or str (a payload), or any other value (one argument)."""
        return [self.submit(kind, *args, payload=payload, **kwargs) for args, payload, kwargs in map(as_call, calls)]

    def flush(self, timeout: float | None = None) -> None:
        """Waits until every submission so far is acknowledged (or failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._unacked:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{self._unacked} submissions not acknowledged within {timeout:g} s")
                self._cond.wait(remaining)

    @contextmanager
    def batch(self):
        """Submissions inside are pipelined; leaving waits for their acks."""
        yield self
        self.flush()

    def _enqueue(self, pending: _Pending) -> None:
        with self._cond:
            while (self._unacked >= MAX_QUEUED_WORKS or self._queued_bytes + pending.size > MAX_QUEUED_BYTES) \
                    and self._unacked and not self._closed:
                self._cond.wait()
            if self._closed:
                raise RuntimeError("the client is closed")
            self._unacked += 1
            # Nothing waits and a call is free: send from here (the call does
            # not block), a thread switch less for a lone submission.
            direct = not self._queue and self._in_flight < CALLS_IN_FLIGHT
            if direct:
                self._in_flight += 1
            else:
                self._queue.append(pending)
                self._queued_bytes += pending.size
                self._cond.notify_all()
        if direct:
            self._send([pending], time.monotonic() + self.timeout)

    def _take_batch(self) -> list[_Pending]:
        """The next batch, once a call is free to send it (empty: closed)."""
        with self._cond:
            while (not self._queue or self._in_flight >= CALLS_IN_FLIGHT) and not self._closed:
                self._cond.wait()
            batch: list[_Pending] = []
            ids: set[str] = set()
            size = 0
            # An id submitted twice goes in the next call (answered duplicate), not twice in one.
            while self._queue and len(batch) < self.batch_works and self._queue[0].handle.id not in ids \
                    and (not batch or size + self._queue[0].size <= BATCH_BYTES):
                item = self._queue.popleft()
                batch.append(item)
                ids.add(item.handle.id)
                size += item.size
            self._queued_bytes -= size
            self._in_flight += bool(batch)
            return batch

    def _send_forever(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return  # closed and drained
            self._send(batch, time.monotonic() + self.timeout)

    def _send(self, batch: list[_Pending], deadline: float, delay: float = 0.05) -> None:
        """One SubmitWorks call (counted in _in_flight by the caller), on the
        stream of submissions; the answer settles each handle, or the batch
        is sent again."""
        request = work_pb2.SubmitWorksRequest(works=[p.request for p in batch], each_on_its_own=True)

        def cancelled(reason: str) -> None:
            self._settle(batch, lambda p: p.handle._accepted.set_exception(
                SubmitError(p.handle.id, "CANCELLED", reason)))

        try:
            if self._closed:
                raise RuntimeError("the client was closed")
            call = self._submits.send(request, timeout=max(0.1, min(self.timeout, deadline - time.monotonic())))
        except Exception as exc:  # e.g. the channel closed under a retry
            cancelled(str(exc))
            return

        def answered(call: concurrent.futures.Future) -> None:
            error = call.exception()
            if error is not None and not isinstance(error, grpc.RpcError):  # e.g. the channel closed
                cancelled(str(error))
                return
            if error is None:
                for pending, answer in zip(batch, call.result().works):
                    if answer.code:
                        pending.handle._accepted.set_exception(SubmitError(pending.handle.id,
                                                                           status_name(answer.code), answer.message))
                    else:
                        pending.handle._accepted.set_result(answer.duplicate)
                        self._unresolved.add(pending.handle)
            elif error.code() in RETRYABLE and time.monotonic() + delay < deadline:
                # Same ids: if the first try was accepted after all, this one answers duplicate.
                timer = threading.Timer(delay, self._send, (batch, deadline, min(delay * 2, 1.0)))
                timer.daemon = True
                timer.start()
                return
            else:
                for pending in batch:
                    pending.handle._accepted.set_exception(
                        SubmitError(pending.handle.id, error.code().name, error.details() or ""))
            self._settle(batch)

        call.add_done_callback(answered)

    def _settle(self, batch: list[_Pending], settle=None) -> None:
        """A sent batch is answered (or given up): frees its call."""
        if settle is not None:
            for pending in batch:
                if not pending.handle._accepted.done():
                    settle(pending)
        with self._cond:
            self._in_flight -= 1
            self._unacked -= len(batch)
            self._cond.notify_all()

    # --- results -----------------------------------------------------------

    def _resolve(self, handle: Handle, deadline: float | None) -> None:
        """Waits for one handle's result (see AwaitStream)."""
        if not self._awaits.wait(handle, deadline):
            self._feeds.wait(handle, deadline)

    def _wait(self, work_ids: list[str], deadline: float | None) -> Iterator[Result]:
        """Results of `work_ids` as they finish (WaitWorks; the frontend
        resumes it across failovers of the master)."""
        for results in self._wait_responses(work_ids, deadline):
            yield from results

    def _wait_responses(self, work_ids: list[str], deadline: float | None) -> Iterator[list[Result]]:
        """As `_wait`, a stream response's results at a time."""
        remaining = set(work_ids)
        while remaining:
            timeout = left(deadline)
            if timeout == 0:
                raise TimeoutError(f"{len(remaining)} of {len(work_ids)} works not finished in time")
            stream = self.stub.WaitWorks(work_pb2.WaitWorksRequest(work_ids=sorted(remaining)), timeout=timeout)
            try:
                for response in stream:
                    results = [Result.of(r) for r in response.results if r.work_id in remaining]
                    remaining.difference_update(r.work_id for r in results)
                    if results:
                        yield results
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"{len(remaining)} of {len(work_ids)} works not finished in time") from None
                if error.code() not in STREAM_RETRYABLE:
                    raise
                time.sleep(0.1)  # the frontend went away: ask again (another one, or the same back)
            finally:
                stream.cancel()

    def as_completed(self, handles: Iterable[Handle], timeout: float | None = None) -> Iterator[Handle]:
        """Yields the handles as their works finish (any order)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done, by_id = split_done(handles)
        yield from done
        for handle in by_id.values():
            handle.accepted(left(deadline))
        ids = list(by_id)
        for i in range(0, len(ids), MAX_BATCH_WORKS):
            for result in self._wait(ids[i:i + MAX_BATCH_WORKS], deadline):
                handle = by_id[result.work_id]
                handle._result = result
                yield handle

    def status(self, work_id: str) -> work_pb2.WorkStatus:
        return self.stub.GetWork(work_pb2.GetWorkRequest(work_id=work_id), timeout=self.timeout)

    def list_works(self, state: str | int, kind: str = "", page_size: int = 100) -> Iterator[work_pb2.WorkStatus]:
        """Every work in one state ("PENDING", "SCHEDULED", "IN_PROGRESS",
        "DONE", "FAILED" or "CANCELLED"), of `kind` if given, page by page
        (one ListWorks call per page; see ListWorksRequest for the order)."""
        which = work_pb2.State.Value(state.upper()) if isinstance(state, str) else state
        token = ""
        while True:
            page = self.stub.ListWorks(work_pb2.ListWorksRequest(state=which, kind=kind, page_token=token,
                                                                 page_size=page_size), timeout=self.timeout)
            yield from page.works
            token = page.next_page_token
            if not token:
                return

    def retry(self, *works: str | Handle) -> list[work_pb2.WorkStatus]:
        """Queues FAILED or CANCELLED works (ids or handles) again, with fresh
        attempts; all or none (NOT_FOUND, FAILED_PRECONDITION otherwise).
        A handle whose result was read waits for the new one."""
        ids = [w.id if isinstance(w, Handle) else w for w in works]
        statuses = list(self.stub.RetryWork(work_pb2.RetryWorkRequest(work_ids=ids), timeout=self.timeout).works)
        for work in works:
            if isinstance(work, Handle):
                work._result = None
        return statuses

    def set_rate_limit(self, kind: str, per_second: float | None) -> work_pb2.KindInfo:
        """At most `per_second` works of `kind` start per second across the
        cluster (0: no limit), overriding the job's rate_limit; None removes
        this override."""
        request = work_pb2.SetRateLimitRequest(kind=kind)
        if per_second is not None:
            request.per_second = per_second
        return self.stub.SetRateLimit(request, timeout=self.timeout)

    def cancel(self, *works: str | Handle) -> list[work_pb2.WorkStatus]:
        """Cancels works (ids or handles), all or none: pending and scheduled
        ones end CANCELLED at once, running ones too and their jobs are
        stopped. Raises if one is unknown (NOT_FOUND) or already finished
        DONE or FAILED (FAILED_PRECONDITION); cancelling twice is fine."""
        ids = [w.id if isinstance(w, Handle) else w for w in works]
        return list(self.stub.CancelWork(work_pb2.CancelWorkRequest(work_ids=ids), timeout=self.timeout).works)

    def watch(self, after: int = 0, resume_token: str = "") -> Iterator[Result]:
        """Every finished work in order, from after sequence `after` (or
        where a result's `resume_token` says: a cluster of several shards
        numbers results per shard), for ever; resumes (from the last one
        seen) when its frontend goes away."""
        cursor = WatchCursor(after, resume_token)
        while True:
            stream = self.stub.WatchResults(cursor.request())
            try:
                for response in stream:
                    yield from cursor.fresh(response)
            except grpc.RpcError as error:
                if error.code() not in STREAM_RETRYABLE:
                    raise
                time.sleep(0.2)
            finally:
                stream.cancel()

    # --- life --------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Waits for submissions in flight to be acknowledged, then closes."""
        try:
            self.flush(self.timeout if timeout is None else timeout)
        finally:
            with self._cond:
                self._closed = True
                left, self._queue = list(self._queue), deque()
                self._queued_bytes = 0
                self._unacked -= len(left)
                self._cond.notify_all()
            for pending in left:  # never sent: say so rather than leave them waiting
                pending.handle._accepted.set_exception(SubmitError(pending.handle.id, "CANCELLED",
                                                                   "the client was closed before sending it"))
            self._sender.join(timeout=5)
            self._submits.close()
            self._awaits.close()
            self._channel.close()  # ends the feeds' streams too

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: do not wait, and do not hide that error
            self.close(timeout=0)
        except TimeoutError:
            pass


OPTIONS = ("work_id", "max_attempts", "timeout", "content_type", "priority", "delay", "not_before", "backoff",
           "heartbeat_timeout")


def submission(kind: str, args: tuple, payload: bytes | bytearray | str | None,
               options: dict[str, Any]) -> work_pb2.SubmitWorkRequest:
    """The request for one work; `options` holds the job's keyword arguments
    and the submission's own options (OPTIONS)."""
    own = {name: options.pop(name) for name in OPTIONS if name in options}
    if payload is not None and (args or options):
        raise TypeError("give either arguments (JSON) or payload, not both")
    if payload is None:
        data, content_type = codec.encode_call(args, options)
    elif isinstance(payload, str):
        data, content_type = payload.encode(), codec.TEXT
    else:
        data, content_type = bytes(payload), codec.BYTES
    if len(data) > MAX_MESSAGE_BYTES // 2:  # could not even be sent; smaller ones the cluster judges
        raise ValueError(f"payload of {len(data):,} bytes exceeds the limit of {MAX_PAYLOAD_BYTES:,} bytes")
    request = work_pb2.SubmitWorkRequest(  # unset options: the job's (@job), else the cluster's
        work_id=own.get("work_id") or new_work_id(), kind=kind, payload=data,
        content_type=own.get("content_type", content_type), max_attempts=own.get("max_attempts", 0),
        timeout_seconds=own.get("timeout", 0.0), delay_seconds=own.get("delay", 0.0),
        heartbeat_timeout=own.get("heartbeat_timeout", 0.0))
    if own.get("priority") is not None:
        request.priority = own["priority"]
    not_before = own.get("not_before")
    if not_before is not None:
        request.not_before = not_before.timestamp() if isinstance(not_before, datetime.datetime) else not_before
    backoff = own.get("backoff")
    if backoff is not None:
        b = request.backoff
        b.initial_seconds, b.multiplier = backoff[0], backoff[1] if len(backoff) > 1 else 0.0
        b.max_seconds = backoff[2] if len(backoff) > 2 else 0.0
    return request


def as_call(item: Any) -> tuple[tuple, bytes | bytearray | str | None, dict]:
    """(args, payload, kwargs) of one item of submit_many."""
    if isinstance(item, tuple):
        return item, None, {}
    if isinstance(item, dict):
        return (), None, dict(item)
    if isinstance(item, (bytes, bytearray, str)):
        return (), item, {}
    return (item,), None, {}


def left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (None: no deadline), at least 0."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def split_done(handles: Iterable) -> tuple[list, dict]:
    """The handles whose results are here, and the others by work id."""
    done, waiting = [], {}
    for handle in handles:
        if handle.done():
            done.append(handle)
        else:
            waiting[handle.id] = handle
    return done, waiting


_default: Client | None = None
_default_lock = threading.Lock()


def connect(target: str | None = None, **options) -> Client:
    """Sets (and returns) the client that `job.submit(...)` uses."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = Client(target, **options)
        return _default


def default_client() -> Client:
    """The client set by connect(), or one to DWORKERS_FRONTEND (default 127.0.0.1:7000)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default
