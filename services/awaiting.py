"""A client's one AwaitResults stream: every result its handles wait for
comes over it (AwaitStream for Client, AsyncAwaitStream for AsyncClient).

Waiting for a handle registers its id, and with it the oldest other handles
still unresolved (read ahead: a producer reading results in order asks once
per 10,000 works), then waits until the stream has stored the result in the
handle. A stream per wait costs the client and the frontend more than the
result itself. When the stream breaks (the frontend went away, or was
busy) it is opened again, asking for every id still awaited. A frontend
without AwaitResults (an older version), or one that already awaits too
many works for this client, makes the client wait with WaitWorks calls.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Container
from typing import Any

import grpc

from dworkers.common.validation import MAX_BATCH_WORKS
from dworkers.v1 import work_pb2

log = logging.getLogger(__name__)

# A stream that ends so is opened again (the frontend went away, or was busy).
REOPEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
          grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
MAX_AWAITED = 50_000  # ids asked at once: reading ahead stops here (a frontend refuses beyond 100,000)
MAX_REFUSALS = 100_000  # refusals kept for handles nobody waits for yet
IDLE_SECONDS = 10.0  # a stream that awaits nothing this long is closed (a frontend slot less)
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_END = object()
ON_ITS_OWN = object()  # the handle is waited for another way
# Refusals after which a handle is waited for with a call of its own.
OWN_WAY = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED)


class Refused(grpc.RpcError):
    """The cluster will give no result for this work: NOT_FOUND (never
    accepted, or its result left the retention window) or
    RESOURCE_EXHAUSTED (too many works awaited at once); raised as WaitWorks
    raised its status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self._code, self._message = code, message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message


class Awaited:
    """What a client's stream waits for: the ids asked, and refusals kept
    for their waiters. No I/O and no lock: its stream guards it."""

    def __init__(self, read_ahead: Callable[[object, Container[str]], list[str]],
                 store: Callable[[list[work_pb2.WorkResult]], None]):
        self.read_ahead = read_ahead  # a handle's id and the others' to ask for with it (not those covered)
        self.store = store  # gives results to their handles
        self.ids: set[str] = set()
        self.refused: OrderedDict[str, Exception] = OrderedDict()
        self.unsupported = False  # the frontend has no AwaitResults
        self.closed = False
        self._idle_since: float | None = None  # when the open stream last came to await nothing
        self._idle_check = False  # a look at it is scheduled

    def to_ask(self, handle) -> list[str]:
        """The ids to ask for so that `handle` gets its result (none if asked already)."""
        if handle._result is not None or handle.id in self.ids or handle.id in self.refused or self.closed:
            return []
        ids = self.read_ahead(handle, self.ids)[:max(1, MAX_AWAITED - len(self.ids))]
        self.ids.update(ids)
        return ids

    def outcome(self, handle):
        """None while `handle` waits; else True (it has its result),
        ON_ITS_OWN (to be waited for another way) or the error to raise."""
        if handle._result is not None:
            return True
        if self.closed:
            return Refused(grpc.StatusCode.CANCELLED, "the client was closed")
        error = self.refused.pop(handle.id, None)
        if self.unsupported or (isinstance(error, Refused) and error.code() in OWN_WAY):
            return ON_ITS_OWN  # (too many waits, here or upstream; a master without AwaitResults)
        return error

    def take(self, response: work_pb2.AwaitResponse) -> None:
        self.store(list(response.results))
        self.ids.difference_update(r.work_id for r in response.results)
        self.refuse({r.work_id: Refused(_CODES.get(r.code, grpc.StatusCode.UNKNOWN), r.message)
                     for r in response.refused})

    def refuse(self, refused: dict[str, Exception]) -> None:
        for work_id, error in refused.items():
            self.ids.discard(work_id)
            self.refused[work_id] = error
        while len(self.refused) > MAX_REFUSALS:
            self.refused.popitem(last=False)

    def went_idle(self, now: float) -> bool:
        """The open stream awaits nothing now: whether to schedule a look
        at it in IDLE_SECONDS (one at a time)."""
        self._idle_since = now
        schedule, self._idle_check = not self._idle_check, True
        return schedule

    def idle_left(self, now: float, current: bool) -> float | None:
        """At a look at the stream (`current`: still the open one): None to
        stop looking, 0 to close it, else seconds until the next look."""
        if not current or self.ids or self._idle_since is None:
            self._idle_check = False
            return None
        left = self._idle_since + IDLE_SECONDS - now
        if left <= 0:
            self._idle_check = False
            return 0.0
        return left

    def ended(self, error: grpc.RpcError, answered: bool) -> bool:
        """The stream ended with `error` (after answering, or not): whether
        to open it again."""
        code = error.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            self.unsupported = True
            return False
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not answered:  # no stream for this client now:
            self.refuse({w: Refused(code, error.details() or "") for w in self.ids})  # its waits go their own way
        elif code not in REOPEN:  # e.g. PERMISSION_DENIED: each waiter is told
            self.refuse(dict.fromkeys(self.ids, error))
        return True


