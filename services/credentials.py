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


def token_of(token: str | None) -> str | None:
    """None: DWORKERS_TOKEN, or the file DWORKERS_TOKEN_FILE names; "": none."""
    if token is None:
        token = os.environ.get("DWORKERS_TOKEN") or None
        if token is None and os.environ.get("DWORKERS_TOKEN_FILE"):
            token = read_token(os.environ["DWORKERS_TOKEN_FILE"])
    return token or None


def read_token(path: str) -> str:
    token = read_file(path).decode(errors="replace").strip()
    if not token:
        raise ConfigError(f"{path} holds no token")
    return token


def channel(target: str, tls: Tls | bool | None = None, aio: bool = False, options=(), token: str | None = None):
    """A channel to `target` (grpc.aio's with `aio`), over TLS per
    `resolve(tls)`, presenting `token` (token_of) as a bearer token on every call."""
    chosen, bearer = resolve(tls), token_of(token)
    module = grpc.aio if aio else grpc
    all_options = [*CHANNEL_OPTIONS, *options]
    # The token is metadata added to each call by an interceptor, over TLS and
    # plaintext alike: gRPC's call credentials would run a plugin per call on
    # another thread (and refuse plaintext).
    if chosen is None:
        if aio:
            return module.insecure_channel(target, options=all_options,
                                           interceptors=_aio_bearer(bearer) if bearer else None)
        channel = module.insecure_channel(target, options=all_options)
    else:
        secure = [*all_options, *chosen.options()]
        if aio:
            return module.secure_channel(target, chosen.credentials(), options=secure,
                                         interceptors=_aio_bearer(bearer) if bearer else None)
        channel = module.secure_channel(target, chosen.credentials(), options=secure)
    return with_bearer(channel, bearer) if bearer else channel


def with_bearer(channel: grpc.Channel, token: str) -> grpc.Channel:
    """The channel, every call of which presents `token`."""
    return grpc.intercept_channel(channel, _Bearer(token))


def _with_bearer(details, token: str):
    return details._replace(metadata=[*(details.metadata or ()), ("authorization", f"Bearer {token}")])


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a plaintext channel."""

    def __init__(self, token: str):
        self.token = token

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_bearer(details, self.token), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_bearer(details, self.token), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(_with_bearer(details, self.token), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(_with_bearer(details, self.token), requests)


class _AioBearer:
    def __init__(self, token: str):
        self.token = token


# grpc.aio files an interceptor under the first call type it implements
# only: one class per type.
class _AioBearerUU(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_bearer(details, self.token), request)


class _AioBearerUS(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_bearer(details, self.token), request)


class _AioBearerSU(_AioBearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):
        return await continuation(_with_bearer(details, self.token), requests)


class _AioBearerSS(_AioBearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):
        return await continuation(_with_bearer(details, self.token), requests)


def _aio_bearer(token: str) -> list:
    """Interceptors adding `authorization: Bearer <token>` to every call of a grpc.aio channel."""
    return [cls(token) for cls in (_AioBearerUU, _AioBearerUS, _AioBearerSU, _AioBearerSS)]
