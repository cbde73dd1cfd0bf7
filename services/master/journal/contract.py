"""What every journal promises: fenced appends at explicit positions,
ordered reads, snapshots and compaction. The master depends on this contract
only; `ZooKeeperJournal` and `PostgreSQLJournal` implement it."""

from __future__ import annotations

import asyncio
import concurrent.futures
from abc import ABC, abstractmethod
from collections.abc import Iterator

from dworkers.v1 import journal_pb2


class JournalError(Exception):
    """An append did not become durable (the writer may have been deposed)."""


class FencedError(JournalError):
    """The writer may no longer write: it is not the master any more."""


class Journal(ABC):
    """Batches of events at increasing 64-bit positions, written only by the
    active master (fenced), read by whoever recovers."""

    # Whether payloads and results are stored apart from the batches (read
    # back with `payloads` and `results`): the master then holds neither.
    keeps_payloads = False
    # Batches the group committer hands over before the first is durable.
    appends_in_flight = 2

    @abstractmethod
    def append(self, position: int, batch: journal_pb2.JournalBatch) -> concurrent.futures.Future | asyncio.Future:
        """Writes one batch at `position` (above every position written
        before), fenced; the future resolves to the position once durable.
        A journal may answer a caller on an event loop with an asyncio
        future of that loop (it writes there, without threads)."""

    @abstractmethod
    def read(self, after: int = -1) -> Iterator[tuple[int, journal_pb2.JournalBatch]]:
        """Yields (position, batch) in order for positions above `after`, as of
        now (not older than the latest append anywhere)."""

    @abstractmethod
    def discard_after(self, position: int) -> None:
        """Removes what unfinished appends beyond `position` left behind
        (fenced); called by a new master before its first append."""

    @abstractmethod
    def write_snapshot(self, position: int, data: bytes) -> None:
        """Stores a snapshot of the state after batch `position` (fenced); once
        this returns, recovery starts from it."""

    @abstractmethod
    def read_snapshot(self) -> tuple[int, bytes] | None:
        """The latest complete snapshot as (position, data), or None."""

    @abstractmethod
    def compact(self) -> int:
        """Deletes the batches and older snapshots the latest snapshot covers
        (fenced); returns how many records were deleted."""

    def payloads(self, work_ids: list[str]) -> dict[str, bytes]:
        """The payloads of unfinished works, by id (journals that keep them)."""
        raise NotImplementedError(f"{type(self).__name__} does not keep payloads apart")

    def results(self, sequences: list[int]) -> dict[int, bytes]:
        """The results of retained completions, by sequence number (journals
        that keep payloads apart keep results apart too)."""
        raise NotImplementedError(f"{type(self).__name__} does not keep results apart")

    def close(self) -> None:  # noqa: B027 (a no-op unless the journal holds resources)
        """Releases what the journal holds (connections, threads); never waits."""
