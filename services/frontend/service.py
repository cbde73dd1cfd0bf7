"""The Frontend: the public, stateless gRPC API. Each call goes to the active
master through the proxy stub, which follows failovers within the deadline."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from dworkers.common import auth, server, tls, validation
from dworkers.common.auth import AuthSettings
from dworkers.common.errors import NotServing, Overloaded, TimedOut
from dworkers.common.lifecycle import Once, StopRequest
from dworkers.common.memory import freeze_survivors
from dworkers.common.metrics import FrontendMetrics, ServerMetrics, process_registry, serve_metrics
from dworkers.common.proxy import MasterProxy, StreamHandle, build_proxy
from dworkers.common.settings import Contact, Logging, group, setting
from dworkers.common.tls import ServingTlsSettings, TlsFiles
from dworkers.frontend.batcher import SubmitBatcher
from dworkers.v1 import frontend_pb2_grpc, work_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "dworkers.v1.Frontend"


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
    max_watchers: int = setting(128, "WatchResults and WaitWorks streams served at once (beyond: "
                                "RESOURCE_EXHAUSTED); each holds a thread", low=1, high=100_000)
    queued_calls: int = setting(256, "calls waiting for a thread before RESOURCE_EXHAUSTED", low=0, high=100_000)
    shutdown_grace: float = setting(5.0, "seconds in-flight calls may take to finish on SIGTERM", low=0, high=3600)
    subscriber_timeout: float = setting(30.0, "a result subscriber that reads nothing this long is dropped", above=0)
    reflection: bool = setting(False, "serve gRPC server reflection (lists the API to anyone who asks)")
    identity_submit_rate: float = setting(0.0, "works per second one caller (an identity of --access-file) may "
                                               "submit; beyond: RESOURCE_EXHAUSTED (0: no limit)", low=0)
    identity_streams: int = setting(0, "WatchResults and WaitWorks streams one caller may hold open at once "
                                       "(0: no limit but --max-watchers)", low=0, high=100_000)


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


class FrontendService(frontend_pb2_grpc.FrontendServicer):
    def __init__(self, proxy: MasterProxy, settings: FrontendSettings, metrics: FrontendMetrics,
                 authorizer: auth.Authorizer | None = None):
        self.proxy = proxy
        self.settings = settings
        self.authorizer = authorizer  # the same one that checks each call; None: anyone may call
        self.batcher = SubmitBatcher(proxy, timeout=settings.call_timeout)
        # Result streams are long-lived: bound them so unary calls keep threads.
        self._watchers = threading.BoundedSemaphore(settings.max_watchers)
        self.metrics = metrics
        self._stalls = StallWatch(settings.subscriber_timeout, metrics.dropped_subscribers.inc)

    def _timeout(self, context) -> float:
        """The caller's deadline, capped at the frontend's call timeout."""
        remaining = context.time_remaining()
        return self.settings.call_timeout if remaining is None else min(remaining, self.settings.call_timeout)

    def _forward(self, method: str, request, context):
        return self.proxy.call(method, request, timeout=self._timeout(context))

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
            return self.batcher.submit(work, timeout=timeout + 1.0)
        except TimeoutError:
            raise TimedOut(f"not accepted within {timeout:g} s") from None

    def SubmitWorks(self, request, context):
        return self._forward("SubmitWorks", self._validated(request), context)

    def GetWork(self, request, context):
        return self._forward("GetWork", request, context)

    def ClusterInfo(self, request, context):
        return self._forward("ClusterInfo", request, context)

    def RetryWork(self, request, context):
        validation.check_work_ids(request.work_ids, "retry")
        return self._forward("RetryWork", request, context)

    def ListWorks(self, request, context):
        validation.check_list(request)
        return self._forward("ListWorks", request, context)

    def SetRateLimit(self, request, context):
        validation.check_rate_limit(request)
        return self._forward("SetRateLimit", request, context)

    def CancelWork(self, request, context):
        validation.check_work_ids(request.work_ids, "cancel")
        return self._forward("CancelWork", request, context)

    def WhoAmI(self, request, context):
        if self.authorizer is None:
            return work_pb2.WhoAmIResponse(roles=auth.CLIENT_ROLES)
        identity = self.authorizer.identify(context)
        roles = [role for role in auth.CLIENT_ROLES if identity.may(role)]
        return work_pb2.WhoAmIResponse(name=identity.name, roles=roles, access_checked=True)

    def _release_watcher(self) -> None:
        self._watchers.release()
        self.metrics.result_streams.dec()

    def WatchResults(self, request, context):
        yield from self._stream(context, lambda handle: self.proxy.watch_results(request.after_sequence,
                                                                                  handle=handle))
        if context.is_active():  # the master's stream cannot end: say so rather than end with OK
            raise NotServing("the result stream ended; resume after the last sequence")

    def WaitWorks(self, request, context):
        work_ids = validation.check_wait(request)
        yield from self._stream(context, lambda handle: self.proxy.wait_works(work_ids, handle=handle))

    def _stream(self, context, open_results):
        """Relays a result stream from the master, within the bound on streams."""
        if not self._watchers.acquire(blocking=False):
            raise Overloaded(f"this frontend already serves {self.settings.max_watchers} result streams; "
                             "use another frontend or retry later")
        self.metrics.result_streams.inc()
        release = Once(self._release_watcher)
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


def serve(proxy: MasterProxy, settings: FrontendSettings, stop: StopRequest, registry,
          ready: threading.Event | None = None, tls_files: TlsFiles | None = None) -> None:
    threads = settings.threads + settings.max_watchers
    authorizer = auth.authorizer(settings.auth, auth.FRONTEND_METHODS, limits=auth.IdentityLimits(
        settings.identity_submit_rate, settings.identity_streams))
    grpc_server, health, _port = server.build(
        [(FrontendService(proxy, settings, FrontendMetrics(registry), authorizer),
          frontend_pb2_grpc.add_FrontendServicer_to_server, SERVICE_NAME)],
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
    proxy.close()


def main(settings: FrontendSettings, stop: StopRequest) -> None:
    """Serves the public API until a stop request."""
    registry = process_registry()
    serve_metrics(settings.metrics_port, registry)
    tls_files = tls.serving_files(settings.tls, "a frontend")
    serve(build_proxy(settings.contact, timeout=settings.call_timeout, tls=tls_files), settings, stop, registry,
          tls_files=tls_files)
