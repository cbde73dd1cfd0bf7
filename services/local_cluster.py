"""A whole cluster on one machine, as real processes: a ZooKeeper server,
backends, workers and frontends. Used by `dworkers demo`, the tests and the
benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dworkers import credentials, devcerts
from dworkers.common.auth import hash_token, new_token
from dworkers.common.zkserver import ZooKeeperServer, free_port
from dworkers.credentials import Tls


@dataclass
class Service:
    role: str
    process: subprocess.Popen
    address: str = ""
    log_path: Path | None = None
    args: list[str] = field(default_factory=list)
    prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", NAME) to run it in a network namespace

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.process.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def wait_serving(address: str, service: str = "", timeout: float = 30.0, tls: Tls | None = None) -> bool:
    """Waits until the gRPC health service at `address` says SERVING (TLS per
    `tls`, else as the environment says: see dworkers.credentials)."""
    deadline = time.monotonic() + timeout
    with credentials.channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    return False


class LocalCluster:
    def __init__(self, workdir: str | Path | None = None, root: str = "/dworkers",
                 session_timeout: float = 4.0, log_to_files: bool = True, extra_env: dict | None = None,
                 zookeeper: ZooKeeperServer | None = None, journal: str = "", tls: bool = False,
                 access: bool = False, zk_auth: bool = False, zk_tls: bool = False):
        """`tls`: every service serves and calls TLS (certificates from
        `dworkers dev-certs` in the workdir), and requires client
        certificates; `client_tls` is what a client needs. `access`: masters
        and frontends check an access file; the services present a token
        with the roles worker and frontend (and, with TLS, their certificate
        is named too), clients one of `tokens` (admin, producer: submit,
        reader: read; tester: admin, worker and frontend). `zk_auth`: the
        services authenticate to ZooKeeper, and only they may read or write
        what they create there. `zk_tls`: they reach ZooKeeper on its TLS
        port (a ZooKeeperServer with a tls_dir)."""
        self.journal = journal  # a PostgreSQL URL for the masters' journal; empty: ZooKeeper
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dworkers-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.session_timeout = session_timeout
        self.log_to_files = log_to_files
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.own_zookeeper = zookeeper is None
        self.zookeeper = zookeeper or ZooKeeperServer(self.workdir / "zookeeper")
        self.services: list[Service] = []
        self._count = 0
        self.client_tls: Tls | None = None
        self.tokens: dict[str, str] = {}
        self.zk_tls = zk_tls
        self.zk_auth: str | None = None
        self.zk_reader_auth: str | None = None
        self.role_env: dict[str, dict[str, str]] = {}  # role -> environment beyond env
        self._lock_down(tls, access, zk_auth, zk_tls)

    def _lock_down(self, tls: bool, access: bool, zk_auth: bool, zk_tls: bool) -> None:
        """Files and environment for the services' TLS, access file and ZooKeeper credentials."""
        if tls:
            certs = self.workdir / "tls"
            devcerts.make(certs)
            self.env.update(DWORKERS_TLS_CERT=str(certs / "server.pem"), DWORKERS_TLS_KEY=str(certs / "server-key.pem"),
                            DWORKERS_TLS_CA=str(certs / "ca.pem"), DWORKERS_TLS_CLIENT_AUTH="require")
            self.client_tls = Tls(ca=str(certs / "ca.pem"), cert=str(certs / "admin.pem"),
                                  key=str(certs / "admin-key.pem"))
        if zk_tls:
            assert self.zookeeper.tls_dir is not None, "zk_tls needs a ZooKeeperServer with a tls_dir"
            self.env.update(DWORKERS_ZK_TLS_CA=str(self.zookeeper.tls_dir / "ca.pem"))
        if zk_auth:  # masters write; workers and frontends log in as a user that may only read
            self.zk_auth = f"dworkers:{new_token()}"
            self.zk_reader_auth = f"reader:{new_token()}"
            auth_file, reader_file = self.workdir / "zk-auth", self.workdir / "zk-reader"
            for path, auth in ((auth_file, self.zk_auth), (reader_file, self.zk_reader_auth)):
                path.write_text(auth + "\n")
                path.chmod(0o600)
            self.role_env["master"] = {"DWORKERS_ZK_AUTH_FILE": str(auth_file),
                                       "DWORKERS_ZK_READERS_FILE": str(reader_file)}
            self.env.update(DWORKERS_ZK_AUTH_FILE=str(reader_file))
        if access:
            self.access_file = self.workdir / "access"
            services = new_token()
            roles_of = {"admin": "admin", "producer": "submit", "reader": "read", "tester": "admin,worker,frontend"}
            self.tokens = {name: new_token() for name in roles_of}
            lines = [f"services worker,frontend {hash_token(services)}",
                     *(f"{name} {roles} {hash_token(self.tokens[name])}" for name, roles in roles_of.items())]
            if tls:
                lines.append("services-certificate worker,frontend cert:dworkers")
            self.access_file.write_text("\n".join(lines) + "\n")
            token_file = self.workdir / "services-token"
            token_file.write_text(services + "\n")
            self.env.update(DWORKERS_ACCESS_FILE=str(self.access_file), DWORKERS_TOKEN_FILE=str(token_file))

    @property
    def zk(self) -> str:
        return self.zookeeper.secure_hosts if self.zk_tls else self.zookeeper.hosts

    def start_zookeeper(self) -> LocalCluster:
        self.zookeeper.start()
        return self

    def _spawn(self, role: str, args: list[str], address: str = "", prefix: tuple[str, ...] = (),
               cwd: Path | None = None) -> Service:
        self._count += 1
        cluster = ["--zk", self.zk, "--root", self.root] if role != "dashboard" else []  # it talks to a frontend only
        command = [*prefix, sys.executable, "-m", "dworkers.cli", role, *cluster, *args]
        log_path = self.workdir / f"{role}-{self._count}.log" if self.log_to_files else None
        out = open(log_path, "ab") if log_path else None
        process = subprocess.Popen(command, stdout=out or None, stderr=subprocess.STDOUT if out else None,
                                   stdin=subprocess.DEVNULL, env={**self.env, **self.role_env.get(role, {})},
                                   cwd=cwd or Path(__file__).resolve().parent.parent)
        if out:
            out.close()
        service = Service(role, process, address, log_path, args, prefix)
        self.services.append(service)
        return service

    def start_master(self, port: int | None = None, *args: str, wait: bool = False, host: str = "127.0.0.1",
                     prefix: tuple[str, ...] = ()) -> Service:
        port = port or free_port()
        address = f"{host}:{port}"
        journal = ["--journal", self.journal] if self.journal else []
        service = self._spawn("master", ["--listen", address, "--metrics-port", "0",
                                         "--session-timeout", str(self.session_timeout), *journal, *args],
                              address, prefix)
        if wait and not wait_serving(address, tls=self.client_tls):
            raise RuntimeError(f"backend {address} did not start:\n{service.log()[-3000:]}")
        return service

    def shards(self, *args: str) -> str:
        """Runs `dworkers shards ARGS` on this cluster; its output."""
        done = subprocess.run([sys.executable, "-m", "dworkers.cli", "shards", "--zk", self.zk, "--root", self.root,
                               *args], env={**self.env, **self.role_env.get("master", {})}, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"dworkers shards {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def start_worker(self, concurrency: int = 2, *args: str, cwd: Path | None = None) -> Service:
        """A worker process; job modules (--jobs) import from `cwd` as well."""
        return self._spawn("worker", ["--concurrency", str(concurrency), "--metrics-port", "0", *args], cwd=cwd)

    def start_frontend(self, port: int | None = None, *args: str, wait: bool = True) -> Service:
        address = f"127.0.0.1:{port or free_port()}"
        service = self._spawn("frontend", ["--listen", address, "--metrics-port", "0", *args], address)
        if wait and not wait_serving(address, tls=self.client_tls):
            raise RuntimeError(f"frontend {address} did not start:\n{service.log()[-3000:]}")
        return service

    def start_dashboard(self, frontend: str, *args: str, port: int | None = None, wait: bool = True) -> Service:
        """A dashboard calling `frontend`; its URL is http://<address>/. It
        presents no token of its own (visitors log in) unless `args` give one."""
        address = f"127.0.0.1:{port or free_port()}"
        env = {"DWORKERS_TOKEN_FILE": ""}  # not the services' token: visitors act as themselves
        if self.client_tls is not None:
            tls = self.client_tls
            env.update(DWORKERS_TLS_CA=tls.ca, DWORKERS_TLS_CERT=tls.cert, DWORKERS_TLS_KEY=tls.key)
        self.role_env["dashboard"] = env
        service = self._spawn("dashboard", ["--listen", address, "--frontend", frontend, "--metrics-port", "0", *args],
                              address)
        if wait and not wait_http(f"http://{address}/healthz"):
            raise RuntimeError(f"dashboard {address} did not start:\n{service.log()[-3000:]}")
        return service

    def restart(self, service: Service) -> Service:
        """Starts a new process in the same role, with the same arguments and address."""
        replacement = self._spawn(service.role, service.args, service.address, service.prefix)
        self.services.remove(service)
        return replacement

    def masters(self) -> list[Service]:
        return [s for s in self.services if s.role == "master" and s.alive()]

    def active_master(self, timeout: float = 30.0) -> Service:
        """The backend whose health says it serves dworkers.v1.Master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for service in self.masters():
                if wait_serving(service.address, "dworkers.v1.Master", timeout=0.2, tls=self.client_tls):
                    return service
            time.sleep(0.05)
        raise TimeoutError("no active master")

    def print_logs(self, tail: int = 4000) -> None:
        """Prints the end of every service's log (after a failed test)."""
        for service in self.services:
            print(f"\n===== {service.role} pid {service.pid} {service.address} =====")
            print(service.log()[-tail:])

    def stop(self) -> None:
        for service in reversed(self.services):
            if service.alive():
                service.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for service in self.services:
            try:
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.kill()
        if self.own_zookeeper:
            self.zookeeper.stop()


def wait_http(url: str, timeout: float = 30.0) -> bool:
    """Waits until `url` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False
