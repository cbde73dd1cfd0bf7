"""Prometheus metrics of every service, each on a registry the process
creates and serves (so that any component can be built twice in one
process, as the in-process tests do)."""

from __future__ import annotations

import time

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from dworkers.common.errors import ConfigError
from dworkers.v1 import work_pb2

# Counters and histograms get no `<name>_created` series: a series per metric
# that dashboards and alerts never use.
disable_created_metrics()


def process_registry() -> CollectorRegistry:
    """A registry with the process, platform and garbage-collector collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def serve_metrics(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> None:
    """Serves /metrics over HTTP; port 0 turns it off."""
    if port:
        try:
            start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on port {port} ({exc.strerror}; another dworkers process on "
                              "this host?): choose another with --metrics-port, or 0 for none") from None


class ServerMetrics:
    """gRPC calls by method and status code, and their latency (streams
    count when they end, however they end; those open are a gauge)."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("dworkers_grpc_requests", "gRPC calls handled, by method and status code",
                                ["method", "code"], registry=registry)
        self.seconds = Histogram("dworkers_grpc_request_seconds", "gRPC call latency (until the handler returns)",
                                 ["method"], registry=registry,
                                 buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))

        self.streams = Gauge("dworkers_grpc_streams", "streaming gRPC calls open now, by method", ["method"],
                             registry=registry)

    def observe(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.seconds.labels(method).observe(time.perf_counter() - started)

    def stream_opened(self, method: str) -> float:
        self.streams.labels(method).inc()
        return time.perf_counter()

    def stream_closed(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self.streams.labels(method).dec()
        self.observe(method, code, started)


_FINISHED_AS = {work_pb2.DONE: "completed", work_pb2.CANCELLED: "cancelled"}  # the rest: failed


class MasterMetrics:
    def __init__(self, registry: CollectorRegistry):
        def gauge(name, text, labels=()):
            return Gauge(name, text, labels, registry=registry)

        self.works = {
            name: Counter(f"dworkers_works_{name}", f"works {name.replace('_', ' ')}, by kind", ["kind"],
                          registry=registry)
            for name in ("accepted", "started", "completed", "failed", "timed_out", "cancelled")
        }
        self.pending = gauge("dworkers_pending_works", "works waiting for a worker")
        self.in_progress = gauge("dworkers_in_progress_works", "works handed to a worker")
        self.scheduled = gauge("dworkers_scheduled_works", "works waiting for their time (delayed, or backing off)")
        self.queue_wait = Histogram("dworkers_queue_wait_seconds", "time works waited in the queue before a "
                                    "slot took them (since queued, or queued again; not while scheduled)",
                                    registry=registry, buckets=(.001, .005, .01, .05, .1, .5, 1, 5, 10, 60, 300, 3600))
        self.oldest_pending = gauge("dworkers_oldest_pending_seconds",
                                    "how long the oldest pending work has waited in the queue (to within a second)")
        self.workers = gauge("dworkers_worker_slots", "registered worker slots (each runs one job at a time)",
                             ["status"])
        self.worker_processes = gauge("dworkers_worker_processes", "worker processes connected to this master")
        self.pending_by_kind = gauge("dworkers_pending_works_by_kind", "works waiting for a worker, by kind", ["kind"])
        self.slots_by_kind = gauge("dworkers_worker_slots_by_kind", "live worker slots that run a kind", ["kind"])
        self.without_worker = gauge("dworkers_pending_works_without_worker",
                                    "pending works of kinds no live worker runs (they wait)")
        self.unfinished_bytes = gauge("dworkers_unfinished_work_bytes",
                                      "bytes held by pending and running works (bounded by --max-pending-bytes)")
        self.result_bytes = gauge("dworkers_retained_result_bytes",
                                  "bytes held by retained results (bounded by --retention-bytes)")
        self.append_seconds = Histogram(
            "dworkers_journal_append_seconds", "time to make one journal batch durable", registry=registry,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.events_per_append = Histogram(
            "dworkers_journal_events_per_append", "events written in one journal batch", registry=registry,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000))
        self.active = gauge("dworkers_master_active", "1 while this backend is the active, recovered master")
        self.shard = gauge("dworkers_master_shard", "1, labelled with the shard whose master group this backend "
                           "joins (join other series on instance to see them per shard)", ["shard"])
        self.shard_slots = gauge("dworkers_master_shard_slots", "hash slots its shard owns in the shard map "
                                 "(of 4,096)")
        self.epoch = gauge("dworkers_master_epoch", "this backend's epoch (election sequence number)")
        self.failovers = Counter("dworkers_failovers", "times this backend took over as the active master from "
                                 "another (a fresh cluster's first master is none)", registry=registry)
        self.recovery_seconds = gauge("dworkers_recovery_seconds", "duration of the last journal replay")

    def journal_batch(self, events: int, seconds: float) -> None:
        self.events_per_append.observe(events)
        self.append_seconds.observe(seconds)

    def recovered(self, seconds: float, failover: bool) -> None:
        self.recovery_seconds.set(seconds)
        if failover:
            self.failovers.inc()

    def accepted(self, by_kind: dict[str, int]) -> None:
        for kind, n in by_kind.items():
            self.works["accepted"].labels(kind).inc(n)

    def recorded(self, step, started_by_kind: dict[str, int]) -> None:
        """Counts what a durable step of the master's decisions did."""
        for kind, n in started_by_kind.items():
            self.works["started"].labels(kind).inc(n)
        for seconds in step.queue_waits:
            self.queue_wait.observe(seconds)
        for result in step.results:
            self.works[_FINISHED_AS.get(result.state, "failed")].labels(result.kind).inc()

    def timed_out(self, kind: str) -> None:
        self.works["timed_out"].labels(kind).inc()

    def update(self, counts: dict | None, active: bool, epoch: int) -> None:
        counts = counts or {}
        self.pending.set(counts.get("pending", 0))
        self.in_progress.set(counts.get("in_progress", 0))
        self.scheduled.set(counts.get("scheduled", 0))
        self.oldest_pending.set(counts.get("oldest_pending_seconds", 0))
        self.workers.labels("busy").set(counts.get("workers_busy", 0))
        self.workers.labels("idle").set(counts.get("workers_idle", 0))
        self.worker_processes.set(counts.get("worker_processes", 0))
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


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.result_streams = Gauge("dworkers_frontend_result_streams",
                                    "WatchResults streams this frontend serves now (bounded by --max-watchers)",
                                    registry=registry)
        self.submit_streams = Gauge("dworkers_frontend_submit_streams",
                                    "SubmitStream streams this frontend serves now (bounded by --max-submit-streams)",
                                    registry=registry)
        self.dropped_subscribers = Counter("dworkers_frontend_dropped_subscribers",
                                           "result subscribers dropped for reading nothing", registry=registry)


class DashboardMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("dworkers_dashboard_requests", "dashboard HTTP requests by route and status",
                                ["route", "status"], registry=registry)
        self.streams = Gauge("dworkers_dashboard_streams", "live streams (overview, result tails) served now "
                             "(bounded by --max-streams)", registry=registry)
        self.sessions = Gauge("dworkers_dashboard_sessions", "visitors logged in now", registry=registry)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.executions = Counter("dworkers_executions", "job executions by kind and outcome", ["kind", "outcome"],
                                  registry=registry)
        self.seconds = Histogram("dworkers_execution_seconds", "job execution time", ["kind"], registry=registry,
                                 buckets=(.001, .005, .01, .05, .1, .5, 1, 5, 10, 30, 60, 300))

    def executed(self, kind: str, outcome: str, seconds: float) -> None:
        self.executions.labels(kind, outcome).inc()
        self.seconds.labels(kind).observe(seconds)
