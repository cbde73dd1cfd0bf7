"""The `dworkers` command as an operator uses it, against a live cluster on
the shared ZooKeeper: a master, a standby, a worker process and a frontend.

Every command runs as a real subprocess, bounded by a timeout. Expected
failures must print one clear line on stderr (`dworkers: error: ...`), never
a traceback, and exit non-zero."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from kazoo.client import KazooClient

from dworkers.common import zk as zk_layout
from dworkers.common.zkserver import free_port
from dworkers.local_cluster import LocalCluster
from dworkers.v1 import work_pb2
from tests.helpers import (
    ResultCollector,
    frontend,
    http_get,
    submit_until_acked,
    wait_until,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "dworkers"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "dworkers.cli"]
WORKER_SLOTS = 2

# A line the services' logging writes ("23:51:57.474 WARNING kazoo.client: ...")
# or gRPC's C core ("E1129 23:55:32.960271 18587 add_port.cc:83] ...").
LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3} [A-Z]+ |[EWID]\d{4} \d\d:\d\d:\d\d\.\d+ )")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DWORKERS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def dworkers(*args: str, input: str | None = None, timeout: float = 60.0, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    """Runs the command like an operator would, bounded by `timeout`."""
    try:
        return subprocess.run([*COMMAND, *args], input=input, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO, env=env or clean_env(), stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`dworkers {' '.join(args)}` still ran after {timeout:g} s; stderr: {exc.stderr!r}")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}; stdout {proc.stdout!r}; stderr {proc.stderr!r}"
    assert "Traceback" not in proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str, ignore_log_lines: bool = False) -> str:
    """Non-zero exit, no traceback, exactly one line on stderr (`dworkers: error: ...`)
    holding every fragment. With ignore_log_lines, the services' log records are
    allowed besides that line."""
    described = f"exit {proc.returncode}; stdout {proc.stdout[-1000:]!r}; stderr {proc.stderr[-3000:]!r}"
    assert proc.returncode != 0, described
    assert "Traceback" not in proc.stderr, described
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if ignore_log_lines:
        lines = [line for line in lines if not LOG_LINE.match(line)]
    assert len(lines) == 1, f"expected one line on stderr: {described}"
    line = lines[0]
    assert line.startswith("dworkers: error: "), described
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    return line


def assert_usage_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """argparse's way: exit 2, the usage, then one error line."""
    described = f"exit {proc.returncode}; stderr {proc.stderr!r}"
    assert proc.returncode == 2, described
    assert "Traceback" not in proc.stderr, described
    assert proc.stderr.startswith("usage: dworkers"), described
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"dworkers( \w+)?: error: ", last), described
    assert sum(": error: " in line for line in proc.stderr.splitlines()) == 1, described
    for fragment in fragments:
        assert fragment in last, described


# --- the live cluster ---------------------------------------------------------


class Live:
    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster
        self.master = cluster.start_master(wait=True)
        self.standby = cluster.start_master(wait=True)
        self.worker = cluster.start_worker(WORKER_SLOTS)
        self.frontend = cluster.start_frontend()
        self.address = self.frontend.address
        self.stub = frontend(self.address)

    def fe(self) -> list[str]:
        return ["--frontend", self.address]

    def info(self) -> work_pb2.ClusterInfoResponse:
        return self.stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)

    def election(self) -> list[tuple[int, str]]:
        """(epoch, address) of every live backend, oldest first, read from ZooKeeper itself."""
        client = KazooClient(hosts=self.cluster.zk)
        client.start(timeout=10)
        try:
            path = zk_layout.Paths(self.cluster.root).election
            members = []
            for child in client.get_children(path):
                data, _ = client.get(f"{path}/{child}")
                members.append((zk_layout.election_sequence(child), zk_layout.decode_member(data)["address"]))
            return sorted(members)
        finally:
            client.stop()
            client.close()

    def last_sequence(self) -> int:
        return self.info().last_sequence

    def worker_ids(self) -> list[str]:
        return [f"{socket.gethostname()}-{self.worker.pid}-{i}" for i in range(WORKER_SLOTS)]


