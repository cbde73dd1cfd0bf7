"""Control over work in the master's decisions (one process, a fake clock in
which Unix time and the decisions' clock agree): priorities, delayed works,
back-off between attempts, permanent failures and cancels."""

from __future__ import annotations

import math
import random

import pytest

from dworkers.common import validation
from dworkers.common.errors import NotFound, WrongState
from dworkers.master.domain.effects import Send
from dworkers.master.domain.master import CoreSettings, Master, backoff_delay
from dworkers.master.domain.state import WorkState
from dworkers.v1 import master_pb2, work_pb2
from dworkers.worker import jobs
from dworkers.worker.executor import describe

pytestmark = pytest.mark.unit

NOW = 1_000.0
SETTINGS = CoreSettings(worker_timeout=1e6)  # slots stay while the test's clock jumps


class Connection:
    def __init__(self, identity: str = "") -> None:
        self.sent: list[master_pb2.MasterMessage] = []
        self.identity = identity

    def send(self, message, size=0):
        self.sent.append(message)

    def close(self, reason):
        pass


def work(work_id: str, priority: int = 0, not_before: float = 0.0, backoff=None, attempts: int = 3,
         kind: str = "square") -> work_pb2.Work:
    w = work_pb2.Work(work_id=work_id, kind=kind, payload=work_id.encode(), max_attempts=attempts,
                      priority=priority, not_before=not_before)
    if backoff:
        w.backoff.initial_seconds, w.backoff.multiplier, w.backoff.max_seconds = backoff
    return w


def master_with(works, strict: bool = True) -> Master:
    master = Master(WorkState(strict=strict), SETTINGS, rng=random.Random(7))
    master.submit(works, NOW)
    master.take()
    return master


def connect(master: Master, slots: int = 1, prefetch: int = 0, kinds=("square",)) -> Connection:
    connection = Connection()
    master.register(connection, master_pb2.RegisterWorker(
        worker_ids=[f"s{i}" for i in range(slots)], kinds=list(kinds), prefetch=prefetch), NOW)
    return connection


def handed(master: Master, connection: Connection, now: float = NOW, slots=("s0",)) -> list[master_pb2.Assignment]:
    """What the slots get when they ask now."""
    master.request_work(connection, list(slots), now)
    out = []
    for effect in master.take().effects:
        if isinstance(effect, Send) and effect.connection is connection and effect.message.HasField("works"):
            out += effect.message.works.assignments
    return out


def finish(master: Master, connection: Connection, a: master_pb2.Assignment, now: float = NOW, ok: bool = True,
           permanent: bool = False) -> None:
    if ok:
        master.report(connection, [master_pb2.Completion(worker_id=a.worker_id, work_id=a.work.work_id,
                                                         attempt_token=a.attempt_token, result=b"r")], [], now)
    else:
        master.report(connection, [], [master_pb2.Failure(worker_id=a.worker_id, work_id=a.work.work_id,
                                                          attempt_token=a.attempt_token, error="boom",
                                                          permanent=permanent)], now)
    master.take()


# --- priorities ------------------------------------------------------------------


def test_higher_priority_first_and_fifo_within_a_priority_across_kinds():
    master = master_with([work("low1", -1), work("mid1"), work("high1", 5), work("mid2"), work("high2", 5),
                          work("blob", 5, kind="blob"), work("low2", -1)])
    connection = connect(master, kinds=("square", "blob"))
    order = []
    for _ in range(7):
        (a,) = handed(master, connection)
        order.append(a.work.work_id)
        finish(master, connection, a)
    assert order == ["high1", "high2", "blob", "mid1", "mid2", "low1", "low2"]


def test_priority_order_survives_a_snapshot_and_a_requeue():
    master = master_with([work("a"), work("b", 3), work("c"), work("d", 3)])
    connection = connect(master)
    (first,) = handed(master, connection)
    assert first.work.work_id == "b"
    finish(master, connection, first, ok=False)  # b goes back, behind d within priority 3
    state = WorkState.from_snapshot(master.state.to_snapshot())
    again = Master(state, CoreSettings())
    again_connection = connect(again)
    order = []
    for _ in range(4):
        (a,) = handed(again, again_connection)
        order.append(a.work.work_id)
        finish(again, again_connection, a)
    assert order == ["d", "b", "a", "c"]


