"""The shard map in ZooKeeper, and a proxy per shard: which one a work goes to.

Frontends and workers hold one `Shards`: shard 0's proxy is the one they
always had (a cluster of one shard works exactly as before), the others are
made when the map first names their shard. With backend addresses instead of
ZooKeeper (--masters) there is no map: the cluster is one shard.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError
from kazoo.recipe.watchers import DataWatch

from dworkers.common.proxy import MasterProxy, ZooKeeperLocator
from dworkers.common.shards import BadShardMap, ShardMap

REROUTE_PAUSE = 0.2  # seconds between tries of a call a master refused as another shard's


def load(client, path: str) -> tuple[ShardMap, int]:
    """The stored map and its znode version (-1: none stored, one shard)."""
    try:
        data, stat = client.get(path)
    except NoNodeError:
        return ShardMap.single(), -1
    return ShardMap.decode(data), stat.version


def store(client, path: str, new: ShardMap, expected_version: int) -> None:
    """Writes `new` if the stored map is still the one read (version
    `expected_version`): two operators changing the map at once cannot
    both win."""
    try:
        if expected_version < 0:
            client.create(path, new.encode(), makepath=True)
        else:
            client.set(path, new.encode(), version=expected_version)
    except (BadVersionError, NodeExistsError, NoNodeError):
        raise BadShardMap("the shard map changed meanwhile: read it again and retry") from None


class ShardMapFollower:
    """The current map, kept fresh by a watch; listeners hear of each new one
    (from ZooKeeper's thread: keep them short)."""

    def __init__(self, client, path: str):
        self._lock = threading.Lock()
        self._map = ShardMap.single()
        self._listeners: list[Callable[[ShardMap], None]] = []
        self.error: str | None = None  # why the stored map was not taken
        self.loaded = False  # a map was read (or there is none): until then `current` is a guess
        self._ready = threading.Event()
        DataWatch(client, path, self._changed)
        self._ready.wait(10)

    @property
    def current(self) -> ShardMap:
        return self._map

    def on_change(self, listener: Callable[[ShardMap], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[ShardMap], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _changed(self, data, stat) -> None:
        try:
            new = ShardMap.single() if stat is None else ShardMap.decode(data)
            self.error = None
            self.loaded = True
        except BadShardMap as exc:  # keep routing by the last good map
            self.error = str(exc)
            self._ready.set()
            return
        with self._lock:
            if new.version < self._map.version:
                self._ready.set()
                return
            self._map = new
            listeners = list(self._listeners)
        self._ready.set()
        for listener in listeners:
            listener(new)


class Shards:
    def __init__(self, first: MasterProxy):
        self.first = first
        self._proxies: dict[int, MasterProxy] = {0: first}
        self._lock = threading.Condition()
        locator = first.locator
        self.follower: ShardMapFollower | None = None
        if isinstance(locator, ZooKeeperLocator):
            self._client, self._paths = locator.client, locator.paths
            self.follower = ShardMapFollower(self._client, self._paths.shard_map)
            self.follower.on_change(self._changed)

    @property
    def map(self) -> ShardMap:
        return self.follower.current if self.follower is not None else ShardMap.single()

    @property
    def several(self) -> bool:
        return self.map.shards > 1

    def proxy(self, shard: int) -> MasterProxy:
        with self._lock:
            proxy = self._proxies.get(shard)
            if proxy is None:
                first = self.first
                locator = ZooKeeperLocator(self._client, self._paths.of_shard(shard), owns_client=False)
                proxy = self._proxies[shard] = MasterProxy(locator, first.timeout, first.attempt_timeout,
                                                           tls=first.tls, token=first.token)
            return proxy

    def split(self, work_ids) -> dict[int, list[int]]:
        """The positions of `work_ids`, by the shard each belongs to."""
        current = self.map
        groups: dict[int, list[int]] = {}
        for i, work_id in enumerate(work_ids):
            groups.setdefault(current.shard_of(work_id), []).append(i)
        return groups

    def wait_newer(self, version: int, deadline: float) -> bool:
        """A master said a work is not its shard's: waits for a map newer
        than `version` (the map here was behind), or a moment (the master's
        was behind, or its slots are moving); False once `deadline` (a
        time.monotonic()) has passed, when the caller gives up."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        with self._lock:
            self._lock.wait_for(lambda: self.map.version > version, min(REROUTE_PAUSE, remaining))
        return True

    def _changed(self, _new: ShardMap) -> None:
        with self._lock:
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            proxies = list(self._proxies.values())
        for proxy in proxies[1:]:
            proxy.close()
        self.first.close()  # last: it owns the ZooKeeper client

