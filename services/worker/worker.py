"""A worker process: N worker slots, each with its own id and executor,
sharing one stream to the master (which it finds through the proxy's
locator). It registers periodically, pulls work when slots are idle, and
resends every WorkIsDone/WorkFailed until the master acks it."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass

import grpc

from dworkers.v1 import master_pb2
from services.common.metrics import WorkerMetrics
from services.common.proxy import MasterProxy, NoMaster
from services.common.wire import MASTER_KEY, metadata_value
from services.worker.executor import Executor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    concurrency: int = 2
    jobs: tuple[str, ...] = ()
    register_interval: float = 5.0
    resend_interval: float = 3.0
    shutdown_grace: float = 30.0
    default_timeout: float = 30.0


class Slot:
    """One worker slot: a thread feeding its executor one work at a time."""

    def __init__(self, worker_id: str, worker: "Worker"):
        self.worker_id = worker_id
        self.worker = worker
        self.executor = Executor(list(worker.settings.jobs))
        self.inbox: queue.Queue = queue.Queue(maxsize=1)
        self.work_id = ""
        self.thread = threading.Thread(target=self._run, name=f"slot-{worker_id}", daemon=True)

    @property
    def busy(self) -> bool:
        return bool(self.work_id)

    def _run(self) -> None:
        self.executor._ensure()  # start the child now, not on the first job
        while True:
            assignment = self.inbox.get()
            if assignment is None:
                self.executor.close()
                return
            work = assignment.work
            timeout = assignment.timeout_seconds or self.worker.settings.default_timeout
            log.info("got work", extra={"work_id": work.work_id, "worker_id": self.worker_id})
            outcome = self.executor.run(work.kind, work.payload, timeout)
            self.worker.metrics.executed(work.kind, "ok" if outcome.ok else "error", outcome.seconds)
            self.worker.finished(self, work.work_id, outcome)


class Worker:
    def __init__(self, proxy: MasterProxy, settings: WorkerSettings, metrics: WorkerMetrics | None = None):
        self.proxy = proxy
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.host = socket.gethostname()
        prefix = f"{self.host}-{os.getpid()}"
        self.slots = {f"{prefix}-{i}": Slot(f"{prefix}-{i}", self) for i in range(settings.concurrency)}
        self._lock = threading.Lock()
        self._unacked: dict[str, master_pb2.WorkerMessage] = {}  # work id -> done/failed message
        self._outbox: queue.Queue | None = None  # the current stream's, None between streams
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stream = None

    # --- slots report here ----------------------------------------------

    def finished(self, slot: Slot, work_id: str, outcome) -> None:
        if outcome.ok:
            message = master_pb2.WorkerMessage(done=master_pb2.WorkIsDone(completions=[
                master_pb2.Completion(worker_id=slot.worker_id, work_id=work_id, result=outcome.result)]))
            log.info("work complete", extra={"work_id": work_id, "worker_id": slot.worker_id})
        else:
            message = master_pb2.WorkerMessage(failed=master_pb2.WorkFailed(failures=[
                master_pb2.Failure(worker_id=slot.worker_id, work_id=work_id, error=outcome.error)]))
            log.warning("work failed: %s", outcome.error, extra={"work_id": work_id, "worker_id": slot.worker_id})
        with self._lock:
            self._unacked[work_id] = message
            slot.work_id = ""
        self._send(message)
        if not self._stopping.is_set():
            self._send(self._request([slot.worker_id]))

    # --- the stream -------------------------------------------------------

    def _send(self, message: master_pb2.WorkerMessage) -> None:
        outbox = self._outbox
        if outbox is not None:
            try:
                outbox.put_nowait(message)
            except queue.Full:
                pass  # the stream is stuck; unacked messages are resent on the next one

    def _request(self, worker_ids) -> master_pb2.WorkerMessage:
        return master_pb2.WorkerMessage(request_work=master_pb2.WorkerRequestsWork(worker_ids=worker_ids))

    def _register(self) -> master_pb2.WorkerMessage:
        with self._lock:
            busy = [s.work_id for s in self.slots.values() if s.busy]
        return master_pb2.WorkerMessage(register=master_pb2.RegisterWorker(
            worker_ids=list(self.slots), host=self.host, busy_work_ids=busy))

    def _idle_ids(self) -> list[str]:
        with self._lock:
            return [s.worker_id for s in self.slots.values() if not s.busy]

    def _outgoing(self, outbox: queue.Queue):
        """The request stream: merges what is queued into as few messages as possible."""
        while True:
            message = outbox.get()
            if message is None:
                return
            batch = [message]
            while len(batch) < 1000:
                try:
                    nxt = outbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    yield from _coalesce(batch)
                    return
                batch.append(nxt)
            yield from _coalesce(batch)

    def _session(self, address: str) -> None:
        outbox: queue.Queue = queue.Queue(maxsize=100_000)
        outbox.put(self._register())
        with self._lock:
            for message in self._unacked.values():
                outbox.put(message)
        if not self._stopping.is_set():
            outbox.put(self._request(self._idle_ids()))
        self._outbox = outbox
        timer = threading.Thread(target=self._timers, args=(outbox,), daemon=True)
        stream = self.proxy.stub(address).Connect(self._outgoing(outbox))
        self._stream = stream
        self.proxy.locator.on_change(stream.cancel)  # the master moved: reconnect at once
        timer.start()
        try:
            for message in stream:
                if not self.proxy.observe_epoch(message.epoch):
                    continue  # a deposed master's late message
                self._handle(message)
        finally:
            self.proxy.locator.remove_listener(stream.cancel)
            self._outbox = None
            outbox.put(None)
            stream.cancel()

    def _handle(self, message: master_pb2.MasterMessage) -> None:
        kind = message.WhichOneof("message")
        if kind == "work_is_ready":
            if not self._stopping.is_set():
                idle = self._idle_ids()
                if idle:
                    self._send(self._request(idle))
        elif kind == "works":
            for assignment in message.works.assignments:
                slot = self.slots.get(assignment.worker_id)
                with self._lock:
                    if slot is None or slot.busy:
                        continue  # the master re-queues it after the deadline
                    slot.work_id = assignment.work.work_id
                slot.inbox.put(assignment)
        elif kind == "ack":
            with self._lock:
                for work_id in message.ack.work_ids:
                    self._unacked.pop(work_id, None)

    def _timers(self, outbox: queue.Queue) -> None:
        """Periodic re-registration and resending of unacked results."""
        next_register = time.monotonic() + self.settings.register_interval
        next_resend = time.monotonic() + self.settings.resend_interval
        while self._outbox is outbox:
            time.sleep(0.2)
            now = time.monotonic()
            if now >= next_register:
                self._send(self._register())
                next_register = now + self.settings.register_interval
            if now >= next_resend:
                with self._lock:
                    pending = list(self._unacked.values())
                for message in pending:
                    self._send(message)
                next_resend = now + self.settings.resend_interval

    # --- life --------------------------------------------------------------

    def run(self) -> None:
        for slot in self.slots.values():
            slot.thread.start()
        delay = 0.05
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                address, _ = self.proxy.locator.current(timeout=5.0)
                log.info("connecting to master at %s", address)
                self._session(address)
            except NoMaster as exc:
                log.info("waiting for a master: %s", exc)
                continue
            except grpc.RpcError as exc:
                if self._stopped.is_set():
                    break
                if time.monotonic() - started > 5:
                    delay = 0.05
                log.info("stream to master ended: %s %s", exc.code().name, exc.details())
                address = metadata_value(exc.trailing_metadata(), MASTER_KEY)
                if address:
                    self.proxy.locator.hint(address)
            if self._stopped.is_set():
                break
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def stop(self) -> None:
        """Finishes running work within the grace period, hands back what is
        still running after it (not a failed attempt), then stops."""
        self._stopping.set()
        deadline = time.monotonic() + self.settings.shutdown_grace
        while time.monotonic() < deadline and self._busy():
            time.sleep(0.1)
        with self._lock:
            running = [(s.worker_id, s.work_id) for s in self.slots.values() if s.busy]
            for worker_id, work_id in running:
                message = master_pb2.WorkerMessage(failed=master_pb2.WorkFailed(failures=[master_pb2.Failure(
                    worker_id=worker_id, work_id=work_id, error="worker shut down", returned=True)]))
                self._unacked[work_id] = message
        for worker_id, work_id in running:
            log.info("handing work back", extra={"work_id": work_id, "worker_id": worker_id})
            self._send(self._unacked[work_id])
        deadline = time.monotonic() + 5.0  # for the acks of what we reported
        while time.monotonic() < deadline:
            with self._lock:
                if not self._unacked:
                    break
            time.sleep(0.05)
        self._stopped.set()
        if self._stream is not None:
            self._stream.cancel()
        for slot in self.slots.values():
            try:
                slot.inbox.put_nowait(None)
            except queue.Full:
                pass
            slot.executor.close()

    def _busy(self) -> bool:
        with self._lock:
            return any(s.busy for s in self.slots.values())


def _coalesce(messages: list[master_pb2.WorkerMessage]) -> list[master_pb2.WorkerMessage]:
    """Merges queued messages into at most one of each kind, in the order
    register, done, failed, request: a slot's request then always follows the
    report that freed it."""
    register = None
    done, failed, requested = [], [], {}
    for message in messages:
        kind = message.WhichOneof("message")
        if kind == "register":
            register = message
        elif kind == "done":
            done.extend(message.done.completions)
        elif kind == "failed":
            failed.extend(message.failed.failures)
        elif kind == "request_work":
            requested.update(dict.fromkeys(message.request_work.worker_ids))
    merged = [register] if register is not None else []
    if done:
        merged.append(master_pb2.WorkerMessage(done=master_pb2.WorkIsDone(completions=done)))
    if failed:
        merged.append(master_pb2.WorkerMessage(failed=master_pb2.WorkFailed(failures=failed)))
    if requested:
        merged.append(master_pb2.WorkerMessage(request_work=master_pb2.WorkerRequestsWork(worker_ids=list(requested))))
    return merged
