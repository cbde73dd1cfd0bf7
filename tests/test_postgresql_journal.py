"""The PostgreSQL journal with real processes: the fence in the database
stops a master that still believes it leads; PostgreSQL killed with -9 and
restarted under load loses nothing acknowledged; a master cut off from
PostgreSQL (ZooKeeper fine) yields to a standby that can reach it; schema
migrations; passwords stay out of logs; ZooKeeper holds no journal data."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import socket
import threading
import time
import uuid

import grpc
import psycopg
import pytest

from dworkers import devcerts
from dworkers.common import zk
from dworkers.common.pgserver import PostgreSQLServer
from dworkers.local_cluster import LocalCluster, wait_serving
from dworkers.master.journal import FencedError, JournalError, PostgreSQLJournal
from dworkers.master.journal.schema import LATEST, SchemaTooNew, migrate
from dworkers.v1 import journal_pb2, work_pb2
from tests.helpers import (
    ResultCollector,
    assert_exactly_once,
    frontend,
    submit_until_acked,
    wait_kind,
    wait_until,
)
from tests.test_faults import Producer

pytestmark = pytest.mark.e2e


def fence_of(url: str, root: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT fence FROM dworkers_journal WHERE name = %s", (root,)).fetchone()
    return row[0] if row else 0


@pytest.fixture
def pg_cluster(zookeeper, postgresql, tmp_path, request):
    c = LocalCluster(workdir=tmp_path, root=f"/pg-{uuid.uuid4().hex[:8]}", session_timeout=2.0,
                     zookeeper=zookeeper, journal=postgresql.url())
    yield c
    c.stop()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        c.print_logs()


def test_a_master_whose_fence_was_raised_stops_acting_though_zookeeper_still_names_it(pg_cluster, postgresql):
    """A split ZooKeeper cannot see: another writer took the journal. The
    master's next append is refused; it steps down, and takes the journal
    back only by raising the fence again (after replaying what is there)."""
    master = pg_cluster.start_master(wait=True)
    pg_cluster.start_worker(2)
    stub = frontend(pg_cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "square")
    before = [submit_until_acked(stub, "square", str(n).encode(), f"before-{n}").work_id for n in range(20)]
    fence = fence_of(postgresql.url(), pg_cluster.root)
    intruder = PostgreSQLJournal(postgresql.url(), pg_cluster.root, holder="intruder")
    assert intruder.take_over() == fence + 1
    intruder.close()
    after = [submit_until_acked(stub, "square", str(n).encode(), f"after-{n}").work_id for n in range(20)]
    assert "another master took over" in master.log() and "stepping down" in master.log()
    assert fence_of(postgresql.url(), pg_cluster.root) >= fence + 2  # it took the journal back
    assert_exactly_once(results, before + after, stub)
    results.stop()


def test_postgresql_killed_and_restarted_under_load_loses_nothing_acknowledged(zookeeper, tmp_path):
    database = PostgreSQLServer(tmp_path / "postgresql").start()
    cluster = LocalCluster(workdir=tmp_path, root=f"/pgkill-{uuid.uuid4().hex[:6]}", session_timeout=2.0,
                           zookeeper=zookeeper, journal=database.url())
    try:
        cluster.start_master(wait=True)
        cluster.start_master(wait=True)
        cluster.start_worker(2)
        stub = frontend(cluster.start_frontend().address)
        results = ResultCollector(stub)
        wait_kind(stub, "square")
        producer = Producer(stub, prefix="pg")
        wait_until(lambda: len(producer.acked) >= 20, 30, "the first acked works")
        database.stop(kill=True)
        # While PostgreSQL is down, a submission is refused, not left hanging.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitWork(work_pb2.SubmitWorkRequest(work_id="while-down", kind="square", payload=b"2"),
                            timeout=20)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert time.monotonic() - started < 15
        database.start()
        before = len(producer.acked)
        wait_until(lambda: len(producer.acked) >= before + 20, 60, "works acked after PostgreSQL returned")
        acked = producer.stop()
        assert_exactly_once(results, acked, stub)
        results.stop()
    finally:
        cluster.stop()
        database.remove()


class TcpProxy:
    """Forwards a local port to PostgreSQL until cut (then refuses and drops
    every connection): one backend loses PostgreSQL, nothing else does."""

    def __init__(self, port: int):
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.cut_off = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_a_master_cut_off_from_postgresql_yields_to_a_standby_that_reaches_it(zookeeper, postgresql, tmp_path):
    proxy = TcpProxy(postgresql.port)
    root = f"/pgcut-{uuid.uuid4().hex[:6]}"
    through_proxy = postgresql.url().replace(f":{postgresql.port}/", f":{proxy.port}/")
    cut_off = LocalCluster(workdir=tmp_path / "a", root=root, session_timeout=2.0, zookeeper=zookeeper,
                           journal=through_proxy)
    direct = LocalCluster(workdir=tmp_path / "b", root=root, session_timeout=2.0, zookeeper=zookeeper,
                          journal=postgresql.url())
    try:
        first = cut_off.start_master(wait=True)
        standby = direct.start_master(wait=True)
        direct.start_worker(2)
        stub = frontend(direct.start_frontend().address)
        results = ResultCollector(stub)
        wait_kind(stub, "square")
        assert wait_serving(first.address, "dworkers.v1.Master", timeout=20)
        producer = Producer(stub, prefix="cut")
        wait_until(lambda: len(producer.acked) >= 10, 30, "the first acked works")
        proxy.cut()
        assert wait_serving(standby.address, "dworkers.v1.Master", timeout=30)
        before = len(producer.acked)
        wait_until(lambda: len(producer.acked) >= before + 10, 30, "works acked by the standby")
        acked = producer.stop()
        assert "yielding to a standby" in first.log() and first.alive()
        assert not wait_serving(first.address, "dworkers.v1.Master", timeout=1)
        assert_exactly_once(results, acked, stub)
        results.stop()
    finally:
        cut_off.stop()
        direct.stop()


def backlog_payload(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * 3200  # 100 KiB, different for each work


@pytest.mark.timeout(600)
def test_a_gigabyte_backlog_is_drained_exactly_once_while_zookeeper_and_the_master_stay_small(pg_cluster):
    """10,000 works of 100 KiB accepted with no worker running (1 GB pending),
    then drained: every payload arrives whole (its job returns its digest),
    every work finishes once, ZooKeeper's data does not grow and the master's
    memory stays far below the backlog."""
    count = 10_000
    master = pg_cluster.start_master(wait=True)
    stub = frontend(pg_cluster.start_frontend().address)
    client = zk.connect(pg_cluster.zk)
    try:
        probe = pg_cluster.start_worker(1, "--jobs", "tests.jobs_for_tests")
        wait_kind(stub, "digest")
        probe.stop()

        def zookeeper_data() -> tuple[int, int]:
            count_, size, stack = 0, 0, [pg_cluster.root]
            while stack:
                path = stack.pop()
                count_, size = count_ + 1, size + len(client.get(path)[0])
                stack += [f"{path}/{child}" for child in client.get_children(path)]
            return count_, size

        zk_before, rss_before = zookeeper_data(), rss(master.pid)
        for start in range(0, count, 50):  # 5 MB per call
            stub.SubmitWorks(work_pb2.SubmitWorksRequest(works=[
                work_pb2.SubmitWorkRequest(work_id=f"big-{i}", kind="digest", payload=backlog_payload(i))
                for i in range(start, start + 50)]), timeout=60)
        info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
        assert info.pending == count
        zk_after, rss_after = zookeeper_data(), rss(master.pid)
        assert zk_after == zk_before, f"ZooKeeper grew with the backlog: {zk_before} -> {zk_after} (znodes, bytes)"
        assert rss_after - rss_before < 150 * 2**20, (
            f"the master grew by {(rss_after - rss_before) / 2**20:.0f} MiB with a 1 GB backlog")
        results = ResultCollector(stub)
        for _ in range(2):
            pg_cluster.start_worker(4, "--jobs", "tests.jobs_for_tests")
        ids = [f"big-{i}" for i in range(count)]
        assert_exactly_once(results, ids, stub, timeout=400)
        wrong = [r.work_id for r in results.results
                 if r.result.decode() != hashlib.sha256(backlog_payload(int(r.work_id[4:]))).hexdigest()]
        assert not wrong, f"payloads that did not arrive whole: {wrong[:5]}"
        with psycopg.connect(pg_cluster.journal) as conn:
            left = conn.execute("SELECT count(*) FROM dworkers_payload WHERE journal = %s",
                                (pg_cluster.root,)).fetchone()[0]
        assert left == 0, f"{left} payloads of finished works left in PostgreSQL"
        results.stop()
    finally:
        client.stop()
        client.close()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_an_endless_stream_of_work_keeps_the_postgresql_journal_bounded(pg_cluster):
    """Retention and compaction on PostgreSQL: batches a snapshot covers are
    deleted, one snapshot is kept, no payload outlives its work, and results
    leave the deduplication window as on ZooKeeper."""
    pg_cluster.start_master(None, "--retention-count", "50", "--snapshot-every", "300", "--snapshot-interval", "1",
                            wait=True)
    pg_cluster.start_worker(2)
    stub = frontend(pg_cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "square")

    def rows() -> tuple[int, int, int]:
        with psycopg.connect(pg_cluster.journal) as conn:
            return tuple(conn.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s", (pg_cluster.root,))
                         .fetchone()[0] for table, column in (("dworkers_batch", "journal"),
                                                               ("dworkers_snapshot", "journal"),
                                                               ("dworkers_payload", "journal")))

    batches = []
    for round_ in range(4):
        ids = [w.work_id for w in stub.SubmitWorks(work_pb2.SubmitWorksRequest(works=[
            work_pb2.SubmitWorkRequest(work_id=f"r{round_}-{n}", kind="square", payload=b"6") for n in range(400)]),
            timeout=30).works]
        assert not results.wait_for(ids, timeout=60)
        wait_until(lambda: rows()[1:] == (1, 0) and rows()[0] < 40, 30, "a snapshot and a compaction")
        batches.append(rows()[0])
    assert max(batches) < 40, f"journal rows grow with history: {batches}"
    with pytest.raises(grpc.RpcError) as error:
        stub.GetWork(work_pb2.GetWorkRequest(work_id="r0-0"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert not submit_until_acked(stub, "square", b"6", "r0-0").duplicate
    assert submit_until_acked(stub, "square", b"6", "r3-399").duplicate
    results.stop()


def test_results_beyond_the_memory_window_are_served_from_postgresql(pg_cluster):
    """60 MB of results (300 of 200 KiB): past --retention-bytes (32 MiB, which
    would forget the oldest on ZooKeeper) and past the master's cache of
    recent results; every one stays readable, by GetWork and by a stream
    resumed from the start, whole and in stream messages below 2 MiB."""
    pg_cluster.start_master(wait=True)
    pg_cluster.start_worker(4, "--jobs", "tests.jobs_for_tests")
    stub = frontend(pg_cluster.start_frontend().address)
    results = ResultCollector(stub)
    wait_kind(stub, "echo")
    payloads = {f"e-{i}": bytes([i % 256]) * (200 * 1024) for i in range(300)}
    for start in range(0, 300, 20):
        stub.SubmitWorks(work_pb2.SubmitWorksRequest(works=[
            work_pb2.SubmitWorkRequest(work_id=w, kind="echo", payload=payloads[w])
            for w in list(payloads)[start:start + 20]]), timeout=60)
    assert_exactly_once(results, list(payloads), stub, timeout=120)
    results.stop()
    for work_id in ("e-0", "e-1", "e-150"):
        status = stub.GetWork(work_pb2.GetWorkRequest(work_id=work_id), timeout=15)
        assert status.state == work_pb2.DONE and status.result == payloads[work_id]
    replayed: dict[str, bytes] = {}
    stream = stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=0), timeout=60)
    for message in stream:
        assert message.ByteSize() < 2 * 1024 * 1024
        replayed.update((r.work_id, r.result) for r in message.results)
        if len(replayed) == len(payloads):
            stream.cancel()
            break
    assert replayed == payloads


def test_a_password_given_in_a_file_works_and_no_password_is_logged(zookeeper, postgresql, tmp_path):
    secret_file = tmp_path / "password"
    secret_file.write_text(postgresql.password + "\n")
    without_password = postgresql.url().replace(f":{postgresql.password}@", "@")
    cluster = LocalCluster(workdir=tmp_path, root=f"/pgpw-{uuid.uuid4().hex[:6]}", session_timeout=2.0,
                           zookeeper=zookeeper, journal=without_password)
    try:
        master = cluster.start_master(None, "--journal-password-file", str(secret_file), "--log-level", "DEBUG",
                                      wait=True)
        assert wait_serving(master.address, "dworkers.v1.Master", timeout=30)
        shown = cluster.start_master(None, "--journal", postgresql.url(), wait=True)  # in the URL: still hidden
        wait_until(lambda: "starting" in shown.log(), 10, "the start-up log line")
        for service in (master, shown):
            assert postgresql.password not in service.log()
        assert "took over the PostgreSQL journal" in master.log()
    finally:
        cluster.stop()


def test_a_wrong_password_or_a_bad_url_is_one_clear_line(zookeeper, postgresql, tmp_path):
    cluster = LocalCluster(workdir=tmp_path, root=f"/pgbad-{uuid.uuid4().hex[:6]}", session_timeout=2.0,
                           zookeeper=zookeeper)
    try:
        bad_url = cluster.start_master(None, "--journal", "mysql://u:p@h/db")
        assert bad_url.process.wait(timeout=30) == 2
        assert "expected empty (ZooKeeper) or a postgresql:// URL" in bad_url.log()
        assert "Traceback" not in bad_url.log() and "mysql://u:***@h/db" in bad_url.log()
        wrong = postgresql.url().replace(postgresql.password, "not-the-password")
        refused = cluster.start_master(None, "--journal", wrong, wait=True)
        wait_until(lambda: "password authentication failed" in refused.log(), 30, "the refusal in the log")
        assert "not-the-password" not in refused.log()
    finally:
        cluster.stop()


def test_migrations_run_once_under_concurrent_starts_and_a_newer_schema_is_refused(zookeeper, postgresql,
                                                                                   tmp_path):
    name = f"migrate_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgresql.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = postgresql.url(name)
    found: list[int] = []
    errors: list[Exception] = []

    def start() -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                found.append(migrate(conn))
        except Exception as exc:
            errors.append(exc)

    starters = [threading.Thread(target=start) for _ in range(4)]
    for t in starters:
        t.start()
    for t in starters:
        t.join(timeout=30)
    assert not errors and sorted(found) == [0, LATEST, LATEST, LATEST]
    with psycopg.connect(url, autocommit=True) as conn:
        assert migrate(conn) == LATEST  # idempotent
        conn.execute("UPDATE dworkers_schema SET version = %s", (LATEST + 1,))
        with pytest.raises(SchemaTooNew, match="newer than this dworkers"):
            migrate(conn)
    cluster = LocalCluster(workdir=tmp_path, root=f"/pgnew-{uuid.uuid4().hex[:6]}", zookeeper=zookeeper, journal=url)
    try:
        refused = cluster.start_master()
        assert refused.process.wait(timeout=30) == 2
        assert "newer than this dworkers" in refused.log() and "Traceback" not in refused.log()
    finally:
        cluster.stop()


def test_the_journal_runs_as_a_role_that_owns_one_schema_and_can_touch_nothing_else(make_cluster, postgresql):
    """The least-privilege set-up of the README: a login role owning one
    schema; the journal migrates and serves there, and the role cannot read
    or write outside it."""
    database, role, password = f"jobs_{uuid.uuid4().hex[:8]}", f"dw_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with psycopg.connect(postgresql.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    with psycopg.connect(postgresql.url(database), autocommit=True) as admin:
        admin.execute("REVOKE ALL ON DATABASE " + database + " FROM PUBLIC")
        admin.execute(f"GRANT CONNECT ON DATABASE {database} TO {role}")
        admin.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
        admin.execute("CREATE TABLE public.payroll (amount int)")
    url = f"postgresql://{role}:{password}@127.0.0.1:{postgresql.port}/{database}"
    cluster = make_cluster(journal=url)
    cluster.start_master(wait=True)
    cluster.start_master(wait=True)
    cluster.start_worker(2)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    results = ResultCollector(stub)
    acked = [submit_until_acked(stub, "square", str(n).encode()).work_id for n in range(50)]
    cluster.active_master().kill()  # the standby replays as that role too
    acked += [submit_until_acked(stub, "square", str(n).encode(), deadline=60).work_id for n in range(50, 60)]
    assert_exactly_once(results, acked, stub)
    results.stop()
    with psycopg.connect(url, autocommit=True) as conn:
        tables = {r[0] for r in conn.execute("SELECT table_schema || '.' || table_name FROM "
                                             "information_schema.tables WHERE table_name LIKE 'dworkers_%'")}
        assert tables and all(t.startswith(f"{role}.") for t in tables), tables
        for statement in ("SELECT * FROM public.payroll", "CREATE TABLE public.mine (x int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_the_journal_can_insist_on_a_verified_tls_connection(make_cluster, tmp_path):
    """libpq's own options in the URL: sslmode=verify-full checks the
    server's certificate and name; a server the CA did not sign is refused."""
    certs, other = tmp_path / "pg-tls", tmp_path / "other-ca"
    devcerts.make(certs)
    devcerts.make(other)
    server = PostgreSQLServer(tmp_path / "postgresql", tls_dir=certs).start()
    try:
        verified = f"{server.url()}?sslmode=verify-full&sslrootcert={certs / 'ca.pem'}"
        with psycopg.connect(verified) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        cluster = make_cluster(journal=verified)
        cluster.start_master(wait=True)
        cluster.start_worker(1)
        stub = frontend(cluster.start_frontend().address)
        wait_kind(stub, "square")
        results = ResultCollector(stub)
        assert_exactly_once(results, [submit_until_acked(stub, "square", b"5").work_id], stub)
        results.stop()
        # A server the CA did not sign: the master never acts, and says why
        # (it keeps trying, as for any journal it cannot reach).
        wrong_ca = f"{server.url()}?sslmode=verify-full&sslrootcert={other / 'ca.pem'}"
        refused = make_cluster(journal=wrong_ca).start_master()
        wait_until(lambda: "SSL error" in refused.log(), 60, "the master to report the TLS failure")
        assert refused.alive() and not wait_serving(refused.address, "dworkers.v1.Master", timeout=1)
        assert "Traceback" not in refused.log() and server.password not in refused.log()
    finally:
        server.remove()