def requests_of(work_ids) -> list[work_pb2.AwaitRequest]:
    ids = list(work_ids)
    return [work_pb2.AwaitRequest(work_ids=ids[i:i + MAX_BATCH_WORKS]) for i in range(0, len(ids), MAX_BATCH_WORKS)]


class AwaitStream:
    """For Client: the stream read by a thread; waiters wait on a condition."""

    def __init__(self, stub, read_ahead, store):
        self._stub = stub
        self._awaited = Awaited(read_ahead, store)
        self._cond = threading.Condition()
        self._requests: queue.SimpleQueue | None = None  # the open stream's
        self._stream: Any = None
        self._started = False
        self._closed = False

    def wait(self, handle, deadline: float | None) -> bool:
        """Waits until the handle has its result; False if it is to be
        waited for another way. Raises TimeoutError past `deadline`
        (time.monotonic()), or Refused."""
        with self._cond:
            while True:
                self._ask(self._awaited.to_ask(handle))  # again: another waiter may have taken a refusal
                outcome = self._awaited.outcome(handle)
                if outcome is not None:
                    break
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if remaining == 0:
                    raise TimeoutError(f"work {handle.id} not finished in time")
                self._cond.wait(remaining)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome is True

    def close(self) -> None:
        with self._cond:
            self._closed = self._awaited.closed = True
            self._cond.notify_all()
            stream, requests = self._stream, self._requests
        if requests is not None:
            requests.put(_END)
        if stream is not None:
            stream.cancel()

    def _ask(self, work_ids: list[str]) -> None:
        """(Under the lock.) A stream opened later asks for every id awaited
        then; a stream is open only while some are."""
        if work_ids and not self._started and not self._closed:
            self._started = True
            threading.Thread(target=self._run, name="dworkers-results", daemon=True).start()
        if self._requests is not None:
            for request in requests_of(work_ids):
                self._requests.put(request)

    def _idle(self, stream) -> None:
        """(Under the lock.) The stream awaits nothing now: closed if it
        still does in IDLE_SECONDS."""
        if self._awaited.went_idle(time.monotonic()):
            self._look_later(stream, IDLE_SECONDS)

    def _look_later(self, stream, seconds: float) -> None:
        timer = threading.Timer(seconds, self._close_if_idle, (stream,))
        timer.daemon = True
        timer.start()

    def _close_if_idle(self, stream) -> None:
        with self._cond:
            left = self._awaited.idle_left(time.monotonic(), self._stream is stream)
        if left == 0:
            stream.cancel()  # the reader then finds nothing awaited, and ends
        elif left is not None:
            self._look_later(stream, left)

    def _run(self) -> None:
        delay = 0.05
        while True:
            requests: queue.SimpleQueue = queue.SimpleQueue()
            with self._cond:
                if self._closed or not self._awaited.ids:  # nothing awaited: no stream (a frontend slot less)
                    self._started = False
                    return
                self._requests = requests
                self._ask(list(self._awaited.ids))
            again, answered, stream = True, False, None
            try:
                stream = self._stub.AwaitResults(iter(requests.get, _END))
                with self._cond:
                    self._stream = stream
                for response in stream:
                    delay, answered = 0.05, True
                    with self._cond:
                        self._awaited.take(response)
                        self._cond.notify_all()
                        if not self._awaited.ids:
                            self._idle(stream)
            except grpc.RpcError as error:
                with self._cond:
                    again = self._awaited.ended(error, answered)
                    self._cond.notify_all()
            except Exception:  # noqa: BLE001 - the stream comes back, whatever broke it
                log.exception("result stream failed")
            finally:
                with self._cond:
                    self._requests = self._stream = None
                requests.put(_END)
                if stream is not None:
                    stream.cancel()
            if not again:
                with self._cond:
                    self._started = False
                return
            if not answered:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


