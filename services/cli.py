"""The `dworkers` command: run a service (master, worker, frontend, demo) or
talk to a cluster (submit, status, watch, cluster). Thin: each service's
flags come from its settings class, and its bootstrap is its module's
`main(settings, stop)`."""

from __future__ import annotations

# ruff: noqa: E402 (gRPC's engine is chosen before anything imports gRPC)
from dworkers.common import grpc_engine

grpc_engine.choose()

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from dworkers import access, commands, demo, devcerts, healthcheck, shardctl
from dworkers.common import logs, memory
from dworkers.common.errors import DworkersError
from dworkers.common.lifecycle import StopRequest
from dworkers.common.settings import add, add_flags, describe, from_args, in_range
from dworkers.common.validation import MAX_SLOTS_PER_CONNECTION
from dworkers.dashboard import settings as dashboard
from dworkers.frontend import service as frontend
from dworkers.master import node as master
from dworkers.worker import worker

log = logging.getLogger("dworkers")

STOP_MARGIN = 10.0  # seconds past a service's grace period before it exits anyway


@dataclass(frozen=True)
class Role:
    settings: type
    main: Callable[..., None]  # main(settings, stop)
    help: str
    description: str


SERVICES = {
    "master": Role(master.MasterSettings, master.main, "run a backend: the active master or a standby",
                   "Run a backend node. The oldest live backend is the active master; the others are standbys."),
    "worker": Role(worker.WorkerSettings, worker.main, "run a worker process with N worker slots",
                   "Run worker slots that pull work from the active master and run jobs in child processes."),
    "frontend": Role(frontend.FrontendSettings, frontend.main, "run the public gRPC API",
                     "Run a stateless frontend serving the dworkers.v1.Frontend API."),
    "dashboard": Role(dashboard.DashboardSettings, dashboard.main, "serve the web dashboard",
                      "Serve the web dashboard: the cluster at a glance, works, and a live tail of results, "
                      "from a frontend, with each visitor's token."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dworkers",
                                     description="Distributed workers: gRPC services coordinated by ZooKeeper.")
    parser.add_argument("--version", action="version", version=f"dworkers {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, role in SERVICES.items():
        add_flags(sub.add_parser(name, help=role.help, description=role.description), role.settings)

    p = sub.add_parser("demo", help="run a local demo cluster (ZooKeeper, 2 masters, workers, a frontend, "
                                    "the dashboard, a producer and a consumer)",
                       description="Start a local ZooKeeper, two backends, workers and a frontend, then produce "
                                   "work at random intervals and log results. Ctrl-C stops everything.")
    add(p, "--frontend-listen", "127.0.0.1:7000", help="where the demo's frontend listens")
    add(p, "--dashboard-listen", "127.0.0.1:8080", help="where the demo's web dashboard listens")
    add(p, "--workers", 3, type=in_range(int, low=1, high=MAX_SLOTS_PER_CONNECTION), help="worker slots")
    add(p, "--interval", 1.0, type=in_range(float, above=0), help="mean seconds between produced works")
    add(p, "--log-format", "text", help="text or json", choices=("text", "json"))
    add(p, "--log-level", "INFO", help="logging level")

    commands.add_parsers(sub)
    healthcheck.add_parser(sub)
    devcerts.add_parser(sub)
    access.add_parser(sub)
    shardctl.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_format, args.log_level)
    try:
        role = SERVICES.get(args.command)
        if role is not None:
            memory.limit_malloc_arenas()  # before any thread starts
            settings = from_args(role.settings, args)
            # First thing: a stop request must work whatever the process waits for.
            stop = StopRequest(grace=settings.shutdown_grace, margin=STOP_MARGIN)
            memory.tune_collector()
            log.info("dworkers %s starting: %s", args.command, describe(settings))
            role.main(settings, stop)
        elif args.command == "demo":
            demo.run(args)
        elif args.command in ("healthcheck", "dev-certs", "token", "shards"):
            args.func(args)
        else:
            commands.main(args)
    except DworkersError as exc:
        print(f"dworkers: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `dworkers cluster | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # as a process killed by SIGPIPE
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dworkers")
    except PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
