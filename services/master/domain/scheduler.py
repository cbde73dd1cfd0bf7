"""The scheduler: worker slots, the kinds they run, their credits, and which
slot holds which attempts. It is the one owner of "who runs what" on the
master (WorkState only knows each work's latest attempt token). Not event
sourced: workers re-register periodically, so a new master learns them again.

A slot is named by its worker id within its worker's identity (when the
master checks identities): two identities' slots never collide, so no
identity can take over another's slot, even on a new master that has not
met either yet. It belongs to the stream its process opened, runs the kinds its process
declared, and holds up to `capacity` attempts: the one it runs and those
prefetched behind it (its process declares how many), which it runs in the
order they were handed out. Only the running attempt has a deadline; the
next one's clock starts when the slot reports the one before it. Slots with
room that asked for work hold a credit and wait, grouped by the kinds they
run, so that handing out work costs one step per group, not per slot.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from dworkers.master.domain.effects import Connection


@dataclass(slots=True)
class Held:
    """An attempt a slot holds."""
    work_id: str
    token: int
    timeout: float  # seconds it may run once it runs (or go without a heartbeat, if it has a lease)
    progress: float | None = None  # what its job last said (ctx.heartbeat), while it runs
    details: str = ""


@dataclass(slots=True)
class Slot:
    worker_id: str
    connection: Connection  # the stream the slot's process opened
    host: str
    kinds: frozenset[str]
    last_seen: float
    capacity: int = 1  # attempts it may hold: the one it runs and those prefetched
    held: deque[Held] = field(default_factory=deque)  # the first one runs
    deadline: float = 0.0  # when the attempt it runs times out
    owner: str = ""  # its worker's identity ("" when identities are not checked)

    @property
    def key(self) -> tuple[str, str]:
        return self.owner, self.worker_id

    @property
    def busy(self) -> bool:
        return bool(self.held)

    @property
    def has_room(self) -> bool:
        return len(self.held) < self.capacity

    @property
    def work_id(self) -> str:
        """The work it runs; empty when idle."""
        return self.held[0].work_id if self.held else ""

    @property
    def token(self) -> int:
        """The token of the attempt it runs."""
        return self.held[0].token if self.held else 0


class Scheduler:
    def __init__(self) -> None:
        self.slots: dict[tuple[str, str], Slot] = {}  # by key: (owner, worker id)
        self.running: dict[int, Slot] = {}  # attempt token -> the slot holding it (running or prefetched)
        self.busy_count = 0  # slots holding at least one attempt
        self.kind_slots: Counter[str] = Counter()  # live slots per kind
        # slots with room per connection, so announcing work costs one step
        # per worker process, not per slot
        self._room: Counter = Counter()
        self.room_count = 0
        self._kinds_of: dict[object, frozenset[str]] = {}  # per connection
        # slots with room holding a request (credit), by the kinds they run
        self.waiting: dict[frozenset[str], OrderedDict[tuple[str, str], None]] = {}
        self.waiting_count = 0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def connection_count(self) -> int:
        """Worker processes (streams) with slots registered."""
        return len(self._kinds_of)

    def get(self, worker_id: str, owner: str = "") -> Slot | None:
        return self.slots.get((owner, worker_id))

    def on(self, connection, worker_id: str) -> Slot | None:
        """The slot `worker_id` if it is registered on `connection`."""
        slot = self.slots.get((owner_of(connection), worker_id))
        return slot if slot is not None and slot.connection is connection else None

    # --- slots come and go ---------------------------------------------------

    def register(self, connection, worker_ids: Iterable[str], host: str, kinds: frozenset[str],
                 now: float, capacity: int = 1, running: Iterable = ()) -> list[Slot]:
        """Registers slots (again); returns the slots that were dropped to
        make room for them (a slot that moved to another stream, or whose
        kinds or capacity changed). A new slot starts out holding what it
        still runs from an earlier stream (`running`: RunningAttempt)."""
        self._kinds_of[connection] = kinds
        owner = owner_of(connection)
        dropped = []
        for worker_id in worker_ids:
            slot = self.slots.get((owner, worker_id))
            if slot is not None and slot.connection is connection and slot.kinds == kinds \
                    and slot.capacity == capacity:
                slot.last_seen = now
                continue
            if slot is not None:
                dropped.append(self.drop(slot))
            slot = Slot(worker_id, connection, host, kinds, now, capacity, owner=owner)
            self.slots[slot.key] = slot
            self._more_room(connection)
            self.kind_slots.update(kinds)
            still = next((a for a in running if a.worker_id == worker_id), None)
            if still is not None and still.attempt_token not in self.running:
                self.start(slot, still.work_id, still.attempt_token, still.seconds_left, now)
        return dropped

    def drop(self, slot: Slot) -> Slot:
        """Forgets a slot (it keeps the attempts it held, for the caller to settle)."""
        del self.slots[slot.key]
        self.unwait(slot)
        self.kind_slots.subtract(slot.kinds)
        for kind in slot.kinds:
            if self.kind_slots[kind] <= 0:
                del self.kind_slots[kind]
        for held in slot.held:
            self.running.pop(held.token, None)
        if slot.busy:
            self.busy_count -= 1
        if slot.has_room:
            self._less_room(slot.connection)
        return slot

    def forget(self, connection) -> list[Slot]:
        """Drops every slot of a connection that ended; returns them."""
        dropped = [self.drop(s) for s in self.of_connection(connection)]
        self._kinds_of.pop(connection, None)
        return dropped

    # --- credits and attempts ------------------------------------------------

    def want(self, slot: Slot) -> None:
        """A slot with room asks for work: it keeps this credit until it is full."""
        if not slot.has_room:
            return
        queue = self.waiting.setdefault(slot.kinds, OrderedDict())
        if slot.key not in queue:
            queue[slot.key] = None
            self.waiting_count += 1

    def next_waiting(self, kinds: frozenset[str]) -> Slot:
        """Takes the slot of this group that asked first (it no longer waits)."""
        queue = self.waiting[kinds]
        key, _ = queue.popitem(last=False)
        self.waiting_count -= 1
        if not queue:
            del self.waiting[kinds]
        return self.slots[key]

    def unwait(self, slot: Slot) -> None:
        """The slot no longer holds a credit."""
        queue = self.waiting.get(slot.kinds)
        if queue is not None and slot.key in queue:
            del queue[slot.key]
            self.waiting_count -= 1
            if not queue:
                del self.waiting[slot.kinds]

    def start(self, slot: Slot, work_id: str, token: int, timeout: float, now: float) -> None:
        """The slot holds one more attempt (it runs it now if it was idle)."""
        if not slot.held:
            slot.deadline = now + timeout
            self.busy_count += 1
        slot.held.append(Held(work_id, token, timeout))
        self.running[token] = slot
        if not slot.has_room:
            self.unwait(slot)
            self._less_room(slot.connection)

    def heartbeat(self, slot: Slot, token: int, lease: float, now: float, progress: float | None,
                  details: str) -> bool:
        """The job of the attempt a slot runs is alive: its lease (if it has
        one) runs `lease` seconds from now, and its progress is noted."""
        if not slot.held or slot.held[0].token != token:
            return False
        running = slot.held[0]
        running.progress, running.details = progress, details
        if lease:
            slot.deadline = max(slot.deadline, now + lease)
        return True

    def finish(self, slot: Slot, token: int, now: float) -> bool:
        """The slot reported on the attempt `token`: it no longer holds it,
        and runs the next one it holds from now. False if it did not hold it."""
        held = slot.held
        if not held or self.running.get(token) is not slot:
            return False
        full = not slot.has_room
        if held[0].token == token:
            held.popleft()
            if held:
                slot.deadline = now + held[0].timeout
        else:  # a prefetched attempt it handed back before running it
            slot.held = deque(h for h in held if h.token != token)
        del self.running[token]
        if not slot.held:
            slot.deadline = 0.0
            self.busy_count -= 1
        if full:
            self._more_room(slot.connection)
        return True

    def _more_room(self, connection) -> None:
        self._room[connection] += 1
        self.room_count += 1

    def _less_room(self, connection) -> None:
        self.room_count -= 1
        self._room[connection] -= 1
        if self._room[connection] <= 0:
            del self._room[connection]

    # --- questions -----------------------------------------------------------

    def overdue(self, now: float) -> list[Slot]:
        """Busy slots whose running attempt is past its deadline."""
        found: dict[tuple[str, str], Slot] = {}
        for slot in self.running.values():
            if slot.deadline <= now:
                found[slot.key] = slot
        return list(found.values())

    def silent(self, now: float, timeout: float) -> list[Slot]:
        return [s for s in self.slots.values() if now - s.last_seen > timeout]

    def of_connection(self, connection) -> list[Slot]:
        return [s for s in self.slots.values() if s.connection is connection]

    def idle_connections(self) -> list[tuple[object, frozenset[str]]]:
        """The connections with at least one slot with room, with their kinds."""
        return [(c, self._kinds_of.get(c, frozenset())) for c in self._room]

    def idle_per_kind(self) -> Counter[str]:
        idle: Counter[str] = Counter()
        for slot in self.slots.values():
            if not slot.busy:
                idle.update(slot.kinds)
        return idle


def owner_of(connection) -> str:
    """The identity a connection's worker proved ("" when none is checked)."""
    return getattr(connection, "identity", "")