class AsyncAwaitStream:
    """For AsyncClient: the stream read by a task; waiters wait on a condition."""

    def __init__(self, stub, read_ahead, store):
        self._stub = stub
        self._awaited = Awaited(read_ahead, store)
        self._came = asyncio.Condition()
        self._requests: asyncio.Queue | None = None  # the open stream's
        self._task: asyncio.Task | None = None
        self._closed = False
        self._current: Any = None  # the open call

    async def wait(self, handle, deadline: float | None) -> bool:
        """As AwaitStream.wait."""
        async with self._came:
            while True:
                self._ask(self._awaited.to_ask(handle))  # again: another waiter may have taken a refusal
                outcome = self._awaited.outcome(handle)
                if outcome is not None:
                    break
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    await asyncio.wait_for(self._came.wait(), remaining)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"work {handle.id} not finished in time") from None
        if isinstance(outcome, Exception):
            raise outcome
        return outcome is True

    async def close(self) -> None:
        async with self._came:
            self._closed = self._awaited.closed = True
            self._came.notify_all()
        if self._task is not None:
            self._task.cancel()

    def _ask(self, work_ids: list[str]) -> None:
        """A stream is open only while some ids are awaited."""
        if work_ids and self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if self._requests is not None:
            for request in requests_of(work_ids):
                self._requests.put_nowait(request)

    def _idle(self, call) -> None:
        """As AwaitStream._idle."""
        if self._awaited.went_idle(time.monotonic()):
            asyncio.get_running_loop().call_later(IDLE_SECONDS, self._close_if_idle, call)

    def _close_if_idle(self, call) -> None:
        left = self._awaited.idle_left(time.monotonic(), self._current is call)
        if left == 0:
            call.cancel()
        elif left is not None:
            asyncio.get_running_loop().call_later(left, self._close_if_idle, call)

    async def _run(self) -> None:
        delay = 0.05
        try:
            while not self._closed and self._awaited.ids:
                requests: asyncio.Queue = asyncio.Queue()
                self._requests = requests
                self._ask(list(self._awaited.ids))
                again, answered, call = True, False, None
                try:
                    call = self._current = self._stub.AwaitResults(_drained(requests))
                    async for response in call:
                        delay, answered = 0.05, True
                        async with self._came:
                            self._awaited.take(response)
                            self._came.notify_all()
                        if not self._awaited.ids:
                            self._idle(call)
                except grpc.aio.AioRpcError as error:
                    async with self._came:
                        again = self._awaited.ended(error, answered)
                        self._came.notify_all()
                except asyncio.CancelledError:
                    if self._closed:
                        raise
                    # closed while idle: ends below, unless ids came meanwhile
                except Exception:  # noqa: BLE001 - the stream comes back, whatever broke it
                    log.exception("result stream failed")
                finally:
                    self._requests = self._current = None
                    if call is not None:
                        call.cancel()
                if not again:
                    return
                if not answered:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        finally:
            self._task = None


async def _drained(requests: asyncio.Queue):
    while True:
        yield await requests.get()
