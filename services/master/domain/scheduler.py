"""The scheduler: worker slots, the kinds they run, their credits, and which
slot runs which attempt. It is the one owner of "who runs what" on the
master (WorkState only knows each work's latest attempt token). Not event
sourced: workers re-register periodically, so a new master learns them again.

A slot belongs to the stream its process opened, runs the kinds its process
declared, and runs at most one attempt at a time. Idle slots that asked for
work hold a credit and wait, grouped by the kinds they run, so that handing
out work costs one step per group, not per slot.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from dworkers.master.domain.effects import Connection


@dataclass(slots=True)
class Slot:
    worker_id: str
    connection: Connection  # the stream the slot's process opened
    host: str
    kinds: frozenset[str]
    last_seen: float
    work_id: str = ""  # the work it runs; empty when idle
    token: int = 0  # the token of the attempt it runs
    deadline: float = 0.0  # when that attempt times out

    @property
    def busy(self) -> bool:
        return bool(self.work_id)


class Scheduler:
    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        self.running: dict[int, Slot] = {}  # attempt token -> the slot running it
        self.kind_slots: Counter[str] = Counter()  # live slots per kind
        # idle slots per connection, so announcing work costs one step per
        # worker process, not per slot
        self._idle: Counter = Counter()
        self._kinds_of: dict[object, frozenset[str]] = {}  # per connection
        # idle slots holding a request (credit), by the kinds they run
        self.waiting: dict[frozenset[str], OrderedDict[str, None]] = {}
        self.waiting_count = 0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def busy_count(self) -> int:
        return len(self.running)

    def get(self, worker_id: str) -> Slot | None:
        return self.slots.get(worker_id)

    def on(self, connection, worker_id: str) -> Slot | None:
        """The slot `worker_id` if it is registered on `connection`."""
        slot = self.slots.get(worker_id)
        return slot if slot is not None and slot.connection is connection else None

    # --- slots come and go ---------------------------------------------------

    def register(self, connection, worker_ids: Iterable[str], host: str, kinds: frozenset[str],
                 now: float) -> list[Slot]:
        """Registers slots (again); returns the slots new here and those that
        were dropped to make room for them (a slot that moved to another
        stream, or whose kinds changed)."""
        self._kinds_of[connection] = kinds
        dropped = []
        for worker_id in worker_ids:
            slot = self.slots.get(worker_id)
            if slot is not None and slot.connection is connection and slot.kinds == kinds:
                slot.last_seen = now
                continue
            if slot is not None:
                dropped.append(self.drop(worker_id))
            self.slots[worker_id] = Slot(worker_id, connection, host, kinds, now)
            self._idle[connection] += 1
            self.kind_slots.update(kinds)
        return dropped

    def drop(self, worker_id: str) -> Slot:
        """Forgets a slot (it keeps the attempt it ran, for the caller to settle)."""
        slot = self.slots.pop(worker_id)
        self._unwait(slot)
        self.kind_slots.subtract(slot.kinds)
        for kind in slot.kinds:
            if self.kind_slots[kind] <= 0:
                del self.kind_slots[kind]
        if slot.busy:
            self.running.pop(slot.token, None)
        else:
            self._less_idle(slot.connection)
        return slot

    def forget(self, connection) -> list[Slot]:
        """Drops every slot of a connection that ended; returns them."""
        dropped = [self.drop(s.worker_id) for s in self.of_connection(connection)]
        self._kinds_of.pop(connection, None)
        return dropped

    # --- credits and attempts ------------------------------------------------

    def want(self, slot: Slot) -> None:
        """An idle slot asks for work: it keeps this credit until it gets some."""
        if slot.busy:
            return
        queue = self.waiting.setdefault(slot.kinds, OrderedDict())
        if slot.worker_id not in queue:
            queue[slot.worker_id] = None
            self.waiting_count += 1

    def next_waiting(self, kinds: frozenset[str]) -> Slot:
        """Takes the slot of this group that asked first (it no longer waits)."""
        queue = self.waiting[kinds]
        worker_id, _ = queue.popitem(last=False)
        self.waiting_count -= 1
        if not queue:
            del self.waiting[kinds]
        return self.slots[worker_id]

    def _unwait(self, slot: Slot) -> None:
        queue = self.waiting.get(slot.kinds)
        if queue is not None and slot.worker_id in queue:
            del queue[slot.worker_id]
            self.waiting_count -= 1
            if not queue:
                del self.waiting[slot.kinds]

    def start(self, slot: Slot, work_id: str, token: int, deadline: float, waiting: bool = True) -> None:
        """The slot runs an attempt now; `waiting=False` if it holds no credit."""
        if waiting:
            self._unwait(slot)
        if slot.busy:
            self.running.pop(slot.token, None)
        else:
            self._less_idle(slot.connection)
        slot.work_id, slot.token, slot.deadline = work_id, token, deadline
        self.running[token] = slot

    def finish(self, slot: Slot) -> None:
        """The slot's attempt ended: it is idle again."""
        if slot.busy:
            self.running.pop(slot.token, None)
            self._idle[slot.connection] += 1
        slot.work_id, slot.token, slot.deadline = "", 0, 0.0

    def _less_idle(self, connection) -> None:
        self._idle[connection] -= 1
        if self._idle[connection] <= 0:
            del self._idle[connection]

    # --- questions -----------------------------------------------------------

    def overdue(self, now: float) -> list[Slot]:
        return [s for s in self.running.values() if s.deadline <= now]

    def silent(self, now: float, timeout: float) -> list[Slot]:
        return [s for s in self.slots.values() if now - s.last_seen > timeout]

    def of_connection(self, connection) -> list[Slot]:
        return [s for s in self.slots.values() if s.connection is connection]

    def idle_connections(self) -> list[tuple[object, frozenset[str]]]:
        """The connections with at least one idle slot, with their kinds."""
        return [(c, self._kinds_of.get(c, frozenset())) for c in self._idle]

    def idle_per_kind(self) -> Counter[str]:
        idle: Counter[str] = Counter()
        for slot in self.slots.values():
            if not slot.busy:
                idle.update(slot.kinds)
        return idle
