"""The dashboard's settings (apart from its server, so that the CLI can
list its flags without importing the web stack)."""

from __future__ import annotations

from dataclasses import dataclass

from dworkers.common.settings import Logging, group, setting


@dataclass(frozen=True)
class DashboardSettings:
    logging: Logging = group(Logging)
    listen: str = setting("127.0.0.1:8080", "HTTP address to listen on")
    frontend: str = setting("127.0.0.1:7000", "the frontend the dashboard calls")
    tls: bool = setting(False, "TLS to the frontend (on too with any --tls-* file)")
    tls_ca: str = setting("", "PEM CA bundle to trust for the frontend (empty: the system's)")
    tls_cert: str = setting("", "PEM client certificate, for a frontend that requires one")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_server_name: str = setting("", "the name in the frontend's certificate, if not its host")
    token_file: str = setting("", "a token the dashboard presents for visitors who have not logged in (a read "
                                  "token makes an open, read-only dashboard); empty: visitors log in with "
                                  "their own token when the frontend checks access")
    https_cert: str = setting("", "PEM certificate chain: serve HTTPS (read again when it changes)")
    https_key: str = setting("", "PEM private key of --https-cert")
    session_hours: float = setting(12.0, "hours a login lasts", above=0, high=24 * 365)
    max_streams: int = setting(256, "live streams (overview and result tails) served at once", low=1,
                               high=100_000)
    metrics_port: int = setting(9103, "Prometheus /metrics port (0: off)", low=0, high=65535)
    call_timeout: float = setting(10.0, "seconds a call to the frontend may take", above=0, high=3600)
    shutdown_grace: float = setting(5.0, "seconds open requests may take to finish on SIGTERM", low=0, high=3600)


def main(settings: DashboardSettings, stop) -> None:
    """Serves the dashboard until a stop request (dashboard/app.py)."""
    from dworkers.dashboard import app

    app.main(settings, stop)
