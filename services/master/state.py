"""WorkState: the master's work bookkeeping, changed only by applying events.

Pure: no I/O, no clocks. The live master and a standby replaying the journal
apply the same events through `apply` and reach the same state.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from dworkers.v1 import journal_pb2, work_pb2

TIMED_OUT_ERROR = "attempt timed out"


def fingerprint(work: work_pb2.Work) -> bytes:
    """Identifies a work's job (kind and payload) once its payload is dropped."""
    return hashlib.blake2b(work.kind.encode() + b"\0" + work.payload, digest_size=16).digest()


@dataclass(slots=True)
class Entry:
    """A work that is not finished yet."""

    work: work_pb2.Work
    attempts: int = 0  # times handed to a worker
    failures: int = 0  # failed or timed-out attempts
    error: str = ""  # the last failed attempt's error
    worker_id: str = ""  # the worker running it, when in progress


class WorkState:
    def __init__(self) -> None:
        self.pending: OrderedDict[str, Entry] = OrderedDict()  # FIFO queue
        self.in_progress: dict[str, Entry] = {}
        self.finished: dict[str, work_pb2.WorkResult] = {}  # by work id
        self.results: OrderedDict[int, work_pb2.WorkResult] = OrderedDict()  # by sequence
        self.fingerprints: dict[str, bytes] = {}  # of finished works, to tell a resubmission from a conflict
        self.next_sequence = 1
        self.forgotten_up_to = 0  # results up to here left the retention window
        self.done_count = 0
        self.failed_count = 0

    # --- queries -----------------------------------------------------------

    @property
    def last_sequence(self) -> int:
        return self.next_sequence - 1

    def is_known(self, work_id: str) -> bool:
        return work_id in self.pending or work_id in self.in_progress or work_id in self.finished

    def conflicts(self, work: work_pb2.Work) -> bool:
        """Whether a known id was accepted with a different kind or payload."""
        known = self.work(work.work_id)
        if known is not None:
            return known.kind != work.kind or known.payload != work.payload
        stored = self.fingerprints.get(work.work_id)
        return stored is not None and stored != fingerprint(work)

    def work(self, work_id: str) -> work_pb2.Work | None:
        entry = self.pending.get(work_id) or self.in_progress.get(work_id)
        return entry.work if entry else None

    def head(self) -> str | None:
        """The id of the oldest pending work."""
        return next(iter(self.pending), None)

    def status(self, work_id: str) -> work_pb2.WorkStatus | None:
        result = self.finished.get(work_id)
        if result is not None:
            return work_pb2.WorkStatus(
                work_id=work_id, kind=result.kind, state=result.state, attempts=result.attempts,
                result=result.result, error=result.error, sequence=result.sequence,
            )
        if work_id in self.pending:
            entry, state = self.pending[work_id], work_pb2.PENDING
        elif work_id in self.in_progress:
            entry, state = self.in_progress[work_id], work_pb2.IN_PROGRESS
        else:
            return None
        return work_pb2.WorkStatus(
            work_id=work_id, kind=entry.work.kind, state=state,
            attempts=entry.attempts, error=entry.error,
        )

    def results_after(self, sequence: int, limit: int) -> list[work_pb2.WorkResult]:
        """Up to `limit` retained results with a sequence number above `sequence`."""
        first = max(sequence + 1, self.forgotten_up_to + 1)
        last = min(self.last_sequence, first + limit - 1)
        return [self.results[s] for s in range(first, last + 1) if s in self.results]

    # --- events ------------------------------------------------------------

    def apply(self, event: journal_pb2.Event) -> work_pb2.WorkResult | None:
        """Applies one event; returns the result it finished, if any."""
        kind = event.WhichOneof("event")
        handler = getattr(self, "_on_" + kind, None)
        if handler is None:
            raise ValueError(f"unknown journal event {kind!r}")
        return handler(getattr(event, kind))

    def _on_work_accepted(self, e: journal_pb2.WorkAccepted) -> None:
        if not self.is_known(e.work.work_id):
            self.pending[e.work.work_id] = Entry(work=e.work)

    def _on_work_started(self, e: journal_pb2.WorkStarted) -> None:
        entry = self.pending.pop(e.work_id, None)
        if entry is None:
            return
        entry.attempts += 1
        entry.worker_id = e.worker_id
        self.in_progress[e.work_id] = entry

    def _on_work_completed(self, e: journal_pb2.WorkCompleted) -> work_pb2.WorkResult | None:
        # A late completion of work that was re-queued (after a failover or a
        # timeout) still counts: the work was done, once.
        entry = self.in_progress.pop(e.work_id, None) or self.pending.pop(e.work_id, None)
        if entry is None:
            return None
        self.done_count += 1
        return self._finish(entry, work_pb2.DONE, result=e.result)

    def _on_worker_failed(self, e: journal_pb2.WorkerFailed) -> work_pb2.WorkResult | None:
        return self._fail_attempt(e.work_id, e.error)

    def _on_worker_timed_out(self, e: journal_pb2.WorkerTimedOut) -> work_pb2.WorkResult | None:
        return self._fail_attempt(e.work_id, TIMED_OUT_ERROR)

    def _on_work_returned(self, e: journal_pb2.WorkReturned) -> None:
        entry = self.in_progress.pop(e.work_id, None)
        if entry is not None:
            entry.worker_id = ""
            self.pending[e.work_id] = entry

    def _on_work_in_progress_reset(self, _e: journal_pb2.WorkInProgressReset) -> None:
        for work_id, entry in self.in_progress.items():
            entry.worker_id = ""
            self.pending[work_id] = entry
        self.in_progress.clear()

    def _on_results_forgotten(self, e: journal_pb2.ResultsForgotten) -> None:
        while self.results:
            sequence, result = next(iter(self.results.items()))
            if sequence > e.up_to_sequence:
                break
            del self.results[sequence]
            self.finished.pop(result.work_id, None)
            self.fingerprints.pop(result.work_id, None)
        self.forgotten_up_to = max(self.forgotten_up_to, e.up_to_sequence)

    def _fail_attempt(self, work_id: str, error: str) -> work_pb2.WorkResult | None:
        entry = self.in_progress.pop(work_id, None)
        if entry is None:
            return None
        entry.failures += 1
        entry.error = error
        entry.worker_id = ""
        if entry.failures >= entry.work.max_attempts:
            self.failed_count += 1
            return self._finish(entry, work_pb2.FAILED, error=error)
        self.pending[work_id] = entry
        return None

    def _finish(self, entry: Entry, state: int, result: bytes = b"", error: str = "") -> work_pb2.WorkResult:
        finished = work_pb2.WorkResult(
            sequence=self.next_sequence, work_id=entry.work.work_id, state=state,
            result=result, error=error, kind=entry.work.kind, attempts=entry.attempts,
        )
        self.next_sequence += 1
        self.finished[finished.work_id] = finished
        self.results[finished.sequence] = finished
        self.fingerprints[finished.work_id] = fingerprint(entry.work)
        return finished

    # --- snapshots ---------------------------------------------------------

    def to_snapshot(self) -> journal_pb2.Snapshot:
        snapshot = journal_pb2.Snapshot(
            next_sequence=self.next_sequence, forgotten_up_to=self.forgotten_up_to,
            done_count=self.done_count, failed_count=self.failed_count,
        )
        for in_progress, entries in ((False, self.pending), (True, self.in_progress)):
            for entry in entries.values():
                snapshot.entries.add(
                    work=entry.work, attempts=entry.attempts, failures=entry.failures,
                    error=entry.error, worker_id=entry.worker_id, in_progress=in_progress,
                )
        snapshot.results.extend(self.results.values())
        snapshot.fingerprints.extend(self.fingerprints[r.work_id] for r in self.results.values())
        return snapshot

    @classmethod
    def from_snapshot(cls, snapshot: journal_pb2.Snapshot) -> "WorkState":
        state = cls()
        state.next_sequence = snapshot.next_sequence
        state.forgotten_up_to = snapshot.forgotten_up_to
        state.done_count = snapshot.done_count
        state.failed_count = snapshot.failed_count
        for e in snapshot.entries:
            entry = Entry(work=e.work, attempts=e.attempts, failures=e.failures,
                          error=e.error, worker_id=e.worker_id)
            (state.in_progress if e.in_progress else state.pending)[e.work.work_id] = entry
        for result, print_ in zip(snapshot.results, snapshot.fingerprints):
            state.results[result.sequence] = result
            state.finished[result.work_id] = result
            state.fingerprints[result.work_id] = print_
        return state
