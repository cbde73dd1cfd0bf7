"""The benchmark: `python -m tests.bench` (or `make bench BENCH_ARGS=...`).

Starts local clusters (one ZooKeeper for the whole run, one cluster per
scenario under its own ZooKeeper root, real processes) and prints a table of
figures beside their targets on stdout (with --json, one JSON object);
progress goes to stderr. Every wait has a deadline and every cluster is
stopped (by the PIDs it started) whatever happens.

Scenarios (--only NAME[,NAME]):
  submit     accepted works/s: SubmitWork from 16 threads; SubmitWorks of 500 from 4 threads (no workers)
  sdk        the Python client from one thread: submit() in a loop (pipelined), and one
             acknowledged submit at a time (p50 / p99), beside the peers' enqueue figures
  e2e        20,000 `square` works, 2 worker processes, a few concurrencies: first submit -> last result streamed
  roundtrip  200 works one at a time, each awaited on an open WatchResults stream: p50 / p99
  postgresql end to end (batched) and round trip on the PostgreSQL journal, beside the ZooKeeper figures
  failover   steady submit load; kill -9 the active master, then SIGTERM the next: time until submits succeed
  replay     100,000 pending works; SIGTERM the master: the standby's recovery time (and `memory`:
             master RSS per pending work)
  backlog    1,000,000 pending works of 1 KiB on the PostgreSQL journal: submit rate, master RSS per
             work, ZooKeeper's data before/after, the database's size; kill -9 -> standby serving
  control    master CPU per dispatched work with 10,000 and with 1,000,000 pending works across 10
             priorities (and a tenth as many delayed); cancel latency: call -> job process gone
  scale      1,000 worker slots on one master: idle master CPU, dispatch latency p99 under load

The machine has 2 cores and may be shared: every scenario reports the CPU its
processes used and the rest of the machine's load ("other") beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kazoo.client import KazooClient
from kazoo.security import make_digest_acl

from dworkers import credentials
from dworkers.common import zk as zkpaths
from dworkers.common.pgserver import PostgreSQLServer
from dworkers.common.shards import slot_of
from dworkers.common.zkserver import ZooKeeperServer
from dworkers.local_cluster import LocalCluster, Service
from dworkers.v1 import work_pb2
from dworkers.worker.worker import WorkerSettings
from tests.bench_support import clients, procstat, profiling
from tests.bench_support.clients import Submitters, Subscriber, percentile
from tests.helpers import wait_until

SCENARIOS = ("submit", "sdk", "peers", "e2e", "shards", "move", "roundtrip", "postgresql", "failover", "replay", "backlog",
             "control",
             "scale")
ALIASES = {"memory": "replay", "rtt": "roundtrip", "pg": "postgresql"}
SESSION_TIMEOUT = 4.0  # the master's default --session-timeout
MASTER_SERVICE = "dworkers.v1.Master"

# Peers measured on this machine on 2026-11-29 (the peers' harness, no Redis persistence; PgQueuer on
# PostgreSQL with fsync); --peers-results takes them from a run of the harness next to this one instead.
PEERS = {"dramatiq_e2e": 480, "celery_e2e": 310, "pgqueuer_e2e": 380, "dramatiq_enqueue": 3160,
         "celery_enqueue": 780, "pgqueuer_enqueue": 980, "celery_rtt_p50": 5.2, "celery_rtt_p99": 9.4,
         "pgqueuer_rtt_p50": 6.5, "pgqueuer_rtt_p99": 13.0}


def load_peers(directory: str) -> tuple[dict, str]:
    """The peers' figures from the harness's result files (one JSON row per
    peer and Redis mode; rows without Redis persistence first), and where
    they come from."""
    peers, seen = dict(PEERS), []
    rows = [json.loads(path.read_text()) for path in sorted(Path(directory).glob("*.json"))]
    rows = [row for row in rows if row.get("peer")]  # not calibration.json
    for row in sorted(rows, key=lambda r: r.get("redis_mode") != "default", reverse=True):
        name = row.get("peer", "").replace("-", "_")
        for key, field in (("e2e", "e2e_per_s"), ("enqueue", "enqueue_per_s"), ("rtt_p50", "p50_ms"),
                           ("rtt_p99", "p99_ms")):
            if row.get(field) is not None and not row.get("errors"):
                peers[f"{name}_{key}"] = round(row[field], 1)
        seen.append(f"{row.get('peer')}/{row.get('redis_mode')} {row.get('started', '')}")
    if not seen:
        raise SystemExit(f"--peers-results: no result files (*.json) in {directory}")
    return peers, f"peers measured by their harness: {', '.join(seen)}"


# Rough seconds each scenario needs (to skip rather than overrun the budget).
ESTIMATE = {"submit": 25, "sdk": 30, "peers": 170, "e2e": 200, "shards": 150, "move": 90, "roundtrip": 20, "postgresql": 60, "failover": 30,
            "replay": 40, "backlog": 240, "control": 150, "scale": 100}
ESTIMATE_QUICK = {"submit": 15, "sdk": 20, "peers": 40, "e2e": 30, "shards": 60, "move": 40, "roundtrip": 15, "postgresql": 30, "failover": 25,
                  "replay": 20, "backlog": 60, "control": 50, "scale": 30}


def ms(seconds: float) -> float:
    return 1000 * seconds


def _fmt(value, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "works/s":
        return f"{value:,.0f} works/s"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "%":
        return f"{value:.2f} %"
    if unit == "B":
        return f"{value:,.0f} B"
    return f"{value} {unit}".strip()


def _commit() -> str:
    """The checked-out commit (read only), with '+' if the tree has changes."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).resolve().parent.parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "services", "protos"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent.parent).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


class HealthWatch:
    """Polls a backend's health for dworkers.v1.Master every 10 ms in a thread;
    remembers when it first said SERVING."""

    def __init__(self, address: str, timeout: float):
        self.address = address
        self.serving_at: float | None = None
        self._end = time.monotonic() + timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="healthwatch")
        self._thread.start()

    def _run(self) -> None:
        with credentials.channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set() and time.monotonic() < self._end:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=MASTER_SERVICE), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        self.serving_at = time.monotonic()
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.01)

    def wait(self, timeout: float) -> float | None:
        self._thread.join(timeout)
        self._stop.set()
        return self.serving_at


