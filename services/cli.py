"""The `dworkers` command: run a service (master, worker, frontend, demo) or
talk to a cluster (submit, status, watch, cluster)."""

from __future__ import annotations

import argparse
import logging
import sys

from services.common import logs, settings
from services.common.settings import add, in_range
from services.common.validation import MAX_SLOTS_PER_CONNECTION

log = logging.getLogger("dworkers")

MiB = 1024 * 1024
PORT = in_range(int, low=0, high=65535)


class CliError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def run_master(args, stop) -> None:
    import asyncio

    from kazoo.handlers.threading import KazooTimeoutError

    from services.common.wire import AddressInUse
    from services.master.core import CoreSettings
    from services.master.node import MasterNode, MasterSettings

    node = MasterNode(MasterSettings(
        zk=args.zk, root=args.root, listen=args.listen, advertise=args.advertise,
        metrics_port=args.metrics_port, session_timeout=args.session_timeout,
        subscriber_timeout=args.subscriber_timeout, shutdown_grace=args.shutdown_grace,
        core=CoreSettings(
            work_timeout=args.work_timeout, worker_timeout=args.worker_timeout, max_pending=args.max_pending,
            max_pending_bytes=args.max_pending_bytes, retention_bytes=args.retention_bytes,
            snapshot_bytes=args.snapshot_bytes,
            snapshot_every=args.snapshot_every, snapshot_interval=args.snapshot_interval,
            snapshot_batches=args.snapshot_batches,
            retention_count=args.retention_count, retention_seconds=args.retention_seconds),
    ))
    stop.on_stop(node.request_stop)
    try:
        asyncio.run(node.run())
    except KazooTimeoutError:
        raise CliError(f"cannot reach ZooKeeper at {args.zk}") from None
    except AddressInUse as exc:
        raise CliError(str(exc)) from None


def _proxy(args):
    from kazoo.handlers.threading import KazooTimeoutError

    from services.common import proxy

    try:
        return proxy.build(args.zk, args.root, args.masters)
    except KazooTimeoutError:
        raise CliError(f"cannot reach ZooKeeper at {args.zk}") from None


def run_worker(args, stop) -> None:
    import threading

    from services.common.metrics import serve_metrics
    from services.worker.worker import Worker, WorkerSettings

    modules = tuple(m.strip() for m in args.jobs.split(",") if m.strip())
    serve_metrics(args.metrics_port)
    master_proxy, _client = _proxy(args)
    try:
        worker = Worker(master_proxy, WorkerSettings(
            concurrency=args.concurrency, jobs=modules, executor=args.executor,
            register_interval=args.register_interval, shutdown_grace=args.shutdown_grace))
    except ImportError as exc:
        raise CliError(f"cannot load jobs module: {exc}") from None
    log.info("worker with %d slots for kinds %s", args.concurrency, ", ".join(worker.kinds))
    thread = threading.Thread(target=worker.run, name="worker", daemon=True)
    thread.start()
    stop.wait()
    log.info("worker stopping: finishing current work")
    worker.stop()
    master_proxy.close()


def run_frontend(args, stop) -> None:
    from services.common.metrics import serve_metrics
    from services.common.wire import AddressInUse
    from services.frontend.service import FrontendSettings, serve

    serve_metrics(args.metrics_port)
    master_proxy, _client = _proxy(args)
    master_proxy.timeout = args.call_timeout
    try:
        serve(master_proxy, FrontendSettings(listen=args.listen, call_timeout=args.call_timeout,
                                             threads=args.threads, max_watchers=args.max_watchers,
                                             subscriber_timeout=args.subscriber_timeout,
                                             shutdown_grace=args.shutdown_grace), stop)
    except AddressInUse as exc:
        raise CliError(str(exc)) from None


def run_demo(args) -> None:
    from services.demo import run

    run(args)


