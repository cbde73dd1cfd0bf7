"""The Prometheus metrics of a live cluster: every endpoint passes
`promtool check metrics`, and a real Prometheus server scrapes all of them and
sees the counters move.

Needs /usr/bin/promtool and /usr/bin/prometheus (Debian's prometheus
package): scripts/ensure-test-tools.sh installs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import grpc
import pytest

from dworkers.common.zkserver import free_port
from dworkers.v1 import work_pb2
from tests.helpers import ResultCollector, frontend, submit_until_acked

pytestmark = pytest.mark.e2e

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")



@pytest.fixture(autouse=True)
def prometheus_tools():
    """Installed by `make test` (scripts/ensure-test-tools.sh): missing is a failure, not a skip."""
    if not (PROMTOOL and PROMETHEUS):
        pytest.fail("needs promtool and prometheus (Debian's prometheus package): run scripts/ensure-test-tools.sh")

BATCH = 5  # works per submission round


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def submit_squares(stub, collector: ResultCollector, first: int, count: int, timeout: float = 60.0) -> list[str]:
    """Submits `count` square works and waits for all their results. Retries
    while the master does not know the kind yet (the worker declares it in
    ZooKeeper shortly after it starts)."""
    ids = []
    for n in range(first, first + count):
        work_id = f"metrics-{n}-{uuid.uuid4().hex[:6]}"
        end = time.monotonic() + timeout
        while True:
            try:
                submit_until_acked(stub, "square", str(n).encode(), work_id, deadline=timeout)
                break
            except grpc.RpcError as error:
                if "unknown kind" not in (error.details() or "") or time.monotonic() > end:
                    raise
                time.sleep(0.1)
        ids.append(work_id)
    missing = collector.wait_for(ids, timeout=timeout)
    assert not missing, f"no result for {sorted(missing)}"
    return ids


class Prometheus:
    """A real Prometheus server on a free port with its own config and TSDB."""

    def __init__(self, workdir, targets: dict[str, list[str]], scrape_interval: str = "1s"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = workdir / "prometheus"
        self.dir.mkdir()
        config = {  # JSON is YAML
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": "10s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addresses}]}
                               for job, addresses in targets.items()],
        }
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(json.dumps(config, indent=2))
        self.log_path = self.dir / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Prometheus:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                http_get(f"{self.url}/-/ready", timeout=2)
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def query(self, promql: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        reply = json.loads(http_get(url))
        assert reply["status"] == "success", reply
        assert reply["data"]["resultType"] == "vector", reply
        return reply["data"]["result"]

    def values(self, promql: str) -> dict[str, float]:
        """instance -> value of each series the query returns."""
        return {r["metric"].get("instance", ""): float(r["value"][1]) for r in self.query(promql)}

    def wait_for(self, promql: str, check, what: str, timeout: float = 45.0) -> list[dict]:
        """Polls the query until check(result) holds; fails with the last result."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while True:
            result = self.query(promql)
            if check(result):
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: after {timeout}s `{promql}` returned {result}")
            time.sleep(0.5)


def value_of(result: list[dict], instance: str) -> float | None:
    for r in result:
        if r["metric"].get("instance") == instance:
            return float(r["value"][1])
    return None


