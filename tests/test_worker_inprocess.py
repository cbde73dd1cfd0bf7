"""The worker in one process, against a scripted master (a real gRPC server
on loopback whose stream the test drives): it registers its slots and kinds,
runs what it is handed, reports with the attempt's token, asks for the next
work in the same message, resends until acked (also on a new stream), bounds
results and run time, ignores hand-outs it cannot take, and hands running
work back when stopped."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
from prometheus_client import CollectorRegistry

from dworkers.common import server
from dworkers.common.metrics import ServerMetrics, WorkerMetrics
from dworkers.common.proxy import MasterProxy, StaticLocator
from dworkers.common.validation import MAX_RESULT_BYTES
from dworkers.v1 import master_pb2, master_pb2_grpc, work_pb2
from dworkers.worker.worker import Outbox, Worker, WorkerSettings, merge
from tests.helpers import wait_until

pytestmark = pytest.mark.unit

JOBS = "tests.jobs_for_tests"


class ScriptedMaster(master_pb2_grpc.MasterServicer):
    """Each Connect is one session: what the worker sends lands in `received`;
    what the test puts in `outgoing` is sent; putting an exception ends the
    stream with it."""

    def __init__(self) -> None:
        self.received: queue.Queue[master_pb2.WorkerMessage] = queue.Queue()
        self.outgoing: queue.Queue = queue.Queue()
        self.sessions = 0
        self.server, _health, port = server.build(
            [(self, master_pb2_grpc.add_MasterServicer_to_server, "dworkers.v1.Master")], "127.0.0.1:0",
            ServerMetrics(CollectorRegistry()), threads=8)
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def Connect(self, request_iterator, context):
        self.sessions += 1

        def read() -> None:
            try:
                for message in request_iterator:
                    self.received.put(message)
            except grpc.RpcError:
                pass  # the stream ended

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                item = self.outgoing.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, Exception):
                context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
            item.epoch, item.cluster_id = 1, "c1"
            yield item

    def next_matching(self, predicate, timeout: float = 10.0) -> master_pb2.WorkerMessage:
        """The next message the worker sent that satisfies `predicate`."""
        seen = []

        def found() -> bool:
            while True:
                try:
                    message = self.received.get_nowait()
                except queue.Empty:
                    return False
                seen.append(message)
                if predicate(message):
                    return True

        wait_until(found, timeout, "a matching message from the worker")
        return seen[-1]

    def hand_out(self, worker_id: str, work_id: str, kind: str, payload: bytes, token: int,
                 timeout: float = 0.0) -> None:
        self.outgoing.put(master_pb2.MasterMessage(works=master_pb2.Works(assignments=[master_pb2.Assignment(
            worker_id=worker_id, attempt=1, attempt_token=token, timeout_seconds=timeout,
            work=work_pb2.Work(work_id=work_id, kind=kind, payload=payload))])))


@pytest.fixture
def master():
    scripted = ScriptedMaster()
    yield scripted
    scripted.server.stop(0)


@pytest.fixture
def start_worker(master):
    made: list[tuple[Worker, MasterProxy]] = []

    def start(**overrides) -> Worker:
        settings = WorkerSettings(**{"concurrency": 2, "jobs": JOBS, "executor": "thread",
                                     "resend_interval": 0.3, **overrides})
        proxy = MasterProxy(StaticLocator([master.address]), timeout=5.0)
        worker = Worker(proxy, settings, WorkerMetrics(CollectorRegistry()))
        threading.Thread(target=worker.run, daemon=True).start()
        made.append((worker, proxy))
        return worker

    yield start
    for worker, proxy in made:
        if not worker._stopped.is_set():
            worker.settings = WorkerSettings(shutdown_grace=0, jobs=JOBS, executor="thread")
            worker.stop()
        proxy.close()


def registered(master: ScriptedMaster) -> master_pb2.RegisterWorker:
    return master.next_matching(lambda m: m.HasField("register")).register


def test_it_registers_its_slots_and_kinds_then_asks_work_for_every_idle_slot(master, start_worker):
    worker = start_worker(concurrency=3)
    first = master.next_matching(lambda m: m.HasField("register"))  # queued together, sent as one message
    register = first.register
    assert list(register.worker_ids) == list(worker.slots) and len(register.worker_ids) == 3
    assert {"square", "echo", "fail"} <= set(register.kinds) and not register.busy_work_ids
    assert set(first.request_work.worker_ids) == set(worker.slots)


def test_a_finished_work_is_reported_with_its_token_asks_for_more_and_is_resent_until_acked(master, start_worker):
    worker = start_worker()
    slot_id = registered(master).worker_ids[0]
    master.hand_out(slot_id, "w1", "square", b"7", token=4242)
    report = master.next_matching(lambda m: m.HasField("done"))
    (completion,) = report.done.completions
    assert (completion.work_id, completion.worker_id, completion.attempt_token) == ("w1", slot_id, 4242)
    assert completion.result == b"7 * 7 = 49"
    assert slot_id in report.request_work.worker_ids  # the same message asks for the next work
    master.next_matching(lambda m: m.HasField("done"))  # no ack yet: sent again
    master.outgoing.put(master_pb2.MasterMessage(ack=master_pb2.Ack(work_ids=["w1"], attempt_tokens=[4242])))
    wait_until(lambda: not worker._unacked, 10, "the ack to clear the report")


def test_an_unacked_report_is_sent_again_on_the_next_stream(master, start_worker):
    start_worker(resend_interval=3600)
    slot_id = registered(master).worker_ids[0]
    master.hand_out(slot_id, "w1", "echo", b"payload", token=7)
    master.next_matching(lambda m: m.HasField("done"))
    master.outgoing.put(RuntimeError("master went away"))
    wait_until(lambda: master.sessions >= 2, 20, "the worker to reconnect")
    again = master.next_matching(lambda m: m.HasField("done"))
    assert [c.attempt_token for c in again.done.completions] == [7]


def test_failures_too_large_results_and_overrun_deadlines_are_reported_as_failed_attempts(master, start_worker):
    start_worker(concurrency=3)
    a, b, c = registered(master).worker_ids
    master.hand_out(a, "poison", "fail", b"x", token=1)
    master.hand_out(b, "huge", "blob", str(MAX_RESULT_BYTES + 1).encode(), token=2)
    master.hand_out(c, "slow", "sleep", b"30", token=3, timeout=0.5)
    failures: dict[str, master_pb2.Failure] = {}

    def collect(message: master_pb2.WorkerMessage) -> bool:
        failures.update((f.work_id, f) for f in message.failed.failures)
        return len(failures) == 3

    master.next_matching(collect, timeout=20)
    assert "cannot handle 'x'" in failures["poison"].error
    assert "exceeds the limit" in failures["huge"].error
    assert "timed out" in failures["slow"].error
    assert not any(f.returned for f in failures.values())


def test_hand_outs_for_unknown_or_full_slots_are_ignored(master, start_worker):
    worker = start_worker(concurrency=1, prefetch=1, register_interval=0.5)
    (slot_id,) = registered(master).worker_ids
    master.hand_out("someone-else-0", "stray", "square", b"1", token=1)
    master.hand_out(slot_id, "long", "sleep", b"30", token=2)
    wait_until(lambda: worker.slots[slot_id].busy, 10, "the slot to run the long work")
    master.hand_out(slot_id, "second", "square", b"2", token=3)  # held ahead
    master.hand_out(slot_id, "third", "square", b"3", token=4)  # beyond its capacity
    master.hand_out(slot_id, "second", "square", b"2", token=3)  # the same hand-out again
    again = master.next_matching(lambda m: m.HasField("register") and len(m.register.busy_work_ids) == 2, timeout=15)
    assert list(again.register.busy_work_ids) == ["long", "second"] and again.register.prefetch == 1
    (running,) = again.register.running  # what a new stream's master must count against the slot
    assert (running.worker_id, running.work_id, running.attempt_token) == (slot_id, "long", 2)
    assert 0 < running.seconds_left <= 30
    assert [a.work.work_id for a in worker.slots[slot_id].held()] == ["long", "second"]


def test_a_prefetched_work_starts_when_the_one_before_ends_and_reports_follow_in_order(master, start_worker):
    start_worker(concurrency=1, prefetch=2)
    (slot_id,) = registered(master).worker_ids
    master.hand_out(slot_id, "first", "sleep", b"0.3", token=1)
    master.hand_out(slot_id, "second", "square", b"4", token=2)
    master.hand_out(slot_id, "third", "square", b"5", token=3)
    done: list[master_pb2.Completion] = []
    asked: list[str] = []

    def collect(message: master_pb2.WorkerMessage) -> bool:
        done.extend(message.done.completions)
        asked.extend(message.request_work.worker_ids)
        return len(done) == 3

    master.next_matching(collect, timeout=20)
    assert [c.work_id for c in done] == ["first", "second", "third"]
    assert done[1].result.endswith(b"16") and done[2].result.endswith(b"25")
    assert asked.count(slot_id) >= 1  # each report with room asks for more


def test_stopping_hands_back_prefetched_work_at_once_and_finishes_the_running_one(master, start_worker):
    worker = start_worker(concurrency=1, prefetch=1, shutdown_grace=10)
    (slot_id,) = registered(master).worker_ids
    master.hand_out(slot_id, "running", "sleep", b"0.5", token=1)
    master.hand_out(slot_id, "ahead", "square", b"3", token=2)
    wait_until(lambda: len(worker.slots[slot_id].held()) == 2, 10, "the slot to hold both")
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    reports: dict[str, object] = {}

    def collect(message: master_pb2.WorkerMessage) -> bool:
        reports.update((f.work_id, f) for f in message.failed.failures)
        reports.update((c.work_id, c) for c in message.done.completions)
        return {"running", "ahead"} <= set(reports)

    master.next_matching(collect, timeout=20)
    ahead = reports["ahead"]
    assert isinstance(ahead, master_pb2.Failure) and ahead.returned  # never ran: not a failed attempt
    assert isinstance(reports["running"], master_pb2.Completion)  # finished within the grace period
    master.outgoing.put(master_pb2.MasterMessage(ack=master_pb2.Ack(attempt_tokens=[1, 2])))
    stopper.join(timeout=15)
    assert not stopper.is_alive()


def test_stopping_hands_running_work_back_without_spending_an_attempt(master, start_worker):
    worker = start_worker(concurrency=1, shutdown_grace=0.2)
    (slot_id,) = registered(master).worker_ids
    master.hand_out(slot_id, "long", "sleep", b"30", token=9)
    wait_until(lambda: worker.slots[slot_id].busy, 10, "the work to start")
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    handed_back = master.next_matching(lambda m: m.HasField("failed"))
    (failure,) = handed_back.failed.failures
    assert failure.returned and failure.attempt_token == 9 and failure.work_id == "long"
    assert not handed_back.HasField("request_work")  # a stopping worker asks for nothing
    master.outgoing.put(master_pb2.MasterMessage(ack=master_pb2.Ack(work_ids=["long"], attempt_tokens=[9])))
    stopper.join(timeout=10)
    assert not stopper.is_alive()


def test_queued_messages_merge_into_one_keeping_every_report_and_each_request_once():
    reports = [master_pb2.WorkerMessage(done=master_pb2.WorkIsDone(completions=[
        master_pb2.Completion(work_id=f"w{i}", attempt_token=i)]), request_work=master_pb2.WorkerRequestsWork(
        worker_ids=["s0", "s1"])) for i in range(3)]
    first = master_pb2.WorkerMessage(register=master_pb2.RegisterWorker(worker_ids=["s0"]))
    latest = master_pb2.WorkerMessage(register=master_pb2.RegisterWorker(worker_ids=["s0", "s1"]))
    merged = merge([first, *reports, latest])
    assert [c.attempt_token for c in merged.done.completions] == [0, 1, 2]
    assert list(merged.request_work.worker_ids) == ["s0", "s1"]
    assert list(merged.register.worker_ids) == ["s0", "s1"]


def test_a_withdrawal_is_never_lost_in_merging():
    withdrawal = master_pb2.WorkerMessage(withdraw_work=master_pb2.WorkerWithdrawsWork(worker_ids=["s0", "s1"]))
    assert list(merge([withdrawal]).withdraw_work.worker_ids) == ["s0", "s1"]
    outbox = Outbox()
    def request(slot: str) -> master_pb2.WorkerMessage:
        return master_pb2.WorkerMessage(request_work=master_pb2.WorkerRequestsWork(worker_ids=[slot]))

    for message in (request("s1"), withdrawal, request("s0")):
        outbox.put(message)
    outbox.close()
    sent = list(Worker._outgoing(None, outbox))  # type: ignore[arg-type]
    assert [list(m.withdraw_work.worker_ids) for m in sent] == [[], ["s0", "s1"], []]
    assert [list(m.request_work.worker_ids) for m in sent] == [["s1"], [], ["s0"]]


def test_the_outbox_drops_what_exceeds_its_bounds():
    box = Outbox(max_messages=2, max_bytes=1_000)
    small = master_pb2.WorkerMessage(request_work=master_pb2.WorkerRequestsWork(worker_ids=["s0"]))
    big = master_pb2.WorkerMessage(done=master_pb2.WorkIsDone(completions=[
        master_pb2.Completion(work_id="w", result=b"x" * 2_000)]))
    assert box.put(small) and not box.put(big) and box.put(small) and not box.put(small)
    assert box.get() == small and box.get() == small and box.get(block=False) is False