def test_picking_the_next_work_does_not_walk_the_backlog():
    """A slot's pick looks at the head of each of its kinds' priorities, so
    100,000 pending works cost the same pick as 10 (counted, not timed)."""
    master = master_with([work(f"w{i}", priority=i % 10) for i in range(100_000)])
    queue = master.state.pending
    assert sum(len(levels) for levels in queue._levels.values()) == 10
    assert queue.oldest(["square"]).work_id == "w9"


# --- delayed works ---------------------------------------------------------------


def test_a_delayed_work_waits_scheduled_then_is_handed_out_on_time():
    master = master_with([work("later", not_before=NOW + 30), work("now")])
    connection = connect(master)
    status = master.status("later")
    assert status.state == work_pb2.SCHEDULED and status.not_before == NOW + 30
    assert master.counts()["scheduled"] == 1 and master.counts()["pending"] == 1
    (a,) = handed(master, connection)
    assert a.work.work_id == "now"  # the delayed one does not block the one behind it
    finish(master, connection, a)
    assert handed(master, connection) == []  # the slot keeps its credit
    assert master.next_due(NOW) == NOW + 30
    master.tick(NOW + 29.9, 0)
    assert not any(e.HasField("works_ready") for e in master.take().events)
    master.tick(NOW + 30, 0)
    step = master.take()
    assert [list(e.works_ready.work_ids) for e in step.events if e.HasField("works_ready")] == [["later"]]
    (late,) = [a for e in step.effects if isinstance(e, Send) and e.message.HasField("works")
               for a in e.message.works.assignments]
    assert late.work.work_id == "later"


def test_scheduled_works_survive_a_snapshot_and_a_replay():
    master = master_with([work("x", not_before=NOW + 10), work("y", not_before=NOW + 5)])
    state = WorkState.from_snapshot(master.state.to_snapshot())
    assert state.status("x").state == work_pb2.SCHEDULED and state.scheduled.next_time() == NOW + 5
    assert state.to_snapshot() == master.state.to_snapshot()
    again = Master(state, CoreSettings())
    again.tick(NOW + 11, 0)
    ready = [list(e.works_ready.work_ids) for e in again.take().events if e.HasField("works_ready")]
    assert ready == [["y", "x"]]  # earliest first


def test_only_the_due_works_are_looked_at():
    master = master_with([work(f"w{i}", not_before=NOW + 100 + i) for i in range(10_000)]
                         + [work("soon", not_before=NOW + 1)])
    assert master.state.scheduled.due(NOW + 2, 100) == ["soon"]


# --- back-off and permanent failures ---------------------------------------------------


def test_backoff_grows_by_its_multiplier_within_its_cap_with_jitter_in_the_upper_half():
    assert [backoff_delay((2.0, 3.0, 0.0), n, 1.0) for n in (1, 2, 3)] == [2.0, 6.0, 18.0]
    assert backoff_delay((2.0, 3.0, 10.0), 3, 1.0) == 10.0
    assert backoff_delay((2.0, 3.0, 10.0), 3, 0.0) == 5.0
    assert math.isfinite(backoff_delay((1.0, 100.0, 0.0), 100, 0.5))


