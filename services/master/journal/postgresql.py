"""The journal in PostgreSQL, fenced by a counter in the database.

ZooKeeper elects the master; PostgreSQL holds what it must not lose. The
master that wins the election opens the journal by raising the fence of its
row in `dworkers_journal` (an UPDATE: it waits for appends in flight, which
hold the row in share mode); every write then runs in a transaction that
locks the row in share mode and proceeds only if the fence is still its own.
A deposed master's write, even one that still believes it leads, finds a
higher fence and fails; the master steps down.

Group commit: the master's appends run on its event loop, on a connection
of their own (no thread to wake and no thread to wake the loop again, ~0.1
ms each way), as a prepared statement driven straight through libpq
(onloop.py); everything queued while one statement runs goes into the next
(one WAL flush for several batches).
Reads, snapshots and compaction use a second connection, payload reads a
third; an append from outside an event loop (tools, tests) runs at once on
the second.

Payloads live apart, in `dworkers_payload`, from the acceptance of a work
until the event that finishes it, and results in `dworkers_result`, by
sequence number, until they are forgotten; both are written in the same
transaction as the batches, which store works and completions without them.
The master holds neither: it reads them when it hands works out and when it
answers for results.

Many clusters may share a database: each journal is a row, named by the
cluster's ZooKeeper root.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg

from dworkers.common.settings import URL_PASSWORD
from dworkers.master.journal.contract import FencedError, Journal, JournalError
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
from dworkers.master.journal.schema import migrate
from dworkers.v1 import journal_pb2

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5  # seconds
# Raising the fence waits this long for the row at a time, ending earlier
# masters' connections before each try, and gives up after a few tries (the
# election then lets a standby try, or this backend again).
TAKEOVER_LOCK_TIMEOUT_MS = 2000
TAKEOVER_TRIES = 5
READ_ROWS = 64  # batches fetched per round trip while replaying
MAX_WRITE_BYTES = 32 * 1024 * 1024  # queued appends written in one transaction, at most

# An append is one statement, its own transaction (schema version 6).
APPEND = """
SELECT dworkers_append(%(name)s, %(fence)s, %(positions)s, %(datas)s, %(ended)s, %(kept_ids)s, %(kept)s,
                       %(sequences)s, %(result_ids)s, %(results)s, %(forgotten_up_to)s)
"""
# The same, prepared on the appends' connection with binary parameters.
APPEND_NAME = b"dworkers_append"
APPEND_PREPARED = b"SELECT dworkers_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
APPEND_TYPES = [TEXT, INT8, INT8_ARRAY, BYTEA_ARRAY, TEXT_ARRAY, TEXT_ARRAY, BYTEA_ARRAY, INT8_ARRAY, TEXT_ARRAY,
                BYTEA_ARRAY, INT8]
QUERY_PASSWORD = re.compile(r"((?:^|[?&\s])password=)[^&\s]*")
HOLD_FENCE = "SELECT dworkers_hold_fence(%(name)s, %(fence)s)"
SNAPSHOT_PART_BYTES = 256 * 1024  # written per transaction
FENCED = "DWF01"  # the SQLSTATE dworkers_hold_fence raises


def redact(url: str) -> str:
    """The URL without its password: the only form that is ever logged."""
    return QUERY_PASSWORD.sub(r"\1***", URL_PASSWORD.sub(r"\1***@", url))


def application_name(journal: str) -> str:
    """What a master's connections to a journal call themselves (at most 63
    bytes, whatever the journal's name): how a successor finds them."""
    return f"dworkers-master {hashlib.blake2b(journal.encode(), digest_size=8).hexdigest()}"


def connection_options(password: str | None, journal: str) -> dict:
    """A connection that notices a dead server: TCP keepalives, connect
    timeout; named after its `journal`."""
    extra: dict = {"connect_timeout": CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": 5,
                   "keepalives_interval": 2, "keepalives_count": 3,
                   "application_name": application_name(journal) if journal else "dworkers-master"}
    if password:
        extra["password"] = password
    return extra


