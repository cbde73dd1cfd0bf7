"""Prepared statements run on an asyncio event loop straight through libpq
(psycopg's pq layer), with their parameters in binary.

The master's appends cross its event loop twice per round trip of a work.
psycopg's asyncio cursor spent ~0.17 ms of CPU per append: its adaptation
layer, and a reader added to the loop and removed again at every wait. Here
the connection's socket stays registered with the loop and the parameters
are packed once: ~0.06 ms. The connection itself is psycopg's (its options,
TLS and password handling unchanged); only the statements bypass it."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable, Sequence

import psycopg
from psycopg import pq
from psycopg.errors import error_from_result

# Type OIDs (pg_type), fixed in every PostgreSQL.
BYTEA, INT8, TEXT = 17, 20, 25
BYTEA_ARRAY, TEXT_ARRAY, INT8_ARRAY = 1001, 1009, 1016

_BINARY = 1
_INT32 = struct.Struct("!i")
_INT8 = struct.Struct("!q")
_ARRAY_HEAD = struct.Struct("!iiIii")  # dimensions, has nulls, element type, length, lower bound
_EMPTY_ARRAY = struct.Struct("!iiI")
_SUCCESS = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)


def int8(value: int) -> bytes:
    return _INT8.pack(value)


def raw(data: bytes) -> bytes:
    """A bytea's binary form: its bytes."""
    return data


def array(element_type: int, items: Sequence, pack: Callable[[object], bytes]) -> bytes:
    """A one-dimensional array without nulls in PostgreSQL's binary format."""
    if not items:
        return _EMPTY_ARRAY.pack(0, 0, element_type)
    parts = [_ARRAY_HEAD.pack(1, 0, element_type, len(items), 1)]
    for item in items:
        data = pack(item)
        parts.append(_INT32.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


class LoopStatements:
    """One connection's statements, one at a time, on the loop that made
    it. A statement's failure raises the psycopg error PostgreSQL sent; a
    connection that broke (`broken`) fails every later statement at once."""

    def __init__(self, conn: psycopg.AsyncConnection, loop: asyncio.AbstractEventLoop):
        self._pgconn = conn.pgconn
        encoding = conn.info.encoding
        self._encoding = "utf-8" if encoding == "ascii" else encoding  # SQL_ASCII: as psycopg sends text
        self._loop = loop
        self._fd = self._pgconn.socket
        self._waiter: asyncio.Future | None = None
        self._error: psycopg.Error | None = None  # the running statement's, reported when it ends
        self._flushing = False
        self.broken: psycopg.Error | None = None
        self._closed = False
        loop.add_reader(self._fd, self._readable)
        self._registered = True

    def text(self, value: str) -> bytes:
        return value.encode(self._encoding)

    async def prepare(self, name: bytes, sql: bytes, types: Sequence[int]) -> None:
        await self._run(lambda: self._pgconn.send_prepare(name, sql, types))

    async def execute(self, name: bytes, values: Sequence[bytes]) -> None:
        """Runs the prepared statement with `values` (binary, in its types)."""
        await self._run(lambda: self._pgconn.send_query_prepared(name, values, param_formats=[_BINARY] * len(values)))

    def close(self) -> None:
        """Lets go of the socket (before the connection closes it)."""
        if not self._closed:
            self._closed = True
            self._forget_socket()
            self._fail(psycopg.OperationalError("the connection was closed"))

    async def _run(self, send: Callable[[], None]) -> None:
        if self.broken is not None:
            raise self.broken
        if self._closed or self._waiter is not None:
            raise psycopg.InterfaceError("the connection is closed" if self._closed else "a statement is running")
        waiter = self._waiter = self._loop.create_future()
        try:
            send()
        except psycopg.Error as exc:
            self._break(exc)
        except BaseException as exc:  # e.g. a parameter of the wrong type: nothing was sent
            self._fail(psycopg.InterfaceError(f"the statement was not sent: {exc!r}"))
        else:
            self._flush()
        try:
            await waiter
        finally:
            if self._waiter is waiter:  # cancelled: the statement's end is unknown, the connection unusable
                self._break(psycopg.OperationalError("a statement was cancelled"))

    def _flush(self) -> None:
        """Sends what libpq holds; the rest when the socket takes it."""
        try:
            pending = self._pgconn.flush()
        except Exception as exc:  # noqa: BLE001 - a callback of the loop: the statement must end, whatever it is
            self._break(exc)
            return
        if pending and not self._flushing:
            self._loop.add_writer(self._fd, self._flush)
        elif not pending and self._flushing:
            self._loop.remove_writer(self._fd)
        self._flushing = bool(pending)

    def _readable(self) -> None:
        pgconn = self._pgconn
        try:
            pgconn.consume_input()
            if self._flushing:  # libpq may need to read before it can write on
                self._flush()
            while self._waiter is not None and not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    self._end()
                elif result.status not in _SUCCESS and self._error is None:
                    self._error = error_from_result(result, self._encoding)
        except Exception as exc:  # noqa: BLE001 - a callback of the loop: the statement must end, whatever it is
            self._break(exc)
            return
        if pgconn.status == pq.ConnStatus.BAD:  # closed by the server between statements
            self._break(psycopg.OperationalError("the server closed the connection"))

    def _end(self) -> None:
        waiter, self._waiter = self._waiter, None
        error, self._error = self._error, None
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _break(self, error: Exception) -> None:
        if not isinstance(error, psycopg.Error):  # from a callback of the loop: the statement must end all the same
            error = psycopg.OperationalError(repr(error))
        try:
            if self.broken is None:
                self.broken = error
                self._forget_socket()
        finally:
            self._fail(error)

    def _fail(self, error: psycopg.Error) -> None:
        waiter, self._waiter = self._waiter, None
        self._error = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _forget_socket(self) -> None:
        """Once only: afterwards the descriptor's number may be another's.
        libpq may have closed it already (on a lost connection): asyncio then
        fails to change its epoll entry but forgets it all the same."""
        if self._registered and not self._loop.is_closed():
            if self._flushing:
                with contextlib.suppress(OSError):
                    self._loop.remove_writer(self._fd)
            with contextlib.suppress(OSError):
                self._loop.remove_reader(self._fd)
        self._registered = self._flushing = False