@pytest.fixture(scope="module")
def live(zookeeper, tmp_path_factory, request):
    cluster = LocalCluster(workdir=tmp_path_factory.mktemp("cli-cluster"), root=f"/cli-{uuid.uuid4().hex[:8]}",
                           session_timeout=2.0, zookeeper=zookeeper)
    failed_before = request.session.testsfailed
    try:
        live = Live(cluster)
        deadline = time.monotonic() + 30
        while len(live.info().workers) < WORKER_SLOTS:  # registered, so its kinds are declared
            assert time.monotonic() < deadline, "the worker did not register"
            time.sleep(0.1)
        # The active master re-reads the election only every few seconds (it
        # watches no children): wait until it lists the standby.
        while len(live.info().standbys) < 1:
            assert time.monotonic() < deadline, "the master never listed the standby"
            time.sleep(0.1)
        warmup = submit_until_acked(live.stub, "square", b"1", "warmup")  # the master knows the kinds
        collector = ResultCollector(live.stub)
        assert not collector.wait_for([warmup.work_id], timeout=30)
        collector.stop()
        yield live
        dead = [s.role for s in (live.master, live.standby, live.worker, live.frontend) if not s.alive()]
        assert not dead, f"died during the CLI tests: {dead}"
    finally:
        cluster.stop()
        if request.session.testsfailed > failed_before:
            cluster.print_logs()


# --- --help -------------------------------------------------------------------

HELP = {
    "master": "oldest live backend is the active master",
    "worker": "pull work from the active master",
    "frontend": "dworkers.v1.Frontend API",
    "demo": "local ZooKeeper",
    "submit": "Submit works of one kind",
    "status": "state, attempts and result of one work",
    "watch": "Stream finished works in order",
    "cluster": "active master, its epoch",
}


def flat(text: str) -> str:
    return " ".join(text.split())  # argparse wraps descriptions


def test_top_level_help_lists_every_command():
    proc = ok(dworkers("--help", timeout=30))
    assert proc.stdout.startswith("usage: dworkers")
    assert "gRPC services coordinated by ZooKeeper" in flat(proc.stdout)
    for command in HELP:
        assert re.search(rf"^\s+{command}\s+\S", proc.stdout, re.M), f"{command} has no line in the help"


@pytest.mark.parametrize("command", list(HELP))
def test_every_command_has_help_that_says_what_it_does(command):
    proc = ok(dworkers(command, "--help", timeout=30))
    assert proc.stdout.startswith(f"usage: dworkers {command}")
    assert HELP[command] in flat(proc.stdout)
    assert proc.stderr == ""
    if command in ("master", "worker", "frontend"):
        assert "[env DWORKERS_ZK;" in proc.stdout  # every flag names its environment variable
    if command in ("submit", "status", "watch", "cluster"):
        assert "[env DWORKERS_FRONTEND;" in proc.stdout


# --- cluster --------------------------------------------------------------------


def test_cluster_prints_a_readable_table(live):
    (epoch, master), (standby_epoch, standby) = live.election()
    assert master == live.master.address and standby == live.standby.address
    out = ok(dworkers("cluster", *live.fe(), timeout=30)).stdout
    lines = out.splitlines()
    assert re.fullmatch(rf"master\s+{re.escape(master)}\s+\(epoch {epoch}\)", lines[0]), out
    standby_line = rf"standby\s+{re.escape(standby)}\s+\(epoch {standby_epoch}\)"
    assert any(re.fullmatch(standby_line, line) for line in lines), out
    assert re.search(rf"^workers\s+{WORKER_SLOTS}$", out, re.M), out
    assert re.search(r"^works\s+pending \d+\s+scheduled \d+\s+in progress \d+\s+done \d+\s+failed \d+"
                     r"\s+cancelled \d+$", out, re.M), out
    for worker_id in live.worker_ids():
        assert re.search(rf"^\s+{re.escape(worker_id)}\s+(idle|busy)", out, re.M), out


