"""A client's one AwaitResults stream: every result its handles wait for
comes over it.

Waiting for a handle registers its id, and with it the oldest other handles
still unresolved (read ahead: a producer reading results in order asks once
per 10,000 works), then waits until the stream has stored the result in the
handle. A stream per wait costs the client and the frontend more than the
result itself. When the stream breaks (the frontend went away, or was
busy) it is opened again, asking for every id still awaited. A frontend
without AwaitResults (an older version) makes the client wait with WaitWorks
calls instead.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Container

import grpc

from dworkers.common.validation import MAX_BATCH_WORKS
from dworkers.v1 import work_pb2

# A stream that ends so is opened again (the frontend went away, or was busy).
REOPEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
          grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
MAX_AWAITED = 50_000  # ids asked at once: reading ahead stops here (a frontend refuses beyond 100,000)
MAX_REFUSALS = 100_000  # refusals kept for handles nobody waits for yet
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_END = object()


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


class AwaitStream:
    def __init__(self, stub, read_ahead: Callable[[object, Container[str]], list[str]],
                 store: Callable[[list[work_pb2.WorkResult]], None]):
        self._stub = stub
        self._read_ahead = read_ahead  # a handle's id and the others' to ask for with it (not those covered)
        self._store = store  # gives results to their handles
        self._cond = threading.Condition()
        self._awaited: set[str] = set()
        self._refused: OrderedDict[str, Exception] = OrderedDict()
        self._requests: queue.SimpleQueue | None = None  # the open stream's
        self._stream = None
        self._started = False
        self._closed = False
        self.unsupported = False

    def wait(self, handle, deadline: float | None) -> bool:
        """Waits until the handle has its result; False if the frontend
        offers no AwaitResults, or awaits too many works for this client (the
        caller waits its own way). Raises TimeoutError past `deadline`
        (time.monotonic()), or Refused."""
        with self._cond:
            if self.unsupported:
                return False
            if handle._result is None and handle.id not in self._awaited and handle.id not in self._refused:
                ids = self._read_ahead(handle, self._awaited)[:max(1, MAX_AWAITED - len(self._awaited))]
                self._awaited.update(ids)
                self._send(ids)
                if not self._started:
                    self._started = True
                    threading.Thread(target=self._run, name="dworkers-results", daemon=True).start()
            while handle._result is None:
                error = self._refused.pop(handle.id, None)
                if isinstance(error, Refused) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return False  # the frontend holds too many of this client's waits: a call of its own
                if error is not None:
                    raise error
                if self.unsupported:
                    return False
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if remaining == 0:
                    raise TimeoutError(f"work {handle.id} not finished in time")
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            stream, requests = self._stream, self._requests
        if requests is not None:
            requests.put(_END)
        if stream is not None:
            stream.cancel()

    def _send(self, work_ids) -> None:
        """Asks for ids on the open stream (under the lock); a stream opened
        later asks for every id awaited then."""
        if self._requests is None:
            return
        ids = list(work_ids)
        for i in range(0, len(ids), MAX_BATCH_WORKS):
            self._requests.put(work_pb2.AwaitRequest(work_ids=ids[i:i + MAX_BATCH_WORKS]))

    def _run(self) -> None:
        delay = 0.05
        while True:
            requests: queue.SimpleQueue = queue.SimpleQueue()
            with self._cond:
                if self._closed:
                    return
                self._requests = requests
                self._send(self._awaited)
                self._stream = stream = self._stub.AwaitResults(iter(requests.get, _END))
            try:
                for response in stream:
                    delay = 0.05
                    self._take(response)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    with self._cond:
                        self.unsupported = True
                        self._cond.notify_all()
                    return
                if error.code() not in REOPEN:  # e.g. PERMISSION_DENIED: each waiter is told
                    with self._cond:
                        self._refuse({work_id: error for work_id in self._awaited})
            finally:
                with self._cond:
                    self._requests = self._stream = None
                requests.put(_END)
                stream.cancel()
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _take(self, response: work_pb2.AwaitResponse) -> None:
        self._store(list(response.results))
        refused: dict[str, Exception] = {r.work_id: Refused(_CODES.get(r.code, grpc.StatusCode.UNKNOWN), r.message)
                   for r in response.refused}
        with self._cond:
            self._awaited.difference_update(r.work_id for r in response.results)
            self._refuse(refused)
            self._cond.notify_all()

    def _refuse(self, refused: dict[str, Exception]) -> None:
        with self._cond:
            for work_id, error in refused.items():
                self._awaited.discard(work_id)
                self._refused[work_id] = error
            while len(self._refused) > MAX_REFUSALS:
                self._refused.popitem(last=False)
            self._cond.notify_all()
