"""The proxy stub: calls the active master without knowing where it runs.

It resolves the master from ZooKeeper (the lowest election znode) or from a
list of backend addresses (following a standby's hint), and on failover
re-resolves and retries within the caller's deadline. It remembers the
highest master epoch seen and refuses answers from a lower one. Only
idempotent calls go through it: submissions carry their work id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator

import grpc
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError

from dworkers import credentials
from dworkers.common import zk
from dworkers.common.errors import ConfigError, NoMaster
from dworkers.common.tls import TlsFiles
from dworkers.common.wire import CHANNEL_OPTIONS, CLUSTER_KEY, EPOCH_KEY, MASTER_KEY, UNREACHABLE_KEY, metadata_value
from dworkers.v1 import master_pb2_grpc, work_pb2

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)
# A result stream that ends with one of these ends for its subscriber too;
# with any other, the proxy resumes it.
FINAL_FOR_STREAMS = (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                     grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED,
                     grpc.StatusCode.ABORTED)  # another shard's works: the caller routes them again


class ZooKeeperLocator:
    """The active master is the lowest election znode; a watch keeps the list fresh."""

    def __init__(self, client, paths: zk.Paths, owns_client: bool = True):
        self.client = client
        self.paths = paths
        self.path = paths.election
        self.owns_client = owns_client  # False: another shard's locator shares it
        self._cond = threading.Condition()
        self._children: list[str] = []
        self._resolved: tuple[str, str] | None = None  # (znode, address)
        self._listeners: list = []
        zk.ChildrenFollower(client, self.path, self._on_children, create=False)

    def _on_children(self, children) -> None:
        with self._cond:
            before = self._children[0] if self._children else None
            self._children = sorted(children, key=zk.election_sequence)
            after = self._children[0] if self._children else None
            self._cond.notify_all()
            listeners = list(self._listeners) if before != after else []
        for listener in listeners:
            listener()

    def on_change(self, listener) -> None:
        """Calls `listener()` (from ZooKeeper's thread; keep it short) whenever
        the oldest backend changes: streams to the old one should end."""
        with self._cond:
            self._listeners.append(listener)

    def remove_listener(self, listener) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def current(self, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                while not self._children:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise NoMaster("no backend is registered in ZooKeeper")
                    self._cond.wait(remaining)
                lowest = self._children[0]
            if self._resolved and self._resolved[0] == lowest:
                return self._resolved[1], zk.election_sequence(lowest)
            try:
                data, _ = self.client.get(f"{self.path}/{lowest}")
            except NoNodeError:
                time.sleep(0.01)
                continue
            except KazooException as exc:
                if time.monotonic() >= deadline:
                    raise NoMaster(f"cannot read the master from ZooKeeper: {exc!r}") from None
                time.sleep(0.1)
                continue
            address = zk.decode_member(data).get("address", "")
            self._resolved = (lowest, address)
            return address, zk.election_sequence(lowest)

    def hint(self, address: str) -> None:
        pass  # ZooKeeper is the authority

    def invalidate(self, address: str) -> None:
        pass  # the watch re-resolves once the dead master's znode is gone

    def others_to_try(self, cut_off: set[str]) -> bool:
        return False  # ZooKeeper names the master: no other backend would do better

    def close(self) -> None:
        if self.owns_client:
            zk.stop(self.client)


class StaticLocator:
    """A fixed list of backend addresses (like the sample's contact points)."""

    def __init__(self, addresses: list[str]):
        if not addresses:
            raise ValueError("no backend addresses given")
        self.addresses = addresses
        self._index = 0
        self._hinted: str | None = None

    def current(self, timeout: float) -> tuple[str, int]:
        return (self._hinted or self.addresses[self._index % len(self.addresses)]), 0

    def hint(self, address: str) -> None:
        self._hinted = address

    def on_change(self, listener) -> None:
        pass  # no watch: a dead master's streams end by keepalive

    def remove_listener(self, listener) -> None:
        pass

    def invalidate(self, address: str) -> None:
        if self._hinted == address:
            self._hinted = None
        else:
            self._index += 1

    def others_to_try(self, cut_off: set[str]) -> bool:
        return any(a not in cut_off for a in self.addresses)

    def close(self) -> None:
        pass


class EpochGuard:
    """The newest master seen: answers from an older epoch of the same
    cluster come from a deposed master and are refused. Epochs are compared
    only within one cluster id: a ZooKeeper that lost its data numbers its
    masters from the start again, under a new cluster id."""

    def __init__(self) -> None:
        self.cluster_id = ""
        self.epoch = 0
        self._lock = threading.Lock()

    def observe(self, epoch: int, cluster_id: str = "") -> bool:
        with self._lock:
            if cluster_id and cluster_id != self.cluster_id:
                if self.cluster_id:
                    log.warning("the cluster id changed (%s -> %s): epochs start again at %d",
                                self.cluster_id, cluster_id, epoch)
                self.cluster_id, self.epoch = cluster_id, epoch
                return True
            if epoch < self.epoch:
                return False
            self.epoch = epoch
            return True


class StreamHandle:
    """Lets another thread end a result stream (e.g. when its client went away)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stream = None
        self.cancelled = False

    def attach(self, stream) -> None:
        with self._lock:
            self._stream = stream
            if self.cancelled:
                stream.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._stream is not None:
                self._stream.cancel()


class MasterProxy:
    def __init__(self, locator, timeout: float = 10.0, attempt_timeout: float = 3.0, tls: TlsFiles | None = None,
                 token: str | None = None):
        self.locator = locator
        self.tls = tls
        self.token = token  # presented on every call, for masters that check access
        self.timeout = timeout
        # A paused or cut-off master must not eat the whole deadline: each
        # attempt gets at most this long, then the call is retried (calls are idempotent).
        self.attempt_timeout = attempt_timeout
        self.epochs = EpochGuard()
        self._stubs: dict[str, master_pb2_grpc.MasterStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._tls_generation = tls.generation() if tls is not None else None
        self._retired: list[grpc.Channel] = []  # made with TLS files since replaced: closed with the proxy
        self._lock = threading.Lock()

    def stub(self, address: str) -> master_pb2_grpc.MasterStub:
        if self.tls is not None:
            self._renew_if_rotated(self.tls)
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = self._new_channel(address)
                self._channels[address] = channel
                stub = self._stubs[address] = master_pb2_grpc.MasterStub(channel)
            return stub

    def _new_channel(self, address: str) -> grpc.Channel:
        if self.tls is None:
            channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.secure_channel(address, self.tls.channel_credentials(),
                                          options=CHANNEL_OPTIONS + self.tls.channel_options())
        return credentials.with_bearer(channel, self.token) if self.token else channel

    def _renew_if_rotated(self, tls: TlsFiles) -> None:
        """New TLS files: new calls get new channels. Calls on the old ones
        (a worker's stream) go on; those channels close at the next rotation."""
        generation = tls.generation()
        if generation == self._tls_generation:
            return
        with self._lock:
            if generation == self._tls_generation:
                return  # another thread renewed them first
            self._tls_generation = generation
            retired, self._retired = self._retired, list(self._channels.values())
            self._channels.clear()
            self._stubs.clear()
        for channel in retired:
            channel.close()

    def close(self) -> None:
        with self._lock:
            for channel in [*self._channels.values(), *self._retired]:
                channel.close()
            self._channels.clear()
            self._retired.clear()
            self._stubs.clear()
        self.locator.close()

    def observe_epoch(self, epoch: int, cluster_id: str = "") -> bool:
        """Records an epoch seen on the wire; False if it is older than one seen before."""
        return self.epochs.observe(epoch, cluster_id)

    def retry_hint(self, error: grpc.RpcError, address: str, cut_off: set[str] | None = None) -> bool:
        """Whether a failed call may be retried elsewhere (and where). A
        backend cut off from ZooKeeper makes the call fail fast, unless other
        contact points may still be in touch."""
        if error.code() not in RETRYABLE:
            return False
        if metadata_value(error.trailing_metadata(), UNREACHABLE_KEY):
            if cut_off is None:
                return False
            cut_off.add(address)
            if not self.locator.others_to_try(cut_off):
                return False  # ZooKeeper is out of reach: no master can accept now
        hint = metadata_value(error.trailing_metadata(), MASTER_KEY)
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION and hint is None:
            return False  # a real precondition failure, not a standby
        self.locator.invalidate(address)
        if hint:
            self.locator.hint(hint)
        return True

    def _pause(self, seconds: float) -> None:
        """Waits before a retry, but no longer than until the master changes."""
        moved = threading.Event()
        self.locator.on_change(moved.set)
        try:
            moved.wait(seconds)
        finally:
            self.locator.remove_listener(moved.set)

    def call(self, method: str, request, timeout: float | None = None):
        """Calls a unary Master method on the active master, retrying through failover."""
        deadline = time.monotonic() + (timeout or self.timeout)
        delay, last = 0.01, "no master found"
        cut_off: set[str] = set()  # backends that said they are cut off from ZooKeeper
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoMaster(f"no master answered in time ({last})")
            address, _ = self.locator.current(remaining)
            attempt = min(remaining, self.attempt_timeout)
            try:
                response, call = getattr(self.stub(address), method).with_call(request, timeout=attempt)
            except grpc.RpcError as error:
                timed_out = error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and attempt < remaining
                if not timed_out and not self.retry_hint(error, address, cut_off):
                    raise
                last = f"{address}: {error.code().name}: {error.details()}"
                self._pause(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.1)
                continue
            trailers = call.trailing_metadata()
            epoch = int(metadata_value(trailers, EPOCH_KEY) or 0)
            if not self.observe_epoch(epoch, metadata_value(trailers, CLUSTER_KEY) or ""):
                last = f"{address} answered with stale epoch {epoch}"
                self.locator.invalidate(address)
                self._pause(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.1)
                continue
            return response

    def watch_results(self, after: int, reconnect_timeout: float = 30.0,
                      handle: StreamHandle | None = None) -> Generator[work_pb2.WatchResultsResponse, None, None]:
        """Streams result batches after `after`, resuming across failovers.
        Gives up when no master serves for `reconnect_timeout` seconds."""
        cursor = after

        def request() -> tuple[str, work_pb2.WatchResultsRequest]:
            return "WatchResults", work_pb2.WatchResultsRequest(after_sequence=cursor)

        def fresh(results) -> list[work_pb2.WorkResult]:
            nonlocal cursor
            new = [r for r in results if r.sequence > cursor]
            if new:
                cursor = new[-1].sequence
            return new

        return self._resumed(request, fresh, lambda: False, reconnect_timeout, handle,
                             lambda: f"resuming after {cursor}")

    def wait_works(self, work_ids: list[str], reconnect_timeout: float = 30.0,
                   handle: StreamHandle | None = None) -> Generator[work_pb2.WatchResultsResponse, None, None]:
        """Streams the results of `work_ids` as they finish; after a failover
        it asks the new master for those not seen yet. Ends when all came."""
        remaining = dict.fromkeys(work_ids)

        def request() -> tuple[str, work_pb2.WaitWorksRequest]:
            return "WaitWorks", work_pb2.WaitWorksRequest(work_ids=list(remaining))

        def fresh(results) -> list[work_pb2.WorkResult]:
            new = [r for r in results if r.work_id in remaining]
            for r in new:
                del remaining[r.work_id]
            return new

        return self._resumed(request, fresh, lambda: not remaining, reconnect_timeout, handle,
                             lambda: f"{len(remaining)} works still awaited")

    def _resumed(self, request: Callable, fresh: Callable, done: Callable[[], bool], reconnect_timeout: float,
                 handle: StreamHandle | None, where: Callable[[], str]):
        """A result stream from the active master, opened again (with
        `request()`) whenever it breaks, until `done()`; yields the results
        `fresh` keeps, in WatchResultsResponse batches."""
        broken_since: float | None = None
        delay = 0.02
        handle = handle or StreamHandle()
        while not handle.cancelled and not done():
            if broken_since is not None and time.monotonic() - broken_since > reconnect_timeout:
                raise NoMaster(f"no master served results for {reconnect_timeout:.0f} s")
            address, _ = self.locator.current(reconnect_timeout)
            method, message = request()
            stream = getattr(self.stub(address), method)(message)
            handle.attach(stream)
            self.locator.on_change(stream.cancel)  # the master moved: resume from the new one
            try:
                for response in stream:
                    if not self.observe_epoch(response.epoch, response.cluster_id):
                        break  # a deposed master: look again
                    broken_since, delay = None, 0.02
                    new = fresh(response.results)
                    if new:
                        yield work_pb2.WatchResultsResponse(results=new, epoch=response.epoch,
                                                            cluster_id=response.cluster_id)
            except grpc.RpcError as error:
                if handle.cancelled:
                    return  # the subscriber left
                if error.code() in FINAL_FOR_STREAMS:
                    raise  # the master's answer for the subscriber (e.g. OUT_OF_RANGE, NOT_FOUND)
                self.retry_hint(error, address)
                log.info("result stream from %s ended (%s); %s", address, error.code().name, where())
            finally:
                self.locator.remove_listener(stream.cancel)
                stream.cancel()
            if done():
                return
            # However the stream ended (a failover, a backend that came back at
            # the same address, a broken connection), it resumes: a result
            # stream ends only when its subscriber leaves, or with an error.
            broken_since = broken_since or time.monotonic()
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def build_proxy(contact, timeout: float = 10.0, zk_connect_timeout: float = 10.0,
                tls: TlsFiles | None = None) -> MasterProxy:
    """A proxy from the Contact settings: backend addresses, or ZooKeeper;
    it calls masters over TLS with `tls`, with the token of --token-file."""
    token = credentials.read_token(contact.token_file) if contact.token_file else None
    if contact.masters:
        return MasterProxy(StaticLocator([a.strip() for a in contact.masters.split(",") if a.strip()]), timeout,
                           tls=tls, token=token)
    try:
        client = zk.connect(contact.zk, connect_timeout=zk_connect_timeout, auth=contact.zk_auth(),
                            tls=contact.zk_tls())
    except KazooTimeoutError:
        raise ConfigError(f"cannot reach ZooKeeper at {contact.zk}") from None
    try:
        zk.check_access(client, contact.root)
    except ConfigError:
        zk.stop(client)
        raise
    return MasterProxy(ZooKeeperLocator(client, zk.Paths(contact.root)), timeout, tls=tls, token=token)