def test_a_failed_attempt_waits_its_backoff_before_the_retry():
    master = master_with([work("f", backoff=(4.0, 2.0, 0.0), attempts=3)])
    connection = connect(master)
    (a,) = handed(master, connection)
    finish(master, connection, a, now=NOW + 1, ok=False)
    status = master.status("f")
    assert status.state == work_pb2.SCHEDULED
    assert NOW + 1 + 2.0 <= status.not_before <= NOW + 1 + 4.0
    assert handed(master, connection, now=NOW + 1.5) == []
    master.tick(status.not_before, 0)
    (b,) = [a for e in master.take().effects if isinstance(e, Send) and e.message.HasField("works")
            for a in e.message.works.assignments]
    assert b.attempt == 2
    finish(master, connection, b, now=status.not_before, ok=False)
    assert handed(master, connection, now=status.not_before) == []  # it asks, and keeps its credit
    second = master.status("f")
    assert status.not_before + 4.0 <= second.not_before <= status.not_before + 8.0  # doubled
    master.tick(second.not_before, 0)
    (c,) = [a for e in master.take().effects if isinstance(e, Send) and e.message.HasField("works")
            for a in e.message.works.assignments]
    finish(master, connection, c, now=second.not_before, ok=False)
    assert master.status("f").state == work_pb2.FAILED  # the last attempt waits for nothing


def test_a_permanent_failure_ends_the_work_whatever_attempts_are_left():
    master = master_with([work("p", attempts=5, backoff=(1.0, 2.0, 0.0))])
    connection = connect(master)
    (a,) = handed(master, connection)
    finish(master, connection, a, ok=False, permanent=True)
    status = master.status("p")
    assert status.state == work_pb2.FAILED and status.attempts == 1 and status.error == "boom"


def test_jobs_say_which_errors_are_worth_retrying():
    plain = jobs.Job("k", lambda: None)
    assert plain.retries(ValueError()) and not plain.retries(jobs.Permanent("no"))
    narrow = jobs.Job("k", lambda: None, retry_for=(ConnectionError,))
    assert narrow.retries(ConnectionResetError()) and not narrow.retries(ValueError())


def test_an_error_keeps_its_type_and_a_bounded_traceback():
    def deep(n):
        if n == 0:
            raise ValueError("x" * 10_000)
        deep(n - 1)

    try:
        deep(50)
    except ValueError as exc:
        text = describe(exc)
    first, rest = text.split("\n", 1)
    assert first.startswith("ValueError: xxx") and "(at " in first and len(first) < 1200
    assert "Traceback (innermost 8 of 52 frames)" in rest and "in deep" in rest
    assert len(text) < 4096


@pytest.mark.parametrize(("options", "message"), [
    ({"priority": 2000}, "priority 2000 is outside"),
    ({"delay_seconds": -1}, "delay_seconds must be between"),
    ({"delay_seconds": math.nan}, "delay_seconds must be between"),
    ({"delay_seconds": 5, "not_before": NOW + 5}, "not both"),
    ({"not_before": 1e13}, "Unix time in seconds"),
    ({"not_before": NOW + 400 * 86400}, "days ahead"),
    ({"backoff": work_pb2.Backoff(initial_seconds=1, multiplier=0.5)}, "multiplier"),
    ({"backoff": work_pb2.Backoff(initial_seconds=-1)}, "initial_seconds"),
    ({"backoff": work_pb2.Backoff(initial_seconds=1, max_seconds=math.inf)}, "max_seconds"),
])
def test_submissions_with_options_out_of_range_are_refused_with_a_reason(options, message):
    request = work_pb2.SubmitWorkRequest(work_id="a", kind="square", **options)
    with pytest.raises(validation.InvalidWork, match=message):
        validation.to_work(request, now=NOW)


def test_a_delay_becomes_a_unix_time_and_defaults_come_from_the_job():
    defaults = master_pb2.KindDefaults(kind="square", priority=7, backoff=work_pb2.Backoff(initial_seconds=2))
    got = validation.to_work(work_pb2.SubmitWorkRequest(kind="square", delay_seconds=30), defaults=lambda k: defaults,
                             now=NOW)
    assert got.not_before == NOW + 30 and got.priority == 7 and got.backoff.initial_seconds == 2
    explicit = validation.to_work(work_pb2.SubmitWorkRequest(kind="square", priority=0, not_before=NOW - 5),
                                  defaults=lambda k: defaults, now=NOW)
    assert explicit.priority == 0 and explicit.not_before == 0  # set to 0 on purpose; a past time is no delay


# --- cancel ----------------------------------------------------------------------------


