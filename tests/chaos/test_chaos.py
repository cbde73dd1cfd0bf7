"""Chaos, on each journal, and on a cluster of 3 shards: a load of works
while random masters, workers and frontends are killed, stopped and paused
(and, with shards, slots move between shards all along),
ZooKeeper restarts once and, with the PostgreSQL journal, PostgreSQL is
killed and restarted once. Half the works
carry payloads of 1-200 KiB and come back with results as large; the others
have priorities, some are delayed, and a client cancels works as they flow.
Then: the acked works are exactly the finished works in the result stream,
none twice, each large result is its work's payload, every confirmed cancel
ended its work CANCELLED (and nothing else was cancelled), and a fresh
replay of the journal gives the live master's results. A client awaits
every fifth work's result over AwaitResults streams (opened again on any
frontend when one breaks): each comes, as the result stream has it.

CI runs a bounded version; `make chaos` sets DWORKERS_CHAOS_SECONDS=300."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter

import grpc
import pytest
from kazoo.exceptions import ConnectionLoss

from dworkers.common.pgserver import PostgreSQLServer
from dworkers.common.shards import encode_cursors
from dworkers.local_cluster import LocalCluster, wait_serving
from dworkers.master.shell import recover_state
from dworkers.v1 import work_pb2
from tests.helpers import frontend, wait_kind
from tests.journals import KINDS, journal_reader

pytestmark = pytest.mark.chaos

CHAOS_SECONDS = float(os.environ.get("DWORKERS_CHAOS_SECONDS", "20"))
SESSION_TIMEOUT = 2.0


class Clients:
    """Producers and a subscriber that move to another frontend when one dies."""

    def __init__(self, cluster: LocalCluster, producers: int = 3, sharded: bool = False):
        self.cluster = cluster
        self.sharded = sharded
        self.acked: list[str] = []
        self.digests: dict[str, bytes] = {}  # of each large work's payload: its result must match
        self.results: list[work_pb2.WorkResult] = []
        self.cancels_tried: set[str] = set()  # whatever their answer (a lost answer may hide a cancel)
        self.cancelled: set[str] = set()  # confirmed
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._produce, args=(i,), daemon=True) for i in range(producers)]
        self.threads.append(threading.Thread(target=self._cancel, daemon=True))
        self.threads.append(threading.Thread(target=self._subscribe, daemon=True))
        self.awaited: dict[str, work_pb2.WorkResult | None] = {}  # every fifth acked id: its awaited result
        self.refused: dict[str, int] = {}
        self.threads.append(threading.Thread(target=self._await, daemon=True))
        for thread in self.threads:
            thread.start()

    def _frontends(self):
        return [s for s in self.cluster.services if s.role == "frontend" and s.alive()]

    def _produce(self, index: int) -> None:
        n, rng = 0, random.Random(index)
        while not self.stopping.is_set():
            n += 1
            if n % 2:
                request = work_pb2.SubmitWorkRequest(work_id=f"c{index}-{n}", kind="square", payload=str(n).encode(),
                                                     priority=rng.randint(-2, 2))
                if rng.random() < 0.2:
                    request.delay_seconds = rng.uniform(0.2, 3.0)
            else:  # 1 KiB to 200 KiB, as many small as large
                size = int(math.exp(rng.uniform(math.log(1024), math.log(200 * 1024))))
                payload = rng.randbytes(size)
                request = work_pb2.SubmitWorkRequest(work_id=f"c{index}-{n}", kind="echo", payload=payload)
                with self.lock:
                    self.digests[request.work_id] = hashlib.sha256(payload).digest()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the same id again, through any frontend, until acked
                candidates = self._frontends()
                if not candidates:
                    time.sleep(0.1)
                    continue
                try:
                    frontend(random.choice(candidates).address).SubmitWork(request, timeout=5)
                    with self.lock:
                        self.acked.append(request.work_id)
                        if n % 5 == 0:
                            self.awaited[request.work_id] = None
                    break
                except grpc.RpcError:
                    time.sleep(0.05)
            time.sleep(random.uniform(0, 0.02))

    def _cancel(self) -> None:
        rng = random.Random(99)
        while not self.stopping.is_set():
            time.sleep(rng.uniform(0.05, 0.3))
            candidates = self._frontends()
            with self.lock:
                recent = self.acked[-40:]
            if not candidates or not recent:
                continue
            work_id = rng.choice(recent)
            with self.lock:
                self.cancels_tried.add(work_id)
            try:
                frontend(random.choice(candidates).address).CancelWork(
                    work_pb2.CancelWorkRequest(work_ids=[work_id]), timeout=5)
                with self.lock:
                    self.cancelled.add(work_id)
            except grpc.RpcError:
                pass  # finished already, or no master now: either end is fine

    def _subscribe(self) -> None:
        """Resumes after the last result of each shard (the tokens of a
        cluster of several shards say the same)."""
        last: dict[int, int] = {}
        while True:
            candidates = self._frontends()
            if not candidates:
                time.sleep(0.1)
                continue
            request = work_pb2.WatchResultsRequest(resume_token=encode_cursors(last)) if self.sharded \
                else work_pb2.WatchResultsRequest(after_sequence=last.get(0, 0))
            stream = frontend(random.choice(candidates).address).WatchResults(request)
            try:
                for batch in stream:
                    with self.lock:
                        for r in batch.results:
                            if r.sequence > last.get(r.shard, 0):
                                last[r.shard] = r.sequence
                                self.results.append(r)
            except grpc.RpcError:
                time.sleep(0.1)

    def _await(self) -> None:
        """One AwaitResults stream at a time, to a random frontend: every id
        still awaited is sent when it opens, new ones as they are acked."""
        while True:
            candidates = self._frontends()
            if not candidates:
                time.sleep(0.1)
                continue
            ended = threading.Event()
            stream = frontend(random.choice(candidates).address).AwaitResults(self._await_requests(ended))
            try:
                for response in stream:
                    with self.lock:
                        for r in response.results:
                            self.awaited[r.work_id] = r
                        for refusal in response.refused:
                            self.refused[refusal.work_id] = refusal.code
            except grpc.RpcError:
                time.sleep(0.1)
            finally:
                ended.set()

    def _await_requests(self, ended: threading.Event):
        sent: set[str] = set()
        while not ended.is_set():
            with self.lock:
                new = [w for w, r in self.awaited.items() if r is None and w not in sent and w not in self.refused]
            sent.update(new[:10_000])
            if new:
                yield work_pb2.AwaitRequest(work_ids=new[:10_000])
            ended.wait(0.05)

    def stop_producing(self) -> list[str]:
        self.stopping.set()
        for thread in self.threads[:-2]:
            thread.join(timeout=150)
        return list(self.acked)

    def wait_results(self, ids: set[str], timeout: float) -> set[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                missing = ids - {r.work_id for r in self.results}
            if not missing:
                return missing
            time.sleep(0.2)
        return missing


class Chaos:
    def __init__(self, cluster: LocalCluster, seed: int, database: PostgreSQLServer | None = None,
                 shards: int = 1):
        self.cluster = cluster
        self.database = database
        self.shards = shards
        self.random = random.Random(seed)
        self.faults: Counter = Counter()

    def move_slots(self) -> None:
        """Starts moving a random run of one shard's slots to another (the
        masters go on with it through whatever comes next)."""
        layout = json.loads(self.cluster.shards("--json"))
        if layout["moving"] is not None:
            return  # one move at a time
        ranges = [(int(a), int(b or a), row["shard"]) for row in layout["shards"] for a, _, b in
                  (r.partition("-") for r in row["ranges"])]
        first, last, source = self.random.choice(ranges)
        start = self.random.randint(first, last)
        end = min(last, start + self.random.randint(16, 512))
        target = self.random.choice([k for k in range(self.shards) if k != source])
        self.cluster.shards("move", "--slots", f"{start}-{end}", "--to", str(target), "--wait", "0")
        self.faults["move_slots"] += 1

    def moves_ended(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if json.loads(self.cluster.shards("--json"))["moving"] is None:
                return True
            time.sleep(0.5)
        return False

    def _pick(self, role: str):
        alive = [s for s in self.cluster.services if s.role == role and s.alive()]
        return self.random.choice(alive) if alive else None

    def _active_master(self):
        """An active master (of any shard), or the first one found serving."""
        serving = [s for s in self.cluster.masters()
                   if wait_serving(s.address, "dworkers.v1.Master", timeout=0.2)]
        return self.random.choice(serving) if serving else self.cluster.active_master(timeout=30)

    def _heal(self) -> None:
        """Replaces dead processes, as a supervisor (or Kubernetes) would."""
        for service in list(self.cluster.services):
            if not service.alive():
                self.cluster.restart(service)

    def inject(self) -> None:
        fault = self.random.choice(["kill_master", "term_master", "pause_master", "kill_worker", "kill_frontend"])
        role = fault.split("_")[1]
        victim = self._active_master() if role == "master" else self._pick(role)
        if victim is None:
            return
        if fault.startswith("kill"):
            victim.kill()
        elif fault == "term_master":
            victim.stop()
        else:  # paused past its session: deposed while it sleeps
            victim.signal(signal.SIGSTOP)
            time.sleep(SESSION_TIMEOUT + 1.0)
            victim.signal(signal.SIGCONT)
        self.faults[fault] += 1

    def restart_zookeeper(self) -> None:
        self.cluster.zookeeper.stop(kill=True)
        time.sleep(1.0)
        self.cluster.zookeeper.start()
        self.faults["restart_zookeeper"] += 1

    def restart_postgresql(self) -> None:
        assert self.database is not None
        self.database.stop(kill=True)
        time.sleep(1.0)
        self.database.start()
        self.faults["restart_postgresql"] += 1

    def run(self, seconds: float) -> None:
        start = time.monotonic()
        end = start + seconds
        # once each, at a third and at two thirds of the run
        servers = [(start + seconds / 3, self.restart_zookeeper)]
        if self.database is not None:
            servers.append((start + seconds * 2 / 3, self.restart_postgresql))
        while time.monotonic() < end:
            time.sleep(self.random.uniform(1.5, 3.5))
            if servers and time.monotonic() >= servers[0][0]:
                servers.pop(0)[1]()
            elif self.shards > 1 and self.random.random() < 0.4:
                self.move_slots()
            else:
                self.inject()
            self._heal()


@pytest.mark.timeout(CHAOS_SECONDS + 420)
@pytest.mark.parametrize(("journal_kind", "shards"), [(kind, 1) for kind in KINDS] + [("zookeeper", 3)])
def test_chaos(tmp_path, journal_kind, shards):
    database = PostgreSQLServer(tmp_path / "postgresql").start() if journal_kind == "postgresql" else None
    cluster = LocalCluster(workdir=tmp_path, root=f"/chaos-{uuid.uuid4().hex[:6]}", session_timeout=SESSION_TIMEOUT,
                           journal=database.url() if database else "")
    cluster.start_zookeeper()
    try:
        if shards > 1:
            cluster.shards("init", str(shards))
        for shard in range(shards):
            for _ in range(2):
                cluster.start_master(None, "--shard", str(shard), wait=True)
        for _ in range(2):
            cluster.start_worker(2, "--jobs", "tests.jobs_for_tests")
        for _ in range(2):
            cluster.start_frontend()
        wait_kind(frontend(cluster.services[-1].address), "echo")
        clients = Clients(cluster, sharded=shards > 1)
        chaos = Chaos(cluster, seed=int(os.environ.get("DWORKERS_CHAOS_SEED", time.time())), database=database,
                      shards=shards)
        chaos.run(CHAOS_SECONDS)
        assert chaos.moves_ended(120), "a move of slots did not end"
        acked = clients.stop_producing()
        missing = clients.wait_results(set(acked), timeout=120)
        time.sleep(1.0)
        with clients.lock:
            streamed = list(clients.results)
        counts = Counter(r.work_id for r in streamed)
        duplicated = sorted(i for i, c in counts.items() if c > 1)
        unacked = sorted(set(counts) - set(acked))
        large = sum(1 for i in acked if i in clients.digests)
        states = Counter(work_pb2.State.Name(r.state) for r in streamed)
        print(f"\nchaos ({journal_kind} journal, {shards} shard(s)): works={len(acked)} large={large} {dict(states)} "
              f"cancels={len(clients.cancels_tried)} (confirmed {len(clients.cancelled)}) "
              f"faults={sum(chaos.faults.values())} ({dict(chaos.faults)}) "
              f"lost={len(missing)} duplicated={len(duplicated)} seconds={CHAOS_SECONDS:g}")
        assert not missing, f"acked works lost: {sorted(missing)[:10]}"
        assert not duplicated, f"works finished twice: {duplicated[:10]}"
        assert not unacked, f"results for works never acked: {unacked[:10]}"
        for shard in range(shards):
            sequences = [r.sequence for r in streamed if r.shard == shard]
            assert sequences == sorted(sequences)
        wrong = [r.work_id for r in streamed if r.work_id in clients.digests and r.state == work_pb2.DONE
                 and hashlib.sha256(r.result).digest() != clients.digests[r.work_id]]
        assert not wrong, f"large works with a wrong result: {wrong[:10]}"
        ended = {r.work_id: r.state for r in streamed}
        not_cancelled = [i for i in clients.cancelled if ended.get(i) != work_pb2.CANCELLED]
        assert not not_cancelled, f"cancels confirmed, works not CANCELLED: {not_cancelled[:10]}"
        strays = [i for i, state in ended.items() if state != work_pb2.DONE and i not in clients.cancels_tried]
        assert not strays, f"works neither DONE nor cancelled by the client: {strays[:10]}"
        # Every awaited result came, as streamed; an id is refused only once its result left retention.
        awaited_deadline = time.monotonic() + 60
        while time.monotonic() < awaited_deadline and any(
                r is None and w not in clients.refused for w, r in dict(clients.awaited).items()):
            time.sleep(0.2)
        with clients.lock:
            awaited, refused = dict(clients.awaited), dict(clients.refused)
        unanswered = [w for w, r in awaited.items() if r is None and w not in refused]
        assert not unanswered, f"awaited results that never came: {unanswered[:10]}"
        final = {r.work_id: r for r in streamed}
        # (a result a move copied has its new shard's number: the state and bytes must match)
        wrongly = [w for w, r in awaited.items() if r is not None
                   and (r.state, r.result, r.error) != (final[w].state, final[w].result, final[w].error)]
        assert not wrongly, f"awaited results unlike the streamed ones: {wrongly[:10]}"
        not_found = grpc.StatusCode.NOT_FOUND.value[0]
        refused_early = [w for w, code in refused.items() if code != not_found or w not in ended]
        assert not refused_early, f"awaited ids refused: {[(w, refused[w]) for w in refused_early[:10]]}"
        print(f"awaited {len(awaited)} results over AwaitResults streams ({len(refused)} past retention)")

        # A fresh replay of the journal gives what the live master streamed.
        # The masters stop first: a live one may compact what is being read.
        master = cluster.active_master(timeout=30)
        assert wait_serving(master.address, "dworkers.v1.Master")
        masters = [s for s in cluster.services if s.role == "master" and s.alive()]
        for service in masters:
            service.signal(signal.SIGTERM)
        for service in masters:
            service.process.wait(timeout=30)
        for shard in range(shards):
            state = _replayed(cluster, shard)
            mine = [r for r in streamed if r.shard == shard]
            # (results a move brought here are numbered, not published: their source's stream had them)
            replayed = {s: r.work_id for s, r in state.results.items() if s not in state.imported}
            assert replayed == {r.sequence: r.work_id for r in mine if r.sequence in replayed}
            # Older results may have left the retention window (by bytes, with large results).
            assert set(replayed) == {r.sequence for r in mine if r.sequence > state.forgotten_up_to}
            assert max(set(range(state.last_sequence + 1)) - state.imported) == mine[-1].sequence
            assert not state.pending and not state.in_progress and not state.scheduled
    finally:
        cluster.stop()
        if database is not None:
            database.remove()


def _replayed(cluster, shard: int):
    """The state a recovering master of the shard would rebuild (read again
    if ZooKeeper, restarted by the chaos, drops the reading session)."""
    for attempt in range(3):
        try:
            with journal_reader(cluster, shard) as journal:
                state, _, _ = recover_state(journal)
            return state
        except ConnectionLoss:
            if attempt == 2:
                raise