def run_client(args) -> None:
    from services import client

    client.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dworkers", description="Distributed workers: gRPC services coordinated by ZooKeeper.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("master", help="run a backend: the active master or a standby",
                       description="Run a backend node. The oldest live backend is the active master; the others are standbys.")
    settings.add_common(p)
    add(p, "--listen", "0.0.0.0:7100", help="gRPC address to listen on")
    add(p, "--advertise", "", help="address others use to reach this backend (default: hostname:port)")
    add(p, "--metrics-port", 9100, type=PORT, help="Prometheus /metrics port (0: off)")
    add(p, "--session-timeout", 4.0, type=in_range(float, low=1, high=60),
        help="ZooKeeper session timeout in seconds (bounds failover after a crash)")
    add(p, "--work-timeout", 30.0, type=in_range(float, above=0, high=24 * 3600),
        help="default seconds a work attempt may run before it is re-queued")
    add(p, "--worker-timeout", 15.0, type=in_range(float, above=0), help="seconds a silent worker slot is kept")
    add(p, "--max-pending", 1_000_000, type=in_range(int, low=1), help="pending works beyond which submissions are refused")
    add(p, "--max-pending-bytes", 32 * MiB, type=in_range(int, low=1 * MiB),
        help="bytes of pending and running works (payloads and metadata) beyond which submissions are refused; "
             "the journal keeps them in ZooKeeper's memory")
    add(p, "--retention-bytes", 32 * MiB, type=in_range(int, low=1 * MiB),
        help="bytes of retained results beyond which the oldest are forgotten early")
    add(p, "--snapshot-every", 50_000, type=in_range(int, low=1), help="journal events between snapshots")
    add(p, "--snapshot-batches", 1_000, type=in_range(int, low=1),
        help="journal batches between snapshots (bounds replay time)")
    add(p, "--snapshot-bytes", 32 * MiB, type=in_range(int, low=1 * MiB),
        help="journal bytes between snapshots (bounds the journal's size in ZooKeeper)")
    add(p, "--snapshot-interval", 60.0, type=in_range(float, above=0),
        help="seconds between snapshots (when anything changed)")
    add(p, "--retention-count", 100_000, type=in_range(int, low=0),
        help="finished results kept at most (their ids stay deduplicated while kept)")
    add(p, "--subscriber-timeout", 30.0, type=in_range(float, above=0),
        help="a result subscriber that reads nothing this long is dropped")
    add(p, "--retention-seconds", 3600.0, type=in_range(float, low=0), help="finished results older than this are forgotten")
    add(p, "--shutdown-grace", 5.0, type=in_range(float, low=0, high=3600),
        help="seconds in-flight calls may take to finish on SIGTERM")
    p.set_defaults(func=run_master)

    p = sub.add_parser("worker", help="run a worker process with N worker slots",
                       description="Run worker slots that pull work from the active master and run jobs in child processes.")
    settings.add_common(p)
    add(p, "--masters", "", help="comma-separated backend addresses instead of ZooKeeper discovery")
    add(p, "--concurrency", 2, type=in_range(int, low=1, high=MAX_SLOTS_PER_CONNECTION),
        help="worker slots (each with its own executor)")
    add(p, "--executor", "process", help="process: each slot's jobs run in a child process (killable); "
        "thread: on a thread of this process (cheap, for many slots or trivial jobs)", choices=("process", "thread"))
    add(p, "--jobs", "", help="comma-separated Python modules that register jobs")
    add(p, "--metrics-port", 9101, type=PORT, help="Prometheus /metrics port (0: off)")
    add(p, "--register-interval", 5.0, type=in_range(float, above=0, high=3600), help="seconds between registrations")
    add(p, "--shutdown-grace", 30.0, type=in_range(float, low=0, high=24 * 3600),
        help="seconds to finish running work on SIGTERM")
    p.set_defaults(func=run_worker)

    p = sub.add_parser("frontend", help="run the public gRPC API",
                       description="Run a stateless frontend serving the dworkers.v1.Frontend API.")
    settings.add_common(p)
    add(p, "--masters", "", help="comma-separated backend addresses instead of ZooKeeper discovery")
    add(p, "--listen", "0.0.0.0:7000", help="gRPC address to listen on")
    add(p, "--metrics-port", 9102, type=PORT, help="Prometheus /metrics port (0: off)")
    add(p, "--call-timeout", 10.0, type=in_range(float, above=0, high=3600), help="seconds a call may wait for a master")
    add(p, "--threads", 64, type=in_range(int, low=1, high=10_000), help="threads serving unary calls")
    add(p, "--max-watchers", 32, type=in_range(int, low=1, high=100_000),
        help="WatchResults streams served at once (beyond: RESOURCE_EXHAUSTED)")
    add(p, "--subscriber-timeout", 30.0, type=in_range(float, above=0),
        help="a result subscriber that reads nothing this long is dropped")
    add(p, "--shutdown-grace", 5.0, type=in_range(float, low=0, high=3600),
        help="seconds in-flight calls may take to finish on SIGTERM")
    p.set_defaults(func=run_frontend)

    p = sub.add_parser("demo", help="run a local demo cluster (ZooKeeper, 2 masters, workers, a frontend, a producer and a consumer)",
                       description="Start a local ZooKeeper, two backends, workers and a frontend, then produce work at random intervals and log results. Ctrl-C stops everything.")
    add(p, "--frontend-listen", "127.0.0.1:7000", help="where the demo's frontend listens")
    add(p, "--workers", 3, type=in_range(int, low=1, high=MAX_SLOTS_PER_CONNECTION), help="worker slots")
    add(p, "--interval", 1.0, type=in_range(float, above=0), help="mean seconds between produced works")
    add(p, "--log-format", "text", help="text or json", choices=("text", "json"))
    add(p, "--log-level", "INFO", help="logging level")
    p.set_defaults(func=run_demo)

    from services import client
    client.add_parsers(sub)
    return parser


SERVICES = ("master", "worker", "frontend")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_format, args.log_level)
    try:
        if args.command in SERVICES:
            from services.common.lifecycle import StopRequest

            # First thing: a stop request must work whatever the process waits for.
            stop = StopRequest(grace=args.shutdown_grace, margin=10.0)
            log.info("dworkers %s starting: %s", args.command, settings.describe(args))
            args.func(args, stop)
        else:
            args.func(args)
    except CliError as exc:
        print(f"dworkers: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
