"""Statements run on an event loop straight through libpq (the journal's
appends), against a real PostgreSQL: binary parameters land as PostgreSQL
reads them, errors arrive as psycopg's, statements larger than the socket
takes are flushed as it drains, and a connection that breaks or a statement
that is cancelled leaves nothing registered with the loop."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid

import psycopg
import pytest

from dworkers.master.journal.onloop import (
    BYTEA,
    BYTEA_ARRAY,
    INT8,
    INT8_ARRAY,
    TEXT,
    TEXT_ARRAY,
    LoopStatements,
    array,
    int8,
    raw,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def table(postgresql):
    name = f"onloop_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgresql.url(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id text PRIMARY KEY, n bigint, ns bigint[], datas bytea[], ids text[])")
    return name


async def open_statements(url: str, table: str) -> tuple[psycopg.AsyncConnection, LoopStatements]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    statements = LoopStatements(conn, asyncio.get_running_loop())
    await statements.prepare(b"put", f"INSERT INTO {table} VALUES ($1, $2, $3, $4, $5)".encode(),
                             [TEXT, INT8, INT8_ARRAY, BYTEA_ARRAY, TEXT_ARRAY])
    return conn, statements


def row(statements: LoopStatements, key: str, n: int, ns: list[int], datas: list[bytes], ids: list[str]) -> list:
    return [statements.text(key), int8(n), array(INT8, ns, int8), array(BYTEA, datas, raw),
            array(TEXT, ids, statements.text)]


def registered(loop: asyncio.AbstractEventLoop, fd: int) -> bool:
    selector = loop._selector  # type: ignore[attr-defined]
    try:
        selector.get_key(fd)
    except KeyError:
        return False
    return True


def test_binary_parameters_land_as_postgresql_reads_them_and_errors_keep_the_connection(postgresql, table):
    """Empty arrays, extreme integers, text beyond ASCII, payloads of 1 B to
    256 KiB and a statement of 24 MiB (far beyond the socket's buffer);
    a unique violation raises psycopg's error and the next statement runs."""
    big = [bytes([i]) * (256 * 1024) for i in range(96)]  # 24 MiB in one statement
    rows = [
        ("empty", 0, [], [], []),
        ("extremes", -2**63, [2**63 - 1, -1, 0], [b"", b"\x00\xff"], ["", "é漢字🙂"]),
        ("sizes", 7, list(range(100)), [b"x" * size for size in (1, 1024, 64 * 1024, 256 * 1024)], ["a"] * 4),
        ("big", 1, [1], big, ["w"]),
    ]

    async def scenario():
        conn, statements = await open_statements(postgresql.url(), table)
        for values in rows:
            await asyncio.wait_for(statements.execute(b"put", row(statements, *values)), 60)
        with pytest.raises(psycopg.errors.UniqueViolation):
            await statements.execute(b"put", row(statements, "empty", 1, [], [], []))
        await statements.execute(b"put", row(statements, "after", 2, [2], [b"2"], ["2"]))
        assert statements.broken is None
        statements.close()
        assert not registered(asyncio.get_running_loop(), conn.pgconn.socket)
        await conn.close()

    asyncio.run(scenario())
    with psycopg.connect(postgresql.url(), autocommit=True) as conn:
        stored = {r[0]: r[1:] for r in conn.execute(f"SELECT id, n, ns, datas, ids FROM {table}")}
    for key, n, ns, datas, ids in [*rows, ("after", 2, [2], [b"2"], ["2"])]:
        assert stored[key] == (n, ns, datas, ids), key


def test_a_connection_ended_by_the_server_fails_the_running_statement_and_every_later_one(postgresql, table):
    """Ended while a statement runs (pg_terminate_backend, as a master
    taking over does): that statement fails, the next fails at once, and the
    socket is no longer watched by the loop."""
    async def scenario():
        conn, statements = await open_statements(postgresql.url(), table)
        pid, fd = conn.pgconn.backend_pid, conn.pgconn.socket
        await statements.prepare(b"sleep", b"SELECT pg_sleep(30)", [])
        running = asyncio.ensure_future(statements.execute(b"sleep", []))
        with psycopg.connect(postgresql.url(), autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(running, 20)
        assert statements.broken is not None
        assert not registered(asyncio.get_running_loop(), fd)
        with pytest.raises(psycopg.OperationalError):
            await statements.execute(b"put", row(statements, "late", 1, [], [], []))
        await conn.close()

    asyncio.run(scenario())


def test_a_cancelled_statement_leaves_the_connection_broken_and_the_loop_clean(postgresql, table):
    async def scenario():
        conn, statements = await open_statements(postgresql.url(), table)
        fd = conn.pgconn.socket
        await statements.prepare(b"sleep", b"SELECT pg_sleep(30)", [])
        running = asyncio.ensure_future(statements.execute(b"sleep", []))
        await asyncio.sleep(0)  # one turn of the loop: the statement is sent
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert statements.broken is not None
        assert not registered(asyncio.get_running_loop(), fd)
        with pytest.raises(psycopg.OperationalError):
            await statements.execute(b"put", row(statements, "late", 1, [], [], []))
        await conn.close()  # ends the sleeping backend too

    asyncio.run(scenario())


class StallingProxy:
    """Forwards a connection to PostgreSQL; `stall()` stops reading what
    the client sends (a congested network or a busy server), `end()` then
    ends the connection towards the client (the server, or a proxy between,
    going away) while the client still has bytes to send."""

    def __init__(self, target_port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.stalled = threading.Event()
        self.stopped_reading = threading.Event()
        self.client: socket.socket | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pump, args=(self.client, server, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(server, self.client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while not (from_client and self.stalled.is_set()):
                data = source.recv(65536)
                if not data:
                    return
                target.sendall(data)
        except OSError:
            return
        finally:
            if from_client:
                self.stopped_reading.set()

    def end(self) -> None:
        assert self.client is not None
        self.client.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        if self.client is not None:
            self.client.close()


def test_a_connection_lost_while_a_statement_is_still_being_sent_fails_it(postgresql, table):
    """The statement (16 MiB) waits in libpq's buffer for a socket nobody
    reads; the connection ends: the statement fails instead of waiting for
    ever (libpq closed the descriptor the loop still watched for writing)."""
    port = int(postgresql.url().rsplit(":", 1)[1].split("/")[0])
    proxy = StallingProxy(port)
    url = postgresql.url().replace(f":{port}/", f":{proxy.port}/")

    async def scenario():
        conn, statements = await open_statements(url, table)
        fd = conn.pgconn.socket
        proxy.stalled.set()
        running = asyncio.ensure_future(statements.execute(b"put", row(
            statements, "big", 1, [1], [b"x" * (1 << 20)] * 16, ["w"])))
        while not proxy.stopped_reading.is_set() or not statements._flushing:
            await asyncio.sleep(0.01)
        proxy.end()
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(running, 20)
        assert statements.broken is not None
        assert not registered(asyncio.get_running_loop(), fd)
        await conn.close()

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()


def test_closing_after_a_lost_connection_leaves_the_descriptor_to_its_next_owner(postgresql, table):
    """libpq closed the lost connection's descriptor and a new connection got
    its number: closing the old statements must not unwatch the new one."""
    async def scenario():
        conn, statements = await open_statements(postgresql.url(), table)
        fd = conn.pgconn.socket
        with psycopg.connect(postgresql.url(), autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (conn.pgconn.backend_pid,))
        while statements.broken is None:  # an idle connection's end is noticed by its reader
            await asyncio.sleep(0.01)
        later, next_statements = await open_statements(postgresql.url(), table)
        assert later.pgconn.socket == fd, "the descriptor's number was not reused: nothing to check"
        running = asyncio.ensure_future(next_statements.execute(b"put", row(next_statements, "next", 1, [], [], [])))
        await asyncio.sleep(0)  # one turn of the loop: the statement is sent
        statements.close()
        await asyncio.wait_for(running, 20)
        next_statements.close()
        await conn.close()
        await later.close()

    asyncio.run(scenario())


def test_text_goes_as_utf8_on_a_sql_ascii_connection(postgresql, table):
    """As psycopg sends it: a SQL_ASCII connection takes UTF-8 bytes as they are."""
    async def scenario():
        conn, statements = await open_statements(postgresql.url() + "?client_encoding=SQL_ASCII", table)
        await statements.execute(b"put", row(statements, "/racine-é", 1, [], [], ["漢字"]))
        statements.close()
        await conn.close()

    asyncio.run(scenario())
    with psycopg.connect(postgresql.url(), autocommit=True) as conn:
        assert conn.execute(f"SELECT ids FROM {table} WHERE id = '/racine-é'").fetchone() == (["漢字"],)
