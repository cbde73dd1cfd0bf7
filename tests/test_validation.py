"""What crosses the network is checked before anything acts on it: works
submitted by clients, and every message a worker sends."""

from __future__ import annotations

import math

import pytest

from dworkers.common import validation
from dworkers.common.errors import InvalidInput, ProtocolError
from dworkers.common.shards import Move, slot_of
from dworkers.v1 import master_pb2, work_pb2

pytestmark = pytest.mark.unit


def request(**fields) -> work_pb2.SubmitWorkRequest:
    return work_pb2.SubmitWorkRequest(**{"work_id": "w1", "kind": "square", "payload": b"3", **fields})


@pytest.mark.parametrize("fields, fragment", [
    ({"work_id": "-leading-dash"}, "malformed work_id"),
    ({"work_id": "x" * 129}, "malformed work_id"),
    ({"kind": ""}, "kind is empty"),
    ({"kind": "9lives"}, "malformed kind"),
    ({"payload": b"p" * (256 * 1024 + 1)}, "exceeds the limit"),
    ({"max_attempts": 101}, "max_attempts"),
    ({"timeout_seconds": math.nan}, "timeout_seconds"),
    ({"timeout_seconds": 24 * 3600 + 1}, "timeout_seconds"),
])
def test_a_bad_work_is_refused_with_what_is_wrong(fields, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        validation.to_work(request(**fields))


def test_defaults_are_filled_in_and_limits_are_inclusive():
    work = validation.to_work(request(work_id="a" * 128, payload=b"p" * 256 * 1024, timeout_seconds=24 * 3600))
    assert work.max_attempts == validation.DEFAULT_MAX_ATTEMPTS and len(work.work_id) == 128


def test_a_batch_judged_as_a_whole_fails_on_one_bad_work_or_a_repeated_id():
    with pytest.raises(InvalidInput, match="work #1"):
        validation.to_works([request(work_id="a"), request(work_id="b", kind="")])
    with pytest.raises(InvalidInput, match="appears twice"):
        validation.to_works([request(work_id="a"), request(work_id="a")])


def test_a_batch_judged_work_by_work_answers_each_refusal_in_its_place():
    def check_kind(kinds):
        if kinds - {"square"}:
            raise validation.InvalidWork(f"unknown kind {sorted(kinds)[0]!r}")

    works, answers = validation.to_works_each(
        [request(work_id="a"), request(work_id="b", kind="blob"), request(work_id="a"), request(work_id="c")],
        check_kind)
    assert [w.work_id for w in works] == ["a", "c"]
    assert answers[0] is None and answers[3] is None
    assert answers[1].code == validation.INVALID_ARGUMENT_CODE and "unknown kind" in answers[1].message
    assert "appears twice" in answers[2].message


def register(**fields) -> master_pb2.WorkerMessage:
    return master_pb2.WorkerMessage(register=master_pb2.RegisterWorker(
        **{"worker_ids": ["h-1-0"], "host": "h", "kinds": ["square"], **fields}))


@pytest.mark.parametrize("message, registered, fragment", [
    (master_pb2.WorkerMessage(request_work=master_pb2.WorkerRequestsWork(worker_ids=["h-1-0"])), False,
     "register before anything else"),
    (register(worker_ids=[]), False, "no worker slots"),
    (register(worker_ids=["w" * 200]), False, "malformed worker_id"),
    (register(worker_ids=[f"h-{i}" for i in range(1025)]), False, "1025 slots"),
    (register(host="h" * 256), False, "host of 256"),
    (register(kinds=["not a kind"]), False, "malformed kind"),
    (register(kinds=[f"k{i}" for i in range(1001)]), False, "1001 kinds"),
    (master_pb2.WorkerMessage(request_work=master_pb2.WorkerRequestsWork(worker_ids=["s"] * 1025)), True,
     "1025 slots"),
    (register(prefetch=17), False, "prefetch of 17"),
    (register(running=[master_pb2.RunningAttempt(worker_id="elsewhere-0", work_id="w", attempt_token=1)]), False,
     "running"),
    (register(running=[master_pb2.RunningAttempt(worker_id="h-1-0", work_id="w", attempt_token=0)]), False,
     "running"),
    (register(running=[master_pb2.RunningAttempt(worker_id="h-1-0", work_id="w", attempt_token=1,
                                                 seconds_left=float("nan"))]), False, "running"),
    (register(defaults=[master_pb2.KindDefaults(kind="square", priority=5000)]), False,
     "a priority or a rate limit out of range"),
    (register(defaults=[master_pb2.KindDefaults(kind="square", heartbeat_timeout=-1)]), False, "out of range"),
    (register(defaults=[master_pb2.KindDefaults(kind="square", rate_limit=float("inf"))]), False, "out of range"),
    (register(defaults=[master_pb2.KindDefaults(kind="square", backoff=work_pb2.Backoff(
        initial_seconds=1, multiplier=1e9))]), False, "multiplier"),
    (master_pb2.WorkerMessage(heartbeats=master_pb2.Heartbeats(heartbeats=[
        master_pb2.Heartbeat(worker_id="h-1-0", attempt_token=1, progress=float("nan"))])), True, "progress"),
    (master_pb2.WorkerMessage(heartbeats=master_pb2.Heartbeats(heartbeats=[
        master_pb2.Heartbeat(worker_id="h-1-0", attempt_token=1, progress=2.0)])), True, "progress"),
    (master_pb2.WorkerMessage(heartbeats=master_pb2.Heartbeats(heartbeats=[
        master_pb2.Heartbeat(worker_id="h-1-0", attempt_token=1, details="d" * 2000)])), True, "details"),
    (master_pb2.WorkerMessage(heartbeats=master_pb2.Heartbeats(heartbeats=[
        master_pb2.Heartbeat(worker_id="h-1-0", attempt_token=1)] * 10_001)), True, "10001 reports"),
])
def test_a_worker_message_that_breaks_the_protocol_is_refused(message, registered, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        validation.check_worker_message(message, registered)


def test_a_well_formed_worker_message_passes():
    validation.check_worker_message(register(), registered=False)
    report = master_pb2.WorkerMessage(done=master_pb2.WorkIsDone(completions=[
        master_pb2.Completion(worker_id="h-1-0", work_id="w1", result=b"r", attempt_token=7)]))
    validation.check_worker_message(report, registered=True)


@pytest.mark.parametrize("options", [{"max_attempts": 500}, {"max_attempts": -1}, {"timeout": 1e6},
                                     {"timeout": float("nan")}])
def test_job_options_out_of_range_fail_where_they_are_written(options):
    """Not later, as a registration every master refuses."""
    from dworkers.worker.jobs import job

    with pytest.raises(ValueError, match="@job\\('bad'\\)"):
        job("bad", **options)


def test_a_hostile_part_of_a_move_is_refused_with_what_is_wrong():
    move = Move(0, 99, 0, 1, since=3)
    inside = sorted(w for w in (f"m{i}" for i in range(5_000)) if slot_of(w) <= 99)[:3]
    outside = next(w for w in (f"o{i}" for i in range(5_000)) if slot_of(w) > 99)

    def part(ids, after="", last=None, prints=None):
        request = master_pb2.ImportWorksRequest(move_key=move.key, source_shard=0, after=after,
                                                last_id=last if last is not None else max(ids))
        for work_id in ids:
            request.results.add(work_id=work_id, state=work_pb2.DONE)
        request.result_fingerprints.extend([b"f"] * (len(ids) if prints is None else prints))
        return request

    validation.check_import(part(inside), move)  # well formed
    for request, fragment in ((part([inside[0], outside]), "not in this part"),
                              (part(inside, after=inside[1]), "not in this part"),
                              (part(inside, last=""), "after < last_id"),
                              (part(inside, prints=1), "one fingerprint per result"),
                              (part(["bad id!"], last="zzz"), "malformed work_id")):
        with pytest.raises(InvalidInput, match=fragment):
            validation.check_import(request, move)
    flood = part(inside)
    for _ in range(validation.MAX_BATCH_WORKS):
        flood.entries.add().work.work_id = inside[0]
    with pytest.raises(InvalidInput, match="works in one part of a move"):
        validation.check_import(flood, move)
