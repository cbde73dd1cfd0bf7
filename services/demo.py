"""`dworkers demo`: the sample's Main without arguments. A local ZooKeeper,
two backends, workers and a frontend as real processes; a producer submits
work at random intervals and a consumer logs the results. Ctrl-C stops all."""

from __future__ import annotations

import logging
import random
import signal
import socket
import threading
import time
from pathlib import Path

import grpc

from dworkers.common.errors import ConfigError
from dworkers.common.zkserver import ZooKeeperNotInstalled
from dworkers.local_cluster import LocalCluster
from dworkers.v1 import frontend_pb2_grpc, work_pb2

log = logging.getLogger("dworkers.demo")

MASTER_PORTS = (7100, 7101)
# Prometheus /metrics of the demo's processes (the services' defaults; the
# second master the next free one), each only if free.
MASTER_METRICS_PORTS, WORKER_METRICS_PORT, FRONTEND_METRICS_PORT = (9100, 9103), 9101, 9102


def _port_free(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        # As gRPC binds: connections of an earlier run waiting in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def produce(stub, stop: threading.Event, interval: float) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        request = work_pb2.SubmitWorkRequest(work_id=f"demo-{int(time.time())}-{n}", kind="square",
                                             payload=str(n).encode())
        log.info("produced work: %d", n, extra={"work_id": request.work_id})
        while not stop.is_set():
            try:  # not acked in time: send the same work again
                stub.SubmitWork(request, timeout=5)
                break
            except grpc.RpcError as error:
                log.warning("work not accepted (%s); retrying", error.code().name)
                stop.wait(1.0)
        stop.wait(random.expovariate(1.0 / interval))


def consume(stub, stop: threading.Event) -> None:
    after = 0
    while not stop.is_set():
        stream = stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=after))
        stop_watch = threading.Thread(target=lambda stream=stream: (stop.wait(), stream.cancel()), daemon=True)
        stop_watch.start()
        try:
            for batch in stream:
                for result in batch.results:
                    after = result.sequence
                    text = result.result.decode(errors="replace") if result.state == work_pb2.DONE else result.error
                    log.info("consumed result: %s", text, extra={"work_id": result.work_id})
        except grpc.RpcError:
            stop.wait(1.0)


def run(args) -> None:

    for address in (args.frontend_listen, *(f"127.0.0.1:{p}" for p in MASTER_PORTS)):
        if not _port_free(address):
            raise ConfigError(f"port {address} is in use: is another demo running? "
                              "(--frontend-listen to move the frontend)")
    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    workdir = Path(".run") / time.strftime("demo-%Y%m%d-%H%M%S")
    cluster = LocalCluster(workdir=workdir, log_to_files=False)
    stop = threading.Event()
    try:
        try:
            cluster.start_zookeeper()
        except ZooKeeperNotInstalled as exc:
            raise ConfigError(str(exc)) from None
        log.info("local ZooKeeper at %s (data in %s)", cluster.zk, workdir)
        trace = ("--log-level", "DEBUG", "--log-format", args.log_format)
        served: list[str] = []

        def metrics(role: str, port: int) -> tuple[str, ...]:
            if not _port_free(f"127.0.0.1:{port}"):
                return ()
            served.append(f"{role} http://127.0.0.1:{port}/metrics")
            return ("--metrics-port", str(port))

        cluster.start_worker(args.workers, *trace, *metrics("worker", WORKER_METRICS_PORT))
        for port, metrics_port in zip(MASTER_PORTS, MASTER_METRICS_PORTS):
            cluster.start_master(port, *trace, *metrics(f"master {port}", metrics_port), "--reflection", "on",
                                 wait=True)
        front = cluster.start_frontend(int(args.frontend_listen.rsplit(":", 1)[1]), "--log-format", args.log_format,
                                       *metrics("frontend", FRONTEND_METRICS_PORT), "--reflection", "on")
        board_port = int(args.dashboard_listen.rsplit(":", 1)[1])
        if _port_free(args.dashboard_listen):
            cluster.start_dashboard(front.address, "--log-format", args.log_format, port=board_port)
            log.info("dashboard: http://localhost:%d/ (open it in a browser)", board_port)
        else:
            log.warning("no dashboard: port %s is in use (--dashboard-listen to move it)", args.dashboard_listen)
        log.info("Prometheus metrics: %s", ", ".join(served) or "none (their ports are taken)")
        log.info("frontend at %s: try `dworkers cluster` or `dworkers submit square 12 --wait` in another terminal",
                 front.address)
        stub = frontend_pb2_grpc.FrontendStub(grpc.insecure_channel(front.address))
        threads = [threading.Thread(target=consume, args=(stub, stop), daemon=True),
                   threading.Thread(target=produce, args=(stub, stop, args.interval), daemon=True)]
        for thread in threads:
            thread.start()
        while all(s.alive() for s in cluster.services if s.role != "master") and cluster.masters():
            time.sleep(0.5)
        raise ConfigError("a demo process exited; stopping the demo")
    except KeyboardInterrupt:
        log.info("stopping the demo")
    finally:
        stop.set()
        cluster.stop()
