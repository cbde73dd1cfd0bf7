"""Merges concurrent SubmitWork calls into SubmitWorks calls to the master.

A call is sent at once, from its own thread, when nothing is in flight or
waiting (a lone caller pays no hand-over between threads); calls that
arrive while earlier ones are on their way leave together in the next
batch, sent by the batcher's threads, over a stream to the master while
one is open (services/frontend/submits.py). The master
then pays its per-call cost once per batch, and the journal writes the batch
in one append. The batch asks the master to judge each work on its own, so
one caller's bad or conflicting work is refused alone, and no caller waits
behind another's mistake. What waits is bounded by the server's concurrent
calls: a caller that gives up takes its work back if it has not left yet.
"""

from __future__ import annotations

import concurrent.futures
import threading
from concurrent.futures import Future

from dworkers.common.errors import from_status, status_name
from dworkers.common.proxy import MasterProxy
from dworkers.common.validation import MAX_STREAM_MESSAGE_BYTES
from dworkers.frontend.submits import SubmitStream
from dworkers.v1 import work_pb2

MAX_BATCH = 500


class SubmitBatcher:
    def __init__(self, proxy: MasterProxy, senders: int = 2, timeout: float = 10.0):
        self.proxy = proxy
        self.stream = SubmitStream(proxy)
        self.timeout = timeout
        self._waiting: list[tuple[work_pb2.SubmitWorkRequest, Future]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._senders = senders
        self._in_flight = 0  # batches on their way to the master
        for i in range(senders):
            threading.Thread(target=self._send_forever, name=f"submit-batcher-{i}", daemon=True).start()

    def submit(self, request: work_pb2.SubmitWorkRequest, timeout: float) -> work_pb2.SubmitWorkResponse:
        """Sends one work within a batch; raises what the master answered for it."""
        future: Future = Future()
        with self._cond:
            alone = not self._in_flight and not self._waiting and not self._closed
            if alone:
                self._in_flight += 1
            else:
                self._waiting.append((request, future))
                self._cond.notify()
        if alone:
            try:
                self._send([(request, future)])
            finally:
                self._sent()
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            # Its caller gets DEADLINE_EXCEEDED (the work's fate unknown to
            # it, as for any call cut short): unsent, it stays unsent, so that
            # callers who give up while the master is slow do not pile up here.
            with self._cond:
                if future.cancel():  # not taken into a batch yet
                    self._waiting = [item for item in self._waiting if item[1] is not future]
            if future.done() and not future.cancelled():
                return future.result()  # answered meanwhile
            raise

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.stream.close()

    def _send_forever(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._waiting or self._in_flight >= self._senders):
                    self._cond.wait()
                if self._closed:
                    return
                self._in_flight += 1
                size, count = 0, 0
                for request, future in self._waiting[:MAX_BATCH]:
                    size += len(request.payload) + 64
                    if count and size > MAX_STREAM_MESSAGE_BYTES:
                        break
                    future.set_running_or_notify_cancel()  # on its way: its caller can no longer take it back
                    count += 1
                batch, self._waiting = self._waiting[:count], self._waiting[count:]
            try:
                self._send(batch)
            finally:
                self._sent()

    def _sent(self) -> None:
        with self._cond:
            self._in_flight -= 1
            if self._waiting:
                self._cond.notify()

    def _send(self, batch) -> None:
        request = work_pb2.SubmitWorksRequest(works=[r for r, _ in batch], each_on_its_own=True)
        try:
            response = self.stream.call(request, timeout=self.timeout)
        except Exception as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), answer in zip(batch, response.works):
            if future.done():
                continue
            if answer.code:
                future.set_exception(from_status(status_name(answer.code), answer.message))
            else:
                future.set_result(work_pb2.SubmitWorkResponse(work_id=answer.work_id, duplicate=answer.duplicate))