def test_cluster_json_has_the_same_facts(live):
    (epoch, master), (standby_epoch, standby) = live.election()
    data = json.loads(ok(dworkers("cluster", "--json", *live.fe(), timeout=30)).stdout)
    assert data["master"] == {"address": master, "epoch": epoch}
    assert data["standbys"] == [{"address": standby, "epoch": standby_epoch}]
    assert sorted(w["worker_id"] for w in data["workers"]) == live.worker_ids()
    assert all(w["status"] in ("idle", "busy") for w in data["workers"])
    for key in ("pending", "in_progress", "done", "failed", "last_sequence"):
        assert isinstance(data[key], int) and data[key] >= 0
    assert data["done"] >= 1 and data["last_sequence"] >= 1  # the warm-up work


def test_the_frontend_address_can_come_from_the_environment(live):
    data = json.loads(ok(dworkers("cluster", "--json", env=clean_env(DWORKERS_FRONTEND=live.address),
                                  timeout=30)).stdout)
    assert data["master"]["address"] == live.master.address


# --- submit, status, watch ------------------------------------------------------

RESULT_LINE = re.compile(r"^\s*(\d+)\s+(\S+)\s+(DONE|FAILED)\s+(.*)$")


def parse_results(out: str) -> list[tuple[int, str, str, str]]:
    rows = []
    for line in out.splitlines():
        match = RESULT_LINE.match(line)
        assert match, f"not a result line: {line!r}"
        rows.append((int(match[1]), match[2], match[3], match[4]))
    return rows


def test_submit_and_wait_prints_the_results(live):
    rows = parse_results(ok(dworkers("submit", "square", "2", "3", "--wait", *live.fe())).stdout)
    assert sorted(text for *_, text in rows) == ["2 * 2 = 4", "3 * 3 = 9"]
    assert all(state == "DONE" for _, _, state, _ in rows)
    assert len({work_id for _, work_id, _, _ in rows}) == 2


def test_submit_from_stdin_prints_every_result(live):
    payloads = "\n".join(str(n) for n in range(1, 21)) + "\n"
    rows = parse_results(ok(dworkers("submit", "square", "--file", "-", "--wait", *live.fe(), input=payloads)).stdout)
    assert len(rows) == 20
    assert sorted(text for *_, text in rows) == sorted(f"{n} * {n} = {n * n}" for n in range(1, 21))
    assert len({work_id for _, work_id, _, _ in rows}) == 20


def test_submit_from_a_file_in_small_batches(live, tmp_path):
    path = tmp_path / "payloads.txt"
    path.write_text("4\n\n5\n6\n")  # blank lines are skipped
    rows = parse_results(ok(dworkers("submit", "square", "--file", str(path), "--batch", "2", "--wait",
                                     *live.fe())).stdout)
    assert sorted(text for *_, text in rows) == ["4 * 4 = 16", "5 * 5 = 25", "6 * 6 = 36"]


def test_submit_json_without_wait(live):
    proc = ok(dworkers("submit", "square", "4", "5", "--json", *live.fe()))
    data = json.loads(proc.stdout)
    assert data["submitted"] == 2 and data["duplicates"] == 0 and len(data["work_ids"]) == 2
    assert isinstance(data["seconds"], (int, float))
    collector = ResultCollector(live.stub)
    assert not collector.wait_for(data["work_ids"], timeout=30)
    collector.stop()


def test_submit_json_with_wait_prints_one_json_result_per_work(live):
    out = ok(dworkers("submit", "square", "6", "7", "--json", "--wait", *live.fe())).stdout
    results = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["result"] for r in results) == ["6 * 6 = 36", "7 * 7 = 49"]
    assert all(r["state"] == "DONE" and r["kind"] == "square" and r["attempts"] == 1 and r["sequence"] > 0
               for r in results)


def test_submit_with_an_id_is_idempotent(live):
    work_id = f"cli-{uuid.uuid4().hex[:8]}"
    first = ok(dworkers("submit", "square", "7", "--id", work_id, *live.fe()))
    assert first.stdout.strip() == work_id
    assert "(0 duplicates)" in first.stderr
    again = ok(dworkers("submit", "square", "7", "--id", work_id, "--wait", *live.fe()))
    rows = parse_results(again.stdout)  # already accepted (maybe done): its result is still printed
    assert [(work_id, "DONE", "7 * 7 = 49")] == [(w, s, t) for _, w, s, t in rows]
    assert json.loads(ok(dworkers("submit", "square", "7", "--id", work_id, "--json", *live.fe())).stdout)[
        "duplicates"] == 1
    conflict = dworkers("submit", "square", "8", "--id", work_id, *live.fe())
    assert_one_line_error(conflict, "ALREADY_EXISTS", work_id)