def test_a_snapshot_cut_short_leaves_the_last_complete_one_which_a_later_snapshot_replaces(postgresql,
                                                                                         monkeypatch):
    """Snapshots are written a part per transaction, then pointed to: a
    writer that dies between two parts leaves the previous snapshot in force,
    and the parts it left are replaced or compacted away."""
    from dworkers.master.journal import postgresql as journal_module

    monkeypatch.setattr(journal_module, "SNAPSHOT_PART_BYTES", 1000)
    name = f"/cut-{uuid.uuid4().hex[:8]}"
    journal = PostgreSQLJournal(postgresql.url(), name, holder="a")
    journal.take_over()
    first, second = bytes(range(256)) * 20, bytes(reversed(range(256))) * 30  # 6 and 8 parts
    journal.write_snapshot(0, first)
    assert journal.read_snapshot() == (0, first)

    written = []
    real_run = journal._run

    def dies_after_three_parts(what, action):
        if what == "snapshot" and len(written) == 4:  # the check that it is new, then three parts
            raise RuntimeError("the writer died")
        written.append(what)
        return real_run(what, action)

    monkeypatch.setattr(journal, "_run", dies_after_three_parts)
    with pytest.raises(RuntimeError):
        journal.write_snapshot(5, second)
    monkeypatch.setattr(journal, "_run", real_run)
    assert journal.read_snapshot() == (0, first)
    journal.write_snapshot(5, second)  # again, whole: the parts left behind are replaced
    assert journal.read_snapshot() == (5, second)
    journal.write_snapshot(5, b"not written: the state at a position is one")
    assert journal.read_snapshot() == (5, second)
    journal.compact()
    with psycopg.connect(postgresql.url()) as conn:
        kept = conn.execute("SELECT position, count(*) FROM dworkers_snapshot WHERE journal = %s GROUP BY position",
                            (name,)).fetchall()
    assert kept == [(5, 8)]
    journal.close()


