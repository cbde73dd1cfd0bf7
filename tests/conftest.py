"""Fixtures: one real ZooKeeper server for the session (free port, temporary
data dir); each cluster test gets its own ZooKeeper root and real processes."""

from __future__ import annotations

import os
import uuid

import pytest

from dworkers.common.pgserver import PostgreSQLServer
from dworkers.common.zkserver import ZooKeeperServer
from dworkers.local_cluster import LocalCluster


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory):
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgresql(tmp_path_factory):
    server = PostgreSQLServer(tmp_path_factory.mktemp("postgresql")).start()
    yield server
    server.remove()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, "report_" + report.when, report)
    return report


@pytest.fixture
def journal(request) -> str:
    """The masters' --journal: ZooKeeper unless a test is parametrized with
    `both_journals` (tests/journals.py)."""
    if getattr(request, "param", "zookeeper") == "zookeeper":
        return ""
    return request.getfixturevalue("postgresql").url()


def pytest_addoption(parser):
    parser.addoption("--secure", action="store_true", default=os.environ.get("DWORKERS_TEST_SECURE") == "1",
                     help="run every `cluster` test with TLS (mutual), access control and ZooKeeper ACLs on "
                          "(tests marked `secure` always do)")


@pytest.fixture
def make_cluster(zookeeper, tmp_path, request):
    """Makes LocalClusters (options: tls=, access=, zk_auth=, journal=, ...)
    on the session's ZooKeeper unless given another; each is stopped at the
    end, and its services' logs printed if the test failed."""
    made: list[LocalCluster] = []

    def make(**options) -> LocalCluster:
        options.setdefault("zookeeper", zookeeper)
        c = LocalCluster(workdir=tmp_path / f"cluster-{len(made)}" if made else tmp_path,
                         root=f"/test-{uuid.uuid4().hex[:8]}", session_timeout=2.0, **options)
        made.append(c)
        return c
    yield make
    report = getattr(request.node, "report_call", None)
    for c in made:
        c.stop()
        if report is not None and report.failed:
            c.print_logs()


@pytest.fixture
def cluster(make_cluster, request, journal, monkeypatch):
    secure = request.config.getoption("--secure") or request.node.get_closest_marker("secure") is not None
    c = make_cluster(journal=journal, tls=secure, access=secure, zk_auth=secure)
    if secure:  # the test's own clients (SDK, stubs) take TLS and a token from the environment
        assert c.client_tls is not None
        for name, value in (("CA", c.client_tls.ca), ("CERT", c.client_tls.cert), ("KEY", c.client_tls.key)):
            monkeypatch.setenv(f"DWORKERS_TLS_{name}", value)
        monkeypatch.setenv("DWORKERS_TOKEN", c.tokens["tester"])
    return c


LEVELS = ("unit", "integration", "e2e", "chaos", "container")


def pytest_collection_modifyitems(config, items):
    """Every test says what it needs (its module's pytestmark): `make
    test-fast` runs the unit and integration ones, `make image-test` the
    container ones (`make test` all but those)."""
    unmarked = [item.nodeid for item in items if not any(item.get_closest_marker(level) for level in LEVELS)]
    if unmarked:
        raise pytest.UsageError(f"tests without a level marker ({', '.join(LEVELS)}): {unmarked[:5]}")
