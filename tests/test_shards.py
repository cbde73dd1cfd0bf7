"""A cluster of several shards on a real ZooKeeper with real processes:
works routed by hash slot to each shard's master group, one result stream
merged from all of them, workers serving every shard."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import threading
import uuid
from collections import Counter
from functools import partial

import grpc
import pytest

import dworkers
from dworkers.common.shards import ShardMap, slot_of
from dworkers.v1 import master_pb2, master_pb2_grpc, work_pb2
from tests.helpers import Producer, ResultCollector, frontend, wait_kind, wait_until
from tests.journals import both_journals

pytestmark = pytest.mark.e2e

SHARDS = 4


def start_sharded(cluster, shards: int = SHARDS, standbys: tuple[int, ...] = ()) -> dict[int, list]:
    """A cluster of `shards` shards: an active master each (a standby for
    those in `standbys`); returns the masters by shard."""
    cluster.shards("init", str(shards))
    masters = {shard: [cluster.start_master(None, "--shard", str(shard), wait=True)] for shard in range(shards)}
    for shard in standbys:
        masters[shard].append(cluster.start_master(None, "--shard", str(shard), wait=True))
    return masters


def settled(results: ResultCollector, stub, timeout: float = 30.0) -> None:
    """Waits until the collector holds every result each shard numbered so far."""
    info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
    last = {s.shard: s.last_sequence for s in info.shards}

    def caught_up() -> bool:
        seen: dict[int, int] = {}
        for r in list(results.results):
            seen[r.shard] = max(seen.get(r.shard, 0), r.sequence)
        return all(seq == 0 or seen.get(shard, 0) >= seq for shard, seq in last.items())

    wait_until(caught_up, timeout, f"results up to {last}")


def assert_exactly_once(results: ResultCollector, acked: list[str], stub) -> None:
    assert not results.wait_for(acked, timeout=90), "acked works never finished"
    settled(results, stub)
    counts = Counter(results.ids())
    assert not [i for i in acked if counts[i] != 1], "acked works not finished exactly once"
    assert set(counts) == set(acked), "results for works that were never acked"


def submit_all(stub, ids: list[str], kind: str = "square") -> None:
    """Half in batches that span shards, half one by one; retried until acked."""
    half = len(ids) // 2
    for i in range(0, half, 50):
        batch = work_pb2.SubmitWorksRequest(works=[work_pb2.SubmitWorkRequest(work_id=w, kind=kind, payload=b"3")
                                                   for w in ids[i:min(i + 50, half)]])
        wait_until(partial(_try, partial(stub.SubmitWorks, batch, timeout=10)), 60, "a batch accepted")
    for work_id in ids[half:]:
        request = work_pb2.SubmitWorkRequest(work_id=work_id, kind=kind, payload=b"4")
        wait_until(partial(_try, partial(stub.SubmitWork, request, timeout=10)), 60, f"{work_id} accepted")


def _try(call) -> bool:
    try:
        call()
        return True
    except grpc.RpcError as error:
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), error
        return False


def test_four_shards_exactly_once_with_one_worker_serving_them_all(cluster):
    """One worker process of 2 slots serves 4 shards (its credit moves to
    the shards with work); each result comes once, from the shard its id's
    slot maps to; ClusterInfo shows every shard; the stream resumes by token."""
    start_sharded(cluster)
    worker = cluster.start_worker(2, "--prefetch", "1")
    cluster_address = cluster.start_frontend().address
    stub = frontend(cluster_address)
    wait_kind(stub, "square")
    results = ResultCollector(stub, by_token=True)
    ids = [f"w-{uuid.uuid4().hex[:10]}" for _ in range(240)]
    submit_all(stub, ids)
    assert_exactly_once(results, ids, stub)
    layout = ShardMap.even(SHARDS)
    assert all(r.shard == layout.shard_of(r.work_id) for r in results.results)
    assert {r.shard for r in results.results} == set(range(SHARDS))
    assert {r.result for r in results.results} == {b"3 * 3 = 9", b"4 * 4 = 16"}

    info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
    assert [s.shard for s in info.shards] == list(range(SHARDS))
    assert all(s.master.address and s.slots == 1024 and not s.error for s in info.shards)
    assert info.done == len(ids) and sum(s.done for s in info.shards) == len(ids)
    assert len({w.worker_id for w in info.workers}) == 2
    # Its slots' credit moved between shards without any master handing a
    # slot more than it holds (such a work would be handed back).
    assert "handing work back" not in worker.log()

    # Resuming from a token in the middle gives exactly what came after it.
    middle = ResultCollector(stub, by_token=True)
    wait_until(lambda: len(middle.results) >= 100, 30, "the first results again")
    token, seen = middle.token, len(middle.results)
    middle.stop()
    rest = stub.WatchResults(work_pb2.WatchResultsRequest(resume_token=token), timeout=10)
    later = []
    try:
        for batch in rest:
            later += [r.work_id for r in batch.results]
            if seen + len(later) >= len(ids):
                break
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    rest.cancel()
    assert sorted(middle.ids()[:seen] + later) == sorted(ids)

    # The SDK resumes the same way, from any result's token.
    with dworkers.Client(cluster_address) as client:
        stream = client.watch()
        first = [next(stream) for _ in range(50)]
        stream.close()
        assert all(r.resume_token and r.shard == layout.shard_of(r.work_id) for r in first)
        stream = client.watch(resume_token=first[-1].resume_token)
        others = [next(stream).work_id for _ in range(len(ids) - 50)]
        stream.close()
    assert sorted([r.work_id for r in first] + others) == sorted(ids)
    table = cluster.shards()
    assert "4 shards" in table and all(f"shard {k} " in table for k in range(SHARDS))

    # after_sequence is shard 0's: a subscriber from before the cluster had
    # shards goes on after it, with every other shard's results.
    shard0 = sorted(r.sequence for r in results.results if r.shard == 0)
    expected = {r.work_id for r in results.results if r.shard != 0 or r.sequence > shard0[4]}
    stream = stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=shard0[4]), timeout=20)
    again: list[str] = []
    for batch in stream:
        again += [r.work_id for r in batch.results]
        if len(again) >= len(expected):
            break
    stream.cancel()
    assert sorted(again) == sorted(expected)
    with pytest.raises(grpc.RpcError) as garbage:
        next(iter(stub.WatchResults(work_pb2.WatchResultsRequest(resume_token="r1:0=x"), timeout=10)))
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    results.stop()


def test_per_work_calls_reach_the_shard_of_the_work(cluster):
    """GetWork, WaitWorks, CancelWork and ListWorks across shards; a master
    asked for another shard's work refuses it (ABORTED), naming the shard."""
    masters = start_sharded(cluster)
    stub = frontend(cluster.start_frontend().address)
    layout = ShardMap.even(SHARDS)
    ids = [f"c-{n}" for n in range(60)]  # delayed an hour: they wait, then are cancelled
    cluster.start_worker(1)  # declares the kinds
    wait_kind(stub, "sleep")
    wait_until(lambda: _try(lambda: stub.SubmitWorks(work_pb2.SubmitWorksRequest(
        works=[work_pb2.SubmitWorkRequest(work_id=w, kind="sleep", payload=b"60", delay_seconds=3600)
               for w in ids]), timeout=10)), 60, "works accepted")
    assert {layout.shard_of(w) for w in ids} == set(range(SHARDS))
    for work_id in ids[:8]:
        assert stub.GetWork(work_pb2.GetWorkRequest(work_id=work_id), timeout=10).state == work_pb2.SCHEDULED
    listed, token = [], ""
    while True:
        page = stub.ListWorks(work_pb2.ListWorksRequest(state=work_pb2.SCHEDULED, page_size=7, page_token=token),
                              timeout=10)
        listed += [w.work_id for w in page.works]
        token = page.next_page_token
        if not token:
            break
    assert sorted(listed) == sorted(ids)
    cancelled = stub.CancelWork(work_pb2.CancelWorkRequest(work_ids=ids), timeout=10)
    assert [w.work_id for w in cancelled.works] == ids and {w.state for w in cancelled.works} == {work_pb2.CANCELLED}
    waited = [r.work_id for batch in stub.WaitWorks(work_pb2.WaitWorksRequest(work_ids=ids), timeout=20)
              for r in batch.results]
    assert sorted(waited) == sorted(ids)

    elsewhere = next(w for w in ids if layout.shard_of(w) != 0)
    master = master_pb2_grpc.MasterStub(grpc.insecure_channel(masters[0][0].address))
    answer = master.SubmitWorks(work_pb2.SubmitWorksRequest(works=[work_pb2.SubmitWorkRequest(
        work_id=elsewhere, kind="sleep", payload=b"1")], each_on_its_own=True), timeout=10)
    assert answer.works[0].code == grpc.StatusCode.ABORTED.value[0]
    assert f"belongs to shard {layout.shard_of(elsewhere)}" in answer.works[0].message
    # A part of a move that the map does not name is refused, however it looks.
    with pytest.raises(grpc.RpcError) as refused:
        master.ImportWorks(master_pb2.ImportWorksRequest(move_key="1:0-9:1>0", source_shard=1, last_id="x"),
                           timeout=10)
    assert refused.value.code() == grpc.StatusCode.ABORTED and "no move" in refused.value.details()


