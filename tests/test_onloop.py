"""Statements run on an event loop straight through libpq (the journal's
appends), against a real PostgreSQL: binary parameters land as PostgreSQL
reads them, errors arrive as psycopg's, statements larger than the socket
takes are flushed as it drains, and a connection that breaks or a statement
that is cancelled leaves nothing registered with the loop."""

from __future__ import annotations

import asyncio
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
)

pytestmark = pytest.mark.integration


def same(data: bytes) -> bytes:
    return data


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
    return [statements.text(key), int8(n), array(INT8, ns, int8), array(BYTEA, datas, same),
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
