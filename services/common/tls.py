"""TLS on every gRPC hop, from PEM files that may be replaced while the
process runs (cert-manager, a Kubernetes Secret update): servers pick the new
files up at the next handshake, clients for the next channel they open.

One set of files per process: its certificate and key (served by masters and
frontends, presented as a client certificate when a master requires one) and
the CA bundle it trusts (for the servers it calls, and for its clients'
certificates when it requires them). TLS is on for a process given a
certificate or a CA bundle; a cluster runs TLS everywhere or nowhere."""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
import threading
import time

import grpc

from dworkers.common.errors import ConfigError
from dworkers.common.settings import setting

log = logging.getLogger(__name__)

# gRPC Python's servers either require a client certificate or never ask for
# one: there is no "ask, but let in without".
CLIENT_AUTH = ("none", "require")
CHECK_INTERVAL = 1.0  # seconds between looks at the files' modification times


@dataclasses.dataclass(frozen=True)
class TlsSettings:
    """How a process calls masters (workers; frontends too)."""
    tls_cert: str = setting("", "PEM certificate chain of this process: presented to masters that require client "
                                "certificates (and served, by masters and frontends)")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_ca: str = setting("", "PEM CA bundle trusted for the masters this process calls (and, with "
                              "--tls-client-auth, for its clients' certificates); empty: the system's")
    tls_server_name: str = setting("", "the name the masters' certificates carry, when it is not the host of "
                                       "their advertised address (one certificate for every master)")

    @property
    def enabled(self) -> bool:
        return bool(self.tls_cert or self.tls_ca)

    @property
    def client_auth(self) -> str:
        return "none"


@dataclasses.dataclass(frozen=True)
class ServingTlsSettings(TlsSettings):
    """A process that serves gRPC (masters, frontends) serves TLS when on."""
    tls_client_auth: str = setting("none", "require: refuse clients without a certificate signed by --tls-ca "
                                           "(their identity for --access-file's cert: lines); none: do not ask",
                                   choices=CLIENT_AUTH)

    @property
    def client_auth(self) -> str:
        return self.tls_client_auth


class TlsFiles:
    """The PEM files of one process, read again whenever one of them changes
    (size or modification time; a Secret's atomic symlink swap counts)."""

    def __init__(self, settings: TlsSettings):
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if settings.client_auth != "none" and not settings.tls_ca:
            raise ConfigError(f"--tls-client-auth {settings.client_auth} needs --tls-ca (the clients' CA)")
        self.settings = settings
        self._paths = [p for p in (settings.tls_cert, settings.tls_key, settings.tls_ca) if p]
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = 0.0  # monotonic time the files were last looked at
        self._loaded: tuple[bytes | None, bytes | None, bytes | None] = (None, None, None)
        self._channel_credentials: grpc.ChannelCredentials | None = None
        self._refresh(initial=True)

    @property
    def serving(self) -> bool:
        return bool(self.settings.tls_cert)

    def _stamp_now(self) -> tuple:
        stamps = []
        for path in self._paths:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def _refresh(self, initial: bool = False) -> None:
        """Reads the files again if they changed and make a valid set. A
        half-replaced set (a key that does not match its certificate) is
        ignored until the rest arrives. Looks at most once a second."""
        now = time.monotonic()
        if not initial and now - self._checked < CHECK_INTERVAL:
            return
        self._checked = now
        try:
            stamp = self._stamp_now()
            if stamp == self._stamp:
                return
            loaded = tuple(read_file(p) if p else None
                           for p in (self.settings.tls_cert, self.settings.tls_key, self.settings.tls_ca))
            if loaded[0] is not None:
                _check_pair(self.settings.tls_cert, self.settings.tls_key)
        except ConfigError as exc:
            if initial:
                raise
            log.warning("TLS files not reloaded (the ones in use stay): %s", exc)
            return
        with self._lock:
            changed = loaded != self._loaded
            self._stamp = stamp
            if changed:
                self._loaded = loaded  # type: ignore[assignment]
                self._channel_credentials = None
        if changed and not initial:
            log.info("TLS files reloaded: %s", ", ".join(self._paths))

    # --- serving ------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that take the files as they are at each handshake."""
        served = [self._loaded]

        def fetch():
            self._refresh()
            loaded = self._loaded
            if loaded is served[0]:
                return None  # unchanged: keep the configuration in use
            served[0] = loaded
            return self._server_configuration(loaded)
        return grpc.dynamic_ssl_server_credentials(
            self._server_configuration(served[0]), fetch,
            require_client_authentication=self.settings.client_auth == "require")

    def _server_configuration(self, loaded):
        chain, key, ca = loaded
        assert chain is not None and key is not None
        return grpc.ssl_server_certificate_configuration(
            [(key, chain)], root_certificates=ca if self.settings.client_auth != "none" else None)

    # --- calling --------------------------------------------------------------

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a new channel, from the files as they are now."""
        self._refresh()
        with self._lock:
            if self._channel_credentials is None:
                chain, key, ca = self._loaded
                self._channel_credentials = grpc.ssl_channel_credentials(ca, key, chain)
            return self._channel_credentials

    def channel_options(self) -> list[tuple[str, str]]:
        name = self.settings.tls_server_name
        return [("grpc.ssl_target_name_override", name)] if name else []

    def generation(self) -> tuple | None:
        """Changes when the files do (a channel made before is stale)."""
        self._refresh()
        return self._stamp


def read_file(path: str) -> bytes:
    """A PEM file's bytes (a ConfigError naming it if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _check_pair(cert: str, key: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{cert} and {key} are not a certificate and its key ({exc})") from None


def files(settings: TlsSettings) -> TlsFiles | None:
    """The process's TLS files, or None when it runs plaintext."""
    return TlsFiles(settings) if settings.enabled else None


def serving_files(settings: TlsSettings, who: str) -> TlsFiles | None:
    """The TLS files of a process that serves gRPC (a master, a frontend):
    with TLS on, it serves it too, so it needs its certificate."""
    if settings.enabled and not settings.tls_cert:
        raise ConfigError(f"{who} serving TLS needs --tls-cert and --tls-key (only --tls-ca was given)")
    return files(settings)
