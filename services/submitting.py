"""A Client's stream of submissions: its SubmitWorks calls, as messages on
one long-lived SubmitStream to the frontend (a message each way costs the
client and the frontend less than a call; a submit-then-wait round trip is
shorter by it). Each call gets its answer, or its refusal as the call's
status. The stream only speeds calls up: calls it did not answer when it
broke are made again on their own (their ids make that safe: a work
accepted already is answered duplicate), and after a stream that answered
nothing (a frontend without SubmitStream, with no stream to spare, or gone)
calls go on their own for a while. A stream with nothing on its way for
IDLE_SECONDS is closed (a frontend slot less).

What waits on it is bounded by the client: a few calls in flight."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import grpc

from dworkers.awaiting import Refused
from dworkers.common.errors import status_name
from dworkers.v1 import work_pb2

log = logging.getLogger(__name__)

IDLE_SECONDS = 10.0
RETRY_SECONDS = 5.0  # after a stream that answered nothing, calls go on their own this long...
ON_THEIR_OWN_SECONDS = {grpc.StatusCode.UNIMPLEMENTED: 60.0}  # ...or this long (an older frontend: an upgrade may end)
_END = object()


class _Open:
    """One open stream: its requests, and the calls sent on it, in order."""

    def __init__(self) -> None:
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: deque[tuple[work_pb2.SubmitWorksRequest, float, Future]] = deque()  # (request, deadline, answer)
        self.call: Any = None
        self.answered = False
        self.idle_since: float | None = None
        self.look_at: float | None = None  # when a look at its deadlines and idleness is due


class SubmitStream:
    def __init__(self, stub):
        self._stub = stub
        self._lock = threading.Lock()
        self._open: _Open | None = None
        self._on_their_own_until = 0.0
        self._closed = False

    def send(self, request: work_pb2.SubmitWorksRequest, timeout: float) -> Future:
        """The call's answer (a SubmitWorksResponse), or its grpc.RpcError."""
        deadline = time.monotonic() + timeout
        answer: Future = Future()
        with self._lock:
            on_its_own = self._closed or time.monotonic() < self._on_their_own_until
            opened = self._open if not on_its_own else None
            if opened is None and not on_its_own:
                opened = self._start()
                on_its_own = opened is None
            if opened is not None:
                opened.idle_since = None
                opened.pending.append((request, deadline, answer))
                opened.requests.put(request)
                self._watch_later(opened, deadline - time.monotonic())
        if on_its_own:
            self._on_its_own(request, deadline, answer)
        return answer

    def _start(self) -> _Open | None:
        """(Under the lock.) A new stream, or None if none can be opened now."""
        opened = _Open()
        try:
            opened.call = self._stub.SubmitStream(iter(opened.requests.get, _END))
            threading.Thread(target=self._read, args=(opened,), name="dworkers-submits", daemon=True).start()
        except Exception:  # noqa: BLE001 - e.g. the channel closed: the calls go on their own, and are told
            if opened.call is not None:
                opened.call.cancel()
            return None
        self._open = opened
        return opened

    def close(self) -> None:
        with self._lock:
            self._closed = True
            opened, self._open = self._open, None
        if opened is not None:
            opened.requests.put(_END)
            opened.call.cancel()

    def _on_its_own(self, request, deadline: float, answer: Future) -> None:
        try:
            call = self._stub.SubmitWorks.future(request, timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - e.g. the channel closed: its caller is told
            answer.set_exception(exc)
            return
        call.add_done_callback(lambda done: _settle(answer, done))

    def _read(self, opened: _Open) -> None:
        error: grpc.RpcError | None = None
        try:
            for response in opened.call:
                with self._lock:
                    _, _, answer = opened.pending.popleft()
                    opened.answered = True
                    if not opened.pending:
                        opened.idle_since = time.monotonic()
                        self._watch_later(opened, IDLE_SECONDS)
                if response.code:  # refused: as the call would have failed
                    answer.set_exception(Refused(grpc.StatusCode[status_name(response.code)], response.message))
                else:
                    answer.set_result(response)
        except grpc.RpcError as caught:
            error = caught
        except Exception:  # noqa: BLE001 - calls go on their own, whatever broke the stream
            log.exception("submit stream failed")
        self._ended(opened, error)

    def _ended(self, opened: _Open, error: grpc.RpcError | None) -> None:
        """The calls the stream did not answer are made again on their own;
        after a stream that answered nothing, so are the next calls for a while."""
        with self._lock:
            if self._open is opened:
                self._open = None
            if error is not None and not opened.answered:
                self._on_their_own_until = time.monotonic() + ON_THEIR_OWN_SECONDS.get(error.code(), RETRY_SECONDS)
            pending, opened.pending = list(opened.pending), deque()
        opened.requests.put(_END)
        if error is not None and error.code() != grpc.StatusCode.CANCELLED:
            log.info("submit stream ended: %s %s", error.code().name, error.details())
        for request, deadline, answer in pending:
            self._on_its_own(request, deadline, answer)

    def _watch_later(self, opened: _Open, seconds: float) -> None:
        """(Under the lock.) A look in `seconds`, unless one comes sooner."""
        due = time.monotonic() + max(0.0, seconds)
        if opened.look_at is None or due < opened.look_at:
            opened.look_at = due
            timer = threading.Timer(max(0.0, seconds), self._watch, (opened, due))
            timer.daemon = True
            timer.start()

    def _watch(self, opened: _Open, due: float) -> None:
        """A call past its deadline ends the stream (a frontend that answers
        nothing: the calls go on their own, and fail in their deadlines); a
        stream idle for IDLE_SECONDS is closed."""
        now = time.monotonic()
        with self._lock:
            if opened.look_at != due:
                return  # a sooner look replaced this one
            opened.look_at = None
            if self._open is not opened:
                return
            if opened.pending:
                soonest = min(deadline for _, deadline, _ in opened.pending)
                if soonest > now:
                    self._watch_later(opened, soonest - now)
                    return
                ending = opened.call.cancel
            elif opened.idle_since is not None:
                idle_until = opened.idle_since + IDLE_SECONDS
                if idle_until > now:
                    self._watch_later(opened, idle_until - now)
                    return
                self._open = None  # the next call opens another

                def ending():
                    opened.requests.put(_END)  # the frontend ends the stream: the reader ends with it
            else:
                return
        ending()


def _settle(answer: Future, call: grpc.Future) -> None:
    error = call.exception()
    if error is None:
        answer.set_result(call.result())
    else:
        answer.set_exception(error)
