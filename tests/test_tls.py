"""TLS on every hop, on a real cluster: masters and frontends serve it and
require client certificates, workers and frontends call masters over it;
the SDK, the CLI and the health check speak it. Refusals of plaintext, of
clients without a certificate and of certificates from another CA;
certificates replaced under load with nothing lost."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import dworkers
from dworkers import credentials, devcerts
from dworkers.common.errors import ConfigError
from dworkers.common.tls import ServingTlsSettings, TlsFiles
from dworkers.local_cluster import LocalCluster
from dworkers.v1 import frontend_pb2_grpc
from tests.helpers import wait_kind, wait_until
from tests.test_cli import assert_one_line_error, clean_env, ok
from tests.test_cli import dworkers as cli

pytestmark = pytest.mark.e2e


@pytest.fixture
def tls_cluster(make_cluster):
    return make_cluster(tls=True)


def started(cluster: LocalCluster, workers: int = 1) -> str:
    """A master, workers and a frontend; the frontend's address once a worker registered."""
    cluster.start_master(wait=True)
    for _ in range(workers):
        cluster.start_worker(2, "--jobs", "tests.jobs_for_tests")
    front = cluster.start_frontend()
    wait_kind(frontend_pb2_grpc.FrontendStub(credentials.channel(front.address, cluster.client_tls)), "square")
    return front.address


def health(address: str, tls) -> health_pb2.HealthCheckResponse:
    with credentials.channel(address, tls) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


def certs(cluster: LocalCluster, name: str) -> str:
    return str(cluster.workdir / "tls" / name)


def test_works_of_every_size_travel_over_mutual_tls(tls_cluster):
    address = started(tls_cluster, workers=2)
    payloads = [os.urandom(1 << (10 + i % 9)) for i in range(60)]  # 1 KiB .. 256 KiB
    with dworkers.Client(address, tls=tls_cluster.client_tls, timeout=60) as client:
        handles = [client.submit("echo", payload=p) for p in payloads]
        assert [h.result(timeout=60) for h in handles] == payloads


def test_plaintext_clients_and_clients_without_a_trusted_certificate_are_refused(tls_cluster, tmp_path):
    address = started(tls_cluster)
    master = tls_cluster.masters()[0].address
    other = tmp_path / "other-ca"
    devcerts.make(other)
    refused = {
        "plaintext": False,
        "no client certificate": dworkers.Tls(ca=certs(tls_cluster, "ca.pem")),
        "a certificate of another CA": dworkers.Tls(ca=certs(tls_cluster, "ca.pem"), cert=str(other / "admin.pem"),
                                                    key=str(other / "admin-key.pem")),
        "a server of another CA": dworkers.Tls(ca=str(other / "ca.pem"), cert=certs(tls_cluster, "admin.pem"),
                                               key=certs(tls_cluster, "admin-key.pem")),
    }
    for target in (address, master):  # the public API, and the masters' port that workers use
        for why, tls in refused.items():
            with pytest.raises(grpc.RpcError) as error:
                health(target, tls)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE, (target, why)
        assert health(target, tls_cluster.client_tls).status == health_pb2.HealthCheckResponse.SERVING
    # The SDK says so rather than hang: the submission is not accepted.
    with dworkers.Client(address, tls=False, timeout=2) as client:
        with pytest.raises(dworkers.SubmitError) as error:
            client.submit("square", 3).accepted(timeout=30)
    assert error.value.code == "UNAVAILABLE"


def test_the_cli_and_the_health_check_speak_tls(tls_cluster):
    address = started(tls_cluster)
    flags = ["--tls-ca", certs(tls_cluster, "ca.pem"), "--tls-cert", certs(tls_cluster, "admin.pem"),
             "--tls-key", certs(tls_cluster, "admin-key.pem")]
    done = ok(cli("submit", "square", "12", "--wait", "--frontend", address, *flags, timeout=60))
    assert "144" in done.stdout
    # the environment works as well as the flags
    env = {**clean_env(), "DWORKERS_TLS_CA": certs(tls_cluster, "ca.pem"),
           "DWORKERS_TLS_CERT": certs(tls_cluster, "admin.pem"),
           "DWORKERS_TLS_KEY": certs(tls_cluster, "admin-key.pem")}
    assert "workers" in ok(cli("cluster", "--frontend", address, env=env, timeout=60)).stdout.lower()
    for target in (address, tls_cluster.masters()[0].address):
        assert ok(cli("healthcheck", "--address", target, *flags, timeout=60)).stdout.startswith("healthy: ")
    plaintext = cli("cluster", "--frontend", address, "--timeout", "3", timeout=60)
    assert_one_line_error(plaintext, "cannot reach the frontend", address)


