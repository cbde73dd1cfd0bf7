"""SubmitWorks calls to one shard's master over a long-lived SubmitStream.

On an open stream a call is one message each way; a unary call costs the
frontend and the master about twice as much (in a submit-then-wait round
trip it was most of the way in). The master answers each call in order,
with its answer or its refusal (raised here as the call would have). The
stream only speeds calls up: a call it does not answer (the stream broke,
the master moved or stopped serving, a deposed master's stream, a master
silent for an attempt's time, one without SubmitStream) is made again on
its own through the proxy stub, which follows failovers. Submissions are
idempotent, so a work the master had accepted before the stream broke is
answered as a duplicate then.

What waits on a stream is bounded by its callers (the frontend's threads).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from dworkers.common.errors import NoMaster, from_status, status_name
from dworkers.common.proxy import MasterProxy, StreamHandle
from dworkers.common.wire import CLUSTER_KEY, EPOCH_KEY, metadata_value
from dworkers.v1 import work_pb2

log = logging.getLogger(__name__)

RETRY_BROKEN = 1.0  # seconds of calls on their own after a stream that broke before answering
RETRY_UNSUPPORTED = 60.0  # seconds before asking a master without SubmitStream again (an upgrade may end)
LOCATE_SECONDS = 0.5  # a call waits this long for a master's address before going on its own

_END = object()  # ends a stream's requests


class _Broken(Exception):
    """The stream ended before answering this call."""


class _Open:
    """One open stream: its requests, and the futures of calls sent on it, in order."""

    def __init__(self, address: str):
        self.address = address
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: deque[Future] = deque()
        self.handle = StreamHandle()  # cancels the call, even before it started
        self.answered = False

    def cancel(self) -> None:
        self.handle.cancel()


class SubmitStream:
    def __init__(self, proxy: MasterProxy):
        self.proxy = proxy
        self._lock = threading.Lock()
        self._open: _Open | None = None
        self._on_its_own_until = 0.0  # calls go on their own until then (time.monotonic())
        self._closed = False

    def call(self, request: work_pb2.SubmitWorksRequest, timeout: float) -> work_pb2.SubmitWorksResponse:
        """SubmitWorks on the active master, within `timeout` seconds;
        raises the master's refusal as the call would have (DworkersError)."""
        deadline = time.monotonic() + timeout
        future = self._send(request)
        if future is not None:
            try:
                # A master silent for an attempt's time is paused or gone:
                # the call is made again on its own, as the proxy does.
                response = future.result(min(timeout, self.proxy.attempt_timeout))
            except _Broken:
                pass  # made again on its own
            except FutureTimeout:
                if deadline - time.monotonic() <= 0:
                    raise NoMaster("no master answered in time") from None
                self._break(future)
            else:
                if response.code:
                    raise from_status(status_name(response.code), response.message)
                return response
        return self.proxy.call("SubmitWorks", request, timeout=max(0.001, deadline - time.monotonic()))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            opened = self._open
        if opened is not None:
            opened.cancel()

    def _send(self, request) -> Future | None:
        """Queues the call on the open stream (opened if none is); None if it is to go on its own."""
        with self._lock:
            if self._closed or time.monotonic() < self._on_its_own_until:
                return None
            opened = self._open
        if opened is None:
            opened = self._start()
            if opened is None:
                return None
        future: Future = Future()
        with self._lock:
            if self._open is not opened:  # it ended meanwhile
                return None
            opened.pending.append(future)
            opened.requests.put(request)
        return future

    def _start(self) -> _Open | None:
        try:
            address, _ = self.proxy.locator.current(LOCATE_SECONDS)
        except Exception:  # noqa: BLE001 - no master known now: the call waits for one on its own
            return None
        with self._lock:
            if self._closed:
                return None
            if self._open is not None:  # another caller opened one first
                return self._open
            opened = self._open = _Open(address)
        threading.Thread(target=self._serve, args=(opened,), name="submit-stream", daemon=True).start()
        return opened

    def _serve(self, opened: _Open) -> None:
        """Reads the stream's answers until it ends; then every call still
        waiting on it goes on its own."""
        error: grpc.RpcError | None = None
        self.proxy.locator.on_change(opened.cancel)  # the master moved: calls go to the new one
        try:
            call = self.proxy.stub(opened.address).SubmitStream(iter(opened.requests.get, _END))
            opened.handle.attach(call)
            metadata = call.initial_metadata()  # the master's epoch, as it takes the stream (a refusal: none)
            epoch = metadata_value(metadata, EPOCH_KEY)
            if epoch is not None and not self.proxy.observe_epoch(int(epoch), metadata_value(metadata, CLUSTER_KEY)
                                                                  or ""):
                log.info("submit stream to %s: a deposed master's (epoch %s)", opened.address, epoch)
                self.proxy.locator.invalidate(opened.address)
                opened.cancel()
            for response in call:
                with self._lock:
                    future = opened.pending.popleft()
                opened.answered = True
                future.set_result(response)
        except grpc.RpcError as caught:
            error = caught
        except Exception:  # noqa: BLE001 - the calls go on their own, whatever broke the stream
            log.exception("submit stream failed")
        finally:
            self.proxy.locator.remove_listener(opened.cancel)
            self._ended(opened, error)

    def _ended(self, opened: _Open, error: grpc.RpcError | None) -> None:
        now = time.monotonic()
        with self._lock:
            if self._open is opened:
                self._open = None
            pending, opened.pending = list(opened.pending), deque()
            if error is not None and error.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._on_its_own_until = now + RETRY_UNSUPPORTED
            elif not opened.answered:
                self._on_its_own_until = now + RETRY_BROKEN
        opened.requests.put(_END)
        opened.cancel()
        if error is not None and error.code() != grpc.StatusCode.CANCELLED:
            self.proxy.retry_hint(error, opened.address)  # a standby's hint: where the master is
            log.info("submit stream to %s ended (%s)", opened.address, error.code().name)
        for future in pending:
            future.set_exception(_Broken())

    def _break(self, future: Future) -> None:
        with self._lock:
            opened = self._open
            if opened is None or future not in opened.pending:
                return
            self._on_its_own_until = time.monotonic() + RETRY_BROKEN
        opened.cancel()
