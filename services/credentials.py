"""How a client reaches a frontend: plaintext, or TLS (a private CA, a
client certificate for mutual TLS). The SDK, the CLI and the health check
open their channels here.

    dworkers.Client("frontend.example:7000", tls=dworkers.Tls(ca="ca.pem"))

Without `tls`, the environment decides: DWORKERS_TLS_CA, DWORKERS_TLS_CERT
and DWORKERS_TLS_KEY, DWORKERS_TLS_SERVER_NAME (any of them, or
DWORKERS_TLS=1 for the system's CAs, turns TLS on)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc

from dworkers.common.errors import ConfigError
from dworkers.common.tls import read_file
from dworkers.common.wire import CHANNEL_OPTIONS


@dataclass(frozen=True)
class Tls:
    """TLS to a frontend. `ca`: PEM file of the CA to trust (empty: the
    system's); `cert`, `key`: a client certificate, for frontends that
    require one; `server_name`: the name its certificate carries, when it is
    not the target's host."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""

    @classmethod
    def from_env(cls, environ=os.environ) -> Tls | None:
        fields = {name: environ.get(f"DWORKERS_TLS_{name.upper()}", "") for name in ("ca", "cert", "key",
                                                                                      "server_name")}
        on = environ.get("DWORKERS_TLS", "").strip().lower() in ("1", "true", "yes", "on")
        return cls(**fields) if on or any(fields.values()) else None

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ConfigError("a client certificate needs its key (and the key its certificate)")
        ca, cert, key = (read_file(path) if path else None for path in (self.ca, self.cert, self.key))
        return grpc.ssl_channel_credentials(ca, key, cert)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def resolve(tls: Tls | bool | None) -> Tls | None:
    """None: from the environment; True: the system's CAs; False: plaintext."""
    if tls is None:
        return Tls.from_env()
    if tls is True:
        return Tls()
    return tls or None


def channel(target: str, tls: Tls | bool | None = None, aio: bool = False, options=()):
    """A channel to `target` (grpc.aio's with `aio`), over TLS per `resolve(tls)`."""
    chosen = resolve(tls)
    module = grpc.aio if aio else grpc
    all_options = [*CHANNEL_OPTIONS, *options]
    if chosen is None:
        return module.insecure_channel(target, options=all_options)
    return module.secure_channel(target, chosen.credentials(), options=[*all_options, *chosen.options()])

