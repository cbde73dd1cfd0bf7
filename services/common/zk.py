"""ZooKeeper layout and client construction shared by every service."""

from __future__ import annotations

import json
from dataclasses import dataclass

import uuid

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError
from kazoo.retry import KazooRetry

DEFAULT_ROOT = "/dworkers"


@dataclass(frozen=True)
class Paths:
    root: str = DEFAULT_ROOT

    @property
    def election(self) -> str:
        return f"{self.root}/election"

    @property
    def journal(self) -> str:
        return f"{self.root}/journal"

    @property
    def kinds(self) -> str:
        return f"{self.root}/kinds"

    @property
    def cluster(self) -> str:
        return f"{self.root}/cluster"


def connect(hosts: str, session_timeout: float = 4.0, connect_timeout: float = 10.0) -> KazooClient:
    """A started client that keeps reconnecting (bounded per try, forever in all)."""
    client = KazooClient(
        hosts=hosts,
        timeout=session_timeout,
        connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
        command_retry=KazooRetry(max_tries=3, delay=0.1, max_delay=0.5),
    )
    client.start(timeout=connect_timeout)
    return client


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
