"""What an operator's tools see: gRPC reflection, health, JSON logs."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.helpers import wait_until

pytestmark = pytest.mark.e2e


def listed_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        return {s.name for s in response.list_services_response.service}


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_reflection_where_enabled_and_health_on_every_grpc_service(cluster):
    active = cluster.start_master(None, "--reflection", "on", wait=True)
    standby = cluster.start_master(wait=True)
    front = cluster.start_frontend(None, "--reflection", "on")
    assert {"dworkers.v1.Master", "grpc.health.v1.Health"} <= listed_services(active.address)
    assert {"dworkers.v1.Frontend", "grpc.health.v1.Health"} <= listed_services(front.address)
    with pytest.raises(grpc.RpcError) as off:  # off unless enabled
        listed_services(standby.address)
    assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert health(active.address, "dworkers.v1.Master") == serving
    assert health(standby.address, "dworkers.v1.Master") == not_serving  # readiness routes to the master only
    assert health(standby.address, "") == serving  # but it is alive
    assert health(front.address, "dworkers.v1.Frontend") == serving


def test_json_logs_carry_stable_keys(cluster):
    master = cluster.start_master(None, "--log-format", "json", wait=True)
    wait_until(lambda: "active master" in master.log(), 30, "the master to lead")
    master.stop()
    entries = [json.loads(line) for line in master.log().splitlines() if line.startswith("{")]
    assert entries and all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    assert any(e.get("epoch") is not None and "active master" in e["msg"] for e in entries)
    assert any("dworkers master starting" in e["msg"] and "session_timeout=" in e["msg"] for e in entries)


def test_sigterm_caught_by_any_thread_stops_every_service(cluster):
    """The kernel may hand a process's signal to any of its threads; Python
    handles it only when the main thread runs: a main thread waiting with
    no timeout would never stop (a worker thawed after SIGSTOP did not)."""
    cluster.start_master(wait=True)
    cluster.start_worker(1)
    cluster.start_frontend()
    for service in list(cluster.services):
        def others(pid=service.pid) -> list[int]:
            return [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
        threads = wait_until(others, 30, f"{service.role} to start a thread besides its main one")
        assert _tgkill(service.pid, threads[-1], signal.SIGTERM) == 0
    for service in cluster.services:
        try:
            service.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{service.role} {service.pid} ignored a SIGTERM caught by another thread")
        assert service.process.returncode == 0, f"{service.role}: {service.log()[-2000:]}"


def _tgkill(pid: int, tid: int, sig: int) -> int:
    """Sends `sig` to one thread of a process (Linux's tgkill)."""
    number = {"x86_64": 234, "aarch64": 131}[platform.machine()]  # SYS_tgkill
    return ctypes.CDLL(None, use_errno=True).syscall(number, pid, tid, int(sig))
