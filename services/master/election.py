"""Leader election with ephemeral sequential znodes.

Each backend creates `<root>/election/<uuid>_n-<seq>`; the lowest sequence
number (the oldest live backend) is the master and its sequence number is
its epoch. Each standby watches only its predecessor. The election runs on
its own thread and reports every change of view through `on_change`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.protocol.states import KazooState

from dworkers.common.zk import Paths, decode_member, election_sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ElectionView:
    node: str | None  # this backend's znode (full path), None while it has none
    leader: bool  # this backend is the oldest live one
    epoch: int  # this backend's sequence number
    master_address: str = ""
    master_epoch: int = 0
    members: tuple[tuple[str, int, str], ...] = field(default=())  # (name, epoch, address)


class Election:
    REFRESH_SECONDS = 5.0  # re-read the view even without a watch firing
    DELETE_TIMEOUT = 2.0

    def __init__(self, client: KazooClient, paths: Paths, member_data: bytes,
                 on_change: Callable[[ElectionView], object]):
        self.client = client
        self.path = paths.election
        self.member_data = member_data
        self.on_change = on_change
        self.prefix = uuid.uuid4().hex + "_n-"
        self.node: str | None = None
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="election", daemon=True)
        self._last_view: ElectionView | None = None
        # One watch function for every read: kazoo keeps watches in a set, so
        # re-reading with the same one does not pile them up.
        self._watch = lambda _event: self._wake.set()
        client.add_listener(self._on_state)

    def start(self) -> None:
        self.client.ensure_path(self.path)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def refresh(self) -> None:
        """Reports the view again even if it did not change."""
        self._last_view = None
        self._wake.set()

    def resign(self) -> None:
        """Leaves the election: deletes this backend's znode so a standby takes over now."""
        self._stopped.set()
        self._drop_node()
        self._thread.join(timeout=5)

    def rejoin(self) -> None:
        """Drops this backend's znode and joins again at the back of the line."""
        self._drop_node()

    def _drop_node(self) -> None:
        node, self.node = self.node, None
        if node is not None:
            try:  # bounded: cut off from ZooKeeper, the session's end removes it
                self.client.delete_async(node).get(timeout=self.DELETE_TIMEOUT)
            except (KazooException, self.client.handler.timeout_exception):
                pass  # gone already, or the session is: either way it is not ours
        self._wake.set()

    def _on_state(self, state: str) -> None:
        if state == KazooState.LOST:
            self.node = None  # the session and its ephemeral znode are gone
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.clear()
            try:
                if self.client.state != KazooState.CONNECTED:
                    self._wake.wait(1.0)
                    continue
                self._step()
            except (KazooException, ValueError) as exc:
                log.warning("election: %r; retrying", exc)
                self._wake.wait(0.5)
                continue
            self._wake.wait(self.REFRESH_SECONDS)

    def _step(self) -> None:
        if self.node is None or self.client.exists(self.node) is None:
            self.node = self._create_node()
        # Only the leader watches all members (for its standby list); a
        # standby watches only its predecessor, so no herd wakes on a change.
        leader_watch = None
        if self._last_view is not None and self._last_view.leader:
            leader_watch = self._watch
        children = sorted(self.client.get_children(self.path, watch=leader_watch), key=election_sequence)
        mine = self.node.rsplit("/", 1)[1]
        if mine not in children:
            self.node = None
            self._wake.set()
            return
        index = children.index(mine)
        members = []
        for name in children:
            try:
                data, _ = self.client.get(f"{self.path}/{name}")
            except NoNodeError:
                continue
            members.append((name, election_sequence(name), decode_member(data).get("address", "")))
        master = members[0] if members else (mine, election_sequence(mine), "")
        view = ElectionView(
            node=self.node, leader=index == 0, epoch=election_sequence(mine),
            master_address=master[2], master_epoch=master[1], members=tuple(members),
        )
        if index > 0:
            predecessor = f"{self.path}/{children[index - 1]}"
            if self.client.exists(predecessor, watch=self._watch) is None:
                self._wake.set()  # it went away between the two reads: look again
        if view != self._last_view:
            self._last_view = view
            self.on_change(view)

    def _create_node(self) -> str:
        # A create whose reply was lost may have succeeded: find it by our
        # unique prefix instead of creating a second node.
        self.client.ensure_path(self.path)  # gone if ZooKeeper lost its data
        for name in self.client.get_children(self.path):
            if name.startswith(self.prefix):
                return f"{self.path}/{name}"
        return self.client.create(f"{self.path}/{self.prefix}", self.member_data,
                                  ephemeral=True, sequence=True)
