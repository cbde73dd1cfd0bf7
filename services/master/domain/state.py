"""WorkState: what the journal says about every work, changed only by
applying events.

Pure: no I/O, no clocks. The live master and a standby replaying the journal
apply the same events through `apply` and reach the same state. An event
that cannot apply (about a work in another state, or another attempt) is
ignored, as old journals may hold such events; with `strict=True` (tests) it
raises ImpossibleEvent instead.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import heapq
import itertools
import operator
import sys
from collections import OrderedDict, deque
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from dworkers.common.shards import slot_of
from dworkers.v1 import journal_pb2, work_pb2

TIMED_OUT_ERROR = "attempt timed out"
CANCELLED_ERROR = "cancelled"
STALE = -1  # the ticket of an entry no longer queued
ENTRY_OVERHEAD_BYTES = 32  # what a work costs in a snapshot beyond its own bytes


def fingerprint(kind: str, payload: bytes) -> bytes:
    """Identifies a work's job (kind and payload) once its payload is dropped."""
    return hashlib.blake2b(kind.encode() + b"\0" + payload, digest_size=16).digest()


def payload_field_bytes(length: int) -> int:
    """What a payload of `length` bytes adds to a serialized Work (tag, length, bytes)."""
    return 0 if not length else 1 + (length.bit_length() + 6) // 7 + length


# One object per distinct kind, size and timeout, shared by the entries that
# have it: a million pending works hold a few distinct values, not a million
# copies. One table per type (1 == 1.0 must not turn a timeout into an int).
_KINDS: dict[str, str] = {}
_SIZES: dict[int, int] = {}
_TIMEOUTS: dict[float, float] = {}
_CONTENT_TYPES: dict[str, str] = {}
_BACKOFFS: dict[tuple, tuple] = {}
NOT_BEFORE_FIELD_BYTES = 9  # a double field: its tag and 8 bytes


def _shared(value, table: dict):
    return table.setdefault(value, value) if len(table) < 100_000 else value


@dataclass(slots=True)
class Extra:
    """What a work has once handed out (its attempts, their token, a failed
    one's error, a worker identity) or what few works have (a content type,
    a back-off, a lease): kept apart, so that the many pending works that
    were never handed out pay one slot for all of it."""

    attempts: int = 0
    failures: int = 0
    token: int = 0
    hand_backs: int = 0
    error: str = ""
    owner: str = ""
    content_type: str = ""
    backoff: tuple[float, float, float] | None = None
    heartbeat_timeout: float = 0.0


def _extra_field(name: str, default: Any) -> Any:
    """An Extra field read and written as the entry's own."""
    def get(entry: Entry) -> Any:
        return default if entry.extra is None else getattr(entry.extra, name)

    def put(entry: Entry, value: Any) -> None:
        if entry.extra is None:
            if value == default:
                return
            entry.extra = Extra()
        setattr(entry.extra, name, value)

    return property(get, put)