def test_cancelling_pending_and_scheduled_works_ends_them_at_once():
    master = master_with([work("p"), work("s", not_before=NOW + 60)])
    statuses = master.cancel(["p", "s"], NOW)
    step = master.take()
    assert [s.state for s in statuses] == [work_pb2.CANCELLED] * 2
    assert [r.sequence for r in step.results] == [1, 2] and all(r.state == work_pb2.CANCELLED for r in step.results)
    assert master.counts()["cancelled"] == 2 and not master.state.pending and not master.state.scheduled
    assert master.state.scheduled.next_time() is None
    assert master.cancel(["p"], NOW)[0].state == work_pb2.CANCELLED  # again: fine, nothing recorded
    assert not master.take().events


def test_cancelling_a_running_work_tells_its_slot_and_frees_it():
    master = master_with([work("r"), work("next")])
    connection = connect(master, prefetch=1)
    running, ahead = handed(master, connection)
    master.cancel(["r"], NOW + 1)
    step = master.take()
    (stop,) = [e.message.cancel for e in step.effects if isinstance(e, Send) and e.message.HasField("cancel")]
    assert list(stop.attempt_tokens) == [running.attempt_token]
    slot = master.scheduler.get("s0")
    assert slot.token == ahead.attempt_token and slot.deadline == NOW + 1 + CoreSettings().work_timeout
    finish(master, connection, running)  # the killed job's late report: ignored
    assert master.status("r").state == work_pb2.CANCELLED and master.state.done_count == 0


def test_cancel_refuses_finished_and_unknown_works_and_then_cancels_nothing():
    master = master_with([work("done"), work("p")])
    connection = connect(master)
    (a,) = handed(master, connection)
    finish(master, connection, a)
    with pytest.raises(WrongState, match="'done': it already finished DONE"):
        master.cancel(["p", "done"], NOW)
    with pytest.raises(NotFound, match="'ghost'"):
        master.cancel(["p", "ghost"], NOW)
    assert not master.take().events and master.status("p").state == work_pb2.PENDING


# --- heartbeats --------------------------------------------------------------------------


def beat(master: Master, connection: Connection, a: master_pb2.Assignment, now: float, progress=None,
         details: str = "") -> None:
    heartbeat = master_pb2.Heartbeat(worker_id=a.worker_id, attempt_token=a.attempt_token, details=details)
    if progress is not None:
        heartbeat.progress = progress
    master.heartbeat(connection, [heartbeat], now)
    assert not master.take().events, "a heartbeat is not journaled"


def test_heartbeats_renew_a_lease_and_carry_progress_without_a_journal_write():
    leased = work("leased")
    leased.heartbeat_timeout, leased.timeout_seconds = 5.0, 2.0
    master = master_with([leased, work("plain")])
    connection = connect(master, slots=2)
    a, b = handed(master, connection, slots=("s0", "s1"))
    assert {a.work.work_id, b.work.work_id} == {"leased", "plain"}
    a, b = (a, b) if a.work.work_id == "leased" else (b, a)
    slot = master.scheduler.get(a.worker_id)
    assert slot.deadline == NOW + 5.0  # the lease, not the timeout
    for t in (4.0, 8.0, 12.0):
        beat(master, connection, a, NOW + t, progress=t / 20, details=f"at {t:g}")
    assert slot.deadline == NOW + 17.0
    status = master.status("leased")
    assert status.progress == 0.6 and status.progress_details == "at 12"
    other = master.scheduler.get(b.worker_id)
    beat(master, connection, b, NOW + 1.0)  # no lease: the timeout stands
    assert other.deadline == NOW + CoreSettings().work_timeout
    stale = master_pb2.Assignment(worker_id=a.worker_id, attempt_token=a.attempt_token + 1)
    beat(master, connection, stale, NOW + 13.0)  # another attempt's: ignored
    assert slot.deadline == NOW + 17.0
    master.tick(NOW + 16.9, 0)
    assert not master.take().events
    master.tick(NOW + 17.0, 0)
    assert [e.WhichOneof("event") for e in master.take().events] == ["worker_timed_out"]


