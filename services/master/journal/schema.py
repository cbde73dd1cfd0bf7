"""The PostgreSQL journal's schema, versioned. Migrations run at start, in
one transaction under an advisory lock (two masters starting at once apply
them once); a database whose schema is newer than this code is refused."""

from __future__ import annotations

import psycopg

from dworkers.common.errors import ConfigError

LOCK_KEY = 0x64776B7273  # "dwkrs": serialises migrations across processes

# (version, statements). Append only: a released migration never changes.
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE dworkers_journal (
    name text PRIMARY KEY,              -- the cluster's ZooKeeper root
    fence bigint NOT NULL DEFAULT 0,    -- raised by each master taking over
    holder text NOT NULL DEFAULT '',    -- that master's election znode, for people
    taken_at timestamptz,
    snapshot_position bigint            -- the latest complete snapshot
);
CREATE TABLE dworkers_batch (
    journal text NOT NULL REFERENCES dworkers_journal (name),
    position bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (journal, position)
);
CREATE TABLE dworkers_snapshot (
    journal text NOT NULL REFERENCES dworkers_journal (name),
    position bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (journal, position)
);
"""),
    (2, """
-- Payloads of unfinished works, kept apart from the batches (which store
-- works without them) so that the master needs no memory for them.
CREATE TABLE dworkers_payload (
    journal text NOT NULL,
    work_id text NOT NULL,
    payload bytea NOT NULL,
    PRIMARY KEY (journal, work_id)
);
-- Opaque bytes, often compressed already: stored as they are.
ALTER TABLE dworkers_payload ALTER COLUMN payload SET STORAGE EXTERNAL;
"""),
    (3, """
-- Results of finished works, by sequence number, kept apart from the batches
-- until they leave the retention window.
CREATE TABLE dworkers_result (
    journal text NOT NULL,
    sequence bigint NOT NULL,
    work_id text NOT NULL,
    result bytea NOT NULL,
    PRIMARY KEY (journal, sequence)
);
ALTER TABLE dworkers_result ALTER COLUMN result SET STORAGE EXTERNAL;
"""),
    (4, """
-- Every write begins with this: it holds the journal's row in share mode (a
-- master taking over waits for writes in flight) and raises if the fence is
-- not the writer's, so the rest of a pipelined transaction is skipped and
-- nothing of a deposed master's write lands, in one round trip.
CREATE FUNCTION dworkers_hold_fence(journal_name text, expected bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    current bigint;
BEGIN
    SELECT fence INTO current FROM dworkers_journal WHERE name = journal_name FOR SHARE;
    IF current IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'the journal''s fence is %, not %: another master took over', current, expected
            USING ERRCODE = 'DWF01';
    END IF;
END
$$;
"""),
    (5, """
-- A snapshot in parts, each written in a transaction of its own: appends
-- commit between them instead of waiting for the flush of megabytes.
ALTER TABLE dworkers_snapshot ADD COLUMN part integer NOT NULL DEFAULT 0;
ALTER TABLE dworkers_snapshot DROP CONSTRAINT dworkers_snapshot_pkey;
ALTER TABLE dworkers_snapshot ADD PRIMARY KEY (journal, position, part);
"""),
    (6, """
-- An append in one statement (its own transaction on an autocommit
-- connection): the fence check, the batches and what they change in the
-- tables beside them. Half the client's work of a pipelined transaction of
-- five statements, and no transaction left open between two of them.
CREATE FUNCTION dworkers_append(journal_name text, expected bigint, positions bigint[], datas bytea[],
                                ended_ids text[], payload_ids text[], payloads bytea[],
                                result_sequences bigint[], result_ids text[], results bytea[],
                                forgotten_up_to bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM dworkers_hold_fence(journal_name, expected);
    INSERT INTO dworkers_batch (journal, position, data)
    SELECT journal_name, b.position, b.data FROM unnest(positions, datas) AS b(position, data);
    IF cardinality(ended_ids) > 0 THEN
        DELETE FROM dworkers_payload WHERE journal = journal_name AND work_id = ANY(ended_ids);
    END IF;
    IF cardinality(payload_ids) > 0 THEN
        INSERT INTO dworkers_payload (journal, work_id, payload)
        SELECT journal_name, p.work_id, p.payload FROM unnest(payload_ids, payloads) AS p(work_id, payload)
            ON CONFLICT (journal, work_id) DO UPDATE SET payload = excluded.payload;
    END IF;
    IF cardinality(result_sequences) > 0 THEN
        INSERT INTO dworkers_result (journal, sequence, work_id, result)
        SELECT journal_name, r.sequence, r.work_id, r.result
          FROM unnest(result_sequences, result_ids, results) AS r(sequence, work_id, result)
            ON CONFLICT (journal, sequence) DO UPDATE SET work_id = excluded.work_id, result = excluded.result;
    END IF;
    IF forgotten_up_to > 0 THEN
        DELETE FROM dworkers_result WHERE journal = journal_name AND sequence <= forgotten_up_to;
    END IF;
END
$$;
"""),
]
LATEST = MIGRATIONS[-1][0]


class SchemaTooNew(ConfigError):
    """The database was migrated by a newer dworkers."""


def migrate(conn: psycopg.Connection) -> int:
    """Brings the schema to LATEST; returns the version found before."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS dworkers_schema (one int PRIMARY KEY DEFAULT 1 CHECK (one = 1), "
                     "version int NOT NULL)")
        row = conn.execute("SELECT version FROM dworkers_schema").fetchone()
        found = row[0] if row else 0
        if found > LATEST:
            raise SchemaTooNew(f"the PostgreSQL journal's schema is version {found}, newer than this dworkers "
                               f"knows ({LATEST}): upgrade dworkers")
        for version, statements in MIGRATIONS:
            if version > found:
                conn.execute(statements)
        if found < LATEST:
            conn.execute("INSERT INTO dworkers_schema (version) VALUES (%s) "
                         "ON CONFLICT (one) DO UPDATE SET version = excluded.version", (LATEST,))
    return found
