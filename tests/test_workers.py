"""The master's worker registry (pure bookkeeping)."""

from services.master.workers import WorkerRegistry


def test_idle_connections_follow_slots_through_start_finish_and_drop():
    registry, a, b = WorkerRegistry(), object(), object()
    registry.register(a, ["a0", "a1"], "host-a", now=0.0)
    registry.register(b, ["b0"], "host-b", now=0.0)
    assert set(registry.idle_connections()) == {a, b}
    registry.start(registry.get("b0"), "w1", deadline=10.0)
    assert set(registry.idle_connections()) == {a} and registry.busy_count == 1
    registry.finish(registry.get("b0"))
    assert set(registry.idle_connections()) == {a, b} and registry.busy_count == 0
    registry.start(registry.get("a0"), "w2", deadline=5.0)
    registry.drop("a1")
    assert set(registry.idle_connections()) == {b}
    assert [s.worker_id for s in registry.overdue(now=6.0)] == ["a0"]
    registry.register(b, ["a0"], "host-b", now=1.0)  # the slot moved to another process
    assert registry.busy_count == 0 and registry.get("a0").connection is b
    assert set(registry.idle_connections()) == {b}


def test_silent_slots_are_found():
    registry, a = WorkerRegistry(), object()
    registry.register(a, ["a0", "a1"], "h", now=0.0)
    registry.register(a, ["a1"], "h", now=20.0)
    assert [s.worker_id for s in registry.silent(now=21.0, timeout=15.0)] == ["a0"]
