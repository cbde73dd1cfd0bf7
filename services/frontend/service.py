"""The Frontend: the public, stateless gRPC API. Each call goes to the active
master of the shard its works belong to (one shard unless the cluster has a
shard map) through that shard's proxy stub, which follows failovers within
the deadline; calls about works of several shards are split, sent at once,
and their answers put back in the caller's order."""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from dworkers.common import auth, server, tls, validation
from dworkers.common.auth import AuthSettings
from dworkers.common.errors import DworkersError, NotServing, Overloaded, TimedOut, WrongShard, status_name
from dworkers.common.lifecycle import Once, StopRequest
from dworkers.common.memory import freeze_survivors
from dworkers.common.metrics import FrontendMetrics, ServerMetrics, process_registry, serve_metrics
from dworkers.common.proxy import StreamHandle, build_proxy
from dworkers.common.routing import Shards
from dworkers.common.settings import Contact, Logging, group, setting
from dworkers.common.shards import decode_cursors, encode_cursors
from dworkers.common.tls import ServingTlsSettings, TlsFiles
from dworkers.frontend.awaits import ClientAwaits, ShardAwaits
from dworkers.frontend.batcher import SubmitBatcher
from dworkers.frontend.merged import MergedStreams
from dworkers.frontend.submits import SubmitStream
from dworkers.v1 import frontend_pb2_grpc, work_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "dworkers.v1.Frontend"
SHARD_RECONNECT_SECONDS = 24 * 3600.0  # in a merged result stream, one shard's outage ends nothing
MAX_MERGED_BYTES = 2 * 1024 * 1024 - 64 * 1024  # several shards' result batches in one message (below 2 MiB)
STREAM_SUBMITS = 8  # a SubmitStream's calls on their way at once (its client sends a few)


@dataclass(frozen=True)
class FrontendSettings:
    contact: Contact = group(Contact)
    logging: Logging = group(Logging)
    tls: ServingTlsSettings = group(ServingTlsSettings)
    auth: AuthSettings = group(AuthSettings)
    listen: str = setting("0.0.0.0:7000", "gRPC address to listen on")
    metrics_port: int = setting(9102, "Prometheus /metrics port (0: off)", low=0, high=65535)
    call_timeout: float = setting(10.0, "seconds a call may wait for a master", above=0, high=3600)
    threads: int = setting(64, "threads serving unary calls", low=1, high=10_000)
    max_watchers: int = setting(128, "WatchResults, WaitWorks and AwaitResults streams served at once "
                                "(beyond: RESOURCE_EXHAUSTED); each holds a thread", low=1, high=100_000)
    max_submit_streams: int = setting(128, "SubmitStream streams served at once (beyond: RESOURCE_EXHAUSTED: "
                                           "the SDK then makes calls); each holds two threads", low=1,
                                      high=100_000)
    queued_calls: int = setting(256, "calls waiting for a thread before RESOURCE_EXHAUSTED", low=0, high=100_000)
    shutdown_grace: float = setting(5.0, "seconds in-flight calls may take to finish on SIGTERM", low=0, high=3600)
    subscriber_timeout: float = setting(30.0, "a result subscriber that reads nothing this long is dropped", above=0)
    reflection: bool = setting(False, "serve gRPC server reflection (lists the API to anyone who asks)")
    identity_submit_rate: float = setting(0.0, "works per second one caller (an identity of --access-file) may "
                                               "submit; beyond: RESOURCE_EXHAUSTED (0: no limit)", low=0)
    identity_streams: int = setting(0, "result streams, and SubmitStream streams, one caller may hold open at once "
                                       "(0: no limit but --max-watchers and --max-submit-streams)", low=0,
                                   high=100_000)


