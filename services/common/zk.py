"""ZooKeeper layout and client construction shared by every service."""

from __future__ import annotations

import functools
import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NodeExistsError
from kazoo.handlers.threading import AsyncResult, SequentialThreadingHandler
from kazoo.protocol.states import KazooState
from kazoo.recipe.watchers import ChildrenWatch, DataWatch
from kazoo.retry import KazooRetry
from kazoo.security import make_digest_acl

from dworkers.common.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/dworkers"


class _ImmediateAsyncResult(AsyncResult):
    """Calls a callback marked `immediate` on the thread that sets the result
    (the connection's), not via kazoo's callback thread: one thread switch
    less per journal append. Such a callback must return at once."""

    def _do_callbacks(self):
        for callback in self._callbacks:
            if getattr(callback, "immediate", False) or not self._handler.running:
                callback(self)
            else:
                self._handler.completion_queue.put(functools.partial(callback, self))


class ImmediateCallbacksHandler(SequentialThreadingHandler):
    def async_result(self):
        return _ImmediateAsyncResult(self)


def immediate(callback: Callable) -> Callable:
    """Marks a callback of an async ZooKeeper call to run on the connection's thread."""
    callback.immediate = True  # type: ignore[attr-defined]
    return callback


@dataclass(frozen=True)
class Paths:
    """Where things live under a cluster's root. Each shard's master group has
    its own election and journal (shard 0's at the root itself, as in a
    cluster of one shard); kinds, the cluster id and the shard map are the
    whole cluster's."""

    root: str = DEFAULT_ROOT
    shard: int = 0

    @property
    def shard_root(self) -> str:
        return self.root if self.shard == 0 else f"{self.root}/shards/{self.shard}"

    def of_shard(self, shard: int) -> Paths:
        return Paths(self.root, shard)

    @property
    def election(self) -> str:
        return f"{self.shard_root}/election"

    @property
    def journal(self) -> str:
        return f"{self.shard_root}/journal"

    @property
    def shard_map(self) -> str:
        return f"{self.root}/shardmap"

    @property
    def kinds(self) -> str:
        return f"{self.root}/kinds"

    @property
    def cluster(self) -> str:
        return f"{self.root}/cluster"


@dataclass(frozen=True)
class ZkTls:
    """TLS to ZooKeeper's secure port: the CA to trust, and a client
    certificate for a server that asks for one."""

    ca: str
    cert: str = ""
    key: str = ""


def connect(hosts: str, session_timeout: float = 4.0, connect_timeout: float = 10.0,
            auth: str | None = None, tls: ZkTls | None = None, readers: str | None = None) -> KazooClient:
    """A started client that keeps reconnecting (bounded per try, forever in
    all). With `auth` ("user:password"), it authenticates by digest and every
    znode it creates is readable and writable by that user only. With `tls`,
    it speaks TLS and checks the server's certificate and name. With
    `readers` ("user:password" too), what it creates is readable by that
    user as well (workers and frontends, which write nothing there)."""
    acl = None
    if auth is not None:
        user, _, password = auth.partition(":")
        acl = [make_digest_acl(user, password, all=True)]
        if readers is not None:
            reader, _, reader_password = readers.partition(":")
            acl.append(make_digest_acl(reader, reader_password, read=True))
    client = KazooClient(
        hosts=hosts,
        timeout=session_timeout,
        handler=ImmediateCallbacksHandler(),
        connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
        command_retry=KazooRetry(max_tries=3, delay=0.1, max_delay=0.5),
        auth_data=[("digest", auth)] if auth is not None else None,
        default_acl=acl,
        **({"use_ssl": True, "ca": tls.ca, "certfile": tls.cert or None, "keyfile": tls.key or None,
            "verify_certs": True, "check_hostname": True} if tls is not None else {}),
    )
    client.start(timeout=connect_timeout)
    ForgetfulReconnect(client, session_timeout)
    return client


def stop(client: KazooClient) -> None:
    """Ends the client's session (its ephemeral znodes go at once). Needed
    cut off from ZooKeeper too: a client never stopped keeps retrying, and
    its watch callbacks, blocked on that, hold the process at exit."""
    try:
        client.stop()
        client.close()
    except Exception as exc:  # a shutdown path: log, never raise
        log.warning("closing the ZooKeeper client: %r", exc)