def test_a_master_frozen_inside_a_transaction_does_not_keep_its_successor_out(postgresql):
    """A master paused (SIGSTOP, a paused VM) between two statements of a
    snapshot's transaction holds the fence's row. Its successor ends its
    connections and takes over; the frozen master's writes fail when it
    wakes, and it can still use the journal to learn so. (An append is one
    statement: the server finishes it whatever its client does.)"""
    name = f"/frozen-{uuid.uuid4().hex[:8]}"
    frozen = PostgreSQLJournal(postgresql.url(), name, holder="frozen")
    fence = frozen.take_over()
    paused, wake = threading.Event(), threading.Event()
    hold_fence = frozen._hold_fence

    def hold_then_freeze(conn):
        hold_fence(conn)  # the row is held in share mode from here
        paused.set()
        wake.wait(60)

    frozen._hold_fence = hold_then_freeze  # type: ignore[method-assign]
    write = concurrent.futures.ThreadPoolExecutor(1).submit(frozen.write_snapshot, 0, b"state")
    assert paused.wait(10)

    successor = PostgreSQLJournal(postgresql.url(), name, holder="successor")
    took: list[int] = []
    taking = threading.Thread(target=lambda: took.append(successor.take_over()), daemon=True)
    taking.start()
    taking.join(30)
    assert took == [fence + 1], "the successor is still waiting for the frozen master's transaction"
    wake.set()
    with pytest.raises(JournalError):
        write.result(10)
    frozen._hold_fence = hold_fence  # type: ignore[method-assign]
    refusals = []
    for _ in range(2):  # the first may find its connection ended; the next opens one and is told
        with pytest.raises(JournalError) as refused:
            frozen.write_snapshot(1, b"too late")
        refusals.append(refused.value)
    assert isinstance(refusals[-1], FencedError)
    assert successor.read_snapshot() is None
    frozen.close()
    successor.close()


