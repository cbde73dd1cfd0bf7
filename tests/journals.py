"""Both journal kinds behind one test interface: open a fenced writer,
depose it (as a new master would), read as a recovering master does."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest

from dworkers.common import zk
from dworkers.master.journal import Journal, PostgreSQLJournal, ZooKeeperJournal
from dworkers.master.journal.postgresql import Apart, take_apart
from dworkers.v1 import journal_pb2

KINDS = ("zookeeper", "postgresql")

# Runs a cluster test once per journal kind (the `journal` fixture, conftest.py).
both_journals = pytest.mark.parametrize("journal", KINDS, indirect=True)


@contextlib.contextmanager
def journal_reader(cluster, shard: int = 0) -> Iterator[Journal]:
    """A cluster's journal (a shard's), to read as a recovering master does
    (without taking it over: the live master stays undisturbed)."""
    paths = zk.Paths(cluster.root, shard)
    if cluster.journal:
        journal = PostgreSQLJournal(cluster.journal, paths.shard_root)
        try:
            yield journal
        finally:
            journal.close()
        return
    client = zk.connect(cluster.zk, auth=cluster.zk_auth)
    try:
        yield ZooKeeperJournal(client, paths.journal)
    finally:
        client.stop()
        client.close()


def read_journal(cluster) -> list[tuple[int, journal_pb2.JournalBatch]]:
    with journal_reader(cluster) as journal:
        return list(journal.read())


class ZooKeeperKind:
    """Writers fenced by an ephemeral election znode; deposed by its deletion."""

    apart = False  # payloads stay in the batches

    @staticmethod
    def stored(batch: journal_pb2.JournalBatch) -> journal_pb2.JournalBatch:
        return batch

    def __init__(self, server) -> None:
        self.client = zk.connect(server.hosts, session_timeout=2.0)
        self.paths = zk.Paths(f"/journal-test-{uuid.uuid4().hex[:8]}")
        self.client.ensure_path(self.paths.election)
        self.fences: dict[int, str] = {}

    def writer(self) -> Journal:
        fence = self.client.create(f"{self.paths.election}/n-", ephemeral=True, sequence=True)
        journal = ZooKeeperJournal(self.client, self.paths.journal, fence_path=fence)
        self.fences[id(journal)] = fence
        return journal

    def depose(self, journal: Journal) -> None:
        self.client.delete(self.fences[id(journal)])

    def reader(self) -> Journal:
        return ZooKeeperJournal(self.client, self.paths.journal)

    def close(self) -> None:
        self.client.stop()
        self.client.close()


class PostgreSQLKind:
    """Writers fenced by the journal row's fence; deposed by a take-over."""

    apart = True  # payloads kept apart: batches come back without them

    @staticmethod
    def stored(batch: journal_pb2.JournalBatch) -> journal_pb2.JournalBatch:
        return journal_pb2.JournalBatch.FromString(take_apart(batch, Apart()))

    def __init__(self, server) -> None:
        self.url = server.url()
        self.name = f"/journal-test-{uuid.uuid4().hex[:8]}"
        self.opened: list[PostgreSQLJournal] = []

    def _open(self) -> PostgreSQLJournal:
        journal = PostgreSQLJournal(self.url, self.name, holder=f"test-{len(self.opened)}")
        self.opened.append(journal)
        journal.take_over()
        return journal

    def writer(self) -> Journal:
        return self._open()

    def depose(self, journal: Journal) -> None:
        self._open()

    def reader(self) -> Journal:
        return self._open()  # a recovering master takes over before it reads

    def close(self) -> None:
        for journal in self.opened:
            journal.close()


def open_kind(request, kind: str):
    if kind == "zookeeper":
        return ZooKeeperKind(request.getfixturevalue("zookeeper"))
    return PostgreSQLKind(request.getfixturevalue("postgresql"))