def read_auth(path: str, flag: str = "--zk-auth-file") -> str:
    """The `user:password` a --zk-auth-file (or `flag`) holds."""
    try:
        with open(path, encoding="utf-8") as f:
            auth = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {flag} {path}: {getattr(exc, 'strerror', exc)}") from None
    user, sep, password = auth.partition(":")
    if not (user and sep and password) or any(c.isspace() for c in auth):
        raise ConfigError(f"{flag} {path} must hold `user:password` (one line, no spaces)")
    return auth


def check_access(client: KazooClient, root: str) -> None:
    """Fails in one line when ZooKeeper refuses this process the cluster's
    root (its ACL is for credentials this process does not have)."""
    try:
        if client.exists(root) is not None:
            client.get_children(root)
    except NoAuthError:
        raise ConfigError(f"ZooKeeper refuses this process access to {root}: its ACL wants other credentials "
                          "(--zk-auth-file)") from None


class ForgetfulReconnect:
    """A ZooKeeper that lost its data refuses every client that has seen a
    newer transaction than its own ("client must try another server"), so
    the client would retry forever. Cut off far longer than any session
    lasts (so its session is gone anyway), the client forgets the newest
    transaction it saw and connects as new: it then learns that its session
    expired, as after any long outage."""

    def __init__(self, client: KazooClient, session_timeout: float):
        self.client = client
        self.patience = max(15.0, 4 * session_timeout)
        self._cut_off = threading.Event()
        client.add_listener(self._on_state)

    def _on_state(self, state: str) -> None:
        if state == KazooState.CONNECTED:
            self._cut_off.clear()
        elif not self._cut_off.is_set():
            self._cut_off.set()
            threading.Thread(target=self._watch, name="zk-forgetful-reconnect", daemon=True).start()

    def _watch(self) -> None:
        waited = 0.0
        while self._cut_off.is_set() and not self.client._stopped.is_set():
            threading.Event().wait(1.0)
            waited += 1.0
            if waited >= self.patience and self.client.state != KazooState.CONNECTED and self.client.last_zxid:
                log.warning("ZooKeeper has refused this client for %.0f s: connecting as a new client "
                            "(it may have lost its data)", waited)
                self.client.last_zxid = 0
                waited = 0.0


def election_sequence(name: str) -> int:
    """The sequence number of an election znode: the master's epoch."""
    return int(name.rsplit("-", 1)[1])


def encode_member(address: str, **extra) -> bytes:
    return json.dumps({"address": address, **extra}).encode()


def decode_member(data: bytes) -> dict:
    try:
        return json.loads(data.decode())
    except (ValueError, UnicodeDecodeError):
        return {}


def cluster_id(client: KazooClient, paths: Paths) -> str:
    """This cluster's id, created by the first backend to ask. A ZooKeeper
    that lost its data gets a new one: epochs restart there, and clients
    compare epochs only within one cluster id."""
    try:
        client.create(paths.cluster, uuid.uuid4().hex.encode(), makepath=True)
    except NodeExistsError:
        pass
    return client.get(paths.cluster)[0].decode()


class ChildrenFollower:
    """Calls `func(children)` whenever the children of `path` change, also
    when the node is deleted and created again (a root wiped by an operator,
    a ZooKeeper that lost its data): kazoo's ChildrenWatch ends for good when
    its node disappears, so a DataWatch, which outlives it, starts a new one."""

    def __init__(self, client: KazooClient, path: str, func: Callable[[list[str]], None], create: bool = True):
        """`create`: make the node if missing (masters); workers and frontends,
        which may only read, wait for it instead."""
        self.client = client
        self.path = path
        self.func = func
        self._generation = 0
        self._lock = threading.Lock()
        if create:
            client.ensure_path(path)
        DataWatch(client, path, self._node_changed)

    def _node_changed(self, _data, stat) -> None:
        with self._lock:
            watching = self._generation % 2 == 1  # odd: a ChildrenWatch is running
            if stat is None and watching:
                self._generation += 1
                gone = True
            elif stat is not None and not watching:
                self._generation += 1
                generation, gone = self._generation, False
            else:
                return
        if gone:
            self.func([])
        else:  # returning False ends a replaced watch
            ChildrenWatch(self.client, self.path, lambda children: self._changed(generation, children))

    def _changed(self, generation: int, children: list[str]) -> bool:
        if generation != self._generation:
            return False
        self.func(children)
        return True