def test_a_submit_stream_of_calls_spanning_shards_is_answered_with_few_threads(cluster):
    """Calls on one SubmitStream, each with works of both shards, sent at
    once to a frontend with two threads per pool: each call's parts go to
    the shards in parallel on threads of their own (shared with the calls,
    they would wait behind them for ever), and every call is answered in
    order."""
    start_sharded(cluster, 2)
    stub = frontend(cluster.start_frontend(None, "--threads", "2").address)
    cluster.start_worker(2)
    wait_kind(stub, "square")
    layout = ShardMap.even(2)
    calls = [[f"x{i}-{j}" for j in range(10)] for i in range(16)]
    assert all({layout.shard_of(w) for w in ids} == {0, 1} for ids in calls)
    requests = iter([work_pb2.SubmitWorksRequest(works=[work_pb2.SubmitWorkRequest(work_id=w, kind="square",
                                                                                 payload=b"5") for w in ids])
                     for ids in calls])
    answers = list(stub.SubmitStream(requests, timeout=60))
    assert [[w.work_id for w in a.works] for a in answers] == calls and not any(a.code for a in answers)
    ids = [w for ids in calls for w in ids]
    done = [r.work_id for batch in stub.WaitWorks(work_pb2.WaitWorksRequest(work_ids=ids), timeout=60)
            for r in batch.results if r.result == b"5 * 5 = 25"]
    assert sorted(done) == sorted(ids)