def outage(calls, t_event: float) -> tuple[float, float, float] | None:
    """The largest gap between consecutive acks that ends after t_event:
    (recovered seconds after t_event, gap seconds, first ack after)."""
    ends = sorted(t1 for _, t1, _ in calls if t1 >= t_event - 2.0)
    before = [e for e in ends if e <= t_event]
    prev = before[-1] if before else t_event
    best = None
    for e in ends:
        if e <= prev:
            continue
        if e > t_event and (best is None or e - prev > best[1]):
            best = (e - t_event, e - prev, e)
        prev = e
    return best


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.t_start = time.monotonic()
        self.budget_end = self.t_start + args.budget
        self.own_workdir = args.workdir is None
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dworkers-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.zookeeper: ZooKeeperServer | None = None
        self.postgresql: PostgreSQLServer | None = None  # started by the first scenario on that journal
        self.kz: KazooClient | None = None
        self.clusters: list[LocalCluster] = []
        self.rows: list[dict] = []
        self.details: dict = {}
        self.notes: list[str] = []
        self.peers, source = load_peers(args.peers_results) if args.peers_results else (
            dict(PEERS), "peers as measured on 2026-11-29 (--peers-results takes a fresh run's)")
        self.notes.append(source)
        self.profiles: dict = {}
        self.failed: dict[str, str] = {}
        self.channels: list[grpc.Channel] = []
        # what-if experiments: extra flags for every master / worker (e.g. --log-level WARNING)
        self.master_args = shlex.split(args.master_args)
        self.worker_args = shlex.split(args.worker_args)

    # --- plumbing ---------------------------------------------------------

    def log(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.t_start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def remaining(self) -> float:
        return self.budget_end - time.monotonic()

    def row(self, key: str, label: str, value, unit: str, target: float | None = None, op: str = "",
            note: str = "") -> None:
        met = None
        if target is not None and value is not None and not (isinstance(value, float) and math.isnan(value)):
            met = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
        target_text = "" if target is None else f"{op} {_fmt(target, unit)}"
        self.rows.append({"key": key, "label": label, "value": value, "unit": unit, "target": target,
                          "op": op, "target_text": target_text, "met": met, "note": note})

    def pg_url(self) -> str:
        """The benchmark's PostgreSQL (Debian's server, fsync on), started once."""
        if self.postgresql is None:
            self.log("starting PostgreSQL")
            self.postgresql = PostgreSQLServer(self.workdir / "postgresql").start()
        return self.postgresql.url()

    @contextlib.contextmanager
    def cluster(self, name: str, journal: str = ""):
        root = f"/bench-{name}-{uuid.uuid4().hex[:6]}"
        secure = self.args.secure
        cluster = LocalCluster(workdir=self.workdir / name, root=root, session_timeout=SESSION_TIMEOUT,
                               zookeeper=self.zookeeper, journal=journal, tls=secure, access=secure, zk_auth=secure)
        self.clusters.append(cluster)
        if secure:  # the bench's own clients (stubs, SDK) take TLS and a token from the environment
            assert cluster.client_tls is not None
            os.environ.update(DWORKERS_TLS_CA=cluster.client_tls.ca, DWORKERS_TLS_CERT=cluster.client_tls.cert,
                              DWORKERS_TLS_KEY=cluster.client_tls.key, DWORKERS_TOKEN=cluster.tokens["tester"])
        # Workers declare their kinds; scenarios without workers need `square` declared.
        acl = None
        if cluster.zk_auth is not None:  # the bench reads the cluster's znodes as the services would
            self.kz.add_auth("digest", cluster.zk_auth)
            user, _, password = cluster.zk_auth.partition(":")
            acl = [make_digest_acl(user, password, all=True)]
            if cluster.zk_reader_auth is not None:  # as the masters do: workers and frontends may read
                reader, _, reader_password = cluster.zk_reader_auth.partition(":")
                acl.append(make_digest_acl(reader, reader_password, read=True))
        self.kz.ensure_path(f"{zkpaths.Paths(root).kinds}/square", acl=acl)
        try:
            yield cluster
        finally:
            self.log(f"{name}: stopping its cluster")
            for channel in self.channels:
                channel.close()
            self.channels.clear()
            self.stop_cluster(cluster)
            self.clusters.remove(cluster)

    def stop_cluster(self, cluster: LocalCluster) -> None:
        """Frontends and workers first, while the master can still ack the
        workers' last reports (a worker waits for its acks before it exits),
        then the rest (LocalCluster.stop). Only this cluster's PIDs."""
        early = [s for s in cluster.services if s.role in ("frontend", "worker") and s.alive()]
        for s in early:
            s.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for s in early:
            try:
                s.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                self.log(f"{s.role} {s.pid} did not stop within 10 s of SIGTERM: killing it")
                s.kill()
        cluster.stop()

    def stop_all(self) -> None:
        for cluster in list(self.clusters):
            with contextlib.suppress(Exception):
                self.stop_cluster(cluster)
        self.clusters.clear()
        if self.kz is not None:
            with contextlib.suppress(Exception):
                self.kz.stop()
                self.kz.close()
            self.kz = None
        if self.zookeeper is not None:
            with contextlib.suppress(Exception):
                self.zookeeper.stop()
        if self.postgresql is not None:
            with contextlib.suppress(Exception):
                self.postgresql.remove()
        if self.own_workdir and not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def cpu_meter(self, cluster: LocalCluster) -> procstat.CpuMeter:
        """CPU per role; "worker" is the worker processes themselves and
        "executors" their children (one job process per slot)."""
        groups: dict[str, list[int]] = {}
        tree = procstat.children_map()
        for s in cluster.services:
            if s.alive():
                groups.setdefault(s.role, []).append(s.pid)
                if s.role == "worker":
                    groups.setdefault("executors", []).extend(procstat.descendants(s.pid, tree)[1:])
        groups["zookeeper"] = [self.zookeeper.process.pid]
        if cluster.journal and self.postgresql is not None and self.postgresql.process is not None:
            groups["postgresql"] = [self.postgresql.process.pid, *procstat.descendants(
                self.postgresql.process.pid, tree)[1:]]
        groups["bench"] = [os.getpid()]
        return procstat.CpuMeter(groups, exact=("bench", "worker", "executors"), count_switches=True)

    def journal_znodes(self, cluster: LocalCluster) -> int:
        """Batch znodes in the journal now (what a new master reads after the snapshot)."""
        path = zkpaths.Paths(cluster.root).journal
        return sum(1 for n in self.kz.get_children(path) if n.startswith("b-")) if self.kz.exists(path) else 0

    def journal_batches(self, cluster: LocalCluster) -> int:
        """Journal batches written so far (the newest batch znode's sequence number + 1)."""
        path = zkpaths.Paths(cluster.root).journal
        names = [n for n in self.kz.get_children(path) if n.startswith("b-")] if self.kz.exists(path) else []
        return max((int(n.rsplit("-", 1)[1]) for n in names), default=-1) + 1

    def start_zookeeper(self) -> None:
        self.log("starting ZooKeeper")
        self.zookeeper = ZooKeeperServer(self.workdir / "zookeeper").start()
        self.kz = KazooClient(hosts=self.zookeeper.hosts, timeout=10.0)
        self.kz.start(timeout=30)
        # A cold JVM is about 2x slower for its first ~20 s: warm it up with writes.
        seconds = 2.0 if self.quick else 6.0
        self.log(f"warming ZooKeeper up for {seconds:g} s")
        self.kz.ensure_path("/warmup")
        end, n, big = time.monotonic() + seconds, 0, b"x" * 200_000
        while time.monotonic() < end:
            pending = [self.kz.create_async("/warmup/n-", b"x" * 200, sequence=True) for _ in range(200)]
            txn = self.kz.transaction()
            txn.create("/warmup/b-", big, sequence=True)
            pending.append(txn.commit_async())
            for p in pending:
                p.get(timeout=30)
            n += len(pending)
        self.details["zookeeper_warmup_writes"] = n

    def frontend_stub(self, frontend: Service):
        channel, stub = clients.stub(frontend.address)
        self.channels.append(channel)
        return stub

    def wait_workers(self, stub, count: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < end:
            try:
                seen = len(stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=5).workers)
                if seen >= count:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"only {seen} of {count} worker slots registered within {timeout:.0f} s")

    def last_sequence(self, stub) -> int | dict[int, int]:
        """Where the result stream is now: a sequence, or one per shard."""
        info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
        return {s.shard: s.last_sequence for s in info.shards} if info.shards else info.last_sequence

    def warm_up(self, stub, count: int, timeout: float = 60.0) -> None:
        """Runs `count` works end to end (starts executors, connections, code paths)."""
        sub = Subscriber(stub, self.last_sequence(stub), record_ids=False)
        try:
            subm = Submitters(stub, clients.batches(clients.requests(count), 100), threads=1, batched=True).start()
            subm.join(timeout)
            if not sub.wait_count(count, timeout):
                raise TimeoutError(f"warm-up: {sub.count} of {count} results within {timeout:.0f} s")
        finally:
            sub.stop()

    def wait_quiet(self, pids: list[int], limit_percent: float, timeout: float) -> float:
        """Waits until these processes (and descendants) use under limit_percent
        of a core over 1 s; returns the last reading."""
        end, reading = time.monotonic() + timeout, float("nan")
        while time.monotonic() < end:
            meter = procstat.CpuMeter({"p": pids}).start()
            time.sleep(1.0)
            reading = meter.stop()["p"]
            if reading < limit_percent:
                break
        return reading

    # --- 1. submit throughput ------------------------------------------------

    def scenario_submit(self) -> None:
        duration = 3.0 if self.quick else 5.0
        with self.cluster("submit") as c:
            c.start_master(None, "--max-pending", "10000000", *self.master_args, wait=True)
            frontend = c.start_frontend()
            stub = self.frontend_stub(frontend)
            self.warm_up_submit(stub)
            # (a) one work per SubmitWork call, 16 threads
            self.log(f"submit: SubmitWork from 16 threads for {duration:g} s (no workers: the queue fills)")
            pool = clients.requests(40_000 if self.quick else 80_000)
            batches0 = self.journal_batches(c)
            meter = self.cpu_meter(c).start()
            single = Submitters(stub, pool, threads=16, batched=False, duration=duration).start()
            single.join(duration + 30)
            cpu_a = meter.stop()
            lat = single.latencies()
            rate_a = single.rate()
            self.details["submit_single"] = {
                "works": single.works, "seconds": round(single.finished - single.started, 2),
                "latency_ms_p50": round(1000 * percentile(lat, 50), 2), "latency_ms_p99": round(1000 * percentile(lat, 99), 2),
                "errors": single.errors, "cpu_percent_of_core": cpu_a,
                "journal_batches": self.journal_batches(c) - batches0}
            self.log(f"submit: single {rate_a:,.0f} works/s; cpu {cpu_a}")
            self.row("submit.single", "submit: SubmitWork x1, 16 threads", rate_a, "works/s",
                     note=f"no workers; ack p50 {1000 * percentile(lat, 50):.1f} ms / p99 {1000 * percentile(lat, 99):.1f} ms; "
                          f"cpu % of a core: master {cpu_a.get('master')} frontend {cpu_a.get('frontend')} "
                          f"zk {cpu_a.get('zookeeper')} bench {cpu_a.get('bench')} other {cpu_a.get('other')}; "
                          f"{self.details['submit_single']['journal_batches']:,} journal writes; peers' enqueue: "
                          f"Dramatiq {self.peers['dramatiq_enqueue']:,.0f}/s, Celery {self.peers['celery_enqueue']:,.0f}/s")
            # (b) 500 works per SubmitWorks call, 4 threads
            self.log(f"submit: SubmitWorks x500 from 4 threads for {duration:g} s")
            size = 500
            pool = clients.batches(clients.requests(150_000 if self.quick else 300_000), size)
            batches0 = self.journal_batches(c)
            meter = self.cpu_meter(c).start()
            batched = Submitters(stub, pool, threads=4, batched=True, duration=duration).start()
            batched.join(duration + 60)
            cpu_b = meter.stop()
            lat = batched.latencies()
            rate_b = batched.rate()
            exhausted = batched.works >= sum(len(b.works) for b in pool)
            self.details["submit_batched"] = {
                "works": batched.works, "seconds": round(batched.finished - batched.started, 2),
                "call_ms_p50": round(1000 * percentile(lat, 50), 1), "call_ms_p99": round(1000 * percentile(lat, 99), 1),
                "errors": batched.errors, "cpu_percent_of_core": cpu_b, "pool_exhausted": exhausted,
                "journal_batches": self.journal_batches(c) - batches0}
            self.log(f"submit: batched {rate_b:,.0f} works/s; cpu {cpu_b}")
            self.row("submit.batched", "submit: SubmitWorks x500, 4 threads", rate_b, "works/s",
                     note=f"no workers; call p50 {1000 * percentile(lat, 50):.0f} ms / p99 {1000 * percentile(lat, 99):.0f} ms; "
                          f"cpu % of a core: master {cpu_b.get('master')} frontend {cpu_b.get('frontend')} "
                          f"zk {cpu_b.get('zookeeper')} other {cpu_b.get('other')}; "
                          f"{self.details['submit_batched']['journal_batches']:,} journal writes"
                          + ("; request pool ran out" if exhausted else ""))

    def warm_up_submit(self, stub) -> None:
        subm = Submitters(stub, clients.batches(clients.requests(2000), 500), threads=1, batched=True).start()
        subm.join(30)
        subm = Submitters(stub, clients.requests(300), threads=4, batched=False).start()
        subm.join(30)

    # --- 2. end to end ---------------------------------------------------------

    def e2e_run(self, cluster: LocalCluster, stub, count: int, batched: bool, profile_dir: Path | None = None) -> dict:
        sub = Subscriber(stub, self.last_sequence(stub), record_ids=False)
        try:
            reqs = clients.requests(count)
            items = clients.batches(reqs, 500) if batched else reqs
            recordings = []
            if profile_dir is not None:
                seconds = 10.0
                for s in cluster.services:
                    if s.role in ("master", "frontend", "worker") and s.alive():
                        out = profile_dir / f"{s.role}-{s.pid}.raw"
                        recordings.append((s.role, s.pid, out, profiling.Recording(
                            s.pid, out, seconds, gil=not self.args.profile_all_threads,
                            native=self.args.profile_native)))
            batches0 = self.journal_batches(cluster)
            meter = self.cpu_meter(cluster).start()
            t0 = time.monotonic()
            subm = Submitters(stub, items, threads=2 if batched else 16, batched=batched).start()
            timeout = max(60.0, count / 150)
            complete = sub.wait_count(count, timeout)
            t1 = time.monotonic()
            subm.join(30)
            cpu = meter.stop()
            submitted_at = max((c[1] for c in subm.calls), default=t1)
            out = {"works": count, "results": sub.count, "done": sub.done, "complete": complete,
                   "seconds": round(t1 - t0, 2), "rate": sub.count / (t1 - t0),
                   "submit_rate": subm.works / max(1e-9, submitted_at - t0),
                   "submit_errors": subm.errors, "cpu_percent_of_core": cpu,
                   "journal_batches": self.journal_batches(cluster) - batches0}
            out["cpu_ms_per_work"] = {k: round(10 * v / max(1.0, out["rate"]), 3) for k, v in cpu.items()}
            out["context_switches_per_work"] = {k: round(v / max(1, sub.count), 1) for k, v in meter.switches.items()}
            for role, pid, path, rec in recordings:
                rec.wait(30)
                if rec.error:
                    self.notes.append(f"profile of {role} {pid} failed: {rec.error}")
                    continue
                summary = profiling.summarise(path, 10.0)
                self.profiles.setdefault(role, []).append({"pid": pid, "file": str(path), **summary})
            return out
        finally:
            sub.stop()

    @contextlib.contextmanager
    def e2e_cluster(self, name: str, per_process: int, journal: str = ""):
        """Master, frontend, 2 worker processes x per_process slots, warmed up."""
        with self.cluster(name, journal) as c:
            c.start_master(None, *self.master_args, wait=True)
            frontend = c.start_frontend()
            stub = self.frontend_stub(frontend)
            workers = [c.start_worker(per_process, *self.worker_args), c.start_worker(per_process, *self.worker_args)]
            self.wait_workers(stub, 2 * per_process, 60)
            self.warm_up(stub, 200)
            self.wait_quiet([w.pid for w in workers], 20, 15)
            yield c, stub

    def _e2e_log(self, mode: str, per_process: int, result: dict) -> None:
        self.log(f"e2e: {mode} c={per_process}: {result['rate']:,.0f} works/s ({result['results']}/{result['works']} "
                 f"in {result['seconds']} s, {result['journal_batches']} journal writes); "
                 f"cpu ms/work {result['cpu_ms_per_work']}; context switches/work {result['context_switches_per_work']}")

    def scenario_sdk(self) -> None:
        """One producer thread with dworkers.Client, the way the peers were
        measured: submit() in a loop, then one acknowledged submit at a time."""
        import dworkers

        pipelined = 5_000 if self.quick else 20_000
        single = 200 if self.quick else 1_000
        with self.cluster("sdk") as c:
            c.start_master(None, *self.master_args, wait=True)
            frontend = c.start_frontend()
            stub = self.frontend_stub(frontend)
            with dworkers.Client(frontend.address, timeout=60) as client:
                for _ in range(500):  # warm up connections and code paths
                    client.submit("square", payload=b"3").accepted(60)
                # No worker yet: the peers' enqueue rates are measured with none running.
                self.log(f"sdk: {single:,} submits one at a time, no worker running")
                alone = self.single_submits(client, single)
                c.start_worker(1, *self.worker_args)
                self.wait_workers(stub, 1, 60)
                wait_until(lambda: self.unfinished(stub) == 0, 300, "the warm-up's works to finish")
                self.log(f"sdk: {pipelined:,} submit() calls from one thread, then {single:,} one at a time")
                meter = self.cpu_meter(c).start()
                started = time.perf_counter()
                for _ in range(pipelined):
                    client.submit("square", payload=b"3")
                queued = time.perf_counter() - started
                client.flush(120)
                rate = pipelined / (time.perf_counter() - started)
                cpu = meter.stop()
                loaded = self.single_submits(client, single // 2)  # while the worker drains the 20,000
                self.log("sdk: waiting for the backlog to drain, then submits with the worker running each")
                wait_until(lambda: self.unfinished(stub) == 0, 300, "the SDK backlog to drain")
                running = self.single_submits(client, single)
        p50, p99 = ms(percentile(alone, 50)), ms(percentile(alone, 99))
        figures = {"pipelined": pipelined, "pipelined_rate": round(rate), "queue_seconds": round(queued, 3),
                   "single": single, "single_rate": round(single / sum(alone)), "cpu_percent_of_core": cpu}
        for name, latencies in (("single", alone), ("single_with_worker", running), ("single_while_draining", loaded)):
            figures.update({f"{name}_ms_p50": round(ms(percentile(latencies, 50)), 2),
                            f"{name}_ms_p99": round(ms(percentile(latencies, 99)), 2),
                            f"{name}_ms_max": round(ms(max(latencies)), 2)})
        self.details["sdk"] = figures
        self.row("sdk.pipelined", "SDK submit() from one thread, pipelined", round(rate), "works/s", 5000, ">=",
                 f"{pipelined:,} works acknowledged (submit() itself returned after {queued:.2f} s); peers' "
                 f"enqueue, one call per work: Dramatiq {self.peers['dramatiq_enqueue']:,.0f}/s, PgQueuer "
                 f"{self.peers['pgqueuer_enqueue']:,.0f}/s, Celery {self.peers['celery_enqueue']:,.0f}/s")
        self.row("sdk.single", "SDK submit, one acknowledged at a time", round(single / sum(alone)), "works/s",
                 None, "", f"{single:,} works; each waits for its durable write; no worker running")
        self.row("sdk.single.p50", "SDK single submit p50", p50, "ms", 2.5, "<=",
                 f"p99 {p99:.1f} ms, max {ms(max(alone)):.1f} ms, no worker running (as the peers' enqueue); "
                 f"with a worker running each work: p50 {figures['single_with_worker_ms_p50']:.1f} ms, "
                 f"p99 {figures['single_with_worker_ms_p99']:.1f} ms; while a worker drains the pipelined "
                 f"backlog: p50 {figures['single_while_draining_ms_p50']:.1f} ms, "
                 f"p99 {figures['single_while_draining_ms_p99']:.1f} ms; client -> frontend -> master -> journal")

    @staticmethod
    def single_submits(client, count: int) -> list[float]:
        """Seconds each of `count` submits took to be acknowledged, one at a time."""
        latencies = []
        for _ in range(count):
            t0 = time.perf_counter()
            client.submit("square", payload=b"3").accepted(30)
            latencies.append(time.perf_counter() - t0)
        return latencies

    @staticmethod
    def unfinished(stub) -> int:
        info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=30)
        return info.pending + info.in_progress + info.scheduled

    def scenario_peers(self) -> None:
        """Measured the way the peers' harness measures Celery, Dramatiq, RQ
        and PgQueuer: 2 job processes in all (2 worker processes x 1 slot,
        each job in its own child process), one producer thread submitting
        one work per call then reading each result in submission order, and
        round trips one at a time; on each journal."""
        n = 2_000 if self.quick else 20_000
        samples = 50 if self.quick else 200
        for journal_name in ("zookeeper", "postgresql"):
            if self.remaining() < 45:
                self.notes.append(f"peers: the {journal_name} journal skipped (time budget)")
                continue
            journal = self.pg_url() if journal_name == "postgresql" else ""
            figures = self._like_peers(journal_name, journal, n, samples)
            self.details[f"peers_{journal_name}"] = figures
            self.log(f"peers ({journal_name}): {figures}")
            self.row(f"peers.{journal_name}.enqueue", f"like the peers, enqueue, SDK submit() per work ({journal_name})",
                     figures["enqueue_rate"], "works/s", self.peers["pgqueuer_enqueue"], ">=",
                     f"{n:,} works, one producer thread, no worker running, every one acknowledged durable; "
                     f"target PgQueuer's; peers: Dramatiq {self.peers['dramatiq_enqueue']:,.0f}, PgQueuer "
                     f"{self.peers['pgqueuer_enqueue']:,.0f}, Celery {self.peers['celery_enqueue']:,.0f}")
            self.row(f"peers.{journal_name}.sdk", f"like the peers, SDK submit() per work ({journal_name})",
                     figures["sdk_rate"], "works/s", round(2 * self.peers["dramatiq_e2e"]), ">=",
                     f"{n:,} works, one producer thread, results read in order; 2 job processes; "
                     f"worker prefetch {figures['prefetch']}; target 2 x Dramatiq; peers: Dramatiq "
                     f"{self.peers['dramatiq_e2e']:,.0f}, PgQueuer {self.peers['pgqueuer_e2e']:,.0f}, "
                     f"Celery {self.peers['celery_e2e']:,.0f}")
            self.row(f"peers.{journal_name}.submitworks", f"like the peers, SubmitWorks x100 ({journal_name})",
                     figures["batch_rate"], "works/s", round(2 * self.peers["dramatiq_e2e"]), ">=",
                     f"{n:,} works in calls of 100 from one thread, then WaitWorks in order; 2 job processes")
            self.row(f"peers.{journal_name}.rtt.p50", f"like the peers, round trip p50 ({journal_name})",
                     figures["rtt_ms_p50"], "ms", self.peers["celery_rtt_p50"], "<=",
                     f"{samples} SDK submit(...).result() one at a time; p99 {figures['rtt_ms_p99']} ms, "
                     f"max {figures['rtt_ms_max']} ms; target Celery's p50; p50 / p99: Celery "
                     f"{self.peers['celery_rtt_p50']} / {self.peers['celery_rtt_p99']} ms, PgQueuer "
                     f"{self.peers['pgqueuer_rtt_p50']} / {self.peers['pgqueuer_rtt_p99']} ms")
            self.row(f"peers.{journal_name}.rtt.p99", f"like the peers, round trip p99 ({journal_name})",
                     figures["rtt_ms_p99"], "ms", round(2 * figures["rtt_ms_p50"], 2), "<=", "target: 2 x this p50")

    def _like_peers(self, name: str, journal: str, n: int, samples: int) -> dict:
        import dworkers

        with self.cluster(f"peers-{name}", journal) as c:
            c.start_master(None, *self.master_args, wait=True)
            frontend = c.start_frontend()
            stub = self.frontend_stub(frontend)
            with dworkers.Client(frontend.address, timeout=60) as client:
                for _ in range(200):  # warm up connections and code paths
                    client.submit("square", payload=b"3")
                client.flush(60)
                self.log(f"peers ({name}): {n:,} submit() calls from one thread, no worker running (enqueue)")
                started = time.perf_counter()
                for i in range(n):
                    client.submit("square", payload=str(i % 1000))
                client.flush(120)
                enqueue_rate = n / (time.perf_counter() - started)
            workers = [c.start_worker(1, "--executor", "process", *self.worker_args) for _ in range(2)]
            self.wait_workers(stub, 2, 60)
            wait_until(lambda: self.unfinished(stub) == 0, 300, "the enqueued works to finish")
            self.warm_up(stub, 200)
            self.wait_quiet([w.pid for w in workers], 20, 15)
            with dworkers.Client(frontend.address, timeout=60) as client:
                self.log(f"peers ({name}): {n:,} submit() calls from one thread, each result read in order")
                meter = self.cpu_meter(c).start()
                started = time.perf_counter()
                handles = [client.submit("square", payload=str(i % 1000)) for i in range(n)]
                for handle in handles:
                    handle.result(120)
                sdk_rate = n / (time.perf_counter() - started)
                cpu = meter.stop()
                self.log(f"peers ({name}): {n:,} works in SubmitWorks calls of 100, then WaitWorks in order")
                started = time.perf_counter()
                ids = []
                for _ in range(0, n, 100):
                    batch = clients.requests(100)
                    stub.SubmitWorks(work_pb2.SubmitWorksRequest(works=batch), timeout=30)
                    ids += [r.work_id for r in batch]
                for first in range(0, n, 10_000):
                    chunk = ids[first:first + 10_000]
                    got = sum(len(m.results) for m in stub.WaitWorks(work_pb2.WaitWorksRequest(work_ids=chunk),
                                                                     timeout=300))
                    if got != len(chunk):
                        raise RuntimeError(f"peers: WaitWorks returned {got} of {len(chunk)} results")
                batch_rate = n / (time.perf_counter() - started)
                # The peers' harness measures round trips from a fresh producer process: this one
                # lets go of the runs' 40,000 handles and ids, which its collector would walk.
                del handles, ids
                gc.collect()
                for _ in range(10):
                    client.submit("square", payload="3").result(30)
                rtts = []
                for i in range(samples):
                    t0 = time.perf_counter()
                    client.submit("square", payload=str(i)).result(30)
                    rtts.append(time.perf_counter() - t0)
        return {"works": n, "enqueue_rate": round(enqueue_rate), "sdk_rate": round(sdk_rate),
                "batch_rate": round(batch_rate),
                "rtt_ms_p50": round(ms(percentile(rtts, 50)), 2), "rtt_ms_p99": round(ms(percentile(rtts, 99)), 2),
                "rtt_ms_max": round(ms(max(rtts)), 2), "samples": samples, "prefetch": self._prefetch(),
                "cpu_percent_of_core": cpu}

    def _prefetch(self) -> int:
        args = self.worker_args
        return int(args[args.index("--prefetch") + 1]) if "--prefetch" in args else WorkerSettings().prefetch

    def scenario_e2e(self) -> None:
        """Batched: every setting with the full count. Single (slower): every
        setting with a smaller count to choose, then the full count at the best."""
        count = self.args.e2e_works or (2_000 if self.quick else 20_000)
        sweep_single = min(count, 2_000 if self.quick else 4_000)
        settings = [int(x) for x in self.args.concurrency.split(",")] if self.args.concurrency else \
            ([4] if self.quick else [4, 8, 16])
        modes = self.args.e2e_modes.split(",")
        runs = {"batched": [], "single": [], "single_sweep": []}
        for per_process in settings:
            if self.remaining() < 90:
                self.notes.append(f"e2e: concurrency {per_process} skipped (time budget)")
                continue
            with self.e2e_cluster(f"e2e-c{per_process}", per_process) as (c, stub):
                for mode in modes:
                    n = count if mode == "batched" or len(settings) == 1 else sweep_single
                    self.log(f"e2e: {n:,} works, {mode}, 2 worker processes x {per_process} slots")
                    result = self.e2e_run(c, stub, n, mode == "batched")
                    result["slots_per_process"] = per_process
                    runs[mode if n == count else "single_sweep"].append(result)
                    self._e2e_log(mode, per_process, result)
        if "single" in modes and runs["single_sweep"] and self.remaining() > 30 + count / 200:
            best = max(runs["single_sweep"], key=lambda r: r["rate"])["slots_per_process"]
            with self.e2e_cluster(f"e2e-single-c{best}", best) as (c, stub):
                self.log(f"e2e: {count:,} works, single, 2 worker processes x {best} slots (the sweep's best)")
                result = self.e2e_run(c, stub, count, False)
                result["slots_per_process"] = best
                runs["single"].append(result)
                self._e2e_log("single", best, result)
        elif runs["single_sweep"] and not runs["single"]:
            self.notes.append(f"e2e single: only the {sweep_single:,}-work sweep ran (time budget)")
            runs["single"] = runs["single_sweep"]
        self.details["e2e"] = runs
        for mode, target, peer in (("batched", 3000, "6 x Dramatiq's 480/s"),
                                   ("single", round(2 * self.peers["celery_e2e"]),
                                    f"2 x Celery's {self.peers['celery_e2e']:,.0f}/s")):
            if not runs[mode]:
                continue
            best = max(runs[mode], key=lambda r: r["rate"])
            tried = runs[mode] if mode == "batched" else runs["single_sweep"] or runs["single"]
            tried_text = ", ".join(f"c={r['slots_per_process']}: {r['rate']:,.0f}" for r in tried)
            if mode == "single" and runs["single_sweep"]:
                tried_text = f"sweep of {sweep_single:,} works: {tried_text}"
            cpu, per = best["cpu_percent_of_core"], best["cpu_ms_per_work"]
            note = (f"2 procs x {best['slots_per_process']} slots ({tried_text}); "
                    f"{'SubmitWorks x500, 2 threads' if mode == 'batched' else 'SubmitWork x1, 16 threads'}; "
                    f"CPU ms/work: master {per.get('master')} frontend {per.get('frontend')} "
                    f"worker {per.get('worker')} executors {per.get('executors')} zk {per.get('zookeeper')} "
                    f"bench {per.get('bench')}; machine {cpu.get('machine')}% of a core, other load {cpu.get('other')}%; "
                    f"{best['journal_batches']:,} journal writes; target {peer}")
            if not best["complete"]:
                note += f"; INCOMPLETE: {best['results']}/{best['works']} results"
            self.row(f"e2e.{mode}", f"end to end, {best['works']:,} works, {mode}", best["rate"], "works/s",
                     target, ">=", note)
        if self.args.profile and runs["batched"] and self.remaining() > 60:
            best = max(runs["batched"], key=lambda r: r["rate"])["slots_per_process"]
            profile_dir = Path(self.args.profile)
            profile_dir.mkdir(parents=True, exist_ok=True)
            with self.e2e_cluster("e2e-profile", best) as (c, stub):
                self.log(f"e2e: profiling master, frontend and workers (py-spy) during a batched run, c={best}")
                result = self.e2e_run(c, stub, count, True, profile_dir)
                self.details["e2e_profiled_run"] = result
                self.log(f"e2e: profiled run {result['rate']:,.0f} works/s (py-spy slows the processes)")

    # --- shards ----------------------------------------------------------------

    def scenario_shards(self) -> None:
        """End to end with 1, 2 and 4 shards (an active master each), batched
        submits, 2 worker processes: the throughput, and the CPU each process
        takes per work, to show which one limits the whole."""
        count = 4_000 if self.quick else 20_000
        per_process = 4
        runs = {}
        for shards in (1, 2, 4):
            if self.remaining() < 90:
                self.notes.append(f"shards: {shards} shards skipped (time budget)")
                continue
            with self.cluster(f"shards-{shards}") as c:
                if shards > 1:
                    c.shards("init", str(shards))
                masters = [c.start_master(None, "--shard", str(k), *self.master_args, wait=True)
                           for k in range(shards)]
                frontend = c.start_frontend()
                stub = self.frontend_stub(frontend)
                workers = [c.start_worker(per_process, *self.worker_args) for _ in range(2)]
                self.wait_workers(stub, 2 * per_process, 60)
                self.warm_up(stub, 400)
                self.wait_quiet([w.pid for w in workers], 20, 15)
                self.log(f"shards: {count:,} works, batched, {shards} shard(s), 2 worker processes x {per_process}")
                per_master = procstat.CpuMeter({f"master {k}": [m.pid] for k, m in enumerate(masters)}).start()
                result = self.e2e_run(c, stub, count, True)
                busiest = max(v for k, v in per_master.stop().items() if k.startswith("master "))
                result["busiest_master_percent_of_core"] = busiest
                runs[shards] = result
                per = result["cpu_ms_per_work"]
                self.log(f"shards: {shards}: {result['rate']:,.0f} works/s; cpu ms/work {per}; busiest master "
                         f"{busiest:.0f}% of a core")
        self.details["shards"] = {str(k): v for k, v in runs.items()}
        for shards, result in runs.items():
            per, cpu = result["cpu_ms_per_work"], result["cpu_percent_of_core"]
            note = (f"CPU ms/work: masters {per.get('master')} frontend {per.get('frontend')} worker "
                    f"{per.get('worker')} executors {per.get('executors')} zk {per.get('zookeeper')} bench "
                    f"{per.get('bench')}; busiest master {result['busiest_master_percent_of_core']:.0f}% of a core; "
                    f"machine {cpu.get('machine')}% of 200%")
            if not result["complete"]:
                note += f"; INCOMPLETE: {result['results']}/{result['works']} results"
            self.row(f"shards.{shards}", f"end to end, {result['works']:,} works, {shards} shard(s)", result["rate"],
                     "works/s", None, "", note)

    def scenario_move(self) -> None:
        """Moving 1,000 slots holding 100,000 pending works from one shard to
        another (no workers: they all wait), on each journal: the time from
        `dworkers shards move` to the map naming the new owner."""
        count = 20_000 if self.quick else 100_000
        first, last = 0, 999
        ids, n = [], 0
        while len(ids) < count:
            work_id = f"m{n}"
            n += 1
            if first <= slot_of(work_id) <= last:
                ids.append(work_id)
        for journal, url in (("zookeeper", ""), ("postgresql", self.pg_url())):
            if self.remaining() < 40:
                self.notes.append(f"move: {journal} skipped (time budget)")
                continue
            with self.cluster(f"move-{journal}", url) as c:
                c.shards("init", "2")
                for shard in (0, 1):
                    c.start_master(None, "--shard", str(shard), *self.master_args, wait=True)
                stub = self.frontend_stub(c.start_frontend())
                self.warm_up_submit(stub)
                self.fill(stub, [work_pb2.SubmitWorkRequest(work_id=w, kind="square", payload=b"x" * 100)
                                 for w in ids], f"move ({journal})")
                self.log(f"move: {count:,} pending works in slots {first}-{last} of shard 0 -> shard 1 ({journal})")
                t0 = time.monotonic()
                c.shards("move", "--slots", f"{first}-{last}", "--to", "1")
                took = time.monotonic() - t0
                info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=30)
                moved = info.shards[1].pending
            self.details[f"move_{journal}"] = {"works": count, "slots": last - first + 1, "seconds": round(took, 2),
                                               "target_pending_after": moved}
            self.row(f"move.{journal}", f"move {last - first + 1:,} slots holding {count:,} pending works "
                     f"({journal} journal)", took, "s", None, "",
                     f"{count / took:,.0f} works/s; the target holds {moved:,} pending after; submissions for "
                     "those slots wait meanwhile")

    # --- 3. round trip ---------------------------------------------------------

    def scenario_roundtrip(self) -> None:
        p50, p99, note50, note99 = self.roundtrip()
        self.row("roundtrip.p50", "round trip submit->result p50", p50, "ms", 6.0, "<=", note50)
        self.row("roundtrip.p99", "round trip submit->result p99", p99, "ms", 20.0, "<", note99)

    def roundtrip(self, journal: str = "") -> tuple[float, float, str, str]:
        """200 works one at a time, each awaited: (p50 ms, p99 ms, notes)."""
        count = 50 if self.quick else 200
        key = "roundtrip_postgresql" if journal else "roundtrip"
        with self.cluster(key.replace("_", "-"), journal) as c:
            c.start_master(None, *self.master_args, wait=True)
            frontend = c.start_frontend()
            stub = self.frontend_stub(frontend)
            workers = [c.start_worker(2, *self.worker_args), c.start_worker(2, *self.worker_args)]
            self.wait_workers(stub, 4, 60)
            self.warm_up(stub, 40)
            self.wait_quiet([w.pid for w in workers], 20, 15)
            sub = Subscriber(stub, self.last_sequence(stub))
            try:
                # the stream is open once a first result came through it
                for r in clients.requests(5):
                    stub.SubmitWork(r, timeout=10)
                    if sub.wait_id(r.work_id, 10) is None:
                        raise TimeoutError("round trip: a warm-up result did not arrive within 10 s")
                self.log(f"roundtrip: {count} works one at a time, each awaited on the open WatchResults stream")
                meter = self.cpu_meter(c).start()
                rtts, acks, after_ack = [], [], []
                for r in clients.requests(count):
                    t0 = time.monotonic()
                    stub.SubmitWork(r, timeout=10)
                    t1 = time.monotonic()
                    arrived = sub.wait_id(r.work_id, 10)
                    if arrived is None:
                        raise TimeoutError(f"round trip: no result for {r.work_id} within 10 s")
                    rtts.append(arrived - t0)
                    acks.append(t1 - t0)
                    after_ack.append(arrived - t1)
                cpu = meter.stop()
            finally:
                sub.stop()
        p50, p99 = ms(percentile(rtts, 50)), ms(percentile(rtts, 99))
        self.details[key] = {
            "works": count, "rtt_ms_p50": round(p50, 2), "rtt_ms_p99": round(p99, 2),
            "rtt_ms_max": round(ms(max(rtts)), 2), "ack_ms_p50": round(ms(percentile(acks, 50)), 2),
            "ack_ms_p99": round(ms(percentile(acks, 99)), 2),
            "ack_to_result_ms_p50": round(ms(percentile(after_ack, 50)), 2),
            "ack_to_result_ms_p99": round(ms(percentile(after_ack, 99)), 2), "cpu_percent_of_core": cpu}
        note = (f"{count} works, 2 procs x 2 slots; submit ack p50 {ms(percentile(acks, 50)):.1f} ms, "
                f"ack->result p50 {ms(percentile(after_ack, 50)):.1f} ms; peers p50 ~6-8 ms")
        return p50, p99, note, (f"max {ms(max(rtts)):.1f} ms; ack->result p99 {ms(percentile(after_ack, 99)):.1f} "
                                "ms; peers p99 ~9-16 ms")

    # --- 3b. the PostgreSQL journal, beside the ZooKeeper journal's figures ------

    def scenario_postgresql(self) -> None:
        """End to end (batched, the ZooKeeper run's best concurrency) and round
        trip on the PostgreSQL journal; the targets are this run's ZooKeeper figures."""
        url = self.pg_url()
        zk_runs = self.details.get("e2e", {}).get("batched") or []
        per_process = max(zk_runs, key=lambda r: r["rate"])["slots_per_process"] if zk_runs else 16
        count = self.args.e2e_works or (2_000 if self.quick else 20_000)
        with self.e2e_cluster("e2e-postgresql", per_process, url) as (c, stub):
            self.log(f"postgresql: {count:,} works, batched, 2 worker processes x {per_process} slots")
            result = self.e2e_run(c, stub, count, True)
        result["slots_per_process"] = per_process
        self.details["e2e_postgresql"] = result
        self._e2e_log("batched on PostgreSQL", per_process, result)
        zk_best = max((r["rate"] for r in zk_runs), default=None)
        per = result["cpu_ms_per_work"]
        self.row("postgresql.e2e", f"PostgreSQL journal: end to end, {count:,} works, batched", result["rate"],
                 "works/s", zk_best, ">=" if zk_best else "",
                 f"2 procs x {per_process} slots; CPU ms/work: master {per.get('master')} postgresql "
                 f"{per.get('postgresql')} zk {per.get('zookeeper')}; target: the ZooKeeper journal's figure above")
        p50, p99, note50, note99 = self.roundtrip(url)
        zk_rtt = self.details.get("roundtrip", {})
        self.row("postgresql.roundtrip.p50", "PostgreSQL journal: round trip p50", p50, "ms",
                 zk_rtt.get("rtt_ms_p50"), "<=" if zk_rtt else "", note50)
        self.row("postgresql.roundtrip.p99", "PostgreSQL journal: round trip p99", p99, "ms",
                 zk_rtt.get("rtt_ms_p99"), "<=" if zk_rtt else "", note99)

    # --- 4. failover -----------------------------------------------------------

    def _standby_recovery(self, service: Service) -> str:
        found = re.findall(r"recovered (\d+) events in ([\d.]+) s", service.log())
        return f"{found[-1][0]} events replayed in {found[-1][1]} s" if found else "no recovery line"

    def scenario_failover(self) -> None:
        with self.cluster("failover") as c:
            first = c.start_master(None, *self.master_args, wait=True)
            second = c.start_master(None, *self.master_args, wait=True)
            frontend = c.start_frontend()
            stub = self.frontend_stub(frontend)
            if c.active_master(10) is not first:
                raise RuntimeError("failover: the first backend is not the active master")
            self.warm_up_submit(stub)
            items = (work_pb2.SubmitWorkRequest(work_id=i, kind="square", payload=b"3")
                     for i in clients.counter_ids(f"fo-{uuid.uuid4().hex[:6]}"))
            load = Submitters(stub, items, threads=4, batched=False, call_timeout=10, give_up_after=30).start()
            out = {}
            try:
                time.sleep(2.0)
                # kill -9: detected when the ZooKeeper session expires
                self.log(f"failover: kill -9 the active master (session timeout {SESSION_TIMEOUT:g} s) under load")
                znodes = self.journal_znodes(c)
                watch = HealthWatch(second.address, 30)
                t_kill = time.monotonic()
                first.kill()
                serving = watch.wait(30)
                time.sleep(2.0)
                gap = outage(load.calls, t_kill)
                out["kill9"] = {"recovered_s": gap and round(gap[0], 3), "client_gap_s": gap and round(gap[1], 3),
                                "standby_serving_s": serving and round(serving - t_kill, 3),
                                "standby": self._standby_recovery(second), "journal_znodes": znodes}
                self.log(f"failover: kill -9 -> {out['kill9']}")
                # SIGTERM: the master resigns; a new standby waits behind the new master
                third = c.start_master(None, *self.master_args, wait=True)
                time.sleep(2.0)
                if c.active_master(10) is not second:
                    raise RuntimeError("failover: the second backend is not the active master")
                self.log("failover: SIGTERM the active master under load")
                znodes = self.journal_znodes(c)
                watch = HealthWatch(third.address, 30)
                t_term = time.monotonic()
                second.signal(signal.SIGTERM)
                serving = watch.wait(30)
                time.sleep(2.0)
                gap = outage(load.calls, t_term)
                out["sigterm"] = {"recovered_s": gap and round(gap[0], 3), "client_gap_s": gap and round(gap[1], 3),
                                  "standby_serving_s": serving and round(serving - t_term, 3),
                                  "standby": self._standby_recovery(third), "journal_znodes": znodes}
                self.log(f"failover: SIGTERM -> {out['sigterm']}")
            finally:
                load.stop()
                load.join(15)
            out["load"] = {"acked": load.works, "errors": load.errors, "given_up": load.failed}
            self.details["failover"] = out
        k, t = out["kill9"], out["sigterm"]
        self.row("failover.kill9", "failover after kill -9: submits succeed again", k["recovered_s"], "s",
                 SESSION_TIMEOUT + 1.0, "<=",
                 f"session timeout {SESSION_TIMEOUT:g} s; standby serving after {k['standby_serving_s']} s; "
                 f"{k['standby']} from {k['journal_znodes']:,} batch znodes; 4 submit threads (SubmitWork)")
        self.row("failover.sigterm", "failover after SIGTERM: submits succeed again", t["recovered_s"], "s",
                 1.0, "<", f"standby serving after {t['standby_serving_s']} s; {t['standby']} "
                           f"from {t['journal_znodes']:,} batch znodes")

    # --- 5. replay and 7. memory -------------------------------------------------

    def fill(self, stub, reqs: list, what: str) -> float:
        """Submits `reqs` as SubmitWorks of 500 from 4 threads (no workers run
        them); returns the rate at which they were accepted."""
        count = len(reqs)
        self.log(f"{what}: filling the queue with {count:,} works (SubmitWorks x500, 4 threads, no workers)")
        subm = Submitters(stub, clients.batches(reqs, 500), threads=4, batched=True).start()
        if not subm.join(max(120.0, count / 500)) or subm.works < count:
            raise RuntimeError(f"{what}: only {subm.works:,} of {count:,} works acked ({subm.errors})")
        return subm.rate()

    def scenario_replay(self) -> None:
        count = self.args.replay_works or (20_000 if self.quick else 100_000)
        with self.cluster("replay") as c:
            first = c.start_master(None, *self.master_args, wait=True)
            second = c.start_master(None, *self.master_args, wait=True)
            frontend = c.start_frontend()
            stub = self.frontend_stub(frontend)
            if c.active_master(10) is not first:
                raise RuntimeError("replay: the first backend is not the active master")
            self.warm_up_submit(stub)  # 2,300 pending from here on
            time.sleep(2.0)
            rss0, standby_rss0 = procstat.rss_bytes(first.pid), procstat.rss_bytes(second.pid)
            reqs = clients.requests(count)
            payload = sum(len(r.payload) for r in reqs)
            fill_rate = self.fill(stub, reqs, "replay")
            # let the ticks take a snapshot if one is due (every 50,000 events by default), then settle
            time.sleep(3.0)
            self.wait_quiet([first.pid], 10, 30)
            rss1 = procstat.rss_bytes(first.pid)
            snapshots = re.findall(r"snapshot at journal position (\d+): (\d+) pending, (\d+) results, ([\d.]+) s",
                                   first.log())
            pending = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10).pending
            self.log(f"replay: {pending:,} pending; master RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB; "
                     f"snapshots taken: {[(int(s[1]), float(s[3])) for s in snapshots]}")
            znodes = self.journal_znodes(c)
            self.log(f"replay: SIGTERM the master; timing the standby's recovery ({znodes} batch znodes to read)")
            watch = HealthWatch(second.address, 120)
            t0 = time.monotonic()
            first.signal(signal.SIGTERM)
            serving = watch.wait(120)
            if serving is None:
                raise TimeoutError("replay: the standby did not serve within 120 s")
            time.sleep(1.0)
            standby_rss1 = procstat.rss_bytes(second.pid)
            standby_rss1 = procstat.rss_bytes(second.pid)
            found = re.findall(r"recovered (\d+) events in ([\d.]+) s: (\d+) pending", second.log())
            if not found:
                raise RuntimeError("replay: no 'recovered N events in X s' line in the standby's log")
            events, seconds, recovered_pending = int(found[-1][0]), float(found[-1][1]), int(found[-1][2])
        per_work = (rss1 - rss0 - payload) / count
        standby_per_work = (standby_rss1 - standby_rss0 - payload) / count
        self.details["replay"] = {
            "works_filled": count, "fill_rate": round(fill_rate), "pending_at_stop": pending,
            "snapshots": [{"position": int(s[0]), "pending": int(s[1]), "results": int(s[2]), "seconds": float(s[3])}
                          for s in snapshots],
            "events_replayed": events, "journal_znodes": znodes, "recovered_s": seconds, "recovered_pending": recovered_pending,
            "serving_after_sigterm_s": round(serving - t0, 3)}
        self.details["memory"] = {
            "master_rss_before": rss0, "master_rss_after": rss1, "payload_bytes": payload, "works": count,
            "per_work_bytes": round(per_work), "standby_rss_before": standby_rss0,
            "standby_rss_after_recovery": standby_rss1, "standby_per_work_bytes": round(standby_per_work)}
        snap = (f"from a snapshot of {int(snapshots[-1][1]):,} pending + {events:,} journal events in {znodes} znodes"
                if snapshots else f"no snapshot: {events:,} journal events in {znodes} znodes")
        self.row("replay.recovered", f"replay of {recovered_pending:,} pending (master's log)", seconds, "s", 2.0, "<",
                 f"{snap}; defaults (--snapshot-every 50000); fill {fill_rate:,.0f} works/s")
        self.row("replay.serving", "replay: SIGTERM -> standby SERVING", serving - t0, "s", 2.0, "<",
                 "health dworkers.v1.Master, polled every 10 ms")
        self.row("memory.per_work", "master RSS per pending work (beyond payload)", per_work, "B", 1024, "<",
                 f"VmRSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB for {count:,} works; a fresh standby "
                 f"after recovering them: {standby_per_work:,.0f} B/work")

    # --- 5b. a backlog bigger than memory (PostgreSQL journal) -------------------

    def zookeeper_data(self, root: str) -> tuple[int, int]:
        """(znodes, data bytes) under a cluster's root."""
        count, size, stack = 0, 0, [root]
        while stack:
            path = stack.pop()
            data, _ = self.kz.get(path)
            count, size = count + 1, size + len(data)
            stack += [f"{path}/{child}" for child in self.kz.get_children(path)]
        return count, size

    def scenario_backlog(self) -> None:
        count = self.args.backlog_works or (100_000 if self.quick else 1_000_000)
        url = self.pg_url()
        with self.cluster("backlog", url) as c:
            room = ("--max-pending", str(count + 10_000))  # the warm-up's works stay pending too
            first = c.start_master(None, *room, *self.master_args, wait=True)
            second = c.start_master(None, *room, *self.master_args, wait=True)
            stub = self.frontend_stub(c.start_frontend())
            self.warm_up_submit(stub)
            time.sleep(2.0)
            zk_before = self.zookeeper_data(c.root)
            rss0, standby_rss0 = procstat.rss_bytes(first.pid), procstat.rss_bytes(second.pid)
            fill_rate = self.fill(stub, [work_pb2.SubmitWorkRequest(work_id=f"b{i}", kind="square",
                                                                    payload=os.urandom(1024)) for i in range(count)],
                                  "backlog")
            time.sleep(3.0)
            self.wait_quiet([first.pid], 10, 60)
            rss1 = procstat.rss_bytes(first.pid)
            zk_after = self.zookeeper_data(c.root)
            with psycopg.connect(url) as conn:
                db_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            self.log(f"backlog: master RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB; ZooKeeper {zk_before} -> "
                     f"{zk_after} (znodes, bytes); PostgreSQL {db_bytes / 2**20:,.0f} MiB; kill -9 the master")
            watch = HealthWatch(second.address, 180)
            t0 = time.monotonic()
            first.kill()
            serving = watch.wait(180)
            if serving is None:
                raise TimeoutError("backlog: the standby did not serve within 180 s")
            time.sleep(1.0)
            standby_rss1 = procstat.rss_bytes(second.pid)
            found = re.findall(r"recovered (\d+) events in ([\d.]+) s: (\d+) pending", second.log())
            recovered = float(found[-1][1]) if found else float("nan")
            pending = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=30).pending
        per_work = (rss1 - rss0) / count
        standby_per_work = (standby_rss1 - standby_rss0) / count
        self.details["backlog"] = {
            "works": count, "payload_bytes": 1024, "fill_rate": round(fill_rate), "master_rss_before": rss0,
            "master_rss_after": rss1, "per_work_bytes": round(per_work),
            "standby_per_work_bytes": round(standby_per_work), "zookeeper_before": zk_before,
            "zookeeper_after": zk_after, "postgresql_bytes": db_bytes, "recovered_s": recovered,
            "serving_after_kill_s": round(serving - t0, 2), "pending_after": pending}
        self.row("backlog.submit", f"PostgreSQL journal: submit {count:,} works of 1 KiB", fill_rate, "works/s",
                 note="SubmitWorks x500, 4 threads, no workers")
        self.row("backlog.memory", "PostgreSQL journal: master RSS per pending work", per_work, "B", 400, "<=",
                 f"VmRSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB for {count:,} pending 1 KiB works "
                 f"(payloads included: they stay in PostgreSQL); the standby after recovering them: "
                 f"{standby_per_work:,.0f} B/work")
        self.row("backlog.zookeeper", "PostgreSQL journal: ZooKeeper data growth", zk_after[1] - zk_before[1], "B",
                 4096, "<", f"znodes {zk_before[0]} -> {zk_after[0]}, data {zk_before[1]:,} -> {zk_after[1]:,} B; "
                 f"PostgreSQL database {db_bytes / 2**20:,.0f} MiB")
        self.row("backlog.recovery", "PostgreSQL journal: kill -9 -> standby SERVING", serving - t0, "s", 10.0, "<=",
                 f"{pending:,} pending after recovery; replay itself {recovered:.2f} s (the standby's log); "
                 f"session timeout {SESSION_TIMEOUT:g} s")

    # --- 5c. control over work ----------------------------------------------------

    def dispatch_cost(self, c: LocalCluster, stub, master: Service, count: int) -> tuple[float, float]:
        """Runs `count` of the pending works with a worker (2 thread slots);
        returns the master's CPU seconds per work and the works/s, measured
        after a warm-up of 200."""
        def done() -> int:
            return stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=30).done

        def wait_done(target: int) -> None:
            end = time.monotonic() + 300
            while done() < target:
                if time.monotonic() > end:
                    raise TimeoutError(f"control: {done()} of {target} works done within 300 s")
                time.sleep(0.05)

        start = done()
        worker = c.start_worker(2, "--executor", "thread", *self.worker_args)
        try:
            wait_done(start + 200)
            cpu0, t0 = procstat.cpu_seconds(master.pid), time.monotonic()
            wait_done(start + 200 + count)
            cpu1, t1 = procstat.cpu_seconds(master.pid), time.monotonic()
        finally:
            worker.stop()
        return (cpu1 - cpu0) / count, count / (t1 - t0)

    def cancel_latency(self, c: LocalCluster, front: Service, rounds: int) -> list[float]:
        """Seconds from CancelWork's call to the end of the job's process, for
        `rounds` running works on a process executor."""
        import dworkers

        c.start_worker(1, "--jobs", "tests.jobs_control", *self.worker_args, cwd=Path(__file__).resolve().parent.parent)
        self.wait_workers(self.frontend_stub(front), 1, 60)
        latencies = []
        with dworkers.Client(front.address, timeout=60) as client:
            for i in range(rounds):
                pid_file = self.workdir / f"nap-{i}.pid"
                handle = client.submit("nap", 60, str(pid_file))
                end = time.monotonic() + 60
                while not (pid_file.exists() and pid_file.read_text()):
                    if time.monotonic() > end:
                        raise TimeoutError("control: the nap job did not start within 60 s")
                    time.sleep(0.01)
                pid = int(pid_file.read_text())
                t0 = time.monotonic()
                handle.cancel()
                while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                    if time.monotonic() - t0 > 30:
                        raise TimeoutError("control: a cancelled job's process still ran after 30 s")
                    time.sleep(0.001)
                latencies.append(time.monotonic() - t0)
        return latencies

    def scenario_control(self) -> None:
        big = self.args.control_works or (100_000 if self.quick else 1_000_000)
        small, runs = 10_000, 2_000 if self.quick else 5_000

        def works(prefix: str, count: int) -> list:
            """`count` pending works across 10 priorities, and a tenth as many delayed by an hour."""
            pending = [work_pb2.SubmitWorkRequest(work_id=f"{prefix}{i}", kind="square", payload=b"7", priority=i % 10)
                       for i in range(count)]
            return pending + [work_pb2.SubmitWorkRequest(work_id=f"{prefix}d{i}", kind="square", payload=b"7",
                                                         delay_seconds=3600 + i % 600) for i in range(count // 10)]

        with self.cluster("control", self.pg_url()) as c:
            room = ("--max-pending", str(2 * big))
            master = c.start_master(None, *room, *self.master_args, wait=True)
            front = c.start_frontend()
            stub = self.frontend_stub(front)
            self.fill(stub, works("s", small + runs + 200), "control")
            cost_small, rate_small = self.dispatch_cost(c, stub, master, runs)
            self.log(f"control: {cost_small * 1e6:.0f} us of master CPU per work with {small:,} pending; "
                     f"filling to {big:,}")
            self.fill(stub, works("b", big), "control")
            self.wait_quiet([master.pid], 10, 120)
            cost_big, rate_big = self.dispatch_cost(c, stub, master, runs)
        with self.cluster("cancel") as c:
            c.start_master(None, *self.master_args, wait=True)
            latencies = self.cancel_latency(c, c.start_frontend(), 5 if self.quick else 20)
        self.details["control"] = {"pending_small": small, "pending_big": big, "works_measured": runs,
                                   "cpu_per_work_small_us": round(cost_small * 1e6),
                                   "cpu_per_work_big_us": round(cost_big * 1e6),
                                   "rate_small": round(rate_small), "rate_big": round(rate_big),
                                   "cancel_ms": [round(ms(x), 1) for x in latencies]}
        self.row("control.dispatch", f"master CPU per dispatched work, {big:,} vs {small:,} pending",
                 cost_big / cost_small, "x", 1.5, "<=",
                 f"{cost_big * 1e6:.0f} vs {cost_small * 1e6:.0f} us/work ({rate_big:,.0f} vs {rate_small:,.0f} "
                 f"works/s; 10 priorities, a tenth as many delayed; PostgreSQL journal; 2 thread slots)")
        self.row("control.cancel", "cancel: call -> job process gone, p50", ms(percentile(latencies, 50)), "ms",
                 1000, "<=", f"max {ms(max(latencies)):.0f} ms over {len(latencies)} running `nap` works "
                 "(process executor)")

    # --- 6. scale ----------------------------------------------------------------

    def scenario_scale(self) -> None:
        procs, slots = self.args.scale_procs, self.args.scale_slots
        if self.quick and not self.args.scale_explicit:
            procs, slots = 2, 50
        # Each slot's executor is a Python process (~10 MiB PSS measured): fit what the machine has.
        available = procstat.mem_available_bytes()
        fit = int((available - 2 * 2**30) / (11 * 2**20) / procs)
        if fit < slots:
            self.notes.append(f"scale: {procs} x {slots} slots would not fit in {available / 2**30:.1f} GiB "
                              f"available: measured with {procs} x {max(1, fit)}")
            slots = max(1, fit)
        total = procs * slots
        idle_seconds = 5.0 if self.quick else 10.0
        with self.cluster("scale") as c:
            master = c.start_master(None, *self.master_args, wait=True)
            frontend = c.start_frontend()
            stub = self.frontend_stub(frontend)
            self.log(f"scale: starting {procs} worker processes x {slots} slots (one executor process per slot)")
            t0 = time.monotonic()
            workers = []
            for i in range(procs):  # one at a time: a gentler peak for a shared machine
                workers.append(c.start_worker(slots, *self.worker_args))
                self.wait_workers(stub, (i + 1) * slots, max(60.0, slots / 2))
                if i < procs - 1:
                    self.wait_quiet([workers[-1].pid], 50, max(30.0, slots / 5))
            registered = time.monotonic() - t0
            tree = procstat.children_map()
            executors = sum(len(procstat.descendants(w.pid, tree)) - 1 for w in workers)
            self.wait_quiet([w.pid for w in workers], 10, 120)
            started = time.monotonic() - t0
            worker_rss = sum(procstat.rss_bytes(p) for w in workers for p in procstat.descendants(w.pid))
            worker_pss = sum(procstat.pss_bytes(p) for w in workers for p in procstat.descendants(w.pid))
            self.log(f"scale: {total} slots registered after {registered:.1f} s, quiet after {started:.1f} s "
                     f"({executors} child processes, PSS {worker_pss / 2**30:.2f} GiB); idle master CPU for {idle_seconds:g} s")
            before = procstat.cpu_seconds(master.pid)
            meter = self.cpu_meter(c).start()
            time.sleep(idle_seconds)
            cpu_idle = meter.stop()
            idle = 100 * (procstat.cpu_seconds(master.pid) - before) / idle_seconds
            # dispatch latency under a moderate load
            rate = self.args.scale_rate
            seconds = 5.0 if self.quick else 10.0
            self.log(f"scale: dispatch latency at {rate}/s for {seconds:g} s (SubmitWork, 4 paced threads)")
            sub = Subscriber(stub, self.last_sequence(stub))
            try:
                items = (work_pb2.SubmitWorkRequest(work_id=i, kind="square", payload=b"7")
                         for i in clients.counter_ids(f"sc-{uuid.uuid4().hex[:6]}"))
                recording = None
                if self.args.profile:
                    profile_dir = Path(self.args.profile)
                    profile_dir.mkdir(parents=True, exist_ok=True)
                    out = profile_dir / f"scale-master-{master.pid}.raw"
                    recording = (out, profiling.Recording(master.pid, out, seconds, native=self.args.profile_native))
                meter = self.cpu_meter(c).start()
                load = Submitters(stub, items, threads=4, batched=False, duration=seconds, pace=4.0 / rate).start()
                load.join(seconds + 30)
                if recording is not None:
                    recording[1].wait(30)
                    if recording[1].error:
                        self.notes.append(f"profile of the master under scale load failed: {recording[1].error}")
                    else:
                        self.profiles.setdefault("master (scale load)", []).append(
                            {"pid": master.pid, "file": str(recording[0]), **profiling.summarise(recording[0], seconds)})
                missing = sub.wait_ids(list(load.acked), 30)
                cpu_load = meter.stop()
                latencies = [sub.arrived[w] - t for w, t in load.acked.items() if w in sub.arrived]
            finally:
                sub.stop()
        p50, p99 = ms(percentile(latencies, 50)), ms(percentile(latencies, 99))
        self.details["scale"] = {
            "processes": procs, "slots_per_process": slots, "executor_processes": executors,
            "registered_after_s": round(registered, 1), "quiet_after_s": round(started, 1),
            "worker_rss_bytes": worker_rss, "worker_pss_bytes": worker_pss, "idle_master_cpu_percent": round(idle, 2),
            "idle_cpu_percent_of_core": cpu_idle, "load_rate": rate, "load_works": len(load.acked),
            "dispatch_ms_p50": round(p50, 2), "dispatch_ms_p99": round(p99, 2),
            "dispatch_ms_max": round(ms(max(latencies)), 2) if latencies else None,
            "missing_results": len(missing), "load_cpu_percent_of_core": cpu_load}
        setting = f"{procs} procs x {slots} slots = {total}"
        self.row("scale.idle_cpu", f"idle master CPU, {total:,} slots", idle, "%", 5.0, "<",
                 f"{setting}; {idle_seconds:g} s of utime+stime; workers {cpu_idle.get('worker')}% while idle")
        self.row("scale.dispatch_p99", f"dispatch p99 (ack->result), {total:,} slots", p99, "ms", 50.0, "<",
                 f"{len(latencies)} works at {rate}/s; p50 {p50:.1f} ms; cpu master {cpu_load.get('master')}% "
                 f"workers {cpu_load.get('worker')}%" + (f"; {len(missing)} results missing" if missing else ""))

    # --- the run -------------------------------------------------------------------

    def run(self, names: list[str]) -> None:
        self.details["machine"] = {"cores": os.cpu_count(), "loadavg_start": procstat.loadavg(),
                                   "python": sys.version.split()[0], "quick": self.quick,
                                   "commit": _commit(), "memory_available": procstat.mem_available_bytes()}
        self.start_zookeeper()
        for name in names:
            need = (ESTIMATE_QUICK if self.quick else ESTIMATE)[name]
            if self.remaining() < need:
                self.notes.append(f"{name}: skipped ({self.remaining():.0f} s of the {self.args.budget:.0f} s budget "
                                  f"left, it needs about {need} s)")
                self.log(f"{name}: skipped, out of time")
                continue
            self.log(f"=== {name} (load average {procstat.loadavg()})")
            started = time.monotonic()
            try:
                getattr(self, f"scenario_{name}")()
            except Exception as exc:  # one scenario failing does not stop the others
                self.failed[name] = f"{type(exc).__name__}: {exc}"
                self.log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            self.details.setdefault("scenario_seconds", {})[name] = round(time.monotonic() - started, 1)
        self.details["machine"]["loadavg_end"] = procstat.loadavg()

    def report(self) -> dict:
        return {
            "figures": {r["key"]: {k: r[k] for k in ("label", "value", "unit", "target", "op", "met", "note")}
                        for r in self.rows},
            "missed": [r["key"] for r in self.rows if r["met"] is False],
            "failed_scenarios": self.failed, "notes": self.notes, "details": self.details,
            "profiles": self.profiles, "session_timeout_s": SESSION_TIMEOUT,
            "master_args": self.master_args, "worker_args": self.worker_args,
            "seconds": round(time.monotonic() - self.t_start, 1),
        }

    def table(self) -> str:
        header = ("figure", "value", "target", "met?", "setting / notes")
        lines = [(r["label"], _fmt(r["value"], r["unit"]), r["target_text"] or "-",
                  {True: "yes", False: "NO", None: "-"}[r["met"]], r["note"]) for r in self.rows]
        widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(header[:4])]

        def fmt(cols):
            return "  ".join(c.ljust(w) for c, w in zip(cols[:4], widths)) + "  " + cols[4]

        out = [fmt(header), fmt(tuple("-" * w for w in widths) + ("-" * 15,))]
        out += [fmt(row) for row in lines]
        for name, error in self.failed.items():
            out.append(f"FAILED {name}: {error}")
        for note in self.notes:
            out.append(f"note: {note}")
        m = self.details.get("machine", {})
        if self.master_args or self.worker_args:
            out.append(f"NOT the defaults: masters {self.master_args} workers {self.worker_args}")
        out.append(f"machine: {m.get('cores')} cores, load average {m.get('loadavg_start')} at start, "
                   f"{m.get('loadavg_end')} at end (shared machine: figures are noisy); "
                   f"{'QUICK run (smaller counts)' if self.quick else 'full run'}; commit {m.get('commit')}; "
                   f"{time.monotonic() - self.t_start:.0f} s")
        return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--json-out", metavar="FILE", default="", help="also write the JSON object to FILE")
    p.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    p.add_argument("--peers-results", metavar="DIR", default="",
                   help="targets from the peers' figures in DIR (the *.json rows of ../shared/peers/run_all.sh "
                        "run next to this one)")
    p.add_argument("--only", default="", help="comma-separated scenarios: " + ", ".join(SCENARIOS) + " (memory = replay)")
    p.add_argument("--profile", metavar="DIR", default="",
                   help="also run py-spy (--gil) on master, frontend and workers during an extra batched e2e run; raw stacks go to DIR")
    p.add_argument("--profile-native", action="store_true", help="with --profile: include C frames (py-spy --native)")
    p.add_argument("--profile-all-threads", action="store_true",
                   help="with --profile: sample every running thread, not only the one holding the GIL")
    p.add_argument("--concurrency", default="", help="e2e: slots per worker process to try, e.g. 2,4,8")
    p.add_argument("--e2e-modes", default="batched,single", help="e2e: which submission modes to run")
    p.add_argument("--e2e-works", type=int, default=0, help="e2e: works per run (default 20,000; quick 2,000)")
    p.add_argument("--replay-works", type=int, default=0, help="replay: pending works (default 100,000; quick 20,000)")
    p.add_argument("--backlog-works", type=int, default=0,
                   help="backlog: pending works of 1 KiB (default 1,000,000; quick 100,000)")
    p.add_argument("--control-works", type=int, default=0,
                   help="control: pending works of the large backlog (default 1,000,000; quick 100,000)")
    p.add_argument("--scale-procs", type=int, default=None, help="scale: worker processes (default 4)")
    p.add_argument("--scale-slots", type=int, default=None, help="scale: slots per worker process (default 250)")
    p.add_argument("--scale-rate", type=int, default=200, help="scale: works/s of the dispatch-latency load")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which remaining scenarios are skipped (default 900; quick 400)")
    p.add_argument("--hard-limit", type=float, default=None,
                   help="seconds after which the bench stops its clusters and exits (default budget + 240)")
    p.add_argument("--master-args", default="", help="extra flags for every master (what-if runs; not the defaults)")
    p.add_argument("--worker-args", default="", help="extra flags for every worker, e.g. '--log-level WARNING'")
    p.add_argument("--workdir", default=None, help="keep logs and data here (default: a temporary dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir (logs)")
    p.add_argument("--secure", action="store_true",
                   help="clusters with mutual TLS, access control (clients with a token) and ZooKeeper ACLs")
    args = p.parse_args(argv)
    args.scale_explicit = args.scale_procs is not None or args.scale_slots is not None
    args.scale_procs = args.scale_procs or 4
    args.scale_slots = args.scale_slots or 250
    if args.budget is None:
        args.budget = 400.0 if args.quick else 900.0
    if args.hard_limit is None:
        args.hard_limit = args.budget + 240.0
    names = [ALIASES.get(n.strip(), n.strip()) for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    args.names = [n for n in SCENARIOS if n in names]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)

    def hard_stop() -> None:
        bench.log(f"hard limit of {args.hard_limit:.0f} s reached: stopping clusters and exiting")
        bench.stop_all()
        os._exit(3)

    watchdog = threading.Timer(args.hard_limit, hard_stop)
    watchdog.daemon = True
    watchdog.start()

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    code = 0
    try:
        bench.run(args.names)
    except KeyboardInterrupt:
        bench.log("interrupted: stopping clusters")
        code = 130
    except Exception as exc:  # e.g. ZooKeeper would not start
        bench.log(f"bench failed: {type(exc).__name__}: {exc}")
        bench.failed["bench"] = f"{type(exc).__name__}: {exc}"
        code = 2
    finally:
        bench.stop_all()
        watchdog.cancel()
    report = bench.report()
    if args.profile and bench.profiles:
        for role, entries in bench.profiles.items():
            for entry in entries:
                print(profiling.format_summary(f"{role} pid {entry['pid']}", entry), file=sys.stderr)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1, default=str))
    if args.json:
        print(json.dumps(report, indent=None, default=str))
    else:
        print(bench.table())
    if bench.failed and code == 0:
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