def connect(url: str, password: str | None = None, autocommit: bool = True, journal: str = "") -> psycopg.Connection:
    try:
        return psycopg.connect(url, autocommit=autocommit, **connection_options(password, journal))
    except psycopg.Error as exc:
        raise JournalError(f"cannot connect to PostgreSQL at {redact(url)}: {first_line(exc)}") from None


async def connect_for_appends(url: str, password: str | None, journal: str) -> psycopg.AsyncConnection:
    """The appends' connection: its statement is prepared once but still
    planned with its parameters each time (cached generic plans scanned
    whole tables)."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True, **connection_options(password, journal))
    except psycopg.Error as exc:
        raise JournalError(f"cannot connect to PostgreSQL at {redact(url)}: {first_line(exc)}") from None
    try:
        await conn.execute("SET plan_cache_mode = force_custom_plan")  # a SET: the URL's options stay the user's
    except psycopg.Error as exc:
        await conn.close()
        raise JournalError(f"cannot set up the journal's connection: {first_line(exc)}") from None
    except BaseException:  # cancelled: the journal was closed meanwhile
        await conn.close()
        raise
    return conn


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def failure(exc: psycopg.Error, what: str) -> JournalError:
    """The journal's error for a failed statement: FencedError when another
    master raised the fence."""
    if exc.sqlstate == FENCED:
        return FencedError(f"{what}: {first_line(exc)}")
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return JournalError(f"{what}: the position is taken")
    return JournalError(f"{what} failed: {first_line(exc)}")


@dataclass
class Apart:
    """What batches change in the tables kept apart from them, in order."""

    payloads: dict[str, bytes | None] = field(default_factory=dict)  # None: the work ended, its payload goes
    results: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # sequence -> (work id, result)
    forgotten_up_to: int = 0  # results up to here go


def take_apart(batch: journal_pb2.JournalBatch, apart: Apart) -> bytes:
    """The batch as stored: works without payloads, completions without
    results; records in `apart` what it changes in the tables beside it."""
    stored = None

    def stored_event(i: int) -> journal_pb2.Event:
        nonlocal stored
        if stored is None:
            stored = journal_pb2.JournalBatch()
            stored.CopyFrom(batch)
        return stored.events[i]

    for i, event in enumerate(batch.events):
        which = event.WhichOneof("event")
        if which == "work_accepted":
            work = event.work_accepted.work
            apart.payloads[work.work_id] = work.payload
            stored_event(i).work_accepted.work.ClearField("payload")
        elif which == "work_completed":
            completed = event.work_completed
            apart.payloads[completed.work_id] = None
            if completed.sequence:
                apart.results[completed.sequence] = (completed.work_id, completed.result)
                stored_event(i).work_completed.ClearField("result")
        elif which == "results_forgotten":  # FAILED and CANCELLED works keep theirs until then: RetryWork
            forgotten = event.results_forgotten
            apart.forgotten_up_to = max(apart.forgotten_up_to, forgotten.up_to_sequence)
            for work_id in forgotten.retryable_work_ids:
                apart.payloads[work_id] = None
        elif which == "works_imported":  # a move's works: kept apart here as on their source
            imported = event.works_imported
            for j, entry in enumerate(imported.entries):
                apart.payloads[entry.work.work_id] = entry.work.payload
                stored_event(i).works_imported.entries[j].work.ClearField("payload")
            for j, result in enumerate(imported.results):
                if result.sequence and result.result:
                    apart.results[result.sequence] = (result.work_id, result.result)
                    stored_event(i).works_imported.results[j].ClearField("result")
        elif which == "move_released":  # gone to another shard
            for work_id in event.move_released.work_ids:
                apart.payloads[work_id] = None
    return (stored or batch).SerializeToString()


class PostgreSQLJournal(Journal):
    """Open with `take_over()` before the first read or write."""

    keeps_payloads = True
    # Everything queued while a statement runs goes into the next one: let
    # the committer queue more than two, so that one commit carries them.
    appends_in_flight = 8

    def __init__(self, url: str, name: str, holder: str = "", password: str | None = None):
        self.url, self.name, self.holder, self.password = url, name, holder, password
        self.fence = 0
        self._other = connect(url, password, journal=name)  # reads, snapshots, compaction
        self._other_lock = threading.Lock()
        self._payload_conn: psycopg.Connection | None = None  # opened on first use
        self._payload_lock = threading.Lock()
        self._closed = False
        self._writer: LoopWriter | None = None  # made by the first append on an event loop

    @staticmethod
    def prepare(url: str, password: str | None = None) -> int:
        """Migrates the schema; returns the version found (SchemaTooNew if newer)."""
        conn = connect(url, password)
        try:
            return migrate(conn)
        except psycopg.Error as exc:
            raise JournalError(f"migrating the schema failed: {first_line(exc)}") from None
        finally:
            conn.close()

    # --- fence -------------------------------------------------------------

    def take_over(self) -> int:
        """Raises the fence (deposing every earlier writer) and returns it."""
        with self._other_lock:
            try:
                conn = self._connection()
                migrate(conn)
                row = None
                for attempt in range(1, TAKEOVER_TRIES + 1):
                    self._end_earlier_connections(conn)
                    try:
                        with conn.transaction():
                            conn.execute(f"SET LOCAL lock_timeout = {TAKEOVER_LOCK_TIMEOUT_MS}")
                            conn.execute("INSERT INTO dworkers_journal (name) VALUES (%s) ON CONFLICT DO NOTHING",
                                         (self.name,))
                            row = conn.execute(
                                "UPDATE dworkers_journal SET fence = fence + 1, holder = %s, taken_at = now() "
                                "WHERE name = %s RETURNING fence", (self.holder, self.name)).fetchone()
                        break
                    except psycopg.errors.LockNotAvailable:
                        log.warning("the journal's fence is held by a connection this master cannot end "
                                    "(try %d of %d)", attempt, TAKEOVER_TRIES)
                if row is None:
                    raise JournalError("cannot take over the journal: its fence stays held by another connection")
            except psycopg.Error as exc:
                raise JournalError(f"cannot take over the journal: {first_line(exc)}") from None
        self.fence = row[0]
        return self.fence

    def _end_earlier_connections(self, conn: psycopg.Connection) -> None:
        """Ends the connections of earlier masters of this journal. One
        frozen (SIGSTOP, a paused VM) in the middle of a transaction holds
        the fence's row, and raising the fence would wait for it for ever:
        a pipelined transaction waiting for its next statement is not even
        idle in the server's eyes, so no server timeout ends it."""
        try:
            ended = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s AND datname = current_database() AND pid <> pg_backend_pid()",
                (application_name(self.name),)).fetchone()
        except psycopg.errors.InsufficientPrivilege as exc:  # another role's: raising the fence waits for them
            log.warning("cannot end an earlier master's connections to the journal: %s", first_line(exc))
            return
        if ended and ended[0]:
            log.info("ended %d connections of an earlier master to the journal", ended[0])

    def _connection(self) -> psycopg.Connection:
        """The connection for reads, snapshots and compaction (its lock
        held): opened again if it broke, unless the journal was closed."""
        if self._closed:
            raise JournalError("the journal is closed")
        if self._other.closed or self._other.broken:
            self._other = connect(self.url, self.password, journal=self.name)
        return self._other

    def _hold_fence(self, conn: psycopg.Connection) -> None:
        """Inside a transaction: the rest of it happens only while the fence
        is ours (else it fails with FENCED, see `failure`)."""
        conn.execute(HOLD_FENCE, {"name": self.name, "fence": self.fence})

    # --- appends -------------------------------------------------------------

    def append(self, position: int, batch: journal_pb2.JournalBatch) -> concurrent.futures.Future | asyncio.Future:
        """On an event loop (the master's): an asyncio future, the append
        queued for that loop's writer. Elsewhere: written now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._closed or not self.fence:
            done: concurrent.futures.Future | asyncio.Future = \
                concurrent.futures.Future() if loop is None else loop.create_future()
            done.set_exception(JournalError("the journal is closed" if self._closed else "the journal is not open"))
            return done
        if loop is not None:
            if self._writer is None or self._writer.loop is not loop:
                self._writer = LoopWriter(self, loop)
            return self._writer.append(position, batch)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._other_lock:
            try:
                self._write(self._connection(), [(position, batch)])
                future.set_result(position)
            except JournalError as exc:
                future.set_exception(exc)
        return future

    def statement(self, taken: list[tuple[int, journal_pb2.JournalBatch]]) -> dict:
        """The append statement's parameters for these batches."""
        apart = Apart()
        datas = [take_apart(batch, apart) for _position, batch in taken]
        kept = {work_id: payload for work_id, payload in apart.payloads.items() if payload is not None}
        return {"name": self.name, "fence": self.fence, "positions": [position for position, _batch in taken],
                "datas": datas, "ended": [work_id for work_id, payload in apart.payloads.items() if payload is None],
                "kept_ids": list(kept), "kept": list(kept.values()),
                "sequences": list(apart.results), "result_ids": [r[0] for r in apart.results.values()],
                "results": [r[1] for r in apart.results.values()], "forgotten_up_to": apart.forgotten_up_to}

    @staticmethod
    def binary(params: dict, text) -> list[bytes]:
        """The statement's parameters for APPEND_PREPARED, in binary;
        `text` encodes a string for the connection."""
        return [text(params["name"]), int8(params["fence"]), array(INT8, params["positions"], int8),
                array(BYTEA, params["datas"], raw), array(TEXT, params["ended"], text),
                array(TEXT, params["kept_ids"], text), array(BYTEA, params["kept"], raw),
                array(INT8, params["sequences"], int8), array(TEXT, params["result_ids"], text),
                array(BYTEA, params["results"], raw), int8(params["forgotten_up_to"])]

    def _write(self, conn: psycopg.Connection, taken: list[tuple[int, journal_pb2.JournalBatch]]) -> None:
        try:
            conn.execute(APPEND, self.statement(taken))  # one statement: if the fence check fails, nothing lands
        except psycopg.Error as exc:
            raise self.append_failure(exc, conn.broken and self._fence_raised(), taken[0][0]) from None

    @staticmethod
    def append_failure(exc: psycopg.Error, fenced: bool, position: int) -> JournalError:
        what = f"journal append at {position}"
        if fenced:  # a successor ended the connection (see take_over)
            return FencedError(f"{what}: another master took over the journal")
        return failure(exc, what)

    def _fence_raised(self) -> bool:
        """Whether another master raised the fence since this one took it
        (asked on a connection of its own; False if that cannot tell). In
        share mode: a successor's raise under way is waited for."""
        try:
            with connect(self.url, self.password) as conn:
                conn.execute(f"SET lock_timeout = {TAKEOVER_LOCK_TIMEOUT_MS}")
                row = conn.execute("SELECT fence FROM dworkers_journal WHERE name = %s FOR SHARE",
                                   (self.name,)).fetchone()
        except (JournalError, psycopg.Error):
            return False
        return row is not None and row[0] != self.fence

    # --- reads, snapshots, compaction ------------------------------------------

    def _run(self, what: str, action):
        with self._other_lock:
            try:
                return action(self._connection())
            except psycopg.Error as exc:
                raise failure(exc, what) from None

    def read(self, after: int = -1) -> Iterator[tuple[int, journal_pb2.JournalBatch]]:
        # A separate connection: replay streams through a server-side cursor
        # (bounded memory) in its own transaction.
        conn = connect(self.url, self.password, autocommit=False, journal=self.name)
        try:
            with conn.cursor(name="journal_replay", binary=True) as cursor:
                cursor.itersize = READ_ROWS
                cursor.execute("SELECT position, data FROM dworkers_batch WHERE journal = %s AND position > %s "
                               "ORDER BY position", (self.name, after))
                for position, data in cursor:
                    yield position, journal_pb2.JournalBatch.FromString(data)
        except psycopg.Error as exc:
            raise JournalError(f"reading the journal failed: {first_line(exc)}") from None
        finally:
            conn.close()

    def payloads(self, work_ids: list[str]) -> dict[str, bytes]:
        return self._lookup("SELECT work_id, payload FROM dworkers_payload WHERE journal = %s AND work_id = ANY(%s)",
                            work_ids, "reading payloads")

    def results(self, sequences: list[int]) -> dict[int, bytes]:
        return self._lookup("SELECT sequence, result FROM dworkers_result WHERE journal = %s AND sequence = ANY(%s)",
                            sequences, "reading results")

    def _lookup(self, query: str, keys: list, what: str) -> dict:
        """Bytes kept apart, by key, on the connection for such reads."""
        with self._payload_lock:
            try:
                if self._payload_conn is None or self._payload_conn.closed:
                    self._payload_conn = connect(self.url, self.password, journal=self.name)
                with self._payload_conn.cursor(binary=True) as cursor:
                    cursor.execute(query, (self.name, keys))
                    return {key: bytes(data) for key, data in cursor}
            except psycopg.Error as exc:
                raise JournalError(f"{what} failed: {first_line(exc)}") from None

    def discard_after(self, position: int) -> None:
        """Nothing to do: an append is one transaction, so an unfinished one
        leaves nothing behind."""

    def write_snapshot(self, position: int, data: bytes) -> None:
        """In parts of SNAPSHOT_PART_BYTES, each in a transaction of its own,
        then the pointer to them in another: an append commits between two
        parts, not after the flush of the whole snapshot, and never waits for
        a transaction that wrote megabytes while holding the pointer's row
        (the fence every append holds in share mode). A crash before the
        pointer moved leaves parts nothing points to, which compaction
        removes (or a snapshot at the same position replaces)."""
        parts = [data[i:i + SNAPSHOT_PART_BYTES] for i in range(0, len(data), SNAPSHOT_PART_BYTES)] or [b""]

        def store(conn: psycopg.Connection, number: int) -> None:
            with conn.transaction():
                self._hold_fence(conn)
                if number == 0:  # what an unfinished snapshot at this position left
                    conn.execute("DELETE FROM dworkers_snapshot WHERE journal = %s AND position = %s",
                                 (self.name, position))
                with conn.cursor(binary=True) as cursor:
                    cursor.execute("INSERT INTO dworkers_snapshot (journal, position, part, data) "
                                   "VALUES (%s, %s, %s, %s)", (self.name, position, number, parts[number]))

        def point(conn: psycopg.Connection) -> None:
            with conn.transaction():
                self._hold_fence(conn)
                conn.execute("UPDATE dworkers_journal SET snapshot_position = %s WHERE name = %s",
                             (position, self.name))

        def pointed(conn: psycopg.Connection) -> bool:
            with conn.transaction():
                self._hold_fence(conn)
                row = conn.execute("SELECT snapshot_position FROM dworkers_journal WHERE name = %s",
                                   (self.name,)).fetchone()
            return row is not None and row[0] == position

        if self._run("snapshot", pointed):
            return  # the state at a position is one: that snapshot is this one, and complete
        for number in range(len(parts)):
            self._run("snapshot", functools.partial(store, number=number))
        self._run("snapshot pointer", point)

    def read_snapshot(self) -> tuple[int, bytes] | None:
        def load(conn: psycopg.Connection) -> tuple[int, bytes] | None:
            with conn.transaction(), conn.cursor(binary=True) as cursor:
                cursor.execute("SELECT s.position, s.data FROM dworkers_journal j JOIN dworkers_snapshot s "
                               "ON s.journal = j.name AND s.position = j.snapshot_position WHERE j.name = %s "
                               "ORDER BY s.part", (self.name,))
                rows = cursor.fetchall()
            return (rows[0][0], b"".join(bytes(row[1]) for row in rows)) if rows else None

        return self._run("reading the snapshot", load)

    def compact(self) -> int:
        def delete(conn: psycopg.Connection) -> int:
            with conn.transaction():
                self._hold_fence(conn)
                covered = conn.execute("SELECT snapshot_position FROM dworkers_journal WHERE name = %s",
                                       (self.name,)).fetchone()
                if covered is None or covered[0] is None:
                    return 0
                batches = conn.execute("DELETE FROM dworkers_batch WHERE journal = %s AND position <= %s",
                                       (self.name, covered[0])).rowcount
                snapshots = conn.execute("DELETE FROM dworkers_snapshot WHERE journal = %s AND position <> %s",
                                         (self.name, covered[0])).rowcount
                return batches + snapshots

        return self._run("compaction", delete)

    def close(self) -> None:
        """Stops writing; called from the event loop, so it never waits."""
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        threading.Thread(target=self._close_connections, daemon=True).start()

    def _close_connections(self) -> None:
        with self._other_lock:
            self._other.close()
        with self._payload_lock:
            if self._payload_conn is not None:
                self._payload_conn.close()


