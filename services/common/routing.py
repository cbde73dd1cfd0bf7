"""A proxy per shard, and the shard map that says which one a work goes to.

Frontends and workers hold one `Shards`: shard 0's proxy is the one they
always had (a cluster of one shard works exactly as before), the others are
made when the map first names their shard. With backend addresses instead of
ZooKeeper (--masters) there is no map: the cluster is one shard.
"""

from __future__ import annotations

import threading

from dworkers.common.proxy import MasterProxy, ZooKeeperLocator
from dworkers.common.shards import ShardMap, ShardMapFollower


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

    def for_work(self, work_id: str) -> tuple[int, MasterProxy]:
        shard = self.map.shard_of(work_id)
        return shard, self.proxy(shard)

    def split(self, work_ids) -> dict[int, list[int]]:
        """The positions of `work_ids`, by the shard each belongs to."""
        current = self.map
        groups: dict[int, list[int]] = {}
        for i, work_id in enumerate(work_ids):
            groups.setdefault(current.shard_of(work_id), []).append(i)
        return groups

    def wait_newer(self, version: int, timeout: float) -> bool:
        """Waits for a map newer than `version`: a master said a work is not
        its shard's, so the map here is behind."""
        with self._lock:
            return self._lock.wait_for(lambda: self.map.version > version, max(0.0, timeout))

    def _changed(self, _new: ShardMap) -> None:
        with self._lock:
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            proxies = list(self._proxies.values())
        for proxy in proxies[1:]:
            proxy.close()
        self.first.close()  # last: it owns the ZooKeeper client