def test_a_work_the_job_cannot_do_ends_failed(live):
    work_id = f"cli-bad-{uuid.uuid4().hex[:8]}"
    proc = dworkers("submit", "square", "abc", "--id", work_id, "--max-attempts", "2", "--wait", *live.fe())
    assert proc.returncode == 1 and proc.stderr.strip().endswith("dworkers: error: 1 work of 1 FAILED"), proc.stderr
    rows = parse_results(proc.stdout)
    assert len(rows) == 1 and rows[0][1:3] == (work_id, "FAILED")
    assert "invalid literal for int()" in rows[0][3]
    status = json.loads(ok(dworkers("status", work_id, "--json", *live.fe(), timeout=30)).stdout)
    assert status["state"] == "FAILED" and status["attempts"] == 2 and "invalid literal" in status["error"]


def test_status_shows_done_and_the_result(live):
    work_id = f"cli-status-{uuid.uuid4().hex[:8]}"
    ok(dworkers("submit", "square", "11", "--id", work_id, "--wait", *live.fe()))
    out = ok(dworkers("status", work_id, *live.fe(), timeout=30)).stdout
    fields = dict(re.match(r"^\s*(\w+): ?(.*)$", line).groups() for line in out.splitlines())
    assert fields["work_id"] == work_id and fields["kind"] == "square"
    assert fields["state"] == "DONE" and fields["result"] == "11 * 11 = 121" and fields["attempts"] == "1"
    assert int(fields["sequence"]) > 0
    data = json.loads(ok(dworkers("status", work_id, "--json", *live.fe(), timeout=30)).stdout)
    assert data == {"work_id": work_id, "kind": "square", "state": "DONE", "attempts": 1,
                    "result": "11 * 11 = 121", "error": "", "sequence": int(fields["sequence"]), "priority": 0}


def test_watch_from_the_start_prints_results_in_sequence_order(live):
    ok(dworkers("submit", "square", "21", "22", "23", "--wait", *live.fe()))
    count = live.last_sequence()
    assert count >= 4
    rows = parse_results(ok(dworkers("watch", "--after", "0", "--count", str(count), *live.fe())).stdout)
    assert [seq for seq, *_ in rows] == list(range(1, count + 1))
    assert rows[0][1] == "warmup" and rows[0][3] == "1 * 1 = 1"
    assert len({work_id for _, work_id, _, _ in rows}) == count  # each work once


def test_watch_resumes_after_a_sequence_number(live):
    ok(dworkers("submit", "square", "31", "32", "33", "--wait", *live.fe()))
    last = live.last_sequence()
    everything = parse_results(ok(dworkers("watch", "--after", "0", "--count", str(last), *live.fe())).stdout)
    after = last - 3
    rows = parse_results(ok(dworkers("watch", "--after", str(after), "--count", "3", *live.fe())).stdout)
    assert rows == everything[after:]
    assert [seq for seq, *_ in rows] == [after + 1, after + 2, after + 3]
    as_json = [json.loads(line) for line in
               ok(dworkers("watch", "--after", str(after), "--count", "3", "--json", *live.fe())).stdout.splitlines()]
    assert [(r["sequence"], r["work_id"]) for r in as_json] == [(s, w) for s, w, _, _ in rows]


def test_watch_waits_for_new_results(live):
    after = live.last_sequence()
    watcher = subprocess.Popen([*COMMAND, "watch", "--after", str(after), "--count", "1", *live.fe()],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=clean_env())
    try:
        assert watcher.poll() is None, "watch ended with nothing to show"
        work_id = f"cli-watch-{uuid.uuid4().hex[:8]}"
        ok(dworkers("submit", "square", "12", "--id", work_id, *live.fe()))
        out, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(timeout=10)
    assert watcher.returncode == 0, err
    assert parse_results(out) == [(after + 1, work_id, "DONE", "12 * 12 = 144")]


