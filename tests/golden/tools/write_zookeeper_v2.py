# Not run by the tests: how tests/golden/zookeeper-v2 was written (with the code of its day).
"""Writes a journal in the second format (explicit positions, batches in parts,
attempt tokens) from a history the master's decisions made, and dumps it."""
import pathlib
import random
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
from dworkers.v1 import journal_pb2, master_pb2, work_pb2

from dworkers.common import zk
from dworkers.common.zkserver import ZooKeeperServer
from dworkers.master.domain.effects import Send
from dworkers.master.domain.master import CoreSettings, Master
from dworkers.master.domain.state import WorkState
from dworkers.master.journal import ZooKeeperJournal
from dworkers.master.shell import recover_state

out = pathlib.Path(sys.argv[1])
rng = random.Random(11)
settings = CoreSettings(retention_count=40)
m = Master(WorkState(strict=True), settings, epoch=1)
events, now = [], 100.0

class Conn:
    def send(self, *a): pass

conn = Conn()
running = {}
def commit():
    step = m.take()
    events.append(list(step.events))
    for e in step.effects:
        if isinstance(e, Send) and e.message.HasField("works"):
            for a in e.message.works.assignments:
                running[a.worker_id] = a

slots = [f"g-{i}" for i in range(4)]
m.register(conn, master_pb2.RegisterWorker(worker_ids=slots, host="g", kinds=["square", "blob"]), now); commit()
n = 0
for round_ in range(30):
    works = []
    for _ in range(rng.randint(1, 6)):
        n += 1
        big = rng.random() < 0.15
        works.append(work_pb2.Work(work_id=f"g{n}", kind=rng.choice(["square", "blob"]),
                                   payload=bytes([n % 251]) * 70_000 if big else str(n).encode(),
                                   max_attempts=2))
    m.submit(works, now); commit()
    m.request_work(conn, [s for s in slots if s not in running], now); commit()
    for slot, a in list(running.items()):
        roll = rng.random()
        del running[slot]
        if roll < 0.6:
            m.report(conn, [master_pb2.Completion(worker_id=slot, work_id=a.work.work_id, attempt_token=a.attempt_token, result=a.work.payload[:100] + b"=")], [], now)
        elif roll < 0.8:
            m.report(conn, [], [master_pb2.Failure(worker_id=slot, work_id=a.work.work_id, attempt_token=a.attempt_token, error="boom")], now)
        elif roll < 0.9:
            m.report(conn, [], [master_pb2.Failure(worker_id=slot, work_id=a.work.work_id, attempt_token=a.attempt_token, error="bye", returned=True)], now)
        else:
            running[slot] = a  # still running
        commit()
    now += 5
    if round_ == 20:  # a failover
        state = WorkState(strict=True)
        for batch in events:
            for e in batch: state.apply(e)
        m = Master(state, settings, epoch=2); m.recovered(now); commit()
        running.clear()
        m.register(conn, master_pb2.RegisterWorker(worker_ids=slots, host="g", kinds=["square", "blob"]), now); commit()
    m.tick(now, m.state.last_sequence); commit()

server = ZooKeeperServer(tempfile.mkdtemp()).start()
client = zk.connect(server.hosts)
try:
    journal = ZooKeeperJournal(client, "/golden/journal")
    batches = [b for b in events if b]
    position = -1
    half = len(batches) // 4
    for i, batch in enumerate(batches):
        position += 1
        journal.append(position, journal_pb2.JournalBatch(epoch=1 if i < half else 2, events=batch)).result(10)
        if i == half:
            state = WorkState()
            for b in batches[:i + 1]:
                for e in b: state.apply(e)
            journal.write_snapshot(position, state.to_snapshot().SerializeToString())
            journal.compact()
    replayed, _, count = recover_state(journal)
    live = m.state
    assert replayed.to_snapshot() == live.to_snapshot(), "replay differs"
    (out / "zookeeper").mkdir(parents=True, exist_ok=True)
    def dump(path):
        data, _ = client.get(path)
        rel = path[len("/golden/"):]
        target = out / "zookeeper" / rel
        children = client.get_children(path)
        for child in children:
            dump(f"{path}/{child}")
        if children:
            target.mkdir(parents=True, exist_ok=True)
            (target / ".data").write_bytes(data)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    for top in client.get_children("/golden"):
        dump(f"/golden/{top}")
    (out / "expected.snapshot").write_bytes(live.to_snapshot().SerializeToString())
    parts = client.get_children("/golden/journal-parts")
    print("batches", len(batches), "replayed", count, "parts", len(parts), "pending", len(live.pending), "in_progress", len(live.in_progress), "results", len(live.results), "forgotten", live.forgotten_up_to)
finally:
    client.stop(); client.close(); server.stop()