def test_a_jobs_heartbeats_are_checked_and_thinned_out():
    sent = []
    ctx = jobs.Context("w", "k", 1, deadline=0.0, heartbeat_timeout=10.0, _beat=lambda p, d: sent.append((p, d)))
    with pytest.raises(ValueError, match="between 0 and 1"):
        ctx.heartbeat(progress=50)
    for i in range(100):
        ctx.heartbeat(progress=i / 100, details="x" * 5000)
    assert len(sent) == 1 and len(sent[0][1]) == 1024  # the rest came within 0.2 s
    assert ctx.remaining > 9  # renewed here too


# --- rate limits ---------------------------------------------------------------------------


def test_a_rate_limit_spaces_the_starts_of_its_kind_and_leaves_others_alone():
    limits = {"square": 5.0}
    master = Master(WorkState(strict=True), SETTINGS, rng=random.Random(1), rate_limits=limits)
    master.submit([work(f"q{i}") for i in range(40)] + [work(f"b{i}", kind="blob") for i in range(3)], NOW)
    master.take()
    connection = connect(master, slots=4, prefetch=16, kinds=("square", "blob"))
    slots = [f"s{i}" for i in range(4)]

    def started_now() -> int:
        return sum(len(e.message.works.assignments) for e in master.take().effects
                   if isinstance(e, Send) and e.message.HasField("works"))

    first = handed(master, connection, NOW, slots)
    assert sorted(a.work.kind for a in first) == ["blob", "blob", "blob", "square"]
    started = [NOW]
    while True:  # the master wakes when the next one may start
        t = master.next_due(started[-1])
        assert t is not None and t > started[-1]
        if t > NOW + 2.0 + 1e-6:
            break
        master.tick(t, 0)
        started += [t] * started_now()
    gaps = [b - a for a, b in zip(started, started[1:])]
    assert len(started) == 11 and all(g == pytest.approx(0.2) for g in gaps)  # 5 a second, evenly
    del limits["square"]  # the limit goes: the rest start at once
    master.announce(t)
    assert started_now() == 40 - 11
    assert master.next_due(t) is None


# --- listing ------------------------------------------------------------------------------


def page_all(master: Master, which: int, kind: str = "", size: int = 7, between=None) -> list[str]:
    ids, token = [], ""
    while True:
        statuses, token = master.list_works(which, kind, token, size)
        assert len(statuses) <= size and all(s.state == which for s in statuses)
        ids += [s.work_id for s in statuses]
        if not token:
            return ids
        if between is not None:
            between()


def test_listing_pages_each_state_in_a_stable_order_while_works_move():
    master = master_with([work(f"p{i:02}", kind="blob" if i % 3 == 0 else "square") for i in range(30)]
                         + [work(f"s{i}", not_before=NOW + 100 - i) for i in range(5)])
    connection = connect(master, slots=3)
    running = handed(master, connection, slots=("s0", "s1", "s2"))
    assert {a.work.work_id for a in running} == {"p01", "p02", "p04"}
    assert page_all(master, work_pb2.IN_PROGRESS) == ["p01", "p02", "p04"]
    assert page_all(master, work_pb2.SCHEDULED) == ["s4", "s3", "s2", "s1", "s0"]  # by their time
    assert page_all(master, work_pb2.PENDING, kind="blob") == [f"p{i:02}" for i in range(0, 30, 3)]
    for a in running:
        finish(master, connection, a, ok=a.work.work_id != "p02", permanent=True)
    left = iter(handed(master, connection, slots=("s0", "s1", "s2")) for _ in range(100))

    def works_move() -> None:  # between pages: three start and finish
        for a in next(left):
            finish(master, connection, a)

    listed = page_all(master, work_pb2.PENDING, size=4, between=works_move)
    assert listed == sorted(listed) and len(set(listed)) == len(listed)  # queue order, none twice
    done = page_all(master, work_pb2.DONE, size=5)
    assert done[:2] == ["p01", "p04"] and len(set(done)) == len(done) == master.state.done_count
    assert page_all(master, work_pb2.FAILED) == ["p02"]
    statuses, _ = master.list_works(work_pb2.DONE, size=1)
    assert statuses[0].result == b""  # results are GetWork's