@dataclass(slots=True)
class Entry:
    """A work that is not finished yet: what scheduling needs, in a few
    hundred bytes. Its payload is here, or (payload None) kept by the journal,
    which hands it out; then `digest` tells a resubmission from a conflict.
    Its rarer fields (Extra's, read and written as its own) live in `extra`."""

    work_id: str
    kind: str
    payload: bytes | None
    max_attempts: int
    timeout_seconds: float
    size: int  # the work's bytes in the journal and in snapshots, and a little more
    digest: bytes | None = None  # fingerprint(kind, payload) when the payload is not here
    ticket: int = STALE  # its place in the queue while pending
    priority: int = 0  # higher first
    ready_at: float = 0.0  # while scheduled: the Unix time it is queued at
    extra: Extra | None = None  # made when one of its fields is first set

    attempts = _extra_field("attempts", 0)  # times handed to a worker
    failures = _extra_field("failures", 0)  # failed or timed-out attempts
    token = _extra_field("token", 0)  # its latest attempt's token: only reports that carry it count
    hand_backs = _extra_field("hand_backs", 0)  # attempts handed back unfinished (a worker leaving)
    error = _extra_field("error", "")  # the last failed attempt's error
    owner = _extra_field("owner", "")  # the worker identity its latest attempt was handed to ("" if unchecked)
    content_type = _extra_field("content_type", "")  # of the payload
    backoff = _extra_field("backoff", None)  # (initial, multiplier, max) seconds between attempts
    heartbeat_timeout = _extra_field("heartbeat_timeout", 0.0)  # > 0: a lease renewed by heartbeats, no timeout

    @classmethod
    def of(cls, work: work_pb2.Work, keep_payload: bool = True, digest: bytes = b"") -> Entry:
        """The entry of an accepted work. Without its payload, its size is the
        work's without the payload (so an event stored without it gives the
        same entry), and `digest` is the event's fingerprint if it has one.
        Its size leaves out not_before, which a snapshot keeps apart (ready_at)."""
        kind = _shared(work.kind, _KINDS)
        payload = work.payload
        size = work.ByteSize() + ENTRY_OVERHEAD_BYTES - (NOT_BEFORE_FIELD_BYTES if work.not_before else 0)
        timeout = _shared(work.timeout_seconds, _TIMEOUTS) if work.timeout_seconds else 0.0
        b = work.backoff
        extra = None
        if work.content_type or b.initial_seconds or work.heartbeat_timeout:
            extra = Extra(content_type=_shared(work.content_type, _CONTENT_TYPES),
                          backoff=_shared((b.initial_seconds, b.multiplier, b.max_seconds), _BACKOFFS)
                          if b.initial_seconds else None,
                          heartbeat_timeout=_shared(work.heartbeat_timeout, _TIMEOUTS) if work.heartbeat_timeout
                          else 0.0)
        ready_at = work.not_before or 0.0  # one shared 0.0, not a float per work
        if keep_payload:
            return cls(work.work_id, kind, payload, work.max_attempts, timeout, _shared(size, _SIZES),
                       priority=work.priority, ready_at=ready_at, extra=extra)
        return cls(work.work_id, kind, None, work.max_attempts, timeout,
                   _shared(size - payload_field_bytes(len(payload)), _SIZES), digest or fingerprint(kind, payload),
                   priority=work.priority, ready_at=ready_at, extra=extra)

    def work(self) -> work_pb2.Work:
        """The work as submitted (without its payload if the journal keeps it,
        and without not_before: see ready_at)."""
        return self.fill(work_pb2.Work())

    def fill(self, work: work_pb2.Work) -> work_pb2.Work:
        """Writes the work into a message's field (no intermediate copy)."""
        work.work_id, work.kind, work.max_attempts = self.work_id, self.kind, self.max_attempts
        if self.payload:
            work.payload = self.payload
        if self.timeout_seconds:
            work.timeout_seconds = self.timeout_seconds
        if self.content_type:
            work.content_type = self.content_type
        if self.priority:
            work.priority = self.priority
        if self.backoff is not None:
            b = work.backoff
            b.initial_seconds, b.multiplier, b.max_seconds = self.backoff
        if self.heartbeat_timeout:
            work.heartbeat_timeout = self.heartbeat_timeout
        return work

    def fingerprint(self) -> bytes:
        return self.digest if self.digest is not None else fingerprint(self.kind, self.payload or b"")

    def same_job(self, work: work_pb2.Work) -> bool:
        if self.kind != work.kind:
            return False
        if self.payload is not None:
            return self.payload == work.payload
        return self.digest == fingerprint(work.kind, work.payload)


_TICKET = operator.attrgetter("ticket")


