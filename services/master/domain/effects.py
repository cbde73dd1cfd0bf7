"""What a decision asks the shell to do once its events are durable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from dworkers.v1 import journal_pb2, master_pb2, work_pb2


class Connection(Protocol):
    """A worker process's stream, as the domain sees it."""

    identity: str  # the worker's proven identity ("" if none is checked): slot ids are its own

    def send(self, message: master_pb2.MasterMessage, size: int = 0) -> None: ...

    def close(self, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Send:
    """A message to a worker process's stream (hand-outs, acks, hints)."""

    connection: Connection
    message: master_pb2.MasterMessage
    size: int  # its size in bytes (an estimate a little above is fine)
    # Sent after the step's results reach their waiters: nothing but the
    # worker's memory of its reports waits on it (acks).
    after_results: bool = False


@dataclass(frozen=True, slots=True)
class DeclareKinds:
    """Kinds a worker declared: the catalog should know them."""

    kinds: frozenset[str]
    defaults: tuple = ()  # KindDefaults of those kinds (master_pb2)


@dataclass(frozen=True, slots=True)
class HandOut:
    """Assignments whose payloads the journal keeps: the shell reads the
    payloads, then sends the assignments (as `hand_outs` splits them)."""

    connection: Connection
    assignments: list[master_pb2.Assignment]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Ends a worker process's stream (it went silent): if it is still there,
    it reconnects and registers afresh, so its books and the master's agree."""

    connection: Connection
    reason: str


Effect = Send | DeclareKinds | HandOut | Disconnect


@dataclass(slots=True)
class Step:
    """What the decisions since the last step recorded: the events to journal
    (already applied to the state), the effects to perform once they are
    durable, and the results those events finished."""

    events: list[journal_pb2.Event] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)
    results: list[work_pb2.WorkResult] = field(default_factory=list)
    queue_waits: list[float] = field(default_factory=list)  # seconds each work handed out waited in the queue
    last_sequence: int = 0  # the state's last result sequence after these events