class LoopWriter:
    """A journal's appends on one event loop: each statement carries every
    batch queued while the one before it ran. After a failure every later
    append fails too (the master cannot vouch for their order): it steps
    down."""

    def __init__(self, journal: PostgreSQLJournal, loop: asyncio.AbstractEventLoop):
        self.journal, self.loop = journal, loop
        self._queue: list[tuple[int, journal_pb2.JournalBatch, asyncio.Future]] = []
        self._queued = asyncio.Event()
        self._conn: psycopg.AsyncConnection | None = None
        self._statements: LoopStatements | None = None
        self.failed: JournalError | None = None
        self._task = loop.create_task(self._run())
        # However the task ends (closed, cancelled before it started, a bug), nothing queued is left waiting.
        self._task.add_done_callback(lambda _task: self._fail_queued(JournalError("the journal's writer stopped")))

    def append(self, position: int, batch: journal_pb2.JournalBatch) -> asyncio.Future:
        future = self.loop.create_future()
        if self.failed is not None or self._task.done():
            future.set_exception(self.failed or JournalError("the journal's writer stopped"))
        else:
            self._queue.append((position, batch, future))
            self._queued.set()
        return future

    def close(self) -> None:
        """From any thread: whatever is queued fails, the connection closes."""
        if self.loop.is_closed():
            return
        try:
            here = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            here = False
        if here:
            self._stop()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(self._stop)

    def _stop(self) -> None:
        self._fail_queued(JournalError("the journal is closed"))
        self._task.cancel()

    def _fail_queued(self, error: JournalError) -> None:
        self.failed = self.failed or error
        self._settle(self._queue, self.failed)
        self._queue.clear()

    @staticmethod
    def _settle(items: list[tuple[int, journal_pb2.JournalBatch, asyncio.Future]],
                error: JournalError | None) -> None:
        """Each append's future: its position, or the error."""
        for position, _batch, future in items:
            if not future.done():
                if error is None:
                    future.set_result(position)
                else:
                    future.set_exception(error)

    def _take(self) -> list[tuple[int, journal_pb2.JournalBatch, asyncio.Future]]:
        taken: list[tuple[int, journal_pb2.JournalBatch, asyncio.Future]] = []
        size = 0
        while self._queue:
            item_size = self._queue[0][1].ByteSize()
            if taken and size + item_size > MAX_WRITE_BYTES:
                break
            taken.append(self._queue.pop(0))
            size += item_size
        return taken

    async def _run(self) -> None:
        try:
            while True:
                await self._queued.wait()
                self._queued.clear()
                while self._queue:
                    taken = self._take()
                    if self.failed is None:
                        try:
                            await self._write([(position, batch) for position, batch, _future in taken])
                        except asyncio.CancelledError:  # closed while writing: whether they landed is unknown
                            self._settle(taken, JournalError("the journal is closed"))
                            raise
                        except JournalError as exc:
                            self.failed = exc
                        except Exception as exc:  # whatever it is, the master must learn and step down
                            self.failed = JournalError(f"journal append at {taken[0][0]} failed: {exc!r}")
                    self._settle(taken, self.failed)
        finally:
            if self._statements is not None:
                self._statements.close()
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()

    async def _write(self, taken: list[tuple[int, journal_pb2.JournalBatch]]) -> None:
        journal = self.journal
        if self._conn is None:
            self._conn = await connect_for_appends(journal.url, journal.password, journal.name)
        try:
            if self._statements is None:
                self._statements = LoopStatements(self._conn, self.loop)
                await self._statements.prepare(APPEND_NAME, APPEND_PREPARED, APPEND_TYPES)
            statements = self._statements
            await statements.execute(APPEND_NAME, journal.binary(journal.statement(taken), statements.text))
        except psycopg.Error as exc:
            broken = self._statements is None or self._statements.broken is not None
            fenced = broken and await self.loop.run_in_executor(None, journal._fence_raised)
            raise journal.append_failure(exc, fenced, taken[0][0]) from None
