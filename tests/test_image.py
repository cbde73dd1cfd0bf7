"""The image, as `make image-test` runs it after `make image`: containers of
two masters, a worker, a frontend and a dashboard on the test's ZooKeeper (host network,
free loopback ports); works of 1 to 256 KiB through them; the active master
stopped with `podman stop` (SIGTERM through tini), the standby takes over
and nothing is lost. Everything started is removed at the end."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest

import dworkers
from dworkers.common.zkserver import free_port
from dworkers.local_cluster import wait_serving
from tests.helpers import frontend, wait_kind, wait_until

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parent.parent
PODMAN = ROOT / "scripts" / "podman.sh"
IMAGE = os.environ.get("DWORKERS_IMAGE", f"localhost/dworkers:{dworkers.__version__}")


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(PODMAN), *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr[-2000:]}")
    return result


class Containers:
    """The test's containers, named after it, removed (with their logs
    printed on failure) when it ends."""

    def __init__(self, zookeeper: str):
        self.prefix = f"dworkers-test-{uuid.uuid4().hex[:8]}"
        self.common = ["--zk", zookeeper, "--root", f"/{self.prefix}"]
        self.names: list[str] = []

    def run(self, name: str, role: str, *args: str, volumes: tuple[str, ...] = ()) -> str:
        full = f"{self.prefix}-{name}"
        common = self.common if role != "dashboard" else []  # it talks to a frontend, not to ZooKeeper
        # No systemd here for podman's health timers: the test runs the
        # image's HEALTHCHECK itself (podman healthcheck run).
        podman("run", "--detach", "--name", full, "--network", "host", "--health-interval", "disable",
               *(arg for volume in volumes for arg in ("--volume", volume)),
               IMAGE, role, *common, *args)
        self.names.append(full)
        return full

    def healthy(self, name: str) -> bool:
        return podman("healthcheck", "run", name, check=False).returncode == 0

    def exit_code(self, name: str) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())

    def print_logs(self) -> None:
        for name in self.names:
            print(f"\n===== {name} =====\n{podman('logs', name, check=False).stderr[-4000:]}")

    def remove_all(self) -> None:
        if self.names:
            podman("rm", "--force", "--time", "5", *self.names, check=False)


@pytest.fixture
def containers(zookeeper, request):
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: `make image-test` builds it first")
    c = Containers(zookeeper.hosts)
    yield c
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        c.print_logs()
    c.remove_all()


def start_master(containers: Containers, name: str) -> tuple[str, str]:
    address = f"127.0.0.1:{free_port()}"
    container = containers.run(name, "master", "--listen", address, "--advertise", address,
                               "--metrics-port", str(free_port()), "--session-timeout", "2")
    return container, address


def test_the_image_serves_works_and_fails_over_when_the_active_master_is_stopped(containers):
    first, first_address = start_master(containers, "master-1")
    assert wait_serving(first_address, "dworkers.v1.Master", timeout=60), "the first master never became active"
    second, second_address = start_master(containers, "master-2")
    assert wait_serving(second_address, timeout=60), "the standby never served health"
    # Job modules go to /app in derived images; here a test module is mounted there.
    worker = containers.run("worker", "worker", "--jobs", "jobs_for_tests", "--concurrency", "4",
                            "--metrics-port", str(free_port()),
                            volumes=(f"{ROOT / 'tests' / 'jobs_for_tests.py'}:/app/jobs_for_tests.py:ro",))
    front_address = f"127.0.0.1:{free_port()}"
    front = containers.run("frontend", "frontend", "--listen", front_address, "--metrics-port", str(free_port()))
    assert wait_serving(front_address, timeout=60), "the frontend never served"
    wait_kind(frontend(front_address), "echo", timeout=60)
    board_address = f"127.0.0.1:{free_port()}"
    board = containers.run("dashboard", "dashboard", "--listen", board_address, "--frontend", front_address,
                           "--metrics-port", str(free_port()))

    # The image's HEALTHCHECK finds each container's role through tini (PID 1).
    assert podman("exec", worker, "cat", "/proc/1/comm").stdout.strip() == "tini"
    for name in (first, second, worker, front, board):
        wait_until(lambda name=name: containers.healthy(name), 30, f"{name} healthy")

    sizes = [1 << (10 + i % 9) for i in range(90)]  # 1 KiB .. 256 KiB
    payloads = [os.urandom(size) for size in sizes]
    with dworkers.Client(front_address, timeout=60) as client:
        handles = [client.submit("echo", payload=payload) for payload in payloads[:45]]
        assert [handle.result(timeout=60) for handle in handles] == payloads[:45]

        # The active master is stopped while works are being submitted and run.
        stopping = threading.Thread(target=podman, args=("stop", "--time", "30", first))
        stopping.start()
        handles = [client.submit("echo", payload=payload) for payload in payloads[45:]]
        stopping.join(timeout=60)
        assert [handle.result(timeout=90) for handle in handles] == payloads[45:]
        assert wait_serving(second_address, "dworkers.v1.Master", timeout=30), "the standby never took over"
        assert client.submit("square", 12).result(timeout=60) == 144
    assert containers.exit_code(first) == 0, "the stopped master did not exit cleanly on SIGTERM"

    with urllib.request.urlopen(f"http://{board_address}/api/overview", timeout=30) as response:
        assert json.loads(response.read())["master"]["address"] == second_address  # the dashboard's page data

    podman("stop", "--time", "30", worker, front, board)
    assert [containers.exit_code(c) for c in (worker, front, board)] == [0, 0, 0]
