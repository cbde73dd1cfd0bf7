"""Who may call what. An access file names identities — a bearer token
(kept as its SHA-256 only) or a client certificate's common name (proven by
mutual TLS) — and their roles; every call of a dworkers service needs a
role, health checks and reflection none. The file is read again when it
changes (a Secret update), so access is granted and revoked without a
restart.

    # name          roles           credential
    ci-producer     submit,read     sha256:5e884898da28047151d0e56f8dc62927...
    ops             admin           cert:alice
    worker          worker          cert:worker
    gpu-box         worker          cert:gpu-box    kinds=render,encode
    frontend        frontend        sha256:...

A worker identity may be limited to some kinds (`kinds=...`): it cannot
register slots for others. `dworkers token NAME --roles ...` makes a token
and prints its line."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable

from dworkers.common.errors import ConfigError, Overloaded, PermissionDenied, Unauthenticated
from dworkers.common.settings import setting

log = logging.getLogger(__name__)

# Roles, and what each lets an identity call.
CLIENT_ROLES = ("submit", "read", "admin")  # the public API (frontends)
SERVICE_ROLES = ("worker", "frontend")  # the masters' port
ROLES = CLIENT_ROLES + SERVICE_ROLES
IMPLIED = {"admin": {"submit", "read"}}  # an admin may do what the others may
FRONTEND_METHODS = {
    "SubmitWork": "submit", "SubmitWorks": "submit", "SubmitStream": "submit",
    "GetWork": "read", "WaitWorks": "read", "AwaitResults": "read", "WatchResults": "read", "ClusterInfo": "read",
    "ListWorks": "read",
    "CancelWork": "admin", "RetryWork": "admin", "SetRateLimit": "admin",
}
MASTER_METHODS = {"Connect": "worker"}  # every other master call: "frontend"
OPEN_METHODS = ("/grpc.health.v1.Health/Check",)  # probes: no credentials
# Any known identity, never an anonymous caller: streams that hold a thread
# for as long as the caller likes, and the question of who one is.
ANY_IDENTITY = ("/grpc.health.v1.Health/Watch", "/grpc.reflection.", "/dworkers.v1.Frontend/WhoAmI")

AUTHORIZATION = "authorization"  # the metadata key: "Bearer <token>"
CHECK_INTERVAL = 1.0  # seconds between looks at the file's modification time
SETTLE_SECONDS = 0.25  # a file changed more recently than this is read once it has settled
LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._@-]{0,127})\s+(?P<roles>[a-z,]+)\s+"
                  r"(?P<kind>sha256|cert):(?P<value>[^\s#]{1,256})(\s+kinds=(?P<kinds>[^\s#]{1,4096}))?$")


@dataclasses.dataclass(frozen=True)
class AuthSettings:
    access_file: str = setting("", "who may call this service, with which roles (a file of tokens' hashes and "
                                   "certificate names, read again when it changes); empty: anyone may")


@dataclasses.dataclass(frozen=True)
class Identity:
    name: str
    roles: frozenset[str]
    kinds: frozenset[str] | None = None  # a worker's allowed kinds; None: any

    def may(self, role: str) -> bool:
        return role in self.roles or any(role in IMPLIED.get(r, ()) for r in self.roles)


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "dwk_" + secrets.token_urlsafe(32)


def parse(text: str, source: str) -> tuple[dict[str, Identity], dict[str, Identity]]:
    """(by token hash, by certificate name) from an access file's text."""
    tokens: dict[str, Identity] = {}
    certs: dict[str, Identity] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()  # a comment: `#` at the start or after a space
        if not line:
            continue
        match = LINE.match(line)
        if match is None:
            raise ConfigError(f"{source}:{number}: expected `NAME ROLES sha256:HEX` or `NAME ROLES cert:NAME`, "
                              "then optionally `kinds=KIND,...`")
        roles = frozenset(match["roles"].split(","))
        unknown = roles - set(ROLES)
        if unknown or not roles:
            raise ConfigError(f"{source}:{number}: unknown role {', '.join(sorted(unknown)) or '(none)'} "
                              f"(roles: {', '.join(ROLES)})")
        kinds = None
        if match["kinds"] is not None:
            kinds = frozenset(match["kinds"].split(","))
            if "" in kinds or roles != {"worker"}:
                raise ConfigError(f"{source}:{number}: kinds= names one or more kinds, for a worker identity "
                                  "(roles: worker) only")
        identity = Identity(match["name"], roles, kinds)
        if match["kind"] == "sha256":
            if not re.fullmatch(r"[0-9a-f]{64}", match["value"]):
                raise ConfigError(f"{source}:{number}: sha256: takes the token's 64 hex digit SHA-256")
            tokens["sha256:" + match["value"]] = identity
        else:
            certs[match["value"]] = identity
    return tokens, certs


