"""Prometheus metrics of every service, and the gRPC interceptors that count
calls by method and status code (shared by master and frontend)."""

from __future__ import annotations

import time

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from dworkers.v1 import work_pb2

GRPC_REQUESTS = Counter("dworkers_grpc_requests", "gRPC calls handled, by method and status code",
                        ["method", "code"])
GRPC_SECONDS = Histogram("dworkers_grpc_request_seconds", "gRPC call latency (until the handler returns)",
                         ["method"], buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """Serves /metrics over HTTP; port 0 turns it off."""
    if port:
        start_http_server(port, addr=addr)


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _observe(method: str, code: grpc.StatusCode, started: float) -> None:
    GRPC_REQUESTS.labels(method, code.name).inc()
    GRPC_SECONDS.labels(method).observe(time.perf_counter() - started)


class SyncMetricsInterceptor(grpc.ServerInterceptor):
    """Counts unary calls of a threaded grpc server (streams count when they end)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        method = _short(handler_call_details.method)
        inner = handler.unary_unary

        def unary(request, context):
            started = time.perf_counter()
            try:
                response = inner(request, context)
            except Exception:
                code = context.code() if callable(getattr(context, "code", None)) else None
                _observe(method, code or grpc.StatusCode.UNKNOWN, started)
                raise
            code = context.code() if callable(getattr(context, "code", None)) else None
            _observe(method, code or grpc.StatusCode.OK, started)
            return response

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class AsyncMetricsInterceptor(grpc.aio.ServerInterceptor):
    """The same for the asyncio server of the master."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        method = _short(handler_call_details.method)
        inner = handler.unary_unary

        async def unary(request, context):
            started = time.perf_counter()
            try:
                response = await inner(request, context)
            except BaseException:
                code = context.code()
                _observe(method, code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN, started)
                raise
            code = context.code()
            _observe(method, code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK, started)
            return response

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class MasterMetrics:
    def __init__(self) -> None:
        self.works = {
            name: Counter(f"dworkers_works_{name}", f"works {name.replace('_', ' ')}")
            for name in ("accepted", "started", "completed", "failed", "timed_out")
        }
        self.pending = Gauge("dworkers_pending_works", "works waiting for a worker")
        self.in_progress = Gauge("dworkers_in_progress_works", "works handed to a worker")
        self.workers = Gauge("dworkers_workers", "registered worker slots", ["status"])
        self.pending_by_kind = Gauge("dworkers_pending_works_by_kind", "works waiting for a worker, by kind", ["kind"])
        self.slots_by_kind = Gauge("dworkers_worker_slots_by_kind", "live worker slots that run a kind", ["kind"])
        self.without_worker = Gauge("dworkers_pending_works_without_worker",
                                    "pending works of kinds no live worker runs (they wait)")
        self.unfinished_bytes = Gauge("dworkers_unfinished_work_bytes",
                                      "bytes held by pending and running works (bounded by --max-pending-bytes)")
        self.result_bytes = Gauge("dworkers_retained_result_bytes",
                                  "bytes held by retained results (bounded by --retention-bytes)")
        self.append_seconds = Histogram(
            "dworkers_journal_append_seconds", "time to make one journal batch durable",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.events_per_append = Histogram(
            "dworkers_journal_events_per_append", "events written in one journal batch",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000))
        self.active = Gauge("dworkers_master_active", "1 while this backend is the active, recovered master")
        self.epoch = Gauge("dworkers_master_epoch", "this backend's epoch (election sequence number)")
        self.failovers = Counter("dworkers_failovers", "times this backend became the active master")
        self.recovery_seconds = Gauge("dworkers_recovery_seconds", "duration of the last journal replay")

    def journal_batch(self, events: int, seconds: float) -> None:
        self.events_per_append.observe(events)
        self.append_seconds.observe(seconds)

    def recovered(self, seconds: float) -> None:
        self.recovery_seconds.set(seconds)
        self.failovers.inc()

    def accepted(self, n: int) -> None:
        self.works["accepted"].inc(n)

    def started(self, n: int) -> None:
        self.works["started"].inc(n)

    def timed_out(self) -> None:
        self.works["timed_out"].inc()

    def finished(self, state: int) -> None:
        self.works["completed" if state == work_pb2.DONE else "failed"].inc()

    def update(self, counts: dict | None, active: bool, epoch: int) -> None:
        counts = counts or {}
        self.pending.set(counts.get("pending", 0))
        self.in_progress.set(counts.get("in_progress", 0))
        self.workers.labels("busy").set(counts.get("workers_busy", 0))
        self.workers.labels("idle").set(counts.get("workers_idle", 0))
        self.without_worker.set(counts.get("pending_without_worker", 0))
        self.unfinished_bytes.set(counts.get("unfinished_bytes", 0))
        self.result_bytes.set(counts.get("result_bytes", 0))
        for gauge, values in ((self.pending_by_kind, counts.get("pending_by_kind", {})),
                              (self.slots_by_kind, counts.get("slots_by_kind", {}))):
            gauge.clear()
            for kind, value in values.items():
                gauge.labels(kind).set(value)
        self.active.set(1 if active else 0)
        self.epoch.set(epoch)


class WorkerMetrics:
    def __init__(self) -> None:
        self.executions = Counter("dworkers_executions", "job executions by kind and outcome", ["kind", "outcome"])
        self.seconds = Histogram("dworkers_execution_seconds", "job execution time", ["kind"],
                                 buckets=(.001, .005, .01, .05, .1, .5, 1, 5, 10, 30, 60, 300))

    def executed(self, kind: str, outcome: str, seconds: float) -> None:
        self.executions.labels(kind, outcome).inc()
        self.seconds.labels(kind).observe(seconds)
