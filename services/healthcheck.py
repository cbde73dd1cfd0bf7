"""`dworkers healthcheck`: is a dworkers process serving? For a container's
HEALTHCHECK (exit 0 healthy, 1 not), and for people.

Masters and frontends answer gRPC health (the empty service: the process
serves, as a standby too); a worker serves its Prometheus metrics, a
dashboard its /healthz. Without
an address, it checks the container's main process (PID 1): its command line
and environment say its role, ports and TLS files (it then checks over TLS,
presenting the process's own certificate, expecting the name it carries)."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dworkers import credentials
from dworkers.commands import add_tls_flags, tls_of
from dworkers.common.errors import ConfigError, DworkersError
from dworkers.common.tls import read_file
from dworkers.credentials import Tls

DEFAULT_LISTEN = {"master": "0.0.0.0:7100", "frontend": "0.0.0.0:7000"}
DEFAULT_METRICS_PORT = {"master": 9100, "worker": 9101, "frontend": 9102}
DASHBOARD_LISTEN = "127.0.0.1:8080"


class Unhealthy(DworkersError):
    """The process does not serve (exit status 1, as HEALTHCHECK expects)."""

    exit_status = 1


def add_parser(sub) -> None:
    p = sub.add_parser("healthcheck", help="check that a dworkers process serves (for a container HEALTHCHECK)",
                       description="Exit 0 if the process serves, 1 if not. Without --address or --metrics, checks "
                                   "the container's main process (PID 1), found from its command line.")
    p.add_argument("--address", help="gRPC health of a master or frontend at HOST:PORT")
    p.add_argument("--metrics", help="the /metrics URL of a worker")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    add_tls_flags(p, "the master or frontend")
    p.set_defaults(func=main, log_format="text", log_level="WARNING")


def main(args) -> None:
    tls: Tls | bool = tls_of(args)
    if args.address:
        target = ("grpc", args.address)
    elif args.metrics:
        target = ("http", args.metrics)
    else:
        argv, env = _read_nul(Path("/proc/1/cmdline")), _environ(Path("/proc/1/environ"))
        target, tls = target_of(argv, env), tls_of_process(argv, env)
    kind, where = target
    if kind == "grpc":
        _grpc_health(where, args.timeout, tls)
    elif kind == "http":
        _http_ok(where, args.timeout)
    print(f"healthy: {where}")


def target_of(argv: list[str], env: dict[str, str]) -> tuple[str, str]:
    """What to check for a process started as `argv` with `env`: ("grpc",
    address), ("http", url), or ("none", why) when there is nothing to ask."""
    role = next((a for a in argv if a in DEFAULT_METRICS_PORT or a == "dashboard"), None)
    if role is None:
        raise ConfigError(f"not a dworkers service process: {' '.join(argv)[:200]!r}")
    if role == "dashboard":
        listen = _flag(argv, "--listen") or env.get("DWORKERS_LISTEN") or DASHBOARD_LISTEN
        host, _, port = listen.rpartition(":")
        https = _flag(argv, "--https-cert") or env.get("DWORKERS_HTTPS_CERT")
        return "http", f"{'https' if https else 'http'}://{_local(host)}:{port}/healthz"
    if role in DEFAULT_LISTEN:
        listen = _flag(argv, "--listen") or env.get("DWORKERS_LISTEN") or DEFAULT_LISTEN[role]
        host, _, port = listen.rpartition(":")
        return "grpc", f"{_local(host)}:{port}"
    metrics_port = int(_flag(argv, "--metrics-port") or env.get("DWORKERS_METRICS_PORT") or DEFAULT_METRICS_PORT[role])
    if not metrics_port:
        return "none", "a worker without a metrics port: its process runs"
    return "http", f"http://127.0.0.1:{metrics_port}/metrics"


def tls_of_process(argv: list[str], env: dict[str, str]) -> Tls | bool:
    """The TLS a process started as `argv` with `env` serves: its own
    certificate (as a client certificate too) and CA; the name expected is
    the first its certificate carries."""
    def value(name: str) -> str:
        return _flag(argv, "--" + name.replace("_", "-")) or env.get("DWORKERS_" + name.upper(), "")
    cert, key, ca = value("tls_cert"), value("tls_key"), value("tls_ca")
    if not (cert or ca):
        return False
    return Tls(ca=ca, cert=cert, key=key, server_name=_name_in(cert) if cert else "")


def _name_in(cert_path: str) -> str:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(read_file(cert_path))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return (names.get_values_for_type(x509.DNSName) or [""])[0]
    except (ValueError, x509.ExtensionNotFound):
        return ""


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _read_nul(path: Path) -> list[str]:
    try:
        return [part for part in path.read_bytes().decode(errors="replace").split("\0") if part]
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror}): give --address or --metrics") from None


def _environ(path: Path) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in _read_nul(path) if "=" in item)
    return {key: value for key, value in pairs}


def _grpc_health(address: str, timeout: float, tls: Tls | bool) -> None:
    with credentials.channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
        except grpc.RpcError as error:
            raise Unhealthy(f"{address}: {error.code().name} {error.details() or ''}".strip()) from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise Unhealthy(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")


def _local(host: str) -> str:
    """Where to reach a process listening on `host`, from its own machine."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "[::]") else host


def _http_ok(url: str, timeout: float) -> None:
    # Over HTTPS the question is whether the process answers, from its own
    # container: its certificate names the host clients use, not this one.
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            if response.status != 200:
                raise Unhealthy(f"{url}: HTTP {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        raise Unhealthy(f"{url}: {getattr(exc, 'reason', exc)}") from None
