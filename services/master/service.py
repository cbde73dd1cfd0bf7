"""The Master gRPC service: thin handlers that validate, turn the core's
outcomes into gRPC statuses, and carry the worker protocol's stream."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import grpc

from dworkers.v1 import master_pb2, master_pb2_grpc, work_pb2
from services.common import validation
from services.common.validation import MAX_STREAM_MESSAGE_BYTES
from services.common.wire import CLUSTER_KEY, EPOCH_KEY, MASTER_KEY, UNREACHABLE_KEY
from services.master.core import Conflict, Forgotten, MasterCore, NotServing, Overloaded

log = logging.getLogger(__name__)

OUTBOX_MESSAGES = 10_000  # queued for one worker process before it is dropped...
OUTBOX_BYTES = 256 * 1024 * 1024  # ...or this many bytes (hand-outs of 1,024 slots fit)


class WorkerConnection:
    """The master's side of one worker process's stream: a bounded outbox
    whose queued messages leave merged, below the stream's message limit."""

    def __init__(self) -> None:
        self._outbox: deque[tuple[master_pb2.MasterMessage, int]] = deque()  # with their sizes
        self._bytes = 0
        self._ready = asyncio.Event()
        self.closed: str | None = None
        self.registered = False  # the stream must register before anything else
        self.protocol_error = ""  # why the master refused the stream

    def send(self, message: master_pb2.MasterMessage, size: int = 0) -> None:
        """Queues a message; `size` is its size if the caller knows it (within
        a few bytes: merging keeps a margin)."""
        if self.closed is not None:
            return
        if len(self._outbox) >= OUTBOX_MESSAGES or self._bytes > OUTBOX_BYTES:
            self.close("worker is not reading its stream")
            return
        size = size or message.ByteSize()
        self._outbox.append((message, size))
        self._bytes += size
        self._ready.set()

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self._ready.set()

    async def next(self) -> master_pb2.MasterMessage | None:
        while not self._outbox:
            if self.closed is not None:
                return None
            self._ready.clear()
            await self._ready.wait()
        taken, total = [], 0
        while self._outbox:
            message, size = self._outbox[0]
            if taken and total + size > MAX_STREAM_MESSAGE_BYTES - 1024:
                break
            self._outbox.popleft()
            self._bytes -= size
            total += size
            taken.append(message)
        if len(taken) == 1:
            return taken[0]
        merged = master_pb2.MasterMessage()  # queued messages may be shared: never change them
        for message in taken:
            _merge(merged, message)
        return merged


def _merge(into: master_pb2.MasterMessage, message: master_pb2.MasterMessage) -> None:
    """Adds one message's parts to another (a worker reads acks first, then works, then the hint)."""
    into.epoch = max(into.epoch, message.epoch)
    into.cluster_id = message.cluster_id
    if message.HasField("ack"):
        into.ack.attempt_tokens.extend(message.ack.attempt_tokens)
    if message.HasField("works"):
        into.works.assignments.extend(message.works.assignments)
    if message.HasField("work_is_ready"):
        into.work_is_ready.SetInParent()


def _answer(work: work_pb2.Work, outcome) -> work_pb2.SubmitWorkResponse:
    if isinstance(outcome, Conflict):
        return work_pb2.SubmitWorkResponse(work_id=work.work_id, code=grpc.StatusCode.ALREADY_EXISTS.value[0],
                                           message=str(outcome))
    return work_pb2.SubmitWorkResponse(work_id=work.work_id, duplicate=outcome)