@pytest.mark.parametrize(("which", "token", "message"), [
    (work_pb2.PENDING, "6:5", "another state|not one this listing gave"),
    (work_pb2.PENDING, "1:x", "malformed"),
    (work_pb2.SCHEDULED, "6:nan/x", "malformed"),
    (work_pb2.STATE_UNSPECIFIED, "", "choose"),
])
def test_listing_refuses_tokens_it_did_not_give(which, token, message):
    from dworkers.common.errors import InvalidInput

    master = master_with([work("a")])
    with pytest.raises(InvalidInput, match=message):
        master.list_works(which, "", token, 10)


# --- retry ---------------------------------------------------------------------------------


def test_failed_and_cancelled_works_can_be_retried_with_fresh_attempts_until_forgotten():
    master = master_with([work("f", attempts=1), work("c", priority=4), work("d")])
    connection = connect(master)
    (f,) = handed(master, connection)
    assert f.work.work_id == "c"  # the highest priority first
    master.cancel(["c"], NOW)
    master.take()
    (f,) = handed(master, connection)
    finish(master, connection, f, ok=False)
    (d,) = handed(master, connection)
    finish(master, connection, d)
    assert master.status("f").state == work_pb2.FAILED and master.status("c").state == work_pb2.CANCELLED
    with pytest.raises(WrongState, match="'d' is DONE"):
        master.retry(["f", "d"], NOW)
    with pytest.raises(NotFound, match="'ghost'"):
        master.retry(["f", "ghost"], NOW)
    statuses = master.retry(["f", "c"], NOW)
    step = master.take()
    assert [s.state for s in statuses] == [work_pb2.PENDING] * 2 and len(step.events) == 2
    assert master.status("f").attempts == 0 and master.status("c").priority == 4
    again = WorkState.from_snapshot(master.state.to_snapshot())
    assert again.to_snapshot() == master.state.to_snapshot()
    (c,) = handed(master, connection)
    assert c.work.work_id == "c" and c.attempt == 1 and c.work.payload == b"c"
    finish(master, connection, c)
    assert [r.state for r in master.state.results.values()] == [work_pb2.CANCELLED, work_pb2.FAILED, work_pb2.DONE,
                                                               work_pb2.DONE]  # the old results stay in the stream
    (f,) = handed(master, connection)
    finish(master, connection, f, ok=False)  # fails again: retryable again, under its new result
    assert master.state.retryable["f"][0] == 5
    master.forget_old_results(NOW + 10**6, master.state.last_sequence)
    (forgotten,) = [e.results_forgotten for e in master.take().events if e.HasField("results_forgotten")]
    assert sorted(forgotten.retryable_work_ids) == ["f"]  # c was retried and is DONE: its old result held none
    assert not master.state.retryable and not master.state.finished
    with pytest.raises(NotFound):
        master.retry(["f"], NOW)


def test_the_oldest_pending_work_s_age_and_each_work_s_wait_in_the_queue_are_known():
    master = master_with([work("a"), work("b")])
    master.recovered(NOW)
    master.take()
    assert master.oldest_pending_age(NOW + 3) == 3
    for t in range(1, 6):
        master.tick(NOW + t, 0)
    master.submit([work("c")], NOW + 5.5)
    master.take()
    master.tick(NOW + 6, 0)
    connection = connect(master, slots=2)
    master.request_work(connection, ["s0", "s1"], NOW + 8)
    assert master.take().queue_waits == [8.0, 8.0]  # a and b, queued at recovery
    assert master.oldest_pending_age(NOW + 8) == 2.5  # c is the oldest now
    master.tick(NOW + 9, 0)
    assert len(master._sampled) <= 2, "samples before the oldest pending work are dropped"
    master.state.pending.pop("c")
    assert master.oldest_pending_age(NOW + 9) == 0