@pytest.mark.timeout(180)
def test_metrics_lint_clean_and_scraped_by_prometheus(cluster, tmp_path):
    ports = {name: free_port() for name in ("master_a", "master_b", "worker", "frontend")}
    master_a = cluster.start_master(None, "--metrics-port", str(ports["master_a"]), wait=True)
    master_b = cluster.start_master(None, "--metrics-port", str(ports["master_b"]), wait=True)
    cluster.start_worker(2, "--metrics-port", str(ports["worker"]))
    stub = frontend(cluster.start_frontend(None, "--metrics-port", str(ports["frontend"])).address)
    collector = ResultCollector(stub)
    prometheus = None
    try:
        active = cluster.active_master(timeout=60)
        standby = master_b if active is master_a else master_a
        instance = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        active_instance = instance["master_a" if active is master_a else "master_b"]
        standby_instance = instance["master_a" if standby is master_a else "master_b"]

        submitted = submit_squares(stub, collector, 1, BATCH)

        # a. every endpoint's /metrics passes promtool's parser and linter
        for name, port in ports.items():
            text = http_get(f"http://127.0.0.1:{port}/metrics")
            assert "dworkers_" in text, f"{name} serves no dworkers metrics"
            check = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                                   capture_output=True, timeout=30)
            problems = (check.stdout + check.stderr).decode().strip()
            assert check.returncode == 0 and not problems, (
                f"promtool check metrics on the {name} endpoint (:{port}) exited {check.returncode}:\n{problems}")

        # b. a real Prometheus scrapes all four endpoints
        prometheus = Prometheus(tmp_path, {
            "master": [instance["master_a"], instance["master_b"]],
            "worker": [instance["worker"]],
            "frontend": [instance["frontend"]],
        }).start()

        up = prometheus.wait_for(
            "up", lambda r: len(r) == 4 and all(float(s["value"][1]) == 1 for s in r),
            "all four targets up")
        assert {s["metric"]["instance"] for s in up} == set(instance.values())

        # counters of the active master exist and count what was submitted ...
        def counters() -> tuple[float | None, float | None]:
            accepted = prometheus.query(f'dworkers_works_accepted_total{{instance="{active_instance}"}}')
            completed = prometheus.query(f'dworkers_works_completed_total{{instance="{active_instance}"}}')
            return value_of(accepted, active_instance), value_of(completed, active_instance)

        deadline = time.monotonic() + 45
        while True:
            accepted_1, completed_1 = counters()
            if accepted_1 is not None and completed_1 is not None and \
                    accepted_1 >= len(submitted) and completed_1 >= len(submitted):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"active master {active_instance}: accepted={accepted_1} completed={completed_1}, "
                            f"expected both >= {len(submitted)}")
            time.sleep(0.5)

        # ... and increase when more works are submitted
        submitted += submit_squares(stub, collector, 100, BATCH)
        deadline = time.monotonic() + 45
        while True:
            accepted_2, completed_2 = counters()
            if accepted_2 is not None and completed_2 is not None and \
                    accepted_2 >= accepted_1 + BATCH and completed_2 >= completed_1 + BATCH:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"counters of {active_instance} did not increase by {BATCH}: accepted "
                            f"{accepted_1} -> {accepted_2}, completed {completed_1} -> {completed_2}")
            time.sleep(0.5)

        # exactly one master is active: 1 on the active one, 0 on the standby
        result = prometheus.wait_for(
            'dworkers_master_active{job="master"}',
            lambda r: value_of(r, active_instance) == 1 and value_of(r, standby_instance) == 0,
            "dworkers_master_active is 1 on the active master and 0 on the standby")
        assert len(result) == 2 and sorted(float(s["value"][1]) for s in result) == [0.0, 1.0], result

        # the worker counts its executions by kind and outcome
        prometheus.wait_for(
            f'dworkers_executions_total{{kind="square",outcome="ok",instance="{instance["worker"]}"}}',
            lambda r: len(r) == 1 and float(r[0]["value"][1]) >= len(submitted),
            f"worker executions of square ok >= {len(submitted)}")

        # the frontend counts its gRPC calls by method and code
        prometheus.wait_for(
            f'dworkers_grpc_requests_total{{method="SubmitWork",code="OK",instance="{instance["frontend"]}"}}',
            lambda r: len(r) == 1 and float(r[0]["value"][1]) >= len(submitted),
            f"frontend SubmitWork OK calls >= {len(submitted)}")

        # the journal's append latency histogram has series, with observations on the active master
        buckets = prometheus.query("dworkers_journal_append_seconds_bucket")
        assert buckets, "no dworkers_journal_append_seconds_bucket series"
        assert any(s["metric"].get("le") == "+Inf" for s in buckets), buckets
        prometheus.wait_for(
            f'dworkers_journal_append_seconds_bucket{{le="+Inf",instance="{active_instance}"}}',
            lambda r: len(r) == 1 and float(r[0]["value"][1]) > 0,
            "journal appends observed on the active master")

        # slots and processes are told apart: one worker process, 2 slots
        prometheus.wait_for(
            f'dworkers_worker_processes{{instance="{active_instance}"}}',
            lambda r: len(r) == 1 and float(r[0]["value"][1]) == 1, "one worker process on the active master")
        slots = prometheus.query(f'sum(dworkers_worker_slots{{instance="{active_instance}"}})')
        assert slots and float(slots[0]["value"][1]) == 2, slots
        # a fresh cluster's first master took over from no one
        assert value_of(prometheus.query("dworkers_failovers_total"), active_instance) == 0
        # streams are counted: those open, and those that ended, with their code
        prometheus.wait_for(
            f'dworkers_grpc_streams{{method="Connect",instance="{active_instance}"}}',
            lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 1, "the worker's stream open on the active master")
        for _ in stub.WaitWorks(work_pb2.WaitWorksRequest(work_ids=submitted[:3]), timeout=30):
            pass
        prometheus.wait_for(
            f'dworkers_grpc_requests_total{{method="WaitWorks",code="OK",instance="{instance["frontend"]}"}}',
            lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 1, "a WaitWorks stream counted when it ended")
        # a timeout counts as one on the worker, and the work's end by kind on the master
        submit_until_acked(stub, "sleep", b"30", "metrics-timeout", timeout_seconds=1, max_attempts=1)
        assert not collector.wait_for(["metrics-timeout"], timeout=60)
        prometheus.wait_for(
            f'dworkers_executions_total{{kind="sleep",outcome="timeout",instance="{instance["worker"]}"}}',
            lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 1, "the worker's timed-out execution")
        prometheus.wait_for(
            f'dworkers_works_failed_total{{kind="sleep",instance="{active_instance}"}}',
            lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 1, "the master's failed work of kind sleep")
        for port in ports.values():  # no `_created` series beside every counter and histogram
            assert "_created" not in http_get(f"http://127.0.0.1:{port}/metrics")

        assert all(s.alive() for s in cluster.services), "a service died during the test"
    except BaseException:
        if prometheus is not None:
            print(f"\n===== prometheus {prometheus.url} =====\n{prometheus.log()}")
        raise
    finally:
        collector.stop()
        if prometheus is not None:
            prometheus.stop()