def test_watches_stopped_with_ctrl_c_do_not_wear_out_the_frontend(live):
    """An operator starts `dworkers watch` and stops it with Ctrl-C, a few times.
    The frontend must let go of each stream: with --threads 2 --max-watchers 2
    it has 4 threads, and it must still answer after 6 such watches."""
    port = free_port()
    metrics = f"http://127.0.0.1:{port}/metrics"
    spare = live.cluster.start_frontend(None, "--threads", "2", "--max-watchers", "2", "--metrics-port", str(port))
    try:
        for _ in range(6):
            watcher = subprocess.Popen([*COMMAND, "watch", "--after", "1000000000", "--frontend", spare.address],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                       text=True, cwd=REPO, env=clean_env())
            # connected, waiting for results that do not come
            wait_until(lambda: "dworkers_frontend_result_streams 1.0" in http_get(metrics), 30, "the stream")
            watcher.send_signal(signal.SIGINT)
            try:
                _, err = watcher.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                watcher.kill()
                watcher.communicate(timeout=10)
                pytest.fail("`dworkers watch` did not stop on Ctrl-C")
            assert watcher.returncode == 130 and "Traceback" not in err, err
            # let go of: the next watch's stream is then the only one counted
            wait_until(lambda: "dworkers_frontend_result_streams 0.0" in http_get(metrics), 30, "the stream's end")
        data = json.loads(ok(dworkers("cluster", "--json", "--frontend", spare.address, "--timeout", "5",
                                      timeout=30)).stdout)
        assert data["master"]["address"] == live.master.address
        rows = parse_results(ok(dworkers("watch", "--after", "0", "--count", "1", "--frontend", spare.address,
                                         timeout=30)).stdout)
        assert rows[0][:2] == (1, "warmup")
    finally:
        spare.stop()


# --- expected failures: one line, no traceback ------------------------------------


@pytest.mark.parametrize("args", [
    ["cluster"],
    ["status", "some-id"],
    ["submit", "square", "1"],
    ["submit", "square", "1", "--wait"],
    ["watch", "--after", "0"],
])
def test_no_frontend_listening(args):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = dworkers(*args, "--frontend", address, "--timeout", "3", timeout=30)
    assert_one_line_error(proc, "cannot reach the frontend", address)
    assert time.monotonic() - started < 10


def test_unknown_kind(live):
    proc = dworkers("submit", "no_such_kind", "1", *live.fe(), timeout=30)
    assert_one_line_error(proc, "INVALID_ARGUMENT", "unknown kind 'no_such_kind'", "square")


def test_empty_kind(live):
    assert_one_line_error(dworkers("submit", "", "1", *live.fe(), timeout=30), "INVALID_ARGUMENT", "kind is empty")


def test_bad_work_id(live):
    proc = dworkers("submit", "square", "1", "--id", "bad id", *live.fe(), timeout=30)
    assert_one_line_error(proc, "INVALID_ARGUMENT", "malformed work_id 'bad id'")


def test_status_of_an_unknown_id(live):
    proc = dworkers("status", "never-submitted-id", *live.fe(), timeout=30)
    assert_one_line_error(proc, "NOT_FOUND", "never-submitted-id")


def test_status_of_a_malformed_id(live):
    assert_one_line_error(dworkers("status", "bad id", *live.fe(), timeout=30), "INVALID_ARGUMENT", "malformed work_id")


@pytest.mark.parametrize("args, fragments", [
    (["submit", "square"], ["nothing to submit"]),
    (["submit", "square", "1", "2", "--id", "one-id"], ["--id", "single work"]),
    (["submit", "square", "--file", "/nonexistent/payloads"], ["/nonexistent/payloads"]),
    (["submit", "square", "1", "--max-attempts", "500"], ["--max-attempts", "at most 100"]),
    (["submit", "square", "1", "--work-timeout", "-5"], ["work-timeout"]),
    (["submit", "square", "1", "--work-timeout", "nan"], ["--work-timeout", "must be a number"]),
    (["submit", "square", "1", "--max-attempts", "-1"], ["max-attempts"]),
], ids=["no-payloads", "id-with-two-payloads", "missing-file", "max-attempts-above-limit", "negative-work-timeout",
        "nan-work-timeout", "negative-max-attempts"])
