"""`dworkers healthcheck` (the image's HEALTHCHECK): against real processes,
and how it finds a container's main process's role and ports."""

from __future__ import annotations

import pytest

from dworkers.common.zkserver import free_port
from dworkers.healthcheck import target_of
from tests.helpers import frontend, wait_kind
from tests.test_cli import assert_one_line_error, ok
from tests.test_cli import dworkers as cli

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (["dworkers", "master"], {}, ("grpc", "127.0.0.1:7100")),
    (["dworkers", "master", "--listen", "10.0.0.5:7200"], {}, ("grpc", "10.0.0.5:7200")),
    (["/opt/venv/bin/python", "/opt/venv/bin/dworkers", "frontend"], {"DWORKERS_LISTEN": "0.0.0.0:7001"},
     ("grpc", "127.0.0.1:7001")),
    (["dworkers", "worker", "--metrics-port=9201"], {}, ("http", "http://127.0.0.1:9201/metrics")),
    (["tini", "--", "dworkers", "master", "--listen=0.0.0.0:7300"], {}, ("grpc", "127.0.0.1:7300")),
    (["tini", "--", "dworkers", "dashboard", "--listen", "0.0.0.0:8080"], {},
     ("http", "http://127.0.0.1:8080/healthz")),
    (["dworkers", "dashboard"], {"DWORKERS_HTTPS_CERT": "/run/secrets/tls-cert"},
     ("http", "https://127.0.0.1:8080/healthz")),
    (["dworkers", "worker"], {"DWORKERS_METRICS_PORT": "0"},
     ("none", "a worker without a metrics port: its process runs")),
])
def test_the_main_process_s_role_and_ports_come_from_its_command_line_and_environment(argv, env, expected):
    assert target_of(argv, env) == expected


def test_serving_processes_are_healthy_and_a_missing_one_is_not(cluster):
    master = cluster.start_master(None, wait=True)
    front = cluster.start_frontend()
    port = free_port()
    cluster.start_worker(1, "--metrics-port", str(port))
    wait_kind(frontend(front.address), "square")
    for args in (("--address", master.address), ("--address", front.address),
                 ("--metrics", f"http://127.0.0.1:{port}/metrics")):
        assert ok(cli("healthcheck", *args, timeout=30)).stdout.startswith("healthy: ")
    gone = cli("healthcheck", "--address", f"127.0.0.1:{free_port()}", "--timeout", "1", timeout=30)
    assert gone.returncode == 1
    assert_one_line_error(gone, "UNAVAILABLE")
