"""The Node.js example client (examples/node) against a live local cluster:
it loads the protos from protos/ at run time, submits, and waits for results."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import dworkers
from dworkers.common.zkserver import free_port
from tests.helpers import frontend, wait_kind, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "examples" / "node"
CLIENT = NODE_DIR / "client.js"

NODE = shutil.which("node")
NPM = shutil.which("npm")



@pytest.fixture(autouse=True)
def node_tools():
    """Node.js and the example's packages come with `make test` (scripts/ensure-test-tools.sh)."""
    if NODE is None or NPM is None:
        pytest.fail("node and npm are needed for the Node.js client: run scripts/ensure-test-tools.sh")


def _installed() -> bool:
    modules = NODE_DIR / "node_modules" / "@grpc"
    return (modules / "grpc-js" / "package.json").exists() and (modules / "proto-loader" / "package.json").exists()


@pytest.fixture(scope="module")
def node_client():
    """The client's dependencies, installed from the committed lock file when missing."""
    if not _installed():
        done = subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0 and _installed(), f"npm ci failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return CLIENT


def run_client(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([NODE, str(CLIENT), *args], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, env=env)


def assert_one_clear_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{done.stderr}"
    assert lines[0].startswith("error: ") and "    at " not in done.stderr, done.stderr  # no stack trace
    return lines[0]


def test_node_client_submits_and_prints_every_result(cluster, node_client):
    cluster.start_master(wait=True)
    cluster.start_worker(2)
    front = cluster.start_frontend()
    wait_kind(frontend(front.address), "square")
    started = time.monotonic()
    done = run_client("--frontend", front.address, "--kind", "square", "--timeout", "45", "3", "4", "5")
    took = time.monotonic() - started
    assert done.returncode == 0, \
        f"exit {done.returncode} after {took:.1f} s\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3, done.stdout
    by_result = {}
    for line in lines:
        work_id, state, result = line.split(" ", 2)
        assert len(work_id) == 36 and work_id.count("-") == 4, line  # a UUID chosen by the client
        assert state == "DONE", line
        by_result[result] = work_id
    assert set(by_result) == {"3 * 3 = 9", "4 * 4 = 16", "5 * 5 = 25"}
    assert len(set(by_result.values())) == 3


def test_node_client_reports_an_unknown_kind_in_one_line(cluster, node_client):
    cluster.start_master(wait=True)
    cluster.start_worker(1)
    front = cluster.start_frontend()
    wait_kind(frontend(front.address), "square")
    done = run_client("--frontend", front.address, "--kind", "no_such_kind", "1")
    line = assert_one_clear_line(done)
    assert "INVALID_ARGUMENT" in line or "unknown kind" in line, line


def test_node_client_reports_an_unreachable_frontend_in_one_line(node_client):
    done = run_client("--frontend", f"127.0.0.1:{free_port()}", "--kind", "square", "1")
    line = assert_one_clear_line(done)
    assert "UNAVAILABLE" in line, line


def test_node_client_over_mutual_tls_with_a_token(make_cluster, node_client):
    cluster = make_cluster(tls=True, access=True)
    cluster.start_master(wait=True)
    cluster.start_worker(2)
    front = cluster.start_frontend()
    tls = cluster.client_tls
    with dworkers.Client(front.address, tls=tls, token=cluster.tokens["admin"], timeout=60) as client:
        def squared() -> bool:  # once the worker declared its kinds (under load it may come after this)
            try:
                return client.submit("square", 2).result(timeout=60) == 4
            except dworkers.SubmitError as error:
                if "unknown kind" not in str(error):
                    raise
                return False

        wait_until(squared, 60, "a worker that runs 'square'")
    # a name, not 127.0.0.1: Node.js warns about TLS server names that are IP addresses
    flags = ["--frontend", front.address, "--tls-ca", tls.ca, "--tls-cert", tls.cert, "--tls-key", tls.key,
             "--tls-server-name", "localhost"]
    env = {**os.environ, "DWORKERS_TOKEN": cluster.tokens["admin"]}
    done = run_client(*flags, "--kind", "square", "--timeout", "45", "6", "7", env=env)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert sorted(line.split(" ", 2)[2] for line in done.stdout.strip().splitlines()) == ["6 * 6 = 36", "7 * 7 = 49"]
    without_token = {k: v for k, v in os.environ.items() if k != "DWORKERS_TOKEN"}
    line = assert_one_clear_line(run_client(*flags, "--kind", "square", "1", env=without_token))
    assert "UNAUTHENTICATED" in line or "credentials needed" in line, line
