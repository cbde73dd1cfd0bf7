"""The journal in ZooKeeper, fenced by the writer's election znode.

Layout under the journal path P (positions are explicit 64-bit numbers
chosen by the writer, never ZooKeeper's 32-bit sequence counter, which stops
at 2^31 - 1):

    P/b-<position>                a batch stored whole
    P/m-<position>                a batch stored in parts: "<writer>:<count>"
    P-parts/<position>-<writer>-<i>   the parts of a stored-in-parts batch
    P-snapshots/s-<position>/c-<i>    the chunks of a snapshot
    P-snapshots-latest            "<position>:<chunks>" of the latest complete snapshot

Every write is a multi-op that first checks the writer's election znode, so
a deposed master can never write. No single write carries more than
`PART_BYTES`: ZooKeeper keeps its last 500 committed writes in memory (about
three copies of each), so large writes, not only large data, exhaust its
heap. A batch in parts becomes visible only when its manifest is written,
and the manifest's multi-op checks that every part exists. A crash between
any two steps leaves a journal that replays: an unfinished snapshot is not
pointed to, an unfinished batch has no manifest, and batches are deleted only
after the pointer moved past them.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Iterator

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from dworkers.common import zk
from dworkers.master.journal.contract import FencedError, Journal, JournalError
from dworkers.v1 import journal_pb2

PART_BYTES = 64 * 1024  # the most one ZooKeeper write carries
BATCH_PREFIX = "b-"
MANIFEST_PREFIX = "m-"
SNAPSHOT_PREFIX = "s-"
CHUNK_PREFIX = "c-"
DELETES_PER_TXN = 200
WRITE_WINDOW = 2  # snapshot chunks in flight at once


def position_of(name: str) -> int:
    """The position in a batch, manifest or snapshot name (legacy batch names
    carry ZooKeeper's 10-digit sequence number, which sorts the same way)."""
    return int(name.rsplit("-", 1)[1])


def _split(data: bytes) -> list[bytes]:
    return [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]


class ZooKeeperJournal(Journal):
    def __init__(self, client: KazooClient, path: str, fence_path: str | None = None,
                 read_parallelism: int = 64):
        self.client = client
        self.path = path.rstrip("/")
        self.parts = self.path + "-parts"
        self.snapshots = self.path + "-snapshots"
        self.pointer = self.snapshots + "-latest"
        self.fence_path = fence_path
        self.read_parallelism = read_parallelism
        self.writer = uuid.uuid4().hex[:12]  # names this writer's parts: no one else's can collide
        for node in (self.path, self.parts, self.snapshots, self.pointer):
            client.ensure_path(node)

    # --- fenced writes -----------------------------------------------------

    def _txn(self):
        txn = self.client.transaction()
        if self.fence_path is not None:
            txn.check(self.fence_path, version=0)
        return txn

    def _failure(self, outcome: list, what: str) -> JournalError:
        if self.fence_path is not None and isinstance(outcome[0], (NoNodeError, BadVersionError)):
            return FencedError(f"{what}: the election znode is gone: this master was deposed")
        if any(isinstance(r, NodeExistsError) for r in outcome):
            return JournalError(f"{what}: the position is taken (another writer, or a journal read too early)")
        return JournalError(f"{what} failed: {outcome!r}")

    def _commit(self, txn, what: str) -> list:
        outcome = txn.commit()
        if any(isinstance(r, Exception) for r in outcome):
            raise self._failure(outcome, what)
        return outcome

    def append(self, position: int, batch: journal_pb2.JournalBatch) -> concurrent.futures.Future:
        data = batch.SerializeToString()
        future: concurrent.futures.Future = concurrent.futures.Future()
        txns = []
        if len(data) <= PART_BYTES:
            txn = self._txn()
            txn.create(f"{self.path}/{BATCH_PREFIX}{position:020d}", data)
            txns.append(txn)
        else:
            parts = _split(data)
            names = [f"{self.parts}/{position:020d}-{self.writer}-{i:06d}" for i in range(len(parts))]
            for name, part in zip(names, parts):
                txn = self._txn()
                txn.create(name, part)
                txns.append(txn)
            manifest = self._txn()
            for name in names:  # all parts or no batch
                manifest.check(name, version=0)
            manifest.create(f"{self.path}/{MANIFEST_PREFIX}{position:020d}", f"{self.writer}:{len(parts)}".encode())
            txns.append(manifest)
        # ZooKeeper applies one session's requests in order: the manifest
        # comes after its parts, so its outcome decides.
        try:
            results = [txn.commit_async() for txn in txns]
        except Exception as exc:  # e.g. the client is stopped
            future.set_exception(JournalError(str(exc)))
            return future
        results[-1].rawlink(zk.immediate(lambda result: self._settle(future, result, position)))
        return future

    def _settle(self, future: concurrent.futures.Future, result, position: int) -> None:
        try:
            outcome = result.get()
        except Exception as exc:
            future.set_exception(JournalError(f"journal append failed: {exc!r}"))
            return
        if any(isinstance(r, Exception) for r in outcome):
            future.set_exception(self._failure(outcome, f"journal append at {position}"))
        else:
            future.set_result(position)

    def discard_after(self, position: int) -> None:
        orphans = [f"{self.parts}/{n}" for n in self.client.get_children(self.parts)
                   if int(n.split("-", 1)[0]) > position]
        self._delete(orphans, "discarding unfinished appends")

    def write_snapshot(self, position: int, data: bytes) -> None:
        base = f"{self.snapshots}/{SNAPSHOT_PREFIX}{position:020d}"
        latest = self._pointer()
        if self.client.exists(base) is not None and (latest is None or latest[0] != position):
            self._delete(self._snapshot_nodes(base), "clearing an unfinished snapshot")
        chunks = _split(data)
        txn = self._txn()
        txn.create(base, b"")
        self._commit(txn, "snapshot")
        for start in range(0, len(chunks), WRITE_WINDOW):
            window = []
            for i in range(start, min(start + WRITE_WINDOW, len(chunks))):
                txn = self._txn()
                txn.create(f"{base}/{CHUNK_PREFIX}{i:06d}", chunks[i])
                window.append(txn.commit_async())
            for result in window:
                outcome = result.get(timeout=30)
                if any(isinstance(r, Exception) for r in outcome):
                    raise self._failure(outcome, "snapshot chunk")
        txn = self._txn()
        txn.set_data(self.pointer, f"{position}:{len(chunks)}".encode())
        self._commit(txn, "snapshot pointer")

    def compact(self) -> int:
        latest = self._pointer()
        if latest is None:
            return 0
        covered = latest[0]
        doomed = [f"{self.parts}/{n}" for n in self.client.get_children(self.parts)
                  if int(n.split("-", 1)[0]) <= covered]
        doomed += [f"{self.path}/{n}" for n in self._batches() if position_of(n) <= covered]
        for name in self.client.get_children(self.snapshots):
            if name.startswith(SNAPSHOT_PREFIX) and position_of(name) != covered:
                doomed += self._snapshot_nodes(f"{self.snapshots}/{name}")
        self._delete(doomed, "compaction")
        return len(doomed)

    def _snapshot_nodes(self, base: str) -> list[str]:
        """A snapshot's chunks, then the snapshot itself (delete order)."""
        return [f"{base}/{c}" for c in sorted(self.client.get_children(base))] + [base]

    def _delete(self, paths: list[str], what: str) -> None:
        for start in range(0, len(paths), DELETES_PER_TXN):
            txn = self._txn()
            for path in paths[start:start + DELETES_PER_TXN]:
                txn.delete(path)
            self._commit(txn, what)

    # --- reads ---------------------------------------------------------------

    def _get_all(self, paths: list[str]) -> Iterator[bytes]:
        # One round trip per znode is the cost: fetch a window at once.
        for start in range(0, len(paths), self.read_parallelism):
            requests = [self.client.get_async(p) for p in paths[start:start + self.read_parallelism]]
            for request in requests:
                yield request.get(timeout=30)[0]

    def _batches(self) -> list[str]:
        """Names of stored batches (whole or in parts), in position order."""
        return sorted((n for n in self.client.get_children(self.path)
                       if n.startswith((BATCH_PREFIX, MANIFEST_PREFIX))), key=position_of)

    def _pointer(self) -> tuple[int, int] | None:
        data, _ = self.client.get(self.pointer)
        if not data:
            return None
        position, chunks = data.decode().split(":")
        return int(position), int(chunks)

    def _sync(self) -> None:
        # A server of an ensemble may lag its leader: catch up before reading,
        # or recovery could miss the last batch the previous master wrote.
        self.client.sync(self.path)

    def read(self, after: int = -1) -> Iterator[tuple[int, journal_pb2.JournalBatch]]:
        self._sync()
        names = [n for n in self._batches() if position_of(n) > after]
        for name, data in zip(names, self._get_all([f"{self.path}/{n}" for n in names])):
            position = position_of(name)
            if name.startswith(MANIFEST_PREFIX):
                writer, count = data.decode().split(":")
                data = b"".join(self._get_all([f"{self.parts}/{position:020d}-{writer}-{i:06d}"
                                               for i in range(int(count))]))
            yield position, journal_pb2.JournalBatch.FromString(data)

    def read_snapshot(self) -> tuple[int, bytes] | None:
        self._sync()
        latest = self._pointer()
        if latest is None:
            return None
        position, count = latest
        base = f"{self.snapshots}/{SNAPSHOT_PREFIX}{position:020d}"
        return position, b"".join(self._get_all([f"{base}/{CHUNK_PREFIX}{i:06d}" for i in range(count)]))