def test_a_worker_without_a_client_certificate_gets_no_work(tls_cluster):
    tls_cluster.start_master(wait=True)
    front = tls_cluster.start_frontend()
    no_cert = {**tls_cluster.env, "DWORKERS_TLS_CERT": "", "DWORKERS_TLS_KEY": ""}
    env, tls_cluster.env = tls_cluster.env, no_cert
    try:
        worker = tls_cluster.start_worker(1)
    finally:
        tls_cluster.env = env
    wait_until(lambda: "PEER_DID_NOT_RETURN_A_CERTIFICATE" in tls_cluster.masters()[0].log()
               or "handshake" in worker.log().lower() or "failed to connect" in worker.log(), 60,
               "the master to refuse the worker's handshake")
    with dworkers.Client(front.address, tls=tls_cluster.client_tls, timeout=30) as client:
        info = client.stub.ClusterInfo(dworkers.v1.work_pb2.ClusterInfoRequest(), timeout=30)
    assert not info.workers, info


def test_certificates_replaced_under_load_are_served_without_a_restart_and_nothing_is_lost(tls_cluster, tmp_path):
    address = started(tls_cluster, workers=2)
    directory = tls_cluster.workdir / "tls"
    with dworkers.Client(address, tls=tls_cluster.client_tls, timeout=60) as client:
        stop = threading.Event()
        handles: list = []

        def produce():
            n = 0
            while not stop.is_set() and n < 3000:
                handles.append((n, client.submit("square", n)))
                n += 1
        producer = threading.Thread(target=produce)
        producer.start()
        try:
            wait_until(lambda: len(handles) > 200, 60, "works to flow")
            # A new key and certificate from the same CA, as cert-manager renews
            # them: written beside, then moved over the old files.
            renewed = tmp_path / "renewed"
            devcerts.make_server(renewed, directory / "ca.pem", directory / "ca-key.pem")
            before = served_certificate(address, tls_cluster)
            shutil.copy(renewed / "server-key.pem", directory / "server-key.pem.new")
            shutil.copy(renewed / "server.pem", directory / "server.pem.new")
            os.replace(directory / "server-key.pem.new", directory / "server-key.pem")
            os.replace(directory / "server.pem.new", directory / "server.pem")
            expected = (renewed / "server.pem").read_bytes()
            wait_until(lambda: served_certificate(address, tls_cluster) == pem_to_der(expected), 30,
                       "the frontend to serve the renewed certificate")
            master = tls_cluster.masters()[0].address
            wait_until(lambda: served_certificate(master, tls_cluster) == pem_to_der(expected), 30,
                       "the master to serve the renewed certificate")
            assert before != pem_to_der(expected)
            wait_until(lambda: len(handles) > 600, 60, "works to flow after the renewal")
        finally:
            stop.set()
            producer.join(timeout=60)
        assert [h.result(timeout=120) for _, h in handles] == [n * n for n, _ in handles]


def served_certificate(address: str, cluster: LocalCluster) -> bytes:
    """The DER certificate a TLS handshake with `address` is answered with."""
    tls = cluster.client_tls
    context = ssl.create_default_context(cafile=tls.ca)
    context.load_cert_chain(tls.cert, tls.key)
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as conn:
            return conn.getpeercert(binary_form=True)


def pem_to_der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


@pytest.mark.unit
def test_tls_settings_that_cannot_work_are_refused_in_one_line(tmp_path):
    devcerts.make(tmp_path)
    cases = [
        (ServingTlsSettings(tls_cert=str(tmp_path / "server.pem")), "--tls-cert and --tls-key go together"),
        (ServingTlsSettings(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server-key.pem"),
                            tls_client_auth="require"), "needs --tls-ca"),
        (ServingTlsSettings(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "admin-key.pem")),
         "are not a certificate and its key"),
        (ServingTlsSettings(tls_ca=str(tmp_path / "missing.pem")), "cannot read"),
    ]
    for settings, fragment in cases:
        with pytest.raises(ConfigError) as error:
            TlsFiles(settings)
        assert fragment in str(error.value)


@pytest.mark.unit
def test_a_half_replaced_key_pair_keeps_the_one_in_use_until_the_rest_arrives(tmp_path):
    devcerts.make(tmp_path)
    files = TlsFiles(ServingTlsSettings(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server-key.pem"),
                                        tls_ca=str(tmp_path / "ca.pem")))
    in_use = files.channel_credentials()
    renewed = tmp_path / "renewed"
    devcerts.make_server(renewed, tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    os.replace(renewed / "server-key.pem", tmp_path / "server-key.pem")  # the key first: no pair yet
    files._checked = 0.0
    assert files.channel_credentials() is in_use
    os.replace(renewed / "server.pem", tmp_path / "server.pem")
    files._checked = 0.0
    assert files.channel_credentials() is not in_use