class MasterService(master_pb2_grpc.MasterServicer):
    def __init__(self, node) -> None:
        self.node = node  # the MasterNode: who is master, the core, known kinds

    async def _core(self, context) -> MasterCore:
        core = self.node.core
        if not self.node.in_contact_with_zookeeper():
            # No backend can be sure it leads now: say so, so that callers
            # fail fast instead of retrying until their deadline.
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "this backend is cut off from ZooKeeper: no master can be sure it leads now",
                                trailing_metadata=((UNREACHABLE_KEY, "1"),))
        if core is None or core.closed is not None:
            address = self.node.master_address()
            if address and not self.node.is_leader():
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"this backend is a standby; the active master is at {address}",
                    trailing_metadata=((MASTER_KEY, address),),
                )
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no active master here yet (electing or recovering)")
        try:
            core.check_serving()
        except NotServing as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"master cannot serve now: {exc}")
        context.set_trailing_metadata(((EPOCH_KEY, str(core.epoch)), (CLUSTER_KEY, core.cluster_id)))
        return core

    async def SubmitWorks(self, request, context):
        core = await self._core(context)
        try:
            if request.each_on_its_own:
                works, answers = validation.to_works_each(request.works, self.node.check_kinds)
            else:
                works, answers = validation.to_works(request.works), None
                self.node.check_kinds({w.kind for w in works})
        except validation.InvalidWork as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            duplicates = await core.submit(works, each_on_its_own=request.each_on_its_own,
                                           size=request.ByteSize()) if works else []
        except Conflict as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except NotServing as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not accepted: {exc}")
        if answers is None:  # all accepted, or the call failed
            return work_pb2.SubmitWorksResponse(works=[
                work_pb2.SubmitWorkResponse(work_id=w.work_id, duplicate=d) for w, d in zip(works, duplicates)])
        accepted = [_answer(w, d) for w, d in zip(works, duplicates)]
        it = iter(accepted)
        return work_pb2.SubmitWorksResponse(works=[a if a is not None else next(it) for a in answers])

    async def GetWork(self, request, context):
        core = await self._core(context)
        try:
            validation.check_work_id(request.work_id)
            status = await core.status(request.work_id)
        except validation.InvalidWork as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NotServing as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no work {request.work_id!r} (never accepted, or past the retention window)")
        return status

    async def WatchResults(self, request, context):
        core = await self._core(context)
        try:
            async for batch in core.results(request.after_sequence):
                # Flow control bounds what a slow subscriber holds; one that
                # stops reading is dropped rather than kept forever.
                limit = self.node.settings.subscriber_timeout
                try:
                    await asyncio.wait_for(context.write(work_pb2.WatchResultsResponse(
                        results=batch, epoch=core.epoch, cluster_id=core.cluster_id)), limit)
                except asyncio.TimeoutError:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"result subscriber read nothing for {limit:g} s: dropped; "
                                        f"resume with after_sequence={batch[0].sequence - 1}")
        except Forgotten as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
        except NotServing as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"result stream ended: {exc}")

    async def ClusterInfo(self, request, context):
        core = await self._core(context)
        try:
            return await self.node.cluster_info(core)
        except NotServing as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def Connect(self, request_iterator, context):
        core = await self._core(context)
        connection = WorkerConnection()
        reader = asyncio.create_task(self._read_worker(core, connection, request_iterator))
        try:
            while True:
                message = await connection.next()
                if message is None:
                    break
                yield message
        finally:
            reader.cancel()
            core.disconnected(connection)
        if connection.protocol_error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, connection.protocol_error)
        if connection.closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, connection.closed)

    async def _read_worker(self, core: MasterCore, connection: WorkerConnection, request_iterator) -> None:
        try:
            async for message in request_iterator:
                if core.closed is not None:
                    break
                validation.check_worker_message(message, connection.registered)
                if message.HasField("register"):
                    connection.registered = True
                    core.register(connection, message.register)
                if message.HasField("done") or message.HasField("failed"):
                    core.report(connection, message.done.completions, message.failed.failures)
                if message.HasField("request_work"):
                    core.request_work(connection, message.request_work.worker_ids)
        except asyncio.CancelledError:
            raise
        except validation.InvalidWorkerMessage as exc:
            log.warning("worker stream refused: %s", exc)
            connection.protocol_error = str(exc)
        except Exception as exc:  # a broken stream or a refused append
            log.info("worker stream ended: %r", exc)
        connection.close("worker stream ended")
