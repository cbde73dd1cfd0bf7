"""The master's registry of worker slots. Not event sourced: workers
re-register periodically, so a new master learns them again."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(slots=True)
class Slot:
    worker_id: str
    connection: object  # the stream the slot's process opened
    host: str
    last_seen: float
    work_id: str = ""  # the work it runs; empty when idle
    deadline: float = 0.0  # when its work times out

    @property
    def busy(self) -> bool:
        return bool(self.work_id)


class WorkerRegistry:
    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        self.busy_count = 0
        # idle slots per connection, so announcing work costs one step per
        # worker process, not per slot
        self._idle = Counter()

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, worker_id: str) -> Slot | None:
        return self.slots.get(worker_id)

    def register(self, connection, worker_ids, host: str, now: float) -> None:
        for worker_id in worker_ids:
            slot = self.slots.get(worker_id)
            if slot is not None and slot.connection is connection:
                slot.last_seen = now
                continue
            if slot is not None:
                self.drop(worker_id)
            self.slots[worker_id] = Slot(worker_id, connection, host, now)
            self._idle[connection] += 1

    def start(self, slot: Slot, work_id: str, deadline: float) -> None:
        if not slot.busy:
            self.busy_count += 1
            self._less_idle(slot.connection)
        slot.work_id, slot.deadline = work_id, deadline

    def finish(self, slot: Slot) -> None:
        if slot.busy:
            self.busy_count -= 1
            self._idle[slot.connection] += 1
        slot.work_id, slot.deadline = "", 0.0

    def drop(self, worker_id: str) -> Slot | None:
        slot = self.slots.pop(worker_id, None)
        if slot is not None:
            if slot.busy:
                self.busy_count -= 1
            else:
                self._less_idle(slot.connection)
        return slot

    def _less_idle(self, connection) -> None:
        self._idle[connection] -= 1
        if self._idle[connection] <= 0:
            del self._idle[connection]

    def overdue(self, now: float) -> list[Slot]:
        return [s for s in self.slots.values() if s.busy and s.deadline <= now]

    def silent(self, now: float, timeout: float) -> list[Slot]:
        return [s for s in self.slots.values() if now - s.last_seen > timeout]

    def of_connection(self, connection) -> list[Slot]:
        return [s for s in self.slots.values() if s.connection is connection]

    def idle_connections(self):
        """The connections with at least one idle slot."""
        return self._idle.keys()