def test_bad_submissions(live, args, fragments):
    proc = dworkers(*args, *live.fe(), timeout=30)
    if proc.returncode == 2 and proc.stderr.startswith("usage:"):
        assert_usage_error(proc, *fragments)  # argparse refusing it is as good
    else:
        assert_one_line_error(proc, *fragments)


def test_oversized_payload(live, tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("1" * (256 * 1024 + 1) + "\n")
    proc = dworkers("submit", "square", "--file", str(path), *live.fe(), timeout=30)
    assert_one_line_error(proc, "INVALID_ARGUMENT", "exceeds the limit of 262144 bytes")


@pytest.mark.parametrize("batch", ["0", "-3"])
def test_a_batch_size_below_one(live, batch):
    """Either submits in batches of one, or says --batch is wrong: never a
    confusing "no works in the request" from the server."""
    proc = dworkers("submit", "square", "1", "2", "--batch", batch, "--json", *live.fe(), timeout=30)
    if proc.returncode == 0:
        assert json.loads(proc.stdout)["submitted"] == 2
    elif proc.returncode == 2 and proc.stderr.startswith("usage:"):
        assert_usage_error(proc, "--batch")
    else:
        assert_one_line_error(proc, "--batch")


@pytest.mark.parametrize("args, fragment", [
    ([], "required: COMMAND"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
    (["submit"], "required: kind"),
    (["status"], "required: work_id"),
    (["watch", "--after", "x"], "--after: invalid int value: 'x'"),
    (["watch", "--count", "many"], "--count: invalid int value: 'many'"),
    (["cluster", "--log-format", "xml"], "--log-format: invalid choice: 'xml'"),
    (["worker", "--concurrency", "two"], "--concurrency: invalid int value: 'two'"),
    (["worker", "--concurrency", "0"], "--concurrency: must be at least 1"),
    (["master", "--work-timeout", "0"], "--work-timeout: must be above 0"),
    (["master", "--retention-count", "-1"], "--retention-count: must be at least 0"),
    (["master", "--session-timeout", "nan"], "--session-timeout: must be a number"),
    (["master", "--max-pending-bytes", "1000"], "--max-pending-bytes: must be at least 1,048,576"),
    (["frontend", "--max-watchers", "0"], "--max-watchers: must be at least 1"),
    (["frontend", "--metrics-port", "70000"], "--metrics-port: must be at most 65,535"),
])
def test_bad_arguments_are_argparse_usage_errors(args, fragment):
    assert_usage_error(dworkers(*args, timeout=30), fragment)


def test_a_bad_environment_variable_is_a_usage_error():
    proc = dworkers("status", "x", env=clean_env(DWORKERS_TIMEOUT="soon"), timeout=30)
    assert_usage_error(proc, "DWORKERS_TIMEOUT='soon' is not a valid float")


# --- the services without ZooKeeper, or without their port ------------------------

SERVICE_ARGS = {
    "worker": ["--metrics-port", "0"],
    "frontend": ["--metrics-port", "0", "--listen", "127.0.0.1:0"],
    "master": ["--metrics-port", "0", "--listen", "127.0.0.1:0"],
}


@pytest.fixture(scope="module")
def without_zookeeper():
    """Starts each service, with the default and with --log-level ERROR, on a
    closed ZooKeeper port, all at once (each waits out kazoo's 10 s connect timeout)."""
    address = f"127.0.0.1:{free_port()}"
    runs = {}
    for role, args in SERVICE_ARGS.items():
        for level in ("INFO", "ERROR"):
            runs[role, level] = subprocess.Popen(
                [*COMMAND, role, "--zk", address, "--root", "/nowhere", "--log-level", level, *args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=REPO,
                env=clean_env())

    def finish(process: subprocess.Popen):
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate(timeout=10)
            err += "\n<still running after 60 s: killed>"
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    with futures.ThreadPoolExecutor(len(runs)) as pool:
        done = dict(zip(runs, pool.map(finish, runs.values())))
    return address, done


@pytest.mark.parametrize("role", list(SERVICE_ARGS))
def test_a_service_without_zookeeper_says_so(without_zookeeper, role):
    address, runs = without_zookeeper
    assert_one_line_error(runs[role, "INFO"], "cannot reach ZooKeeper", address, ignore_log_lines=True)


@pytest.mark.parametrize("role", list(SERVICE_ARGS))
def test_a_service_without_zookeeper_with_log_level_error_prints_only_the_error(without_zookeeper, role):
    """--log-level ERROR: the retry warnings are not errors; one line is left."""
    address, runs = without_zookeeper
    assert_one_line_error(runs[role, "ERROR"], "cannot reach ZooKeeper", address)


@pytest.mark.parametrize("role", ["frontend", "master"])
def test_a_service_whose_port_is_taken_says_so(live, role):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    address = f"127.0.0.1:{holder.getsockname()[1]}"
    try:
        proc = dworkers(role, "--zk", live.cluster.zk, "--root", f"/port-{uuid.uuid4().hex[:6]}", "--listen", address,
                        "--metrics-port", "0", timeout=30)
    finally:
        holder.close()
    assert_one_line_error(proc, address, ignore_log_lines=True)


@pytest.mark.parametrize("role", ["frontend", "master"])
def test_a_service_on_the_port_of_another_grpc_server_refuses_to_start(live, role):
    """gRPC servers set SO_REUSEPORT by default: unless the services turn it off,
    a second one on the same address starts anyway and the kernel splits the
    connections between the two."""
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    address = f"127.0.0.1:{port}"
    try:
        proc = subprocess.Popen([*COMMAND, role, "--zk", live.cluster.zk, "--root", f"/port-{uuid.uuid4().hex[:6]}",
                                 "--listen", address, "--metrics-port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                cwd=REPO, env=clean_env())
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate(timeout=10)
            pytest.fail(f"`dworkers {role} --listen {address}` started on an address already in use; "
                        f"its log: {err[-1500:]}")
    finally:
        other.stop(0)
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), address,
                          ignore_log_lines=True)


# --- what a first-time user trips over ------------------------------------------

def test_version():
    proc = ok(dworkers("--version"))
    assert re.fullmatch(r"dworkers \d+\.\d+\.\d+\S*\n", proc.stdout), proc.stdout


def test_output_cut_short_by_its_reader_is_not_an_error(live):
    """`dworkers cluster | head -1`: no "Broken pipe", no traceback. The
    reader is gone before the first write (as `head` may be), every time."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*COMMAND, "cluster", *live.fe()], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60, cwd=REPO, env=clean_env())
    finally:
        os.close(write_end)
    assert proc.stderr == "" and proc.returncode in (0, 141), (proc.returncode, proc.stderr)


def test_large_payloads_from_a_file_are_batched_by_bytes(live, tmp_path):
    """100 payloads of 200 KB (20 MB): more than one message may hold, sent
    in calls that each fit, with progress of results too."""
    path = tmp_path / "big.txt"
    path.write_text("".join(f"{i}{' ' * 200_000}\n" for i in range(100)))
    started = time.monotonic()
    proc = ok(dworkers("submit", "square", "--file", str(path), "--wait", "--json", *live.fe(), timeout=120))
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["result"] for r in results) == sorted(f"{i} * {i} = {i * i}" for i in range(100))
    assert time.monotonic() - started < 60  # not retried as overload for seconds on end


def test_wait_is_bounded_by_timeout_and_status_can_wait(live):
    work_id = f"cli-slow-{uuid.uuid4().hex[:8]}"
    proc = dworkers("submit", "sleep", "5", "--id", work_id, "--wait", "--timeout", "1", *live.fe(), timeout=30)
    assert proc.returncode == 2 and "within --timeout 1 s" in proc.stderr.strip().splitlines()[-1], proc.stderr
    waited = ok(dworkers("status", work_id, "--wait", "--json", *live.fe(), timeout=60))
    assert json.loads(waited.stdout)["state"] == "DONE"


def test_a_second_worker_on_the_same_metrics_port_says_so_in_one_line(live):
    port = str(free_port())
    first = live.cluster.start_worker(1, "--metrics-port", port)
    wait_until(lambda: "for kinds" in first.log(), 30, "the first worker to start")
    proc = dworkers("worker", "--zk", live.cluster.zk, "--root", live.cluster.root, "--metrics-port", port,
                    timeout=60)
    assert_one_line_error(proc, f"cannot serve metrics on port {port}", "--metrics-port", ignore_log_lines=True)