@both_journals
def test_kill_9_of_two_shards_masters_and_of_a_worker_under_load(cluster):
    """Two shards lose their active master at once, then a worker dies;
    standbys take over and every acknowledged work finishes exactly once."""
    masters = start_sharded(cluster, standbys=(0, 1))
    cluster.start_worker(2)
    doomed = cluster.start_worker(2)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    results = ResultCollector(stub, by_token=True)
    ids = [f"k-{uuid.uuid4().hex[:10]}" for _ in range(300)]
    submit_all(stub, ids[:100])
    for shard in (0, 1):
        masters[shard][0].signal(signal.SIGKILL)
    submit_all(stub, ids[100:200])
    doomed.signal(signal.SIGKILL)
    submit_all(stub, ids[200:])
    assert_exactly_once(results, ids, stub)
    results.stop()


def free_ports(count: int) -> int:
    """A base port with `count` free ports from it."""
    for _ in range(200):
        base = random.randint(20_000, 60_000)
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + count):
                    held.enter_context(socket.create_server(("127.0.0.1", port)))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


def shard_table(cluster) -> dict[int, dict]:
    return {row["shard"]: row for row in json.loads(cluster.shards("--json"))["shards"]}


def test_backends_for_every_shard(cluster):
    """Two backends run `--shards all`, a master process per shard each (an
    active master and a standby per shard): kill -9 of the active master of
    one shard fails that shard over and its backend starts it again; a shard
    added to the map gets a master on both backends."""
    cluster.shards("init", "3")
    bases = [free_ports(4), free_ports(4)]
    for base in bases:
        cluster.start_master(base, "--shards", "all", wait=True)
    wait_until(lambda: all(r["master"] and r["standbys"] == 1 for r in shard_table(cluster).values()), 60,
               "an active master and a standby for every shard")
    cluster.start_worker(2)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    results = ResultCollector(stub, by_token=True)
    ids = [f"g-{uuid.uuid4().hex[:10]}" for _ in range(200)]
    submit_all(stub, ids[:100])

    victim_address = shard_table(cluster)[1]["master"]
    victim = next(pid for pid in os.listdir("/proc") if pid.isdigit() and _listens(int(pid), victim_address))
    os.kill(int(victim), signal.SIGKILL)
    submit_all(stub, ids[100:])
    assert_exactly_once(results, ids, stub)
    wait_until(lambda: shard_table(cluster)[1]["standbys"] == 1, 60, "the killed master started again, a standby")
    assert shard_table(cluster)[1]["master"] != victim_address

    cluster.shards("add")
    wait_until(lambda: shard_table(cluster).get(3, {}).get("standbys") == 1, 60, "masters for the added shard")
    results.stop()


