"""The Master gRPC service: the calls of frontends, and the worker
protocol's stream (WorkerConnection: what waits to be sent to one worker
process)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import grpc

from dworkers.common import validation
from dworkers.common.errors import (
    Conflict,
    CutOff,
    DworkersError,
    InvalidInput,
    NotFound,
    NotServing,
    NotTheMaster,
    Overloaded,
    PermissionDenied,
    ProtocolError,
    WrongShard,
)
from dworkers.common.validation import MAX_STREAM_MESSAGE_BYTES
from dworkers.common.wire import CLUSTER_KEY, EPOCH_KEY
from dworkers.master.awaits import AwaitStream
from dworkers.master.shell import MasterShell
from dworkers.v1 import master_pb2, master_pb2_grpc, work_pb2

log = logging.getLogger(__name__)

OUTBOX_MESSAGES = 10_000  # queued for one worker process before it is dropped...
OUTBOX_BYTES = 256 * 1024 * 1024  # ...or this many bytes (hand-outs of 1,024 slots fit)
STREAM_SUBMITS = 64  # SubmitStream requests being accepted at once (a frontend's calls in flight)


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
        self.denied = ""  # why the worker's identity may not do what it asked
        self.allowed_kinds: frozenset[str] | None = None  # its identity's kinds, if limited
        self.identity = ""  # who it is, when an access file is checked: its slots are named within it

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
        taken: list[master_pb2.MasterMessage] = []
        total = 0
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
    if message.HasField("cancel"):
        into.cancel.attempt_tokens.extend(message.cancel.attempt_tokens)
    if message.HasField("work_is_ready"):
        into.work_is_ready.SetInParent()
    if message.HasField("withdrawn"):
        into.withdrawn.worker_ids.extend(message.withdrawn.worker_ids)


async def _write(context, message, limit: float, dropped: str) -> None:
    """Sends a message the caller must take within `limit` seconds: flow
    control bounds what a slow reader holds, and one that reads nothing is
    dropped (Overloaded: `dropped`) rather than kept for ever."""
    try:
        await asyncio.wait_for(context.write(message), limit)
    except asyncio.TimeoutError:
        raise Overloaded(dropped) from None


def _ignore_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _answer(work: work_pb2.Work, outcome) -> work_pb2.SubmitWorkResponse:
    if isinstance(outcome, Conflict):
        return work_pb2.SubmitWorkResponse(work_id=work.work_id, code=grpc.StatusCode.ALREADY_EXISTS.value[0],
                                           message=str(outcome))
    return work_pb2.SubmitWorkResponse(work_id=work.work_id, duplicate=outcome)


def _check_kinds_allowed(connection: WorkerConnection, register: master_pb2.RegisterWorker) -> None:
    """A worker identity limited to some kinds registers slots for those only."""
    allowed = connection.allowed_kinds
    if allowed is None:
        return
    others = sorted({*register.kinds, *(d.kind for d in register.defaults)} - allowed)
    if others:
        raise PermissionDenied(f"this worker may run only {', '.join(sorted(allowed))}; not "
                               f"{', '.join(others[:10])}{' ...' if len(others) > 10 else ''}")


class MasterService(master_pb2_grpc.MasterServicer):
    """Thin handlers: check, call the shell, shape the answer. Errors are
    raised (services/common/errors.py); the server's interceptor turns them
    into statuses."""

    def __init__(self, node) -> None:
        self.node = node  # the MasterNode: who is master, the shell, known kinds

    def _shell(self, context) -> MasterShell:
        if not self.node.in_contact_with_zookeeper():
            raise CutOff("this backend is cut off from ZooKeeper: no master can be sure it leads now")
        shell = self.node.shell
        if shell is None or shell.closed is not None:
            address = self.node.master_address()
            if address and not self.node.is_leader():
                raise NotTheMaster(address, self.node.master_epoch())
            raise NotServing("no active master here yet (electing or recovering)")
        shell.check_serving()
        context.set_trailing_metadata(((EPOCH_KEY, str(shell.epoch)), (CLUSTER_KEY, shell.cluster_id)))
        return shell

    async def SubmitWorks(self, request, context):
        shell = self._shell(context)
        now = time.time()  # delays become Unix times here, where they are journaled
        if request.each_on_its_own:
            works, answers = validation.to_works_each(request.works, self.node.check_kinds, self.node.kinds.defaults,
                                                      now)
        else:
            works, answers = validation.to_works(request.works, self.node.kinds.defaults, now), None
            self.node.check_kinds({w.kind for w in works})
        works, answers = self._owned(works, answers)
        duplicates = await shell.submit(works, request.each_on_its_own, request.ByteSize()) if works else []
        if answers is None:  # all accepted (or the call failed)
            return work_pb2.SubmitWorksResponse(works=[
                work_pb2.SubmitWorkResponse(work_id=w.work_id, duplicate=d) for w, d in zip(works, duplicates)])
        accepted = iter([_answer(w, d) for w, d in zip(works, duplicates)])
        return work_pb2.SubmitWorksResponse(works=[a if a is not None else next(accepted) for a in answers])

    async def SubmitStream(self, request_iterator, context):
        """SubmitWorks over one stream: requests are accepted concurrently,
        answered in order, each with its answer or its refusal; a master
        that stops serving ends the stream (its callers go elsewhere)."""
        shell = self._shell(context)
        await context.send_initial_metadata(((EPOCH_KEY, str(shell.epoch)), (CLUSTER_KEY, shell.cluster_id)))
        answers: asyncio.Queue = asyncio.Queue(STREAM_SUBMITS)  # answers' tasks, in order; None: the end
        reader = asyncio.create_task(self._read_submits(request_iterator, context, answers))
        limit = self.node.settings.subscriber_timeout
        try:
            while (answer := await answers.get()) is not None:
                await _write(context, await answer, limit, f"caller read nothing for {limit:g} s: dropped")
        finally:
            reader.cancel()

    async def _read_submits(self, request_iterator, context, answers: asyncio.Queue) -> None:
        try:
            async for request in request_iterator:
                task = asyncio.ensure_future(self._stream_answer(request, context))
                task.add_done_callback(_ignore_outcome)  # a stream that ended leaves it to nobody
                await answers.put(task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken stream: what was read is answered
            log.info("submit stream ended: %r", exc)
        await answers.put(None)

    async def _stream_answer(self, request, context) -> work_pb2.SubmitWorksResponse:
        """SubmitWorks's answer, or its refusal; raises what says this
        master does not serve (the stream ends with it, hints and all)."""
        try:
            return await self.SubmitWorks(request, context)
        except (NotServing, NotTheMaster):
            raise
        except DworkersError as refused:
            return work_pb2.SubmitWorksResponse(code=grpc.StatusCode[refused.status].value[0],
                                                message=refused.message)

    def _owned(self, works: list, answers: list | None) -> tuple[list, list | None]:
        """Works of another shard's slots are refused (ABORTED: the caller
        routes them again with the current shard map): each on its own, or
        the whole call."""
        follower = self.node.shard_map
        if not follower.loaded:  # a guess of the map would accept works of other shards
            raise NotServing(f"this backend cannot read the shard map: {follower.error or 'not read yet'}")
        owns = self.node.takes
        if all(owns(w.work_id) for w in works):
            return works, answers
        if answers is None:
            raise next(self.node.wrong_shard(w.work_id) for w in works if not owns(w.work_id))
        kept, judged, pending = [], [], iter(works)
        for answer in answers:
            if answer is None:
                work = next(pending)
                if owns(work.work_id):
                    kept.append(work)
                else:
                    wrong = self.node.wrong_shard(work.work_id)
                    answer = work_pb2.SubmitWorkResponse(work_id=work.work_id,
                                                         code=grpc.StatusCode.ABORTED.value[0], message=str(wrong))
            judged.append(answer)
        return kept, judged

    def _taken(self, work_ids) -> None:
        """Calls that change works (or wait for them) go to the shard that
        takes them: another shard's, or one moving away, is refused (ABORTED:
        the caller asks again with the current shard map)."""
        for work_id in work_ids:
            if not self.node.takes(work_id):
                raise self.node.wrong_shard(work_id)

    async def GetWork(self, request, context):
        shell = self._shell(context)
        validation.check_work_id(request.work_id)
        if not self.node.owns(request.work_id):
            raise self.node.wrong_shard(request.work_id)
        status = await shell.status(request.work_id)
        if status is None:
            if not self.node.takes(request.work_id):  # moving: the target may hold it already
                raise self.node.wrong_shard(request.work_id)
            raise NotFound(f"no work {request.work_id!r} (never accepted, or past the retention window)")
        return status

    async def WatchResults(self, request, context):
        shell = self._shell(context)
        limit = self.node.settings.subscriber_timeout
        async for batch in shell.results(request.after_sequence):
            # Flow control bounds what a slow subscriber holds; one that
            # stops reading is dropped rather than kept for ever.
            await _write(context, work_pb2.WatchResultsResponse(
                results=batch, epoch=shell.epoch, cluster_id=shell.cluster_id), limit,
                f"result subscriber read nothing for {limit:g} s: dropped; "
                f"resume with after_sequence={batch[0].sequence - 1}")

    async def WaitWorks(self, request, context):
        shell = self._shell(context)
        work_ids = validation.check_wait(request)
        self._taken(work_ids)
        limit = self.node.settings.subscriber_timeout
        async for batch in shell.wait_works(work_ids):
            await _write(context, work_pb2.WatchResultsResponse(
                results=batch, epoch=shell.epoch, cluster_id=shell.cluster_id), limit,
                f"caller read nothing for {limit:g} s: dropped; call again")

    async def AwaitResults(self, request_iterator, context):
        stream = AwaitStream(self._shell(context), self.node.takes, self.node.wrong_shard)
        reader = asyncio.create_task(self._read_awaits(stream, request_iterator))
        limit = self.node.settings.subscriber_timeout
        try:
            await context.write(work_pb2.AwaitResponse(epoch=stream.shell.epoch, cluster_id=stream.shell.cluster_id))
            async for response in stream.responses():
                await _write(context, response, limit, f"caller read nothing for {limit:g} s: dropped; call again")
        finally:
            reader.cancel()
            stream.close()

    @staticmethod
    async def _read_awaits(stream: AwaitStream, request_iterator) -> None:
        try:
            async for request in request_iterator:
                stream.request(request)
        except asyncio.CancelledError:
            raise
        except (InvalidInput, NotServing) as exc:
            stream.end(exc)
            return
        except Exception as exc:  # noqa: BLE001 - a broken stream
            log.info("await stream ended: %r", exc)
        stream.end()

    async def CancelWork(self, request, context):
        shell = self._shell(context)
        work_ids = validation.check_work_ids(request.work_ids, "cancel")
        self._taken(work_ids)
        return work_pb2.CancelWorkResponse(works=await shell.cancel(work_ids))

    async def RetryWork(self, request, context):
        shell = self._shell(context)
        work_ids = validation.check_work_ids(request.work_ids, "retry")
        self._taken(work_ids)
        return work_pb2.RetryWorkResponse(works=await shell.retry(work_ids))

    async def ListWorks(self, request, context):
        shell = self._shell(context)
        validation.check_list(request)
        return await shell.list_works(request.state, request.kind, request.page_token, request.page_size)

    async def SetRateLimit(self, request, context):
        shell = self._shell(context)
        per_second = validation.check_rate_limit(request)
        self.node.kinds.set_rate_limit(request.kind, per_second)
        shell.rate_limits_changed()
        return self.node.kinds.kind_info(request.kind)

    async def ClusterInfo(self, request, context):
        return await self.node.cluster_info(self._shell(context))

    async def ImportWorks(self, request, context):
        """A part of a move's works, from the source shard's master."""
        shell = self._shell(context)
        current = self.node.shard_map.current
        move = current.moving
        if move is None or move.key != request.move_key or move.target != self.node.settings.shard \
                or move.source != request.source_shard:
            raise WrongShard(f"no move {request.move_key!r} to shard {self.node.settings.shard} in shard map "
                             f"version {current.version}")
        validation.check_import(request, move)
        return master_pb2.ImportWorksResponse(imported_up_to=await shell.import_works(request))

    async def Connect(self, request_iterator, context):
        shell = self._shell(context)
        connection = WorkerConnection()
        identity = self.node.authorizer.identify(context) if self.node.authorizer is not None else None
        if identity is not None:
            connection.allowed_kinds, connection.identity = identity.kinds, identity.name
        reader = asyncio.create_task(self._read_worker(shell, connection, request_iterator))
        try:
            while True:
                message = await connection.next()
                if message is None:
                    break
                yield message
        finally:
            reader.cancel()
            shell.disconnected(connection)
        if connection.protocol_error:
            raise ProtocolError(connection.protocol_error)
        if connection.denied:
            raise PermissionDenied(connection.denied)
        if connection.closed:
            raise NotServing(connection.closed)

    async def _read_worker(self, shell: MasterShell, connection: WorkerConnection, request_iterator) -> None:
        try:
            async for message in request_iterator:
                if shell.closed is not None:
                    break
                validation.check_worker_message(message, connection.registered)
                if message.HasField("register"):
                    _check_kinds_allowed(connection, message.register)
                    connection.registered = True
                    shell.register(connection, message.register)
                if message.HasField("withdraw_work"):  # before reports free room it would fill
                    shell.withdraw_work(connection, message.withdraw_work.worker_ids)
                if message.HasField("heartbeats"):
                    shell.heartbeat(connection, message.heartbeats.heartbeats)
                if message.HasField("done") or message.HasField("failed"):
                    shell.report(connection, message.done.completions, message.failed.failures)
                if message.HasField("request_work"):
                    shell.request_work(connection, message.request_work.worker_ids)
        except asyncio.CancelledError:
            raise
        except ProtocolError as exc:
            log.warning("worker stream refused: %s", exc)
            connection.protocol_error = str(exc)
        except PermissionDenied as exc:
            log.warning("worker stream refused: %s", exc)
            connection.denied = str(exc)
        except Exception as exc:  # a broken stream
            log.info("worker stream ended: %r", exc)
        connection.close("worker stream ended")
