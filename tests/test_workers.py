"""The master's scheduler (pure bookkeeping), and the worker's own books."""

import pytest

from dworkers.master.domain.scheduler import Scheduler

pytestmark = pytest.mark.unit

SQUARE = frozenset({"square"})


def test_idle_connections_follow_slots_through_start_finish_and_drop():
    registry, a, b = Scheduler(), object(), object()
    registry.register(a, ["a0", "a1"], "host-a", SQUARE, now=0.0)
    registry.register(b, ["b0"], "host-b", SQUARE, now=0.0)
    assert {c for c, _ in registry.idle_connections()} == {a, b}
    registry.start(registry.get("b0"), "w1", token=7, timeout=10.0, now=0.0)
    assert {c for c, _ in registry.idle_connections()} == {a} and registry.busy_count == 1
    assert registry.finish(registry.get("b0"), 7, now=1.0)
    assert {c for c, _ in registry.idle_connections()} == {a, b} and registry.busy_count == 0
    registry.start(registry.get("a0"), "w2", token=8, timeout=5.0, now=0.0)
    registry.drop(registry.get("a1"))
    assert {c for c, _ in registry.idle_connections()} == {b}
    assert [s.worker_id for s in registry.overdue(now=6.0)] == ["a0"]
    registry.register(b, ["a0"], "host-b", SQUARE, now=1.0)  # the slot moved to another process
    assert registry.busy_count == 0 and registry.get("a0").connection is b
    assert {c for c, _ in registry.idle_connections()} == {b}


def test_a_slot_holds_works_ahead_up_to_its_capacity_and_runs_them_in_order():
    registry, a = Scheduler(), object()
    registry.register(a, ["a0"], "h", SQUARE, now=0.0, capacity=3)
    slot = registry.get("a0")
    registry.want(slot)
    for token in (1, 2):
        registry.start(slot, f"w{token}", token=token, timeout=10.0, now=0.0)
    assert slot.has_room and registry.waiting_count == 1 and registry.room_count == 1
    registry.start(slot, "w3", token=3, timeout=10.0, now=0.0)
    assert not slot.has_room and registry.waiting_count == 0 and registry.room_count == 0
    assert (slot.work_id, slot.deadline, registry.busy_count) == ("w1", 10.0, 1)
    assert not registry.finish(slot, 99, now=4.0)  # not an attempt it holds
    assert registry.finish(slot, 1, now=4.0)  # the next one runs from now
    assert (slot.work_id, slot.deadline, registry.room_count) == ("w2", 14.0, 1)
    assert registry.finish(slot, 3, now=5.0)  # handed back before it ran
    assert [h.work_id for h in slot.held] == ["w2"] and slot.deadline == 14.0
    assert [s.worker_id for s in registry.overdue(now=14.0)] == ["a0"]
    assert registry.finish(slot, 2, now=15.0)
    assert not slot.busy and registry.busy_count == 0 and not registry.running


def test_silent_slots_are_found():
    registry, a = Scheduler(), object()
    registry.register(a, ["a0", "a1"], "h", SQUARE, now=0.0)
    registry.register(a, ["a1"], "h", SQUARE, now=20.0)
    assert [s.worker_id for s in registry.silent(now=21.0, timeout=15.0)] == ["a0"]


def test_live_kinds_count_the_slots_that_run_them():
    registry, a, b = Scheduler(), object(), object()
    registry.register(a, ["a0", "a1"], "h", frozenset({"square", "blob"}), now=0.0)
    registry.register(b, ["b0"], "h", SQUARE, now=0.0)
    assert registry.kind_slots == {"square": 3, "blob": 2}
    registry.forget(a)
    assert registry.kind_slots == {"square": 1}
    registry.forget(b)
    assert not registry.kind_slots


def test_waiting_slots_are_grouped_by_kinds_and_served_in_order():
    registry, a, b = Scheduler(), object(), object()
    registry.register(a, ["a0", "a1"], "h", frozenset({"blob"}), now=0.0)
    registry.register(b, ["b0"], "h", SQUARE, now=0.0)
    for worker_id in ("a1", "b0", "a0"):
        registry.want(registry.get(worker_id))
    registry.want(registry.get("a1"))  # asking twice holds one credit
    assert registry.waiting_count == 3
    assert registry.next_waiting(frozenset({"blob"})).worker_id == "a1"
    registry.start(registry.get("a0"), "w", token=1, timeout=9.0, now=0.0)  # full: no longer waiting
    assert frozenset({"blob"}) not in registry.waiting and registry.waiting_count == 1
    registry.drop(registry.get("b0"))
    assert not registry.waiting and registry.waiting_count == 0


def test_an_ack_of_one_attempt_keeps_the_report_of_another_attempt_of_the_same_work():
    """The worker keys its unacked reports by attempt token, not by work id."""
    from prometheus_client import CollectorRegistry

    from dworkers.common.metrics import WorkerMetrics
    from dworkers.common.proxy import MasterProxy, StaticLocator
    from dworkers.v1 import master_pb2, work_pb2
    from dworkers.worker.executor import Outcome
    from dworkers.worker.worker import Worker, WorkerSettings

    worker = Worker(MasterProxy(StaticLocator(["127.0.0.1:1"])), WorkerSettings(concurrency=2),
                    WorkerMetrics(CollectorRegistry()))
    first, second = list(worker.slots.values())
    for slot, token in ((first, 11), (second, 22)):  # the same work, handed out twice
        slot.assignment = master_pb2.Assignment(worker_id=slot.worker_id, attempt_token=token,
                                                work=work_pb2.Work(work_id="same", kind="square"))
        worker._finished(slot, Outcome(True, result=b"r"))
    worker._handle(master_pb2.MasterMessage(ack=master_pb2.Ack(work_ids=["same"], attempt_tokens=[11])), 0)
    assert list(worker._unacked) == [22]


class _Stream:
    def __init__(self, identity: str) -> None:
        self.identity = identity


def test_slot_ids_are_named_within_their_worker_identity():
    """Another identity registering the same slot id gets a slot of its own:
    it neither takes over nor drops the first one's slot and attempts."""
    registry, owner, other = Scheduler(), _Stream("box-a"), _Stream("box-b")
    registry.register(owner, ["s0"], "host-a", SQUARE, now=0.0)
    registry.start(registry.on(owner, "s0"), "w1", token=7, timeout=10.0, now=0.0)
    dropped = registry.register(other, ["s0"], "host-b", SQUARE, now=1.0)
    assert dropped == [] and len(registry) == 2
    assert registry.on(other, "s0") is not registry.on(owner, "s0")
    assert not registry.on(other, "s0").busy and registry.on(owner, "s0").token == 7
    assert not registry.finish(registry.on(other, "s0"), 7, now=2.0)  # not its attempt
    assert registry.finish(registry.on(owner, "s0"), 7, now=2.0)