# --- regressions: bounded memory, stale reports, failover --------------------------------------------


def test_works_cancelled_behind_a_head_that_does_not_move_do_not_stay_in_memory():
    master = master_with([work("stuck", not_before=NOW + 3600), work("head", kind="nobody-runs-it")])
    for i in range(2000):  # submit and cancel, far ahead and behind the stuck head
        master.submit([work(f"s{i}", not_before=NOW + 86400), work(f"q{i}", kind="nobody-runs-it")], NOW)
        master.cancel([f"s{i}", f"q{i}"], NOW)
        master.take()
    assert len(master.state.scheduled._heap) < 200
    assert sum(len(q) for q in master.state.pending._queues.values()) < 200
    assert master.state.scheduled.next_time() == NOW + 3600 and master.state.pending.oldest(["nobody-runs-it"])


def test_retention_by_bytes_counts_failed_works_kept_to_be_retried_and_forgets_no_more_than_needed():
    settings = CoreSettings(worker_timeout=1e6, retention_bytes=1024 * 1024)
    master = Master(WorkState(strict=True), settings)
    big = [work_pb2.Work(work_id=f"big{i}", kind="square", payload=b"x" * 250_000, max_attempts=1) for i in range(5)]
    master.submit(big + [work(f"d{i}") for i in range(200)], NOW)
    master.take()
    connection = connect(master, slots=1)
    for _ in range(205):
        (a,) = handed(master, connection)
        finish(master, connection, a, ok=not a.work.work_id.startswith("big"))
    master.forget_old_results(NOW, master.state.last_sequence)
    master.take()
    assert master.state.result_bytes <= settings.retention_bytes
    assert master.state.forgotten_up_to <= 5 and master.status("d199") is not None


def test_a_late_report_of_an_attempt_before_a_retry_counts_for_nothing():
    master = master_with([work("w")])
    connection = connect(master)
    (a,) = handed(master, connection)
    master.cancel(["w"], NOW)
    master.retry(["w"], NOW)
    master.take()
    finish(master, connection, a)  # the cancelled attempt's completion, in flight
    assert master.status("w").state in (work_pb2.PENDING, work_pb2.IN_PROGRESS) and master.state.done_count == 0


def test_a_cancel_after_a_failover_stops_the_attempt_its_slot_still_runs():
    master = master_with([work("w")])
    connection = connect(master)
    (a,) = handed(master, connection)
    again = Master(WorkState.from_snapshot(master.state.to_snapshot()), SETTINGS)
    again.recovered(NOW)  # the work is queued again; its worker still runs it and says so
    again.take()
    connection = Connection()
    again.register(connection, master_pb2.RegisterWorker(worker_ids=["s0"], kinds=["square"], running=[
        master_pb2.RunningAttempt(worker_id="s0", work_id="w", attempt_token=a.attempt_token, seconds_left=5)]), NOW)
    again.take()
    again.cancel(["w"], NOW)
    stops = [e.message.cancel for e in again.take().effects if isinstance(e, Send) and e.message.HasField("cancel")]
    assert [list(s.attempt_tokens) for s in stops] == [[a.attempt_token]] and not again.scheduler.get("s0").busy


def handed_to_box_a_then_failed_over() -> tuple[master_pb2.Assignment, Master]:
    """Work "w" handed to slot s0 of identity box-a; then a new master, recovered from the state."""
    master = master_with([work("w")])
    owner = Connection("box-a")
    master.register(owner, master_pb2.RegisterWorker(worker_ids=["s0"], kinds=["square"]), NOW)
    (a,) = handed(master, owner)
    again = Master(WorkState.from_snapshot(master.state.to_snapshot()), SETTINGS)
    again.recovered(NOW)
    again.take()
    return a, again


def box_a_comes_back(again: Master, a: master_pb2.Assignment) -> Connection:
    """box-a registers s0 again on the new master, saying it still runs `a`."""
    owner = Connection("box-a")
    again.register(owner, master_pb2.RegisterWorker(worker_ids=["s0"], kinds=["square"], running=[
        master_pb2.RunningAttempt(worker_id="s0", work_id="w", attempt_token=a.attempt_token, seconds_left=5)]), NOW)
    again.take()
    return owner