def test_a_takeover_ends_no_connection_of_a_journal_of_the_same_name_in_another_database(postgresql):
    """Staging and production on one server, in two databases, with the same
    ZooKeeper root: a failover in one leaves the other's master writing."""
    other_db = f"other_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgresql.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {other_db}")
    name = f"/same-{uuid.uuid4().hex[:8]}"
    elsewhere = PostgreSQLJournal(postgresql.url(other_db), name, holder="elsewhere")
    elsewhere.take_over()
    here = PostgreSQLJournal(postgresql.url(), name, holder="here")
    here.take_over()
    successor = PostgreSQLJournal(postgresql.url(), name, holder="successor")
    successor.take_over()  # ends `here`'s connections, not `elsewhere`'s
    assert elsewhere.append(0, journal_pb2.JournalBatch(epoch=1)).result(10) == 0
    with pytest.raises(FencedError):
        here.append(0, journal_pb2.JournalBatch(epoch=1)).result(10)
    for journal in (elsewhere, here, successor):
        journal.close()


def test_a_takeover_blocked_by_a_connection_it_cannot_end_gives_up_with_a_clear_error(postgresql, monkeypatch):
    """Someone else's session (not a master's: it is not ended) holds the
    fence's row: the takeover waits a bounded time, then fails, so the
    election can let another backend try."""
    from dworkers.master.journal import postgresql as journal_module

    monkeypatch.setattr(journal_module, "TAKEOVER_LOCK_TIMEOUT_MS", 200)
    monkeypatch.setattr(journal_module, "TAKEOVER_TRIES", 2)
    name = f"/held-{uuid.uuid4().hex[:8]}"
    first = PostgreSQLJournal(postgresql.url(), name, holder="first")
    first.take_over()
    with psycopg.connect(postgresql.url()) as operator:  # a transaction left open in psql, say
        operator.execute("SELECT fence FROM dworkers_journal WHERE name = %s FOR SHARE", (name,))
        blocked = PostgreSQLJournal(postgresql.url(), name, holder="blocked")
        with pytest.raises(JournalError, match="fence stays held by another connection"):
            blocked.take_over()
        blocked.close()
    assert fence_of(postgresql.url(), name) == 1  # not raised
    first.close()


