"""A real network cut: the active master runs in its own network namespace,
joined to the host by a veth pair, and the link is cut while work flows. It
must stop acting (its appends are fenced, its SUSPENDED deadline fires), a
standby takes over, and when the link heals it rejoins as a standby."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from dworkers.common.zkserver import ZooKeeperServer, free_port
from dworkers.local_cluster import LocalCluster, wait_serving
from tests.helpers import (
    ResultCollector,
    assert_exactly_once,
    frontend,
    wait_kind,
    wait_until,
)
from tests.journals import read_journal
from tests.test_faults import Producer

pytestmark = pytest.mark.e2e

NAMESPACE = f"dw-cut-{os.getpid() % 10000}"
HOST_END, NS_END = f"dwh{os.getpid() % 10000}", f"dwn{os.getpid() % 10000}"
HOST_IP, NS_IP = "10.213.7.1", "10.213.7.2"  # a link between two test hosts of our own


def ip(*args: str, namespace: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespace():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    try:
        ip("netns", "add", NAMESPACE)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        ip("link", "add", HOST_END, "type", "veth", "peer", "name", NS_END)
        ip("link", "set", NS_END, "netns", NAMESPACE)
        ip("addr", "add", f"{HOST_IP}/30", "dev", HOST_END)
        ip("link", "set", HOST_END, "up")
        ip("addr", "add", f"{NS_IP}/30", "dev", NS_END, namespace=NAMESPACE)
        ip("link", "set", NS_END, "up", namespace=NAMESPACE)
        ip("link", "set", "lo", "up", namespace=NAMESPACE)
        yield NAMESPACE
    finally:
        subprocess.run(["ip", "link", "del", HOST_END], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True, timeout=10)


def test_a_partitioned_master_stops_acting_and_rejoins(namespace, tmp_path):
    zookeeper = ZooKeeperServer(tmp_path / "zookeeper", address=HOST_IP)
    cluster = LocalCluster(workdir=tmp_path, root=f"/cut-{uuid.uuid4().hex[:6]}", session_timeout=2.0,
                           zookeeper=zookeeper.start())
    try:
        cut_off = cluster.start_master(free_port(), wait=True, host=NS_IP, prefix=("ip", "netns", "exec", namespace))
        standby = cluster.start_master(free_port(), wait=True, host=HOST_IP)
        cluster.start_worker(2)
        stub = frontend(cluster.start_frontend().address)
        results = ResultCollector(stub)
        wait_kind(stub, "square")
        assert cluster.active_master() is cut_off
        producer = Producer(stub, prefix="cut")
        wait_until(lambda: len(producer.acked) >= 10, 30, "the first acked works")
        ip("link", "set", NS_END, "down", namespace=namespace)  # no RST, no FIN: packets just vanish
        try:
            assert wait_serving(standby.address, "dworkers.v1.Master", timeout=20)
            before = len(producer.acked)
            wait_until(lambda: len(producer.acked) >= before + 10, 30, "works acked by the new master")
        finally:
            ip("link", "set", NS_END, "up", namespace=namespace)
        # The healed master learns it lost its session and rejoins as a standby.
        wait_until(lambda: wait_serving(cut_off.address, "", timeout=1) and
                   not wait_serving(cut_off.address, "dworkers.v1.Master", timeout=0.2), 30, "the old master to rejoin")
        acked = producer.stop()
        assert len(acked) > 20
        assert_exactly_once(results, acked, stub)
        assert cut_off.alive()
        assert not wait_serving(cut_off.address, "dworkers.v1.Master", timeout=1)
        assert wait_serving(cut_off.address, "", timeout=5)  # alive, as a standby
        epochs = [batch.epoch for _, batch in read_journal(cluster)]
        assert epochs == sorted(epochs) and len(set(epochs)) >= 2
        log = cut_off.log()
        assert "stepping down" in log
        results.stop()
    finally:
        cluster.stop()
        zookeeper.stop()