class StallWatch:
    """Drops result subscribers that stop reading. A message handed to gRPC
    is sent once the client's flow-control window takes it; a client that
    reads nothing holds the sending thread (and a stream slot) forever, so a
    watchdog cancels any stream whose message waits longer than `timeout`."""

    def __init__(self, timeout: float, on_drop=lambda: None):
        self.timeout = timeout
        self.on_drop = on_drop
        self._lock = threading.Lock()
        self._sending: dict[int, tuple[float, grpc.ServicerContext]] = {}  # stream -> (since, its context)
        threading.Thread(target=self._watch, name="stall-watch", daemon=True).start()

    def sending(self, key: int, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._sending[key] = (time.monotonic(), context)

    def sent(self, key: int) -> None:
        with self._lock:
            self._sending.pop(key, None)

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            now = time.monotonic()
            with self._lock:
                stalled = [(k, c) for k, (since, c) in self._sending.items() if now - since > self.timeout]
                for key, _ in stalled:
                    del self._sending[key]
            for _, context in stalled:
                log.warning("dropping a result subscriber that read nothing for %g s", self.timeout)
                self.on_drop()
                context.cancel()


class StreamSlots:
    """A bound on streams of one sort served at once (each holds a thread)."""

    def __init__(self, count: int, gauge, what: str):
        self.count = count
        self.gauge = gauge
        self.what = what
        self._slots = threading.BoundedSemaphore(count)

    def take(self) -> Once:
        """A slot, or Overloaded; returns what frees it (once)."""
        if not self._slots.acquire(blocking=False):
            raise Overloaded(f"this frontend already serves {self.count} {self.what}; "
                             "use another frontend or retry later")
        self.gauge.inc()
        return Once(self._release)

    def _release(self) -> None:
        self._slots.release()
        self.gauge.dec()


class FrontendService(frontend_pb2_grpc.FrontendServicer):
    def __init__(self, shards: Shards, settings: FrontendSettings, metrics: FrontendMetrics,
                 authorizer: auth.Authorizer | None = None):
        self.shards = shards
        self.proxy = shards.first
        self.settings = settings
        self.authorizer = authorizer  # the same one that checks each call; None: anyone may call
        self._batchers = {0: SubmitBatcher(self.proxy, timeout=settings.call_timeout)}
        self._batchers_lock = threading.Lock()
        self._shard_awaits: dict[int, ShardAwaits] = {}  # WaitWorks calls' results, by shard
        # Calls to several shards at once (each bounded by its caller's deadline).
        self._fan_out = ThreadPoolExecutor(settings.threads, thread_name_prefix="shard-call")
        # Result streams are long-lived: bound them so unary calls keep threads.
        self._watchers = StreamSlots(settings.max_watchers, metrics.result_streams, "result streams")
        self._submitters = StreamSlots(settings.max_submit_streams, metrics.submit_streams, "submit streams")
        # SubmitStream calls on their way (apart from _fan_out: they wait on its shard calls).
        self._stream_submits = ThreadPoolExecutor(settings.threads, thread_name_prefix="stream-submit")
        self.metrics = metrics
        self._stalls = StallWatch(settings.subscriber_timeout, metrics.dropped_subscribers.inc)

    def _timeout(self, context) -> float:
        """The caller's deadline, capped at the frontend's call timeout."""
        remaining = context.time_remaining()
        return self.settings.call_timeout if remaining is None else min(remaining, self.settings.call_timeout)

    def _forward(self, method: str, request, context):
        return self.proxy.call(method, request, timeout=self._timeout(context))

    def close(self) -> None:
        with self._batchers_lock:
            for awaits in self._shard_awaits.values():
                awaits.close()

    def _awaits(self, shard: int) -> ShardAwaits:
        with self._batchers_lock:
            awaits = self._shard_awaits.get(shard)
            if awaits is None:
                awaits = self._shard_awaits[shard] = ShardAwaits(self.shards.proxy(shard), shard)
            return awaits

    def _batcher(self, shard: int) -> SubmitBatcher:
        with self._batchers_lock:
            batcher = self._batchers.get(shard)
            if batcher is None:
                batcher = self._batchers[shard] = SubmitBatcher(self.shards.proxy(shard),
                                                                timeout=self.settings.call_timeout)
            return batcher

    def _rerouted(self, send, context):
        """`send(map)`, again with a newer shard map while a master says a
        work is another shard's (the map here was behind), within the deadline."""
        deadline = time.monotonic() + self._timeout(context)
        while True:
            current = self.shards.map
            try:
                return send(current)
            except (WrongShard, grpc.RpcError) as error:
                if not _wrong_shard(error) or not self.shards.wait_newer(current.version, deadline):
                    raise

    def _each_shard(self, calls: dict[int, Callable[[], Any]]) -> dict[int, Any]:
        """Runs `calls` (shard -> function) at once; their results, or the
        errors they raised, by shard."""
        futures = {shard: self._fan_out.submit(call) for shard, call in calls.items()}
        outcomes = {}
        for shard, future in futures.items():
            try:
                outcomes[shard] = future.result()
            except Exception as error:  # noqa: BLE001 - each caller decides
                outcomes[shard] = error
        return outcomes

    def _parts(self, groups: dict[int, list[int]], part) -> dict[int, Any]:
        """Each shard's part of a call (`part(shard, positions)` makes it),
        at once when there are several; outcomes by shard, a refusal as
        another shard's among them (the others' errors too, when several)."""
        if len(groups) > 1:
            return self._each_shard({shard: part(shard, positions) for shard, positions in groups.items()})
        shard, positions = next(iter(groups.items()))
        try:
            return {shard: part(shard, positions)()}
        except (WrongShard, grpc.RpcError) as error:
            if not _wrong_shard(error):
                raise
            return {shard: error}

    def _on_every_shard(self, method: str, request, context) -> dict[int, Any]:
        deadline = time.monotonic() + self._timeout(context)
        return self._each_shard({shard: partial(_call_by, self.shards.proxy(shard), method, request, deadline)
                                 for shard in range(self.shards.map.shards)})

    def _route(self, work_ids: list[str], deadline: float, part, take) -> None:
        """Sends each shard its part of a call naming works, and again, with a
        newer map, the works a shard refuses as not its own (the map here was
        behind, or their slots are moving), until none is left or `deadline`
        (time.monotonic()) passes. `part(shard, positions)` makes a shard's
        call; `take(positions, outcome)` handles its answer or error and
        returns the positions it refused one by one."""
        todo = list(range(len(work_ids)))
        while todo:
            current = self.shards.map
            groups: dict[int, list[int]] = {}
            for i in todo:
                groups.setdefault(current.shard_of(work_ids[i]), []).append(i)
            outcomes = self._parts(groups, part)
            todo = []
            for shard, positions in groups.items():
                outcome = outcomes[shard]
                todo += positions if _wrong_shard(outcome) else take(positions, outcome)
            if todo and not self.shards.wait_newer(current.version, deadline):
                raise WrongShard(f"{len(todo)} works were refused as another shard's (or their slots are moving), "
                                 "and no newer shard map came in time; retry")
            todo.sort()

    def _by_work(self, method: str, request, context, response_type):
        """A call naming works (CancelWork, RetryWork): each shard gets its
        own works; the answers come back in the request's order. Each shard
        applies its part all or nothing; when one refuses, the call fails
        with its error and what other shards did stays done."""
        work_ids = list(request.work_ids)
        deadline = time.monotonic() + self._timeout(context)
        answers: list = [None] * len(work_ids)

        def part(shard, positions):
            sub = type(request)()
            sub.CopyFrom(request)
            del sub.work_ids[:]
            sub.work_ids.extend(work_ids[i] for i in positions)
            return partial(_call_by, self.shards.proxy(shard), method, sub, deadline)

        def take(positions, outcome) -> list[int]:
            if isinstance(outcome, Exception):
                raise outcome
            for i, work in zip(positions, outcome.works):
                answers[i] = work
            return []

        self._route(work_ids, deadline, part, take)
        return response_type(works=answers)

    def _validated(self, request: work_pb2.SubmitWorksRequest) -> work_pb2.SubmitWorksRequest:
        # Ids are fixed here, before any retry, so a retried call stays idempotent.
        batch = work_pb2.SubmitWorksRequest()
        batch.CopyFrom(request)
        for work in batch.works:
            if not work.work_id:
                work.work_id = validation.new_work_id()
        if batch.each_on_its_own:  # the master answers each work; only the call's own limits apply here
            validation.to_works_each(batch.works)
        else:
            validation.to_works(batch.works)
        return batch

    def SubmitWork(self, request, context):
        work = self._validated(work_pb2.SubmitWorksRequest(works=[request])).works[0]
        timeout = self._timeout(context)
        try:
            return self._rerouted(lambda current: self._batcher(current.shard_of(work.work_id)).submit(
                work, timeout=timeout + 1.0), context)
        except TimeoutError:
            raise TimedOut(f"not accepted within {timeout:g} s") from None

    def SubmitWorks(self, request, context):
        """Works of several shards: each shard accepts its part. With
        each_on_its_own every work gets its own answer; otherwise each shard
        takes its part all or nothing, and if one refuses the call fails with
        its error while the parts other shards accepted stay accepted
        (submitting the same batch again is idempotent: their ids are known)."""
        return self._submit_works(self._validated(request), self._timeout(context))

    def SubmitStream(self, request_iterator, context):
        """SubmitWorks calls over one stream, within the bound on submit
        streams: each is sent on while earlier ones are on their way
        (STREAM_SUBMITS at most); each gets its answer, or its refusal (the
        status SubmitWorks would fail with), in order."""
        identity = self.authorizer.identify(context) if self.authorizer is not None else None
        yield from self._stream(context, lambda handle: self._submit_answers(request_iterator, identity, handle),
                                self._submitters)

    def _submit_answers(self, requests, identity: auth.Identity | None, handle: StreamHandle):
        """A call alone on the stream is answered from this (the handler's)
        thread, a hand-over less; calls sent while others are on their way
        go to the pool at once."""
        answers: queue.SimpleQueue = queue.SimpleQueue()  # (batch, deadline) to answer here, answers' futures; None
        room = threading.Semaphore(STREAM_SUBMITS)
        handle.attach(_Ending(answers))  # the client left
        limits = self.authorizer.limits if self.authorizer is not None and identity is not None else None
        lock = threading.Lock()
        in_flight = 0  # read and not answered yet

        def read() -> None:
            nonlocal in_flight
            try:
                for request in requests:
                    while not room.acquire(timeout=1.0):
                        if handle.cancelled:
                            return
                    deadline = time.monotonic() + self.settings.call_timeout
                    with lock:
                        alone = not in_flight
                        in_flight += 1
                    try:
                        if limits is not None:
                            limits.take_submits(identity, len(request.works))
                        batch = self._validated(request)
                    except DworkersError as refused:
                        answers.put(_answered(_refusal(refused)))
                        continue
                    if alone:
                        answers.put((batch, deadline))
                    else:
                        answers.put(self._stream_submits.submit(self._stream_answer, batch, deadline))
            except Exception:  # noqa: BLE001 - the client went away: its stream ends with it
                pass
            answers.put(None)

        threading.Thread(target=read, name="submit-requests", daemon=True).start()
        while (item := answers.get()) is not None:
            try:
                answer = self._stream_answer(*item) if isinstance(item, tuple) else item.result()
            finally:
                with lock:
                    in_flight -= 1
                room.release()
            yield answer

    def _stream_answer(self, batch: work_pb2.SubmitWorksRequest, deadline: float) -> work_pb2.SubmitWorksResponse:
        """A SubmitStream call's answer, or its refusal (the status SubmitWorks would fail with)."""
        try:
            return self._submit_works(batch, deadline - time.monotonic())
        except (DworkersError, grpc.RpcError) as refused:
            return _refusal(refused)

    def _submit_works(self, batch: work_pb2.SubmitWorksRequest, timeout: float) -> work_pb2.SubmitWorksResponse:
        deadline = time.monotonic() + timeout
        answers: list = [None] * len(batch.works)

        def part(shard, positions):
            sub = work_pb2.SubmitWorksRequest(works=[batch.works[i] for i in positions],
                                              each_on_its_own=batch.each_on_its_own)
            return partial(_submit_by, self._batcher(shard).stream, sub, deadline)

        def take(positions, outcome) -> list[int]:
            if isinstance(outcome, Exception):
                if not batch.each_on_its_own or not isinstance(outcome, DworkersError | grpc.RpcError):
                    raise outcome
                code, message = _status(outcome)
                for i in positions:
                    answers[i] = work_pb2.SubmitWorkResponse(work_id=batch.works[i].work_id, code=code,
                                                             message=message)
                return []
            again = []
            for i, answer in zip(positions, outcome.works):
                if answer.code == grpc.StatusCode.ABORTED.value[0]:
                    again.append(i)  # refused as another shard's, on its own
                else:
                    answers[i] = answer
            return again

        self._route([w.work_id for w in batch.works], deadline, part, take)
        return work_pb2.SubmitWorksResponse(works=answers)

    def GetWork(self, request, context):
        timeout = self._timeout(context)
        return self._rerouted(lambda current: self.shards.proxy(current.shard_of(request.work_id)).call(
            "GetWork", request, timeout=timeout), context)

    def ClusterInfo(self, request, context):
        if not self.shards.several:
            return self._forward("ClusterInfo", request, context)
        return self._cluster_info(request, context)

    def RetryWork(self, request, context):
        validation.check_work_ids(request.work_ids, "retry")
        return self._by_work("RetryWork", request, context, work_pb2.RetryWorkResponse)

    def ListWorks(self, request, context):
        validation.check_list(request)
        if not self.shards.several:
            return self._forward("ListWorks", request, context)
        return self._list_works(request, context)

    def SetRateLimit(self, request, context):
        """Every shard's master applies it (each starts works of the kind at
        this rate at most, so the cluster's own rate is at most shards x rate)."""
        validation.check_rate_limit(request)
        current = self.shards.map
        if current.shards == 1:
            return self._forward("SetRateLimit", request, context)
        outcomes = self._on_every_shard("SetRateLimit", request, context)
        for outcome in outcomes.values():
            if isinstance(outcome, Exception):
                raise outcome
        return outcomes[0]

    def CancelWork(self, request, context):
        validation.check_work_ids(request.work_ids, "cancel")
        return self._by_work("CancelWork", request, context, work_pb2.CancelWorkResponse)

    def _cluster_info(self, request, context) -> work_pb2.ClusterInfoResponse:
        """Every shard's figures summed; workers (which serve every shard) and
        kinds listed once; shard 0's master and standbys; each shard's own
        line in `shards`. A shard that does not answer is listed with why."""
        current = self.shards.map
        outcomes = self._on_every_shard("ClusterInfo", request, context)
        if isinstance(outcomes[0], Exception):
            raise outcomes[0]
        info = work_pb2.ClusterInfoResponse()
        info.CopyFrom(outcomes[0])
        info.ClearField("shard")
        kinds = {k.kind: k for k in info.kinds}
        workers = {w.worker_id for w in info.workers}
        for shard in range(current.shards):
            outcome = outcomes[shard]
            if isinstance(outcome, Exception):
                code, message = _status(outcome)
                info.shards.add(shard=shard, map_version=current.version, slots=current.slot_count(shard),
                                error=f"{status_name(code)}: {message}"[:500])
                continue
            info.shards.append(outcome.shard)
            if shard == 0:
                continue
            for field in ("pending", "in_progress", "done", "failed", "scheduled", "cancelled",
                          "pending_without_worker", "unfinished_bytes", "retained_result_bytes"):
                setattr(info, field, getattr(info, field) + getattr(outcome, field))
            info.oldest_pending_seconds = max(info.oldest_pending_seconds, outcome.oldest_pending_seconds)
            for kind in outcome.kinds:
                known = kinds.get(kind.kind)
                if known is None:
                    kinds[kind.kind] = info.kinds.add()
                    kinds[kind.kind].CopyFrom(kind)
                else:
                    known.pending += kind.pending
            for worker in outcome.workers:
                if worker.worker_id not in workers and len(info.workers) < len(outcome.workers) + 1000:
                    workers.add(worker.worker_id)
                    info.workers.append(worker)
        return info

    def _list_works(self, request, context) -> work_pb2.ListWorksResponse:
        """Shard after shard: the page token names the shard and its own token."""
        current = self.shards.map
        shard, token = 0, request.page_token
        if token:
            found = re.fullmatch(r"s(\d{1,3}):(.*)", token, re.ASCII | re.DOTALL)
            if found is None or int(found[1]) >= current.shards:
                raise validation.InvalidWork("page_token: not a token ListWorks gave (pass it back as it came)")
            shard, token = int(found[1]), found[2]
        sub = work_pb2.ListWorksRequest()
        sub.CopyFrom(request)
        sub.page_token = token
        page = self.shards.proxy(shard).call("ListWorks", sub, timeout=self._timeout(context))
        if page.next_page_token:
            page.next_page_token = f"s{shard}:{page.next_page_token}"
        elif shard + 1 < current.shards:
            page.next_page_token = f"s{shard + 1}:"
        return page

    def WhoAmI(self, request, context):
        if self.authorizer is None:
            return work_pb2.WhoAmIResponse(roles=auth.CLIENT_ROLES)
        identity = self.authorizer.identify(context)
        roles = [role for role in auth.CLIENT_ROLES if identity.may(role)]
        return work_pb2.WhoAmIResponse(name=identity.name, roles=roles, access_checked=True)

    def WatchResults(self, request, context):
        cursors = decode_cursors(request.resume_token) if request.resume_token else None
        if cursors is None and not self.shards.several:
            yield from self._stream(context, lambda handle: self.proxy.watch_results(request.after_sequence,
                                                                                      handle=handle))
        else:
            # after_sequence is shard 0's (the sequences of a cluster before it
            # grew shards): its subscribers go on, and get the others' too.
            start = cursors if cursors is not None else {0: request.after_sequence}
            yield from self._stream(context, lambda handle: self._merged_results(start, handle))
        if context.is_active():  # the master's stream cannot end: say so rather than end with OK
            raise NotServing("the result stream ended; resume after the last sequence")

    def _merged_results(self, cursors: dict[int, int], handle: StreamHandle):
        """Every shard's results (shards the map gains meanwhile included),
        each response with the token that resumes after it."""
        cursors = dict(cursors)
        merged = MergedStreams()
        handle.attach(merged)
        watched: set[int] = set()

        def watch_new_shards(current) -> None:
            for shard in range(current.shards):
                if shard not in watched:
                    watched.add(shard)
                    # A shard without a master (failing over, or added but not
                    # started yet) is waited for, while the others' results flow.
                    merged.add(shard, lambda h, shard=shard: self.shards.proxy(shard).watch_results(
                        cursors.get(shard, 0), reconnect_timeout=SHARD_RECONNECT_SECONDS, handle=h))

        watch_new_shards(self.shards.map)
        if self.shards.follower is not None:
            self.shards.follower.on_change(watch_new_shards)
        try:
            for first in merged:
                # With what else came meanwhile: one message, not one per shard.
                response = work_pb2.WatchResultsResponse()
                for shard, batch in [first, *merged.ready(MAX_MERGED_BYTES - first[1].ByteSize())]:
                    for result in batch.results:
                        result.shard = shard
                    cursors[shard] = batch.results[-1].sequence
                    response.results.extend(batch.results)
                    response.epoch, response.cluster_id = batch.epoch, batch.cluster_id
                response.resume_token = encode_cursors(cursors)
                yield response
        finally:
            if self.shards.follower is not None:
                self.shards.follower.remove_listener(watch_new_shards)
            merged.close()

    def WaitWorks(self, request, context):
        work_ids = validation.check_wait(request)
        yield from self._stream(context, lambda handle: self._waits(work_ids, handle))

    def AwaitResults(self, request_iterator, context):
        yield from self._stream(context, lambda handle: ClientAwaits(self.shards, self._awaits).responses(
            request_iterator, handle))

    def _waits(self, work_ids: list[str], handle: StreamHandle):
        """The results of `work_ids` from the shards that hold them; when a
        shard says some are not its own (they moved), those not seen yet are
        asked for again with the newer shard map."""
        remaining = dict.fromkeys(work_ids)
        while remaining:
            current = self.shards.map
            try:
                for batch in self._merged_waits(list(remaining), handle):
                    for result in batch.results:
                        remaining.pop(result.work_id, None)
                    yield batch
                return
            except (WrongShard, grpc.RpcError) as error:
                # (tried again for as long as the caller waits: a move ends when its running works did)
                if handle.cancelled or not _wrong_shard(error) or not self.shards.wait_newer(current.version, math.inf):
                    raise

    def _merged_waits(self, work_ids: list[str], handle: StreamHandle):
        groups = self.shards.split(work_ids)
        if len(groups) == 1:
            shard = next(iter(groups))
            for batch in self._awaits(shard).wait(work_ids, handle):
                for result in batch.results:
                    result.shard = shard
                yield batch
            return
        merged = MergedStreams()
        handle.attach(merged)
        for shard, positions in groups.items():
            ids = [work_ids[i] for i in positions]
            merged.add(shard, lambda h, shard=shard, ids=ids: self._awaits(shard).wait(ids, h))
        try:
            for shard, batch in merged:
                for result in batch.results:
                    result.shard = shard
                yield batch
        finally:
            merged.close()

    def _stream(self, context, open_results, slots: StreamSlots | None = None):
        """Relays a stream (results from the master, by default), within its bound on streams."""
        release = (slots or self._watchers).take()
        handle = StreamHandle()
        # The client may have gone already: then no callback will ever run.
        if not (context.add_callback(release) and context.add_callback(handle.cancel)):
            release()
            return
        key = id(handle)
        results = open_results(handle)
        try:  # the master's errors (e.g. OUT_OF_RANGE) pass on as they are
            for batch in results:
                if not context.is_active():
                    return
                self._stalls.sending(key, context)
                yield batch
                self._stalls.sent(key)
        finally:
            self._stalls.sent(key)
            release()
            handle.cancel()
            results.close()


def _answered(response) -> Future:
    done: Future = Future()
    done.set_result(response)
    return done


def _refusal(error: Exception) -> work_pb2.SubmitWorksResponse:
    status = server.status_of(error)
    if status is None:  # a bug: the stream ends with it
        raise error
    code, message, _ = status
    return work_pb2.SubmitWorksResponse(code=code.value[0], message=message)


class _Ending:
    """Ends a stream of answers when its client leaves."""

    def __init__(self, answers: queue.SimpleQueue):
        self.answers = answers

    def cancel(self) -> None:
        self.answers.put(None)


def _call_by(proxy, method: str, request, deadline: float):
    """A call that may wait in the fan-out pool: its timeout counts from the caller's deadline."""
    return proxy.call(method, request, timeout=_time_left(deadline, method))


def _submit_by(stream: SubmitStream, request, deadline: float):
    """A shard's part of a SubmitWorks call, over its stream of submissions."""
    return stream.call(request, timeout=_time_left(deadline, "SubmitWorks"))


def _time_left(deadline: float, method: str) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimedOut(f"{method}: no time left for this shard")
    return remaining


def _wrong_shard(error) -> bool:
    """A master said the work is another shard's: the map here is behind."""
    return isinstance(error, WrongShard) or (isinstance(error, grpc.RpcError)
                                             and error.code() == grpc.StatusCode.ABORTED)


def _status(error: Exception) -> tuple[int, str]:
    """The status code number and message a failed call to a shard ends with."""
    if isinstance(error, grpc.RpcError):
        return error.code().value[0], error.details() or ""
    if isinstance(error, DworkersError):
        return grpc.StatusCode[error.status].value[0], error.message
    return grpc.StatusCode.UNKNOWN.value[0], repr(error)


def serve(shards: Shards, settings: FrontendSettings, stop: StopRequest, registry,
          ready: threading.Event | None = None, tls_files: TlsFiles | None = None) -> None:
    threads = settings.threads + settings.max_watchers + settings.max_submit_streams
    authorizer = auth.authorizer(settings.auth, auth.FRONTEND_METHODS, limits=auth.IdentityLimits(
        settings.identity_submit_rate, settings.identity_streams))
    service = FrontendService(shards, settings, FrontendMetrics(registry), authorizer)
    grpc_server, health, _port = server.build(
        [(service, frontend_pb2_grpc.add_FrontendServicer_to_server, SERVICE_NAME)],
        settings.listen, ServerMetrics(registry), reflection_on=settings.reflection, threads=threads,
        maximum_concurrent_rpcs=threads + settings.queued_calls, tls=tls_files, authorizer=authorizer)
    grpc_server.start()
    for name in ("", SERVICE_NAME):
        health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("frontend listening on %s", settings.listen)
    freeze_survivors()
    if ready is not None:
        ready.set()
    stop.wait()
    log.info("frontend shutting down")
    health.enter_graceful_shutdown()
    grpc_server.stop(settings.shutdown_grace).wait()
    service.close()
    shards.close()


def main(settings: FrontendSettings, stop: StopRequest) -> None:
    """Serves the public API until a stop request."""
    registry = process_registry()
    serve_metrics(settings.metrics_port, registry)
    tls_files = tls.serving_files(settings.tls, "a frontend")
    serve(Shards(build_proxy(settings.contact, timeout=settings.call_timeout, tls=tls_files)), settings, stop,
          registry, tls_files=tls_files)