def test_appends_on_an_event_loop_are_written_there_in_order_and_fenced(postgresql):
    """The master's appends run on its loop: many queued at once all land,
    each future says its position; once a successor raised the fence the
    next append fails FencedError and every later one fails too; closing
    fails what is queued."""
    name = f"/loop-{uuid.uuid4().hex[:8]}"
    journal = PostgreSQLJournal(postgresql.url(), name, holder="first")
    journal.take_over()

    def batch(i: int) -> journal_pb2.JournalBatch:
        work = work_pb2.Work(work_id=f"w-{i}", kind="k", payload=b"p" * (i * 1000))
        return journal_pb2.JournalBatch(epoch=1, events=[journal_pb2.Event(
            work_accepted=journal_pb2.WorkAccepted(work=work))])

    async def scenario():
        first = [journal.append(i, batch(i)) for i in range(50)]
        assert all(isinstance(f, asyncio.Future) for f in first)
        assert await asyncio.gather(*first) == list(range(50))
        successor = PostgreSQLJournal(postgresql.url(), name, holder="successor")
        await asyncio.get_running_loop().run_in_executor(None, successor.take_over)
        with pytest.raises(FencedError):
            await journal.append(50, batch(50))
        with pytest.raises(FencedError):
            await journal.append(51, batch(51))
        successor.close()
        third = PostgreSQLJournal(postgresql.url(), f"{name}-other", holder="third")
        await asyncio.get_running_loop().run_in_executor(None, third.take_over)
        queued = [third.append(i, batch(i)) for i in range(3)]
        third.close()
        for future in queued:
            with pytest.raises(JournalError, match="closed"):
                await future
        fourth = PostgreSQLJournal(postgresql.url(), f"{name}-fourth", holder="fourth")
        await asyncio.get_running_loop().run_in_executor(None, fourth.take_over)
        stranded = [fourth.append(i, batch(i)) for i in range(3)]
        fourth._writer._task.cancel()  # e.g. the loop's tasks cancelled as it ends: nothing is left waiting
        for future in [*stranded, fourth.append(3, batch(3))]:
            with pytest.raises(JournalError):
                await asyncio.wait_for(future, 10)
        fourth.close()

    asyncio.run(scenario())
    assert [position for position, _batch in journal.read()] == list(range(50))
    assert journal.payloads(["w-7"]) == {"w-7": b"p" * 7000}
    journal.close()