def _listens(pid: int, address: str) -> bool:
    """Whether the process is a shard's master started to listen at `address`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return b"--listen" in args and args[len(args) - 1 - args[::-1].index(b"--listen") + 1] == address.encode()


def test_the_shard_map_is_made_before_the_masters_start(cluster):
    """Works a running master holds would route elsewhere under a new map:
    init refuses then, and refuses a second map, in one line each."""
    cluster.start_master(wait=True)
    with pytest.raises(RuntimeError, match="masters are running: init the shard map before starting them"):
        cluster.shards("init", "2")
    other = cluster.__class__(workdir=cluster.workdir / "other", root=cluster.root + "-other",
                              zookeeper=cluster.zookeeper)
    other.shards("init", "2")
    with pytest.raises(RuntimeError, match="already has a shard map"):
        other.shards("init", "3")
    assert "shard map version 2: 3 shards" in other.shards("add")
    # Moves: one shard's slots at a time (refusals: test_shard_map.py), one move at a time.
    with pytest.raises(RuntimeError, match="belong to shards 0, 1"):
        other.shards("move", "--slots", "2000-2100", "--to", "2", "--wait", "0")
    assert "moving slots 0-99 from shard 0 to shard 2" in other.shards("move", "--slots", "0-99", "--to", "2",
                                                                      "--wait", "0")
    with pytest.raises(RuntimeError, match="one move at a time"):
        other.shards("move", "--slots", "100-199", "--to", "2", "--wait", "0")
    assert json.loads(other.shards("--json"))["moving"] == {"first": 0, "last": 99, "from": 0, "to": 2}


MOVE_STEPS = ("started", "copied", "released")


@both_journals
def test_slots_move_under_load_through_kill_9_of_the_source_and_the_target_at_each_step(cluster):
    """Three moves while works flow; in each, the source's and the target's
    active masters are killed at different steps (every step of both sides
    once). Every acknowledged work finishes exactly once; moved ids stay
    deduplicated; works of moved slots are found on their new shard."""
    cluster.env["DWORKERS_MOVE_STEP_PAUSE"] = "1.5"  # time to kill a master between steps
    masters = start_sharded(cluster, shards=2, standbys=(0, 1))
    cluster.start_worker(2)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    results = ResultCollector(stub, by_token=True)
    before = [f"b-{uuid.uuid4().hex[:10]}" for _ in range(400)]
    submit_all(stub, before)  # results of these are retained: their dedup must move too
    producer = Producer(stub, payload=b"5", prefix=f"p{uuid.uuid4().hex[:6]}")

    def logs(shard: int) -> str:
        return "".join(m.log() for m in masters[shard])

    def kill_active(shard: int) -> None:
        info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
        address = info.shards[shard].master.address
        victim = next(m for m in masters[shard] if m.address == address and m.alive())
        victim.signal(signal.SIGKILL)
        masters[shard].append(cluster.start_master(None, "--shard", str(shard), wait=True))

    plan = [((0, 511), "started", "released"), ((2048, 2559), "copied", "started"), ((512, 1023), "released", "copied")]
    for (first, last), kill_source_at, kill_target_at in plan:
        source = ShardMap.even(2).owners[first]
        target = 1 - source
        move = f"moving slots {first}-{last} from shard {source} to shard {target}"
        done = threading.Thread(target=cluster.shards, args=("move", "--slots", f"{first}-{last}", "--to",
                                                             str(target)))
        done.start()
        for step in MOVE_STEPS:
            line = f"{move}: {step}"
            wait_until(lambda line=line, source=source: line in logs(source), 60, line)
            if step == "started":  # ClusterInfo shows the move under way
                assert any(s.move == move[len("moving "):] for s in stub.ClusterInfo(
                    work_pb2.ClusterInfoRequest(), timeout=10).shards)
            if step == kill_source_at:
                kill_active(source)
            if step == kill_target_at:
                kill_active(target)
        done.join(120)
        assert not done.is_alive(), f"{move} did not end"
        assert "moved slots" in logs(source)
    acked = producer.stop()
    assert len(acked) > 50
    missing = results.wait_for(before + acked, timeout=90)
    assert not missing, [(w, stub.GetWork(work_pb2.GetWorkRequest(work_id=w), timeout=10)) for w in sorted(missing)[:3]]
    assert_exactly_once(results, before + acked, stub)
    # Every id is still known as a duplicate where its slot is now.
    payload = {w: b"3" if i < len(before) // 2 else b"4" for i, w in enumerate(before)} | dict.fromkeys(acked, b"5")
    everything = before + acked
    for i in range(0, len(everything), 500):
        answer = stub.SubmitWorks(work_pb2.SubmitWorksRequest(works=[
            work_pb2.SubmitWorkRequest(work_id=w, kind="square", payload=payload[w]) for w in everything[i:i + 500]]),
            timeout=30)
        assert all(a.duplicate for a in answer.works)
    final = ShardMap.even(2)
    for (first, last), _, _ in plan:
        final = final.with_slots_moved(first, last, 1 - ShardMap.even(2).owners[first])
    assert f"slots {final.slot_count(0)} " in cluster.shards().replace("  ", " ")
    moved = [w for w in before if final.shard_of(w) != ShardMap.even(2).shard_of(w)]
    assert moved
    status = stub.GetWork(work_pb2.GetWorkRequest(work_id=moved[0]), timeout=10)
    assert status.state == work_pb2.DONE
    results.stop()


@pytest.mark.parametrize("journal", ["postgresql"], indirect=True)
def test_a_move_carries_large_payloads_the_journal_keeps_apart(cluster):
    """120 pending works of 200 KB (24 MB, kept in PostgreSQL, not in the
    master) move in parts bounded with their payloads, and each runs on its
    new shard with its payload whole."""
    start_sharded(cluster, shards=2)
    stub = frontend(cluster.start_frontend().address)
    worker = cluster.start_worker(1, "--jobs", "tests.jobs_for_tests")
    wait_kind(stub, "digest")
    worker.kill()
    ids = [w for w in (f"big-{n}" for n in range(2000)) if ShardMap.even(2).owners[slot_of(w)] == 0][:120]
    payloads = {w: os.urandom(200_000) for w in ids}
    for i in range(0, len(ids), 20):
        stub.SubmitWorks(work_pb2.SubmitWorksRequest(works=[
            work_pb2.SubmitWorkRequest(work_id=w, kind="digest", payload=payloads[w]) for w in ids[i:i + 20]]),
            timeout=60)
    cluster.shards("move", "--slots", "0-2047", "--to", "1")
    results = ResultCollector(stub)
    cluster.start_worker(2, "--jobs", "tests.jobs_for_tests")
    assert not results.wait_for(ids, timeout=120)
    assert {r.shard for r in results.results} == {1}
    assert all(r.result.decode() == hashlib.sha256(payloads[r.work_id]).hexdigest() for r in results.results)
    results.stop()
