"""ZooKeeper locked down: services authenticate by digest, and what they
create (election, journal, kinds, cluster id) only they may read or write.
An anonymous client, or one with the wrong password, can neither read the
cluster's root nor join the election; a service with the wrong password
says so in one line. Optionally, they reach ZooKeeper over TLS."""

from __future__ import annotations

import pytest
from kazoo.exceptions import NoAuthError
from kazoo.handlers.threading import KazooTimeoutError

import dworkers
from dworkers import devcerts
from dworkers.common import zk
from dworkers.common.zkserver import ZooKeeperServer
from tests.helpers import frontend, wait_kind
from tests.test_cli import assert_one_line_error
from tests.test_cli import dworkers as cli

pytestmark = pytest.mark.e2e


@pytest.fixture
def locked(make_cluster):
    return make_cluster(zk_auth=True)


def test_only_the_services_credentials_open_the_clusters_znodes(locked, tmp_path):
    locked.start_master(wait=True)
    locked.start_master(wait=True)
    locked.start_worker(2)
    front = locked.start_frontend()
    wait_kind(frontend(front.address), "square")
    with dworkers.Client(front.address, timeout=60) as client:
        assert [h.result(timeout=60) for h in [client.submit("square", n) for n in range(20)]] == \
            [n * n for n in range(20)]
    paths = zk.Paths(locked.root)
    trusted = zk.connect(locked.zk, auth=locked.zk_auth)
    try:
        names = set(trusted.get_children(locked.root))
        assert {"election", "journal", "cluster"} <= names, names
        assert len(trusted.get_children(paths.election)) == 2
        for path in (locked.root, paths.election, paths.journal, paths.cluster):
            acl, _ = trusted.get_acls(path)
            # the masters' user may do anything, the workers' and frontends' only read
            assert {(entry.id.id.split(":")[0], entry.acl_list[0]) for entry in acl} == \
                {("dworkers", "ALL"), ("reader", "READ")}, (path, acl)
    finally:
        zk.stop(trusted)
    # Workers and frontends log in as a user that may read, and nothing more:
    # one of them compromised cannot plant an election znode or touch the journal.
    reader = zk.connect(locked.zk, auth=locked.zk_reader_auth)
    try:
        assert len(reader.get_children(paths.election)) == 2 and reader.get(paths.cluster)[0]
        for write in (lambda: reader.create(f"{paths.election}/backend-", b"{}", ephemeral=True, sequence=True),
                      lambda: reader.set(paths.cluster, b"forged"), lambda: reader.delete(paths.cluster),
                      lambda: reader.create(f"{paths.journal}/b-forged", b"")):
            with pytest.raises(NoAuthError):
                write()
    finally:
        zk.stop(reader)
    for auth in (None, "dworkers:wrong-password", "mallory:secret"):
        outsider = zk.connect(locked.zk, auth=auth)
        try:
            for read, path in ((outsider.get_children, locked.root), (outsider.get, paths.cluster),
                               (outsider.get_children, paths.election)):
                with pytest.raises(NoAuthError):
                    read(path)
            # An election znode with a low number would redirect everyone: refused.
            with pytest.raises(NoAuthError):
                outsider.create(f"{paths.election}/backend-", b'{"address": "10.6.6.6:7100"}', ephemeral=True,
                                sequence=True)
            with pytest.raises(NoAuthError):
                outsider.delete(paths.cluster)
        finally:
            zk.stop(outsider)


def test_a_service_with_the_wrong_password_says_so_in_one_line(locked, tmp_path):
    locked.start_master(wait=True)
    wrong = tmp_path / "wrong-auth"
    wrong.write_text("dworkers:not-the-password\n")
    for role, args in (("frontend", ["--listen", "127.0.0.1:0"]), ("master", ["--listen", "127.0.0.1:0"])):
        proc = cli(role, "--zk", locked.zk, "--root", locked.root, "--zk-auth-file", str(wrong), "--metrics-port",
                   "0", *args, timeout=60)
        assert_one_line_error(proc, "ZooKeeper refuses this process access to", locked.root, ignore_log_lines=True)
    malformed = tmp_path / "malformed-auth"
    malformed.write_text("no colon here\n")
    proc = cli("worker", "--zk", locked.zk, "--root", locked.root, "--zk-auth-file", str(malformed),
               "--metrics-port", "0", timeout=60)
    assert_one_line_error(proc, "must hold `user:password`", ignore_log_lines=True)


def test_a_cluster_reaches_zookeeper_over_tls_only_with_the_ca(make_cluster, tmp_path, request):
    certs = tmp_path / "zk-tls"
    devcerts.make(certs)
    server = ZooKeeperServer(tmp_path / "zookeeper", tls_dir=certs).start()
    request.addfinalizer(server.stop)
    cluster = make_cluster(zookeeper=server, zk_tls=True, zk_auth=True)
    cluster.start_master(wait=True)
    cluster.start_worker(1)
    front = cluster.start_frontend()
    wait_kind(frontend(front.address), "square")
    with dworkers.Client(front.address, timeout=60) as client:
        assert client.submit("square", 11).result(timeout=60) == 121
    assert f"zk={server.secure_hosts}" in cluster.masters()[0].log()
    with pytest.raises(KazooTimeoutError):  # plaintext on the TLS port: no session
        zk.connect(server.secure_hosts, connect_timeout=3)
    other = tmp_path / "other-ca"
    devcerts.make(other)
    with pytest.raises(KazooTimeoutError):  # a server this CA did not sign
        zk.connect(server.secure_hosts, connect_timeout=3, tls=zk.ZkTls(str(other / "ca.pem")))