def test_after_a_failover_another_identity_cannot_squat_a_slot_id():
    """The new master has not met either worker: one that registers the
    other's slot id first gets a slot of its own, and the owner's attempt
    still counts when it comes back and reports it."""
    a, again = handed_to_box_a_then_failed_over()
    squatter = Connection("box-b")
    again.register(squatter, master_pb2.RegisterWorker(worker_ids=["s0"], kinds=["square"]), NOW)
    again.take()
    owner = box_a_comes_back(again, a)
    assert again.scheduler.get("s0", "box-a").token == a.attempt_token and not again.scheduler.get("s0", "box-b").busy
    finish(again, owner, a)
    assert again.status("w").state == work_pb2.DONE and handed(again, squatter) == []


def test_after_a_failover_another_identity_cannot_claim_or_report_an_attempt_with_its_token():
    """The token leaked (say, read from the ZooKeeper journal): on a new
    master no slot holds the attempt yet, but the journal says whose it is."""
    a, again = handed_to_box_a_then_failed_over()
    thief = Connection("box-b")
    claim = master_pb2.RunningAttempt(worker_id="t0", work_id="w", attempt_token=a.attempt_token, seconds_left=5)
    again.register(thief, master_pb2.RegisterWorker(worker_ids=["t0"], kinds=["square"], running=[claim]), NOW)
    again.take()
    assert not again.scheduler.get("t0", "box-b").busy  # not adopted
    stolen = master_pb2.Assignment()
    stolen.CopyFrom(a)
    stolen.worker_id = "t0"
    finish(again, thief, stolen, ok=False, permanent=True)  # reported before the owner is back
    assert again.status("w").state != work_pb2.FAILED
    owner = box_a_comes_back(again, a)
    finish(again, owner, a)
    assert again.status("w").state == work_pb2.DONE


def test_a_slot_cannot_report_on_an_attempt_another_slot_holds_even_with_its_token():
    master = master_with([work("w")])
    owner, other = Connection("box-a"), Connection("box-b")
    for connection in (owner, other):
        master.register(connection, master_pb2.RegisterWorker(worker_ids=["s0"], kinds=["square"]), NOW)
    (a,) = handed(master, owner)
    stolen = master_pb2.Assignment()
    stolen.CopyFrom(a)  # the token leaked (say, read from the journal)
    finish(master, other, stolen, ok=False, permanent=True)
    assert master.status("w").state == work_pb2.IN_PROGRESS
    finish(master, owner, a)
    assert master.status("w").state == work_pb2.DONE


def test_a_rate_limited_kind_that_no_waiting_slot_runs_wakes_nothing():
    master = Master(WorkState(strict=True), SETTINGS, rate_limits={"square": 1.0})
    master.submit([work("a1"), work("a2"), work("b", kind="blob")], NOW)
    master.take()
    squares, blobs = connect(master, kinds=("square",)), Connection()
    master.register(blobs, master_pb2.RegisterWorker(worker_ids=["b0"], kinds=["blob"]), NOW)
    handed(master, squares, NOW)  # a1 starts; the square slot is full
    master.request_work(blobs, ["b0"], NOW)
    master.take()  # b starts; the blob slot waits again with nothing of its kind
    master.request_work(blobs, ["b0"], NOW)
    assert master.next_due(NOW + 5) is None, "a wake-up in the past would spin the ticker"


def test_a_listing_of_finished_works_shows_each_work_s_latest_end_once():
    master = master_with([work("v", attempts=1)])
    connection = connect(master)
    (a,) = handed(master, connection)
    finish(master, connection, a, ok=False)
    master.retry(["v"], NOW)
    master.take()
    (b,) = handed(master, connection)
    finish(master, connection, b)
    assert page_all(master, work_pb2.FAILED) == [] and page_all(master, work_pb2.DONE) == ["v"]