class PendingQueue:
    """Pending works, highest priority first and FIFO within a priority,
    kept per kind and priority: a slot finds the next work it can run at a
    cost that grows with its kinds and their distinct priorities, not with
    the queue.

    Each (kind, priority) queue is a deque of entries; an entry taken out of
    the middle is marked stale and stays there until it reaches the front
    (an entry is queued once: queueing a work again queues a fresh entry),
    which keeps a pending work at the cost of one dict slot and one deque slot."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._queues: dict[tuple[str, int], deque[Entry]] = {}
        self._levels: dict[str, list[int]] = {}  # per kind: the priorities queued, highest first
        self._count_by_kind: dict[str, int] = {}
        self._stale: dict[tuple[str, int], int] = {}  # entries taken out of a queue's middle, still in it
        self._next_ticket = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, work_id: object) -> bool:
        return work_id in self._entries

    def __getitem__(self, work_id: str) -> Entry:
        return self._entries[work_id]

    def get(self, work_id: str) -> Entry | None:
        return self._entries.get(work_id)

    def __iter__(self) -> Iterator[str]:
        """Work ids in the order they were queued."""
        return (entry.work_id for entry in self.entries())

    def entries(self) -> Iterator[Entry]:
        """Entries in the order they were queued (merged across queues)."""
        live = [[e for e in queue if e.ticket >= 0] for queue in self._queues.values()]
        return iter(live[0]) if len(live) == 1 else heapq.merge(*live, key=_TICKET)

    def push(self, entry: Entry) -> Entry:
        """Queues a work again, at the back of its priority, as a fresh entry
        (the old one may still sit, stale, in a queue); returns that entry."""
        return self.push_new(dataclasses.replace(entry))

    def push_new(self, entry: Entry) -> Entry:
        """Queues an entry that was never queued, at the back of its priority."""
        self.extend((entry,))
        return entry

    def extend(self, entries: Iterable[Entry]) -> None:
        """Queues entries that were never queued, at the back, in order
        (recovery loads a snapshot's queue this way)."""
        by_id, queues, counts = self._entries, self._queues, self._count_by_kind
        ticket = self._next_ticket
        for entry in entries:
            entry.ticket = ticket
            ticket += 1
            kind = entry.kind
            by_id[entry.work_id] = entry
            key = (kind, entry.priority)
            queue = queues.get(key)
            if queue is None:
                queue = queues[key] = deque()
                levels = self._levels.setdefault(kind, [])
                bisect.insort(levels, -entry.priority)  # kept negated: ascending is highest first
            queue.append(entry)
            counts[kind] = counts.get(kind, 0) + 1
        self._next_ticket = ticket

    def pop(self, work_id: str) -> Entry | None:
        entry = self._entries.pop(work_id, None)
        if entry is not None:
            entry.ticket = STALE  # if it is not at the front, its place there is skipped later
            kind, key = entry.kind, (entry.kind, entry.priority)
            self._count_by_kind[kind] -= 1
            if not self._count_by_kind[kind]:
                del self._count_by_kind[kind]
            self._stale[key] = self._stale.get(key, 0) + 1
            if self._front(kind, entry.priority) is not None:
                self._compact(key)
        return entry

    def _compact(self, key: tuple[str, int]) -> None:
        """Drops a queue's stale entries once they outnumber its live ones (a
        head that does not move, e.g. of a kind no worker runs, must not keep
        every work cancelled behind it in memory)."""
        queue, stale = self._queues[key], self._stale.get(key, 0)
        if stale > len(queue) - stale + 64:
            self._queues[key] = deque(e for e in queue if e.ticket >= 0)
            self._stale.pop(key, None)

    def _front(self, kind: str, priority: int) -> Entry | None:
        """The oldest queued entry of a kind and priority, dropping stale ones
        before it (and the queue, once empty)."""
        key = (kind, priority)
        queue = self._queues.get(key)
        while queue:
            if queue[0].ticket >= 0:
                return queue[0]
            queue.popleft()
            self._stale[key] = self._stale.get(key, 1) - 1
        if queue is not None:
            del self._queues[key]
            self._stale.pop(key, None)
            levels = self._levels[kind]
            levels.remove(-priority)
            if not levels:
                del self._levels[kind]
        return None

    def _next(self, kind: str) -> Entry | None:
        """The entry of a kind to hand out next: the oldest of its highest priority."""
        levels = self._levels.get(kind)
        while levels:
            head = self._front(kind, -levels[0])
            if head is not None:
                return head
            levels = self._levels.get(kind)
        return None

    def oldest(self, kinds: Iterable[str], held_back: Container[str] = ()) -> Entry | None:
        """The next pending work of one of `kinds` (but those `held_back`):
        the highest priority, the oldest within it."""
        best = None
        for kind in kinds:
            if kind in held_back:
                continue
            head = self._next(kind)
            if head is not None and (best is None or head.priority > best.priority
                                     or (head.priority == best.priority and head.ticket < best.ticket)):
                best = head
        return best

    def counts(self) -> dict[str, int]:
        """Pending works per kind."""
        return dict(self._count_by_kind)

    @property
    def next_ticket(self) -> int:
        return self._next_ticket

    def oldest_ticket(self) -> int | None:
        """The ticket of the work queued longest ago (None: none is pending);
        costs one step per kind and priority."""
        heads = [self._front(kind, priority) for kind, priority in list(self._queues)]
        return min((h.ticket for h in heads if h is not None), default=None)


class Schedule:
    """Works waiting for their time (ready_at, Unix seconds): a dict and a
    heap, so that finding the due ones costs in proportion to them, not to
    all that wait. Heap items of works no longer scheduled (or scheduled
    again for another time) are dropped lazily when they reach the top."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._heap: list[tuple[float, int, Entry]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, work_id: object) -> bool:
        return work_id in self._entries

    def get(self, work_id: str) -> Entry | None:
        return self._entries.get(work_id)

    def values(self) -> Iterable[Entry]:
        return self._entries.values()

    def add(self, entry: Entry) -> None:
        self._entries[entry.work_id] = entry
        heapq.heappush(self._heap, (entry.ready_at, next(self._counter), entry))

    def pop(self, work_id: str) -> Entry | None:
        entry = self._entries.pop(work_id, None)
        if entry is not None and len(self._heap) > 2 * len(self._entries) + 64:
            # Items of works no longer scheduled wait for the top to be dropped: when
            # they outnumber the live ones (cancels of works due far ahead), rebuild.
            self._heap = [item for item in self._heap if self._live(item)]
            heapq.heapify(self._heap)
        return entry

    def _live(self, item: tuple[float, int, Entry]) -> bool:
        entry = item[2]
        return self._entries.get(entry.work_id) is entry and entry.ready_at == item[0]

    def next_time(self) -> float | None:
        """When the next scheduled work is due (None: none is scheduled)."""
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due(self, now: float, limit: int) -> list[str]:
        """Up to `limit` ids of works due at `now`, earliest first. They stay
        scheduled until WorksReady queues them (their heap items go now)."""
        heap, found = self._heap, dict[str, None]()
        while heap and len(found) < limit:
            item = heap[0]
            if not self._live(item):
                heapq.heappop(heap)
                continue
            if item[0] > now:
                break
            heapq.heappop(heap)
            found[item[2].work_id] = None
        return list(found)


class SnapshotCapture:
    """A state captured at a journal cut, serialized later in parts of
    `PART_ITEMS` entries or results: a snapshot message is the concatenation
    of its parts (repeated fields append; the header's scalars come first and
    parts leave them unset), so the master's loop serves calls between parts
    instead of stopping for the whole state."""

    PART_ITEMS = 1_000

    def __init__(self, header: journal_pb2.Snapshot, entries: list[Entry | tuple], results: list[work_pb2.WorkResult],
                 fingerprints: list[bytes]):
        self.header = header
        # (entry, in_progress, retryable_until_forgotten, then its changing fields), or the entry alone
        self.entries = entries
        self.results = results
        self.fingerprints = fingerprints

    def parts(self) -> Iterator[bytes]:
        yield self.header.SerializeToString()
        step = self.PART_ITEMS
        for first in range(0, len(self.entries), step):
            part = journal_pb2.Snapshot()
            add = part.entries.add
            for item in self.entries[first:first + step]:
                if isinstance(item, Entry):  # its changing fields were at their defaults: they stay so here
                    item.fill(add(fingerprint=item.digest or b"").work)
                    continue
                entry, in_progress, until, attempts, failures, hand_backs, error, token, owner, ready_at = item
                entry.fill(add(
                    attempts=attempts, failures=failures, error=error, in_progress=in_progress,
                    attempt_token=token, fingerprint=entry.digest or b"", ready_at=ready_at,
                    retryable_until_forgotten=until, hand_backs=hand_backs, worker_owner=owner).work)
            yield part.SerializeToString()
        for first in range(0, len(self.results), step):
            yield journal_pb2.Snapshot(results=self.results[first:first + step],
                                       fingerprints=self.fingerprints[first:first + step]).SerializeToString()

    def message(self) -> journal_pb2.Snapshot:
        return journal_pb2.Snapshot.FromString(b"".join(self.parts()))

    def counts(self) -> tuple[int, int]:
        """Entries and results held."""
        return len(self.entries), len(self.results)


class ImpossibleEvent(ValueError):
    """An event that cannot apply to this state (raised only when strict)."""


class WorkState:
    def __init__(self, strict: bool = False, payloads_apart: bool = False) -> None:
        self.strict = strict
        self.payloads_apart = payloads_apart  # the journal keeps payloads: entries hold none
        self.pending = PendingQueue()
        self.scheduled = Schedule()  # waiting for their time: delayed, or backing off between attempts
        self.in_progress: dict[str, Entry] = {}
        self.finished: dict[str, work_pb2.WorkResult] = {}  # by work id
        self.results: OrderedDict[int, work_pb2.WorkResult] = OrderedDict()  # by sequence
        self.fingerprints: dict[str, bytes] = {}  # of finished works, to tell a resubmission from a conflict
        # FAILED and CANCELLED works, kept to be retried (RetryWork) until
        # their result (this sequence) is forgotten; their bytes count as the result's
        self.retryable: dict[str, tuple[int, Entry]] = {}
        self.next_sequence = 1
        self.forgotten_up_to = 0  # results up to here left the retention window
        self.done_count = 0
        self.failed_count = 0
        self.cancelled_count = 0
        self.unfinished_bytes = 0  # held by pending and in-progress works
        self.result_bytes = 0  # held by retained results
        # Moving slots away (the source of a move): its pending and scheduled
        # works wait in `held` (not handed out) until the target has them.
        self.leaving: journal_pb2.MoveStarted | None = None
        self.held: dict[str, Entry] = {}
        self.last_released = ""  # the last move away whose works were released
        # Moving slots here (the target): how far each move's import got (by
        # work id), and the sequences of imported results (not published again).
        self.imports: OrderedDict[str, str] = OrderedDict()
        self.imported: set[int] = set()
        # Results of slots moved away: still in the stream, no longer any work's status here.
        self.disowned: set[int] = set()
        self._handlers = {
            "work_accepted": self._on_work_accepted,
            "work_started": self._on_work_started,
            "work_completed": self._on_work_completed,
            "worker_failed": self._on_worker_failed,
            "worker_timed_out": self._on_worker_timed_out,
            "work_returned": self._on_work_returned,
            "work_in_progress_reset": self._on_work_in_progress_reset,
            "results_forgotten": self._on_results_forgotten,
            "work_cancelled": self._on_work_cancelled,
            "works_ready": self._on_works_ready,
            "work_retried": self._on_work_retried,
            "move_started": self._on_move_started,
            "works_imported": self._on_works_imported,
            "move_released": self._on_move_released,
        }

    # --- queries -----------------------------------------------------------

    @property
    def last_sequence(self) -> int:
        return self.next_sequence - 1

    def is_known(self, work_id: str) -> bool:
        return (work_id in self.pending or work_id in self.in_progress or work_id in self.scheduled
                or work_id in self.finished or work_id in self.held)

    def conflicts(self, work: work_pb2.Work) -> bool:
        """Whether a known id was accepted with a different kind or payload."""
        known = self.unfinished(work.work_id)
        if known is not None:
            return not known.same_job(work)
        stored = self.fingerprints.get(work.work_id)
        return stored is not None and stored != fingerprint(work.kind, work.payload)

    def unfinished(self, work_id: str) -> Entry | None:
        """The entry of a pending, scheduled or in-progress work."""
        return (self.pending.get(work_id) or self.in_progress.get(work_id) or self.scheduled.get(work_id)
                or self.held.get(work_id))

    def leaves(self, work_id: str) -> bool:
        """Whether the work's slot is moving away from this shard."""
        leaving = self.leaving
        return leaving is not None and leaving.first_slot <= slot_of(work_id) <= leaving.last_slot

    def _queue(self, entry: Entry, fresh: bool = False) -> None:
        """Queues a work (a fresh entry: one never queued), or schedules it if
        it has a time; holds it apart if its slot is moving away."""
        if self.leaving is not None and self.leaves(entry.work_id):
            entry.ticket = STALE
            self.held[entry.work_id] = entry
        elif entry.ready_at:
            self.scheduled.add(entry)
        elif fresh:
            self.pending.push_new(entry)
        else:
            self.pending.push(entry)

    def head(self) -> str | None:
        """The id of the oldest pending work."""
        return next(iter(self.pending), None)

    def status(self, work_id: str) -> work_pb2.WorkStatus | None:
        result = self.finished.get(work_id)
        if result is not None:
            return work_pb2.WorkStatus(
                work_id=work_id, kind=result.kind, state=result.state, attempts=result.attempts,
                result=result.result, error=result.error, sequence=result.sequence,
                content_type=result.content_type,
            )
        entry = self.unfinished(work_id)
        if entry is None:
            return None
        state = work_pb2.IN_PROGRESS if work_id in self.in_progress else \
            work_pb2.SCHEDULED if entry.ready_at else work_pb2.PENDING
        return work_pb2.WorkStatus(
            work_id=work_id, kind=entry.kind, state=state, attempts=entry.attempts, error=entry.error,
            priority=entry.priority, not_before=entry.ready_at,
        )

    def results_after(self, sequence: int, limit: int, max_bytes: int = 1 << 62) -> list[work_pb2.WorkResult]:
        """Up to `limit` retained results with a sequence number above
        `sequence`, within `max_bytes` (but at least one)."""
        first = max(sequence + 1, self.forgotten_up_to + 1)
        last = min(self.last_sequence, first + limit - 1)
        batch: list[work_pb2.WorkResult] = []
        size = 0
        imported = self.imported
        for s in range(first, last + 1):
            result = self.results.get(s)
            if result is None or (imported and s in imported):  # an imported one was published by its source
                continue
            size += result.ByteSize() + 8
            if batch and size > max_bytes:
                break
            batch.append(result)
        return batch

    # --- events ------------------------------------------------------------

    def apply(self, event: journal_pb2.Event) -> work_pb2.WorkResult | None:
        """Applies one event; returns the result it finished, if any."""
        kind = event.WhichOneof("event")
        handler = self._handlers.get(kind)
        if handler is None:
            raise ValueError(f"unknown journal event {kind!r}")
        return handler(getattr(event, kind))

    def _impossible(self, what: str) -> None:
        if self.strict:
            raise ImpossibleEvent(what)

    def _on_work_accepted(self, e: journal_pb2.WorkAccepted) -> None:
        work = e.work
        if self.is_known(work.work_id):
            return self._impossible(f"{work.work_id!r} accepted twice")
        entry = Entry.of(work, not self.payloads_apart, e.fingerprint)
        self._queue(entry, fresh=True)
        self.unfinished_bytes += entry.size

    def _on_work_started(self, e: journal_pb2.WorkStarted) -> None:
        self.start(e.work_id, e.attempt_token, e.worker_owner)

    def start(self, work_id: str, token: int, owner: str = "") -> None:
        """What WorkStarted does (the master applies it while building the event)."""
        entry = self.pending.pop(work_id)
        if entry is None:
            return self._impossible(f"{work_id!r} started but not pending")
        entry.attempts += 1
        entry.token = token
        entry.owner = sys.intern(owner)
        self.in_progress[work_id] = entry

    def _on_work_completed(self, e: journal_pb2.WorkCompleted) -> work_pb2.WorkResult | None:
        # A late completion of work that was re-queued (after a failover or a
        # timeout) still counts if it is about the latest attempt: the work
        # was done, once.
        work_id, token = e.work_id, e.attempt_token
        entry = self.in_progress.get(work_id)
        if entry is not None and _same_attempt(entry, token):
            del self.in_progress[work_id]
        else:  # re-queued, or scheduled to be retried (or held by a move: see Master.report)
            queue: PendingQueue | Schedule | dict[str, Entry] = \
                self.pending if work_id in self.pending else self.held if work_id in self.held else self.scheduled
            entry = queue.get(work_id)
            if entry is None or not _same_attempt(entry, token):
                self._impossible(f"{work_id!r} completed, but not by its latest attempt")
                return None
            queue.pop(work_id)
        if self.payloads_apart and e.sequence and e.sequence != self.next_sequence:
            self._impossible(f"{work_id!r} completed as result {e.sequence}, but the next is {self.next_sequence}")
        self.done_count += 1
        # Kept apart too: the result's bytes are the journal's to serve.
        return self._finish(entry, work_pb2.DONE, result=b"" if self.payloads_apart else e.result,
                            content_type=e.content_type)

    def _on_worker_failed(self, e: journal_pb2.WorkerFailed) -> work_pb2.WorkResult | None:
        return self._fail_attempt(e.work_id, e.error, e.attempt_token, e.retry_at, e.permanent)

    def _on_worker_timed_out(self, e: journal_pb2.WorkerTimedOut) -> work_pb2.WorkResult | None:
        return self._fail_attempt(e.work_id, TIMED_OUT_ERROR, e.attempt_token, e.retry_at)

    def _on_work_cancelled(self, e: journal_pb2.WorkCancelled) -> work_pb2.WorkResult | None:
        work_id = e.work_id
        entry = (self.pending.pop(work_id) or self.scheduled.pop(work_id) or self.in_progress.pop(work_id, None)
                 or self.held.pop(work_id, None))
        if entry is None:
            self._impossible(f"{work_id!r} cancelled, but not pending, scheduled or in progress")
            return None
        self.cancelled_count += 1
        return self._finish(entry, work_pb2.CANCELLED, error=CANCELLED_ERROR)

    def _on_work_retried(self, e: journal_pb2.WorkRetried) -> None:
        kept = self.retryable.pop(e.work_id, None)
        if kept is None:
            return self._impossible(f"{e.work_id!r} retried, but not FAILED or CANCELLED within the retention window")
        _sequence, entry = kept
        del self.finished[e.work_id]  # its result stays in the stream; a new one comes when it finishes again
        self.result_bytes -= entry.size
        self.unfinished_bytes += entry.size
        entry.attempts = entry.failures = entry.hand_backs = 0
        entry.error, entry.ready_at = "", 0.0
        entry.token = 0  # no earlier attempt's report counts (0 matches no report: reports carry a token)
        self._queue(entry)

    def _on_works_ready(self, e: journal_pb2.WorksReady) -> None:
        for work_id in e.work_ids:
            entry = self.scheduled.pop(work_id)
            if entry is None:
                self._impossible(f"{work_id!r} ready, but not scheduled")
                continue
            entry.ready_at = 0.0
            self._queue(entry)

    def _on_work_returned(self, e: journal_pb2.WorkReturned) -> None:
        entry = self.in_progress.get(e.work_id)
        if entry is None or not _same_attempt(entry, e.attempt_token):
            return self._impossible(f"{e.work_id!r} returned, but not by its running attempt")
        del self.in_progress[e.work_id]
        entry.hand_backs += e.by_worker
        self._queue(entry)

    def _on_work_in_progress_reset(self, _e: journal_pb2.WorkInProgressReset) -> None:
        # Each keeps its latest attempt's token: that attempt may still report.
        for entry in self.in_progress.values():
            self._queue(entry)
        self.in_progress.clear()

    def _on_results_forgotten(self, e: journal_pb2.ResultsForgotten) -> None:
        while self.results:
            sequence, result = next(iter(self.results.items()))
            if sequence > e.up_to_sequence:
                break
            del self.results[sequence]
            self.imported.discard(sequence)
            self.disowned.discard(sequence)
            self.result_bytes -= result.ByteSize()
            work_id = result.work_id
            kept = self.retryable.get(work_id)
            if kept is not None and kept[0] == sequence:
                del self.retryable[work_id]
                self.result_bytes -= kept[1].size
            current = self.finished.get(work_id)
            if current is None or current.sequence == sequence:  # not a later result of the work, retried
                self.finished.pop(work_id, None)
                if self.unfinished(work_id) is None:
                    self.fingerprints.pop(work_id, None)
        self.forgotten_up_to = max(self.forgotten_up_to, e.up_to_sequence)

    def _on_move_started(self, e: journal_pb2.MoveStarted) -> None:
        if self.leaving is not None:
            if self.leaving.move_key != e.move_key:
                self._impossible(f"move {e.move_key} started while {self.leaving.move_key} is under way")
            return
        self.leaving = journal_pb2.MoveStarted()
        self.leaving.CopyFrom(e)
        for entry in [*(p for p in self.pending.entries() if self.leaves(p.work_id)),
                      *(s for s in self.scheduled.values() if self.leaves(s.work_id))]:
            (self.pending if entry.work_id in self.pending else self.scheduled).pop(entry.work_id)
            self._queue(entry)

    def _on_works_imported(self, e: journal_pb2.WorksImported) -> None:
        """Takes the works of moving slots as their source had them; those up
        to the move's cursor came before (a part sent again) and are skipped."""
        cursor = self.imports.get(e.move_key, "")
        for result, print_ in zip(e.results, e.result_fingerprints):
            # A result kept here from before its slot left is older than the source's: replaced.
            if result.work_id <= cursor or self.unfinished(result.work_id) is not None:
                continue
            if result.sequence and result.sequence != self.next_sequence:
                self._impossible(f"{result.work_id!r} imported as result {result.sequence}, "
                                 f"but the next is {self.next_sequence}")
            result.sequence = self.next_sequence  # the event is journaled with it (and replays the same)
            self.next_sequence += 1
            kept = work_pb2.WorkResult()
            kept.CopyFrom(result)
            if self.payloads_apart and kept.state == work_pb2.DONE:
                kept.ClearField("result")  # the journal keeps it, as its own results
            self.results[kept.sequence] = kept
            self.finished[kept.work_id] = kept
            self.fingerprints[kept.work_id] = print_
            self.imported.add(kept.sequence)
            self.result_bytes += kept.ByteSize()
        for e_ in e.entries:
            work_id = e_.work.work_id
            if work_id <= cursor or self.unfinished(work_id) is not None:
                continue
            entry = _restored(e_, self.payloads_apart)
            finished = self.finished.get(work_id)
            if e_.retryable_until_forgotten:
                if finished is None or work_id in self.retryable:
                    self._impossible(f"{work_id!r} imported to be retried, without its result")
                    continue
                self.retryable[work_id] = (finished.sequence, entry)
                self.result_bytes += entry.size
                continue
            if finished is not None:  # an older result of it, kept here: the work lives again
                del self.finished[work_id]
            self.unfinished_bytes += entry.size
            self._queue(entry, fresh=True)
        if e.last_id > cursor:
            self.imports[e.move_key] = e.last_id
            self.imports.move_to_end(e.move_key)
            while len(self.imports) > MAX_IMPORT_CURSORS:
                self.imports.popitem(last=False)

    def _on_move_released(self, e: journal_pb2.MoveReleased) -> None:
        if self.leaving is None or self.leaving.move_key != e.move_key:
            return self._impossible(f"works of move {e.move_key} released, but it is not under way")
        for work_id in e.work_ids:
            entry = self.held.pop(work_id, None)
            if entry is not None:
                self.unfinished_bytes -= entry.size
                continue
            kept = self.retryable.get(work_id)
            if kept is not None and self.leaves(work_id):
                del self.retryable[work_id]
                self.result_bytes -= kept[1].size
        if e.done:
            for work_id in [w for w in self.finished if self.leaves(w)]:
                self.disowned.add(self.finished.pop(work_id).sequence)
                self.fingerprints.pop(work_id, None)
            self.leaving, self.last_released = None, e.move_key
            for entry in list(self.held.values()):  # none, unless the source took works after it copied
                self._impossible(f"{entry.work_id!r} held by a move, but not released")
                self._queue(entry)
            self.held.clear()

    def _fail_attempt(self, work_id: str, error: str, token: int, retry_at: float = 0.0,
                      permanent: bool = False) -> work_pb2.WorkResult | None:
        entry = self.in_progress.get(work_id)
        if entry is None or not _same_attempt(entry, token):
            self._impossible(f"{work_id!r} failed, but not by its running attempt")
            return None
        del self.in_progress[work_id]
        entry.failures += 1
        entry.error = error
        if permanent or entry.failures >= entry.max_attempts:
            self.failed_count += 1
            return self._finish(entry, work_pb2.FAILED, error=error)
        entry.ready_at = retry_at
        self._queue(entry)
        return None

    def _finish(self, entry: Entry, state: int, result: bytes = b"", error: str = "",
                content_type: str = "") -> work_pb2.WorkResult:
        finished = work_pb2.WorkResult(
            sequence=self.next_sequence, work_id=entry.work_id, state=state,
            result=result, error=error, kind=entry.kind, attempts=entry.attempts, content_type=content_type,
        )
        self.next_sequence += 1
        self.unfinished_bytes -= entry.size
        self.result_bytes += finished.ByteSize()
        self.finished[finished.work_id] = finished
        self.results[finished.sequence] = finished
        self.fingerprints[finished.work_id] = entry.fingerprint()
        if state != work_pb2.DONE:
            self.retryable[entry.work_id] = (finished.sequence, entry)
            self.result_bytes += entry.size
        return finished

    # --- snapshots ---------------------------------------------------------

    def to_snapshot(self) -> journal_pb2.Snapshot:
        return self.capture().message()

    def capture(self) -> SnapshotCapture:
        """The state as it is now, taken in one pass that copies references
        and the few fields that change (a fraction of building the snapshot)."""
        header = journal_pb2.Snapshot(
            next_sequence=self.next_sequence, forgotten_up_to=self.forgotten_up_to,
            done_count=self.done_count, failed_count=self.failed_count, cancelled_count=self.cancelled_count,
            unfinished_bytes=self.unfinished_bytes, result_bytes=self.result_bytes,
            leaving=self.leaving, last_released=self.last_released,
            imports=[journal_pb2.ImportCursor(move_key=k, last_id=v) for k, v in self.imports.items()],
            imported_sequences=sorted(self.imported), disowned_sequences=sorted(self.disowned),
        )
        listed = itertools.chain(((False, 0, e) for e in self.pending.entries()),
                                 ((False, 0, e) for e in self.scheduled.values()),
                                 ((False, 0, e) for e in self.held.values()),
                                 ((True, 0, e) for e in self.in_progress.values()),
                                 ((False, until, e) for until, e in self.retryable.values()))
        # An entry whose changing fields are all at their defaults (most of a
        # backlog) is captured as itself: a list slot, not a tuple of them.
        entries = [e if not (in_progress or until or e.ready_at or e.extra is not None)
                   else (e, in_progress, until, e.attempts, e.failures, e.hand_backs, e.error, e.token, e.owner,
                         e.ready_at) for in_progress, until, e in listed]
        results = list(self.results.values())  # results never change once made
        return SnapshotCapture(header, entries, results, [self.fingerprints.get(r.work_id, b"") for r in results])

    @classmethod
    def from_snapshot(cls, snapshot: journal_pb2.Snapshot, payloads_apart: bool = False) -> WorkState:
        state = cls(payloads_apart=payloads_apart)
        state.next_sequence = snapshot.next_sequence
        state.forgotten_up_to = snapshot.forgotten_up_to
        state.done_count = snapshot.done_count
        state.failed_count = snapshot.failed_count
        state.cancelled_count = snapshot.cancelled_count
        if snapshot.HasField("leaving"):
            state.leaving = snapshot.leaving
        state.last_released = snapshot.last_released
        state.imports.update((c.move_key, c.last_id) for c in snapshot.imports)
        state.imported.update(snapshot.imported_sequences)
        state.disowned.update(snapshot.disowned_sequences)
        pending = []
        for e in snapshot.entries:
            entry = _restored(e, payloads_apart)
            if e.retryable_until_forgotten:
                state.retryable[entry.work_id] = (e.retryable_until_forgotten, entry)
            elif e.in_progress:
                state.in_progress[entry.work_id] = entry
            elif entry.ready_at or (state.leaving is not None and state.leaves(entry.work_id)):
                state._queue(entry)
            else:
                pending.append(entry)
        state.pending.extend(pending)
        # Snapshots written before byte totals existed carry none: count them.
        state.unfinished_bytes = snapshot.unfinished_bytes or sum(
            e.size for e in (*pending, *state.in_progress.values(), *state.scheduled.values(), *state.held.values()))
        state.result_bytes = snapshot.result_bytes or sum(r.ByteSize() for r in snapshot.results)
        for result, print_ in zip(snapshot.results, snapshot.fingerprints):
            state.results[result.sequence] = result
            if result.sequence in state.disowned:
                continue
            if state.unfinished(result.work_id) is None:  # else retried since: its result is to come
                state.finished[result.work_id] = result
            state.fingerprints[result.work_id] = print_
        return state


MAX_IMPORT_CURSORS = 64  # moves to this shard whose progress is kept (a part sent again after is skipped)


def recorded(entry: Entry, in_progress: bool = False, retryable_until: int = 0) -> journal_pb2.SnapshotEntry:
    """What a snapshot (or a move) records of an entry."""
    e = journal_pb2.SnapshotEntry(
        attempts=entry.attempts, failures=entry.failures, error=entry.error, in_progress=in_progress,
        attempt_token=entry.token, fingerprint=entry.digest or b"", ready_at=entry.ready_at,
        retryable_until_forgotten=retryable_until, hand_backs=entry.hand_backs, worker_owner=entry.owner)
    entry.fill(e.work)
    return e


def _restored(e: journal_pb2.SnapshotEntry, payloads_apart: bool) -> Entry:
    """The entry a snapshot (or a move) recorded."""
    entry = Entry.of(e.work, not payloads_apart, e.fingerprint)
    entry.attempts, entry.failures, entry.token = e.attempts, e.failures, e.attempt_token
    entry.ready_at = e.ready_at or 0.0
    if e.error or e.hand_backs or e.worker_owner:  # most have none: no Extra made, no property called
        entry.error, entry.hand_backs, entry.owner = e.error, e.hand_backs, sys.intern(e.worker_owner)
    return entry


def _same_attempt(entry: Entry, token: int) -> bool:
    """Whether an event is about the entry's latest attempt (events written
    before tokens existed carry 0 and are about whichever attempt)."""
    return token == 0 or token == entry.token