class AccessFile:
    """An access file, read again (at most once a second) when it changes;
    a file that became unreadable or malformed leaves the last good one in force."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._tokens: dict[str, Identity] = {}
        self._certs: dict[str, Identity] = {}
        self._refresh(initial=True)

    def _refresh(self, initial: bool = False) -> None:
        now = time.monotonic()
        if not initial and now - self._checked < CHECK_INTERVAL:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            if not initial and time.time() - st.st_mtime < SETTLE_SECONDS:
                # Being written (an editor truncates, then writes): a half-written
                # file would revoke whoever is not in it yet. Look again soon.
                self._checked = now - CHECK_INTERVAL + SETTLE_SECONDS
                return
            with open(self.path, encoding="utf-8") as f:
                tokens, certs = parse(f.read(), self.path)
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            message = exc if isinstance(exc, ConfigError) else f"cannot read {self.path}: {exc}"
            if initial:
                raise ConfigError(str(message)) from None
            log.warning("access file not reloaded (the last one read stays in force): %s", message)
            return
        with self._lock:
            self._stamp, self._tokens, self._certs = stamp, tokens, certs
        if not initial:
            log.info("access file reloaded: %d tokens, %d certificate names", len(tokens), len(certs))

    def by_token(self, token: str) -> Identity | None:
        self._refresh()
        return self._tokens.get(hash_token(token))

    def by_certificate(self, common_name: str) -> Identity | None:
        self._refresh()
        return self._certs.get(common_name)


class IdentityLimits:
    """What one identity may hold of a frontend: works submitted per second
    (a bucket of a second's worth; a batch larger than that passes when the
    bucket is full, and leaves it in debt) and result streams open at once.
    0: no limit."""

    SUBMITS = ("SubmitWork", "SubmitWorks")
    STREAMS = {"WatchResults": "result", "WaitWorks": "result", "AwaitResults": "result",
               "SubmitStream": "submit"}  # each sort counted on its own

    def __init__(self, works_per_second: float = 0.0, streams: int = 0):
        self.rate = works_per_second
        self.capacity = works_per_second
        self.streams = streams
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, monotonic time)
        self._open: dict[tuple[str, str], int] = {}  # (name, sort) -> streams

    def admit(self, identity: Identity, method: str, request) -> Callable[[], None] | None:
        if method in self.SUBMITS and self.rate > 0:
            self._take(identity.name, len(request.works) if method == "SubmitWorks" else 1)
        elif method in self.STREAMS and self.streams > 0:
            return self._open_stream(identity.name, self.STREAMS[method])
        return None

    def take_submits(self, identity: Identity, count: int) -> None:
        """A SubmitStream's call: counted like SubmitWorks; raises Overloaded."""
        if self.rate > 0:
            self._take(identity.name, count)

    def _take(self, name: str, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(name, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - then) * self.rate)
            if tokens < min(count, self.capacity):
                self._buckets[name] = (tokens, now)
                raise Overloaded(f"{name} submits above its limit of {self.rate:g} works per second: "
                                 "retry in a moment")
            self._buckets[name] = (tokens - count, now)

    def _open_stream(self, name: str, sort: str) -> Callable[[], None]:
        key = (name, sort)
        with self._lock:
            if self._open.get(key, 0) >= self.streams:
                raise Overloaded(f"{name} already has {self.streams} {sort} streams open, its limit: "
                                 "close one first")
            self._open[key] = self._open.get(key, 0) + 1

        def release() -> None:
            with self._lock:
                left = self._open[key] - 1
                if left:
                    self._open[key] = left
                else:
                    del self._open[key]
        return release


class Authorizer:
    """Checks each call of one service against an access file (and the
    caller's limits, if any)."""

    def __init__(self, access: AccessFile, methods: dict[str, str], default_role: str | None = None,
                 limits: IdentityLimits | None = None):
        self.access = access
        self.methods = methods
        self.default_role = default_role
        self.limits = limits

    def admit(self, full_method: str, context, request) -> tuple[Identity | None, Callable[[], None] | None]:
        """check(), then the identity's limits: the identity, and what ends
        a stream's hold on its limits."""
        identity = self.check(full_method, context)
        if identity is None or self.limits is None:
            return identity, None
        return identity, self.limits.admit(identity, full_method.rsplit("/", 1)[-1], request)

    def check(self, full_method: str, context) -> Identity | None:
        """The caller's identity; raises Unauthenticated or PermissionDenied."""
        if full_method in OPEN_METHODS:
            return None
        if full_method.startswith(ANY_IDENTITY):
            self.identify(context)
            return None
        method = full_method.rsplit("/", 1)[-1]
        role = self.methods.get(method, self.default_role)
        identity = self.identify(context)
        if role is None or not identity.may(role):
            needed = f"the role {role!r}" if role else "a role no one has"
            raise PermissionDenied(f"{identity.name} may not call {method}: it needs {needed} "
                                   f"(it has {', '.join(sorted(identity.roles))})")
        return identity

    def identify(self, context) -> Identity:
        """Who calls (by token, else by client certificate); raises Unauthenticated."""
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION:
                token = value if isinstance(value, str) else value.decode(errors="replace")
                break
        if token is not None:
            scheme, _, secret = token.partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                raise Unauthenticated("the authorization metadata must be `Bearer <token>`")
            identity = self.access.by_token(secret.strip())
            if identity is None:
                raise Unauthenticated("unknown token (revoked, mistyped, or for another cluster)")
            return identity
        names = [n.decode(errors="replace") if isinstance(n, bytes) else n
                 for n in (context.auth_context() or {}).get("x509_common_name") or []]
        for name in names:
            identity = self.access.by_certificate(name)
            if identity is not None:
                return identity
        if names:
            raise Unauthenticated(f"no access for the client certificate {names[0]!r} and no token given")
        raise Unauthenticated("credentials needed: a bearer token (authorization metadata) or a client "
                              "certificate named in the access file")


def authorizer(settings: AuthSettings, methods: dict[str, str], default_role: str | None = None,
               limits: IdentityLimits | None = None) -> Authorizer | None:
    if not settings.access_file:
        return None
    return Authorizer(AccessFile(settings.access_file), methods, default_role, limits)
