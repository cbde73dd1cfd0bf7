"""The frontend's batcher in one process, over a proxy the test plays: calls
of many clients leave together, and each client gets its own answer."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from dworkers.common.errors import Conflict
from dworkers.frontend.batcher import SubmitBatcher
from dworkers.v1 import work_pb2

pytestmark = pytest.mark.unit


class Master:
    """Answers SubmitWorks like the master: each work on its own; ids that
    start with 'bad' conflict. Holds each call until `ready()` says the
    other callers piled up behind it (however slow the machine is)."""

    def __init__(self):
        self.calls: list[work_pb2.SubmitWorksRequest] = []
        self.ready = lambda: True

    def call(self, method, request, timeout=None):
        assert method == "SubmitWorks" and request.each_on_its_own
        self.calls.append(request)
        end = time.monotonic() + 10
        while not self.ready() and time.monotonic() < end:
            time.sleep(0.002)
        return work_pb2.SubmitWorksResponse(works=[
            work_pb2.SubmitWorkResponse(work_id=w.work_id, code=6, message="conflict")
            if w.work_id.startswith("bad") else work_pb2.SubmitWorkResponse(work_id=w.work_id)
            for w in request.works])


def test_one_clients_refused_work_does_not_hold_up_the_others():
    master = Master()
    batcher = SubmitBatcher(master, senders=1)
    ids = [f"bad-{n}" if n % 10 == 3 else f"good-{n}" for n in range(100)]

    def submit(work_id):
        try:
            return batcher.submit(work_pb2.SubmitWorkRequest(work_id=work_id, kind="k"), timeout=10).work_id
        except Conflict as refusal:
            return refusal.status

    # A call is answered once every other client waits behind it (the 20
    # threads, but those whose works it holds), or all the works left do.
    def piled_up() -> bool:
        held, sent = len(master.calls[-1].works), sum(len(c.works) for c in master.calls)
        return len(batcher._waiting) >= min(20 - held, len(ids) - sent)

    master.ready = piled_up
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(submit, ids))
    assert answers == ["ALREADY_EXISTS" if i.startswith("bad") else i for i in ids]
    assert len(master.calls) < len(ids) / 2  # merged: no call per work, no retry work by work
    batcher.close()


def test_a_lone_call_leaves_from_its_callers_thread():
    class Master:
        threads: list[str] = []

        def call(self, method, request, timeout=None):
            self.threads.append(threading.current_thread().name)
            return work_pb2.SubmitWorksResponse(works=[work_pb2.SubmitWorkResponse(work_id=w.work_id)
                                                       for w in request.works])

    batcher = SubmitBatcher(Master())
    for n in range(3):
        assert batcher.submit(work_pb2.SubmitWorkRequest(work_id=f"w{n}", kind="k"), timeout=5).work_id == f"w{n}"
    assert Master.threads == [threading.current_thread().name] * 3  # no hand-over to the batcher's threads
    batcher.close()


def test_a_failed_call_fails_every_caller_in_its_batch():
    class Down:
        def call(self, method, request, timeout=None):
            raise grpc.RpcError()

    batcher = SubmitBatcher(Down(), senders=1)
    with pytest.raises(grpc.RpcError):
        batcher.submit(work_pb2.SubmitWorkRequest(work_id="w", kind="k"), timeout=5)
    batcher.close()


def test_callers_that_give_up_while_the_master_is_slow_leave_nothing_behind():
    release = threading.Event()

    class Stuck:
        def __init__(self):
            self.sent: list[str] = []

        def call(self, method, request, timeout=None):
            self.sent += [w.work_id for w in request.works]
            release.wait(30)
            return work_pb2.SubmitWorksResponse(works=[work_pb2.SubmitWorkResponse(work_id=w.work_id)
                                                       for w in request.works])

    master = Stuck()
    batcher = SubmitBatcher(master, senders=1)
    first = threading.Thread(target=lambda: batcher.submit(work_pb2.SubmitWorkRequest(work_id="first", kind="k"),
                                                            timeout=30))
    first.start()  # alone: on its way, holding the only sender's turn
    while master.sent != ["first"]:
        time.sleep(0.001)
    for n in range(200):  # each gives up before the master answers
        with pytest.raises(TimeoutError):
            batcher.submit(work_pb2.SubmitWorkRequest(work_id=f"late-{n}", kind="k"), timeout=0.001)
    release.set()
    first.join(10)
    kept = batcher.submit(work_pb2.SubmitWorkRequest(work_id="after", kind="k"), timeout=10)
    assert kept.work_id == "after"
    assert master.sent == ["first", "after"], "works of callers that gave up were sent"
    assert not batcher._waiting
    batcher.close()


def test_callers_that_give_up_once_their_works_left_do_not_break_the_batcher():
    gates = [threading.Event(), threading.Event()]

    class Slow:
        calls = 0

        def call(self, method, request, timeout=None):
            gate = gates[min(self.calls, 1)]
            self.calls += 1
            gate.wait(30)
            return work_pb2.SubmitWorksResponse(works=[work_pb2.SubmitWorkResponse(work_id=w.work_id)
                                                       for w in request.works])

    master = Slow()
    batcher = SubmitBatcher(master, senders=1)
    first = threading.Thread(target=lambda: batcher.submit(work_pb2.SubmitWorkRequest(work_id="first", kind="k"),
                                                            timeout=30))
    first.start()
    while master.calls < 1:
        time.sleep(0.001)

    def late(n):
        with pytest.raises(TimeoutError):
            batcher.submit(work_pb2.SubmitWorkRequest(work_id=f"late-{n}", kind="k"), timeout=1.0)

    callers = [threading.Thread(target=late, args=(n,)) for n in range(5)]
    for caller in callers:
        caller.start()
    while len(batcher._waiting) < 5:
        time.sleep(0.001)
    gates[0].set()  # the first returns; the five leave together and wait at the master past their callers' time
    for caller in callers:
        caller.join(10)
    gates[1].set()  # then they are answered: nobody waits for them any more
    first.join(10)
    while master.calls < 2 or batcher._in_flight:
        time.sleep(0.001)
    assert any(t.name == "submit-batcher-0" for t in threading.enumerate()), "the batcher's sender died"
    batcher.close()
