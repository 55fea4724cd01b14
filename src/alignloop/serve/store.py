"""The log store: every interaction, durably, in the tables of the user-log schema.

The product writes here and the flywheel reads from here (`export` writes the five log tables as
Parquet, which `alignloop logs ingest` and the flywheel's ingest stage take). A write returns only
after its transaction has committed, and the server acknowledges an event only after that, so an
acknowledged event survives a `kill -9` of the server:

* SQLite (the default, a file, nothing to run): WAL journal with `synchronous=FULL`, so a commit
  is on disk before it returns (NORMAL would survive a killed process but not a power cut).
* PostgreSQL (`postgresql://...`): a commit returns after the WAL is flushed (its default
  `synchronous_commit=on`).

Rows mirror `alignloop.data.schema.LOG_SCHEMAS` column for column; timestamps are stored as
integer milliseconds since the epoch (exact in both databases). Beside them, `accounts` maps a
hash of each API key to its user (the key itself is never stored). A batch of rows is written in
one transaction: all or nothing. Re-sending an event with a known `event_id` is a no-op, as in
ingest. One connection behind a lock: the server's writes are small and SQLite has one writer
anyway; a busy PostgreSQL deployment would put a pool here.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from alignloop.data.schema import LOG_SCHEMAS, TIMESTAMP, conform
from alignloop.errors import AlignloopError

TIME_COLUMNS = {"first_seen", "started_at", "ended_at", "created_at", "timestamp"}
KEYS = {"users": "user_id", "sessions": "session_id", "conversations": "conversation_id", "turns": "turn_id",
        "events": "event_id"}


class StoreError(AlignloopError):
    pass


def _sql_type(field: pa.Field) -> str:
    if field.name in TIME_COLUMNS or pa.types.is_integer(field.type):
        return "BIGINT"
    if pa.types.is_floating(field.type):
        return "DOUBLE PRECISION"
    if pa.types.is_boolean(field.type):
        return "BOOLEAN"
    return "TEXT"


def _ddl() -> list[str]:
    out = []
    for name, schema in LOG_SCHEMAS.items():
        cols = [f"{f.name} {_sql_type(f)}{'' if f.nullable else ' NOT NULL'}" for f in schema]
        cols[0] += " PRIMARY KEY"
        out.append(f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)})")
    out += [
        "CREATE TABLE IF NOT EXISTS accounts (key_hash TEXT PRIMARY KEY, user_id TEXT NOT NULL, created_at BIGINT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns (conversation_id)",
        "CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations (user_id)",
        "CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id)",
    ]
    return out


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


class LogStore:
    """`url`: a SQLite file path (or `sqlite:///path`), or `postgresql://user@host:port/db`."""

    def __init__(self, url: str | os.PathLike):
        self.url = str(url)
        self._lock = threading.Lock()
        self.postgres = self.url.startswith(("postgresql://", "postgres://"))
        if self.postgres:
            import psycopg

            try:
                self._db = psycopg.connect(self.url)
            except psycopg.OperationalError as e:
                raise StoreError(f"cannot connect to the log store {self.url}: {e}") from None
        else:
            path = Path(self.url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are opened explicitly (BEGIN IMMEDIATE) below.
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        with self._tx() as cur:
            for statement in _ddl():
                cur.execute(statement)

    # ---- plumbing ---------------------------------------------------------------------------
    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    class _Tx:
        def __init__(self, store: LogStore):
            self.store = store

        def __enter__(self):
            s = self.store
            s._lock.acquire()
            self.cur = s._db.cursor()
            if not s.postgres:
                self.cur.execute("BEGIN IMMEDIATE")
            return self

        def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
            self.cur.execute(self.store._q(sql), tuple(params))
            return self.cur

        def __exit__(self, exc_type, exc, tb):
            s = self.store
            try:
                if exc_type is None:
                    s._db.execute("COMMIT") if not s.postgres else s._db.commit()
                else:
                    s._db.execute("ROLLBACK") if not s.postgres else s._db.rollback()
            finally:
                self.cur.close()
                s._lock.release()

    def _tx(self) -> LogStore._Tx:
        return LogStore._Tx(self)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict]:
        with self._tx() as tx:
            cur = tx.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- writes -------------------------------------------------------------------------------
    def write(self, rows: Mapping[str, Iterable[Mapping[str, Any]]],
              updates: Iterable[tuple[str, Sequence[Any]]] = ()) -> int:
        """Insert rows of several log tables and run `updates`, in one transaction; returns how many
        rows were new (a row whose key is already there is skipped: re-sent events are no-ops)."""
        written = 0
        with self._tx() as tx:
            for table in LOG_SCHEMAS:
                batch = list(rows.get(table, ()))
                if not batch:
                    continue
                names = LOG_SCHEMAS[table].names
                sql = (f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
                       f"ON CONFLICT ({KEYS[table]}) DO NOTHING")
                for row in batch:
                    written += tx.execute(sql, [row.get(n) for n in names]).rowcount or 0
            for sql, params in updates:
                tx.execute(sql, params)
        return written

    def add_account(self, user_id: str, key_hash: str, at_ms: int) -> None:
        with self._tx() as tx:
            tx.execute("INSERT INTO users (user_id, first_seen) VALUES (?, ?) ON CONFLICT (user_id) DO NOTHING",
                       (user_id, at_ms))
            tx.execute("INSERT INTO accounts (key_hash, user_id, created_at) VALUES (?, ?, ?)",
                       (key_hash, user_id, at_ms))

    def session(self, user_id: str, at_ms: int, gap_ms: int) -> str:
        """The user's current session (extended to `at_ms`), or a new one after `gap_ms` of silence."""
        with self._tx() as tx:
            row = tx.execute("SELECT session_id, ended_at FROM sessions WHERE user_id = ? "
                             "ORDER BY ended_at DESC LIMIT 1", (user_id,)).fetchone()
            if row is not None and at_ms - row[1] <= gap_ms:
                tx.execute("UPDATE sessions SET ended_at = ? WHERE session_id = ? AND ended_at < ?",
                           (at_ms, row[0], at_ms))
                return row[0]
            session_id = f"s-{user_id}-{at_ms}"
            tx.execute("INSERT INTO sessions (session_id, user_id, started_at, ended_at) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (session_id) DO NOTHING", (session_id, user_id, at_ms, at_ms))
            return session_id

    # ---- reads --------------------------------------------------------------------------------
    def user_for_key(self, key_hash: str) -> str | None:
        rows = self._rows("SELECT user_id FROM accounts WHERE key_hash = ?", (key_hash,))
        return rows[0]["user_id"] if rows else None

    def conversation(self, conversation_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM conversations WHERE conversation_id = ?", (conversation_id,))
        return rows[0] if rows else None

    def conversations_of(self, user_id: str) -> list[dict]:
        return self._rows("SELECT * FROM conversations WHERE user_id = ? ORDER BY started_at DESC", (user_id,))

    def turns_of(self, conversation_id: str) -> list[dict]:
        return self._rows("SELECT * FROM turns WHERE conversation_id = ? ORDER BY position, candidate_index, "
                          "created_at", (conversation_id,))

    def turn(self, turn_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM turns WHERE turn_id = ?", (turn_id,))
        return rows[0] if rows else None

    def count(self, table: str) -> int:
        if table not in LOG_SCHEMAS and table != "accounts":
            raise StoreError(f"unknown table {table}")
        return self._rows(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"]

    def event_ids(self) -> set[str]:
        return {r["event_id"] for r in self._rows("SELECT event_id FROM events")}

    # ---- export -------------------------------------------------------------------------------
    def tables(self) -> dict[str, pa.Table]:
        """The five log tables as Arrow, conformed to the schema."""
        out = {}
        for name, schema in LOG_SCHEMAS.items():
            rows = self._rows(f"SELECT {', '.join(schema.names)} FROM {name} ORDER BY {KEYS[name]}")
            columns = {}
            for f in schema:
                values = [r[f.name] for r in rows]
                if f.name in TIME_COLUMNS:
                    columns[f.name] = pa.array(values, type=pa.int64()).cast(TIMESTAMP)
                elif pa.types.is_boolean(f.type):
                    columns[f.name] = pa.array([None if v is None else bool(v) for v in values], type=f.type)
                else:
                    columns[f.name] = pa.array(values, type=f.type)
            out[name] = conform(name, pa.table(columns))
        return out

    def export(self, folder: str | os.PathLike) -> dict[str, int]:
        """Write `<table>.parquet` per log table into `folder` (each atomically); row counts."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        counts = {}
        for name, table in self.tables().items():
            tmp = folder / f".{name}.parquet.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, folder / f"{name}.parquet")
            counts[name] = table.num_rows
        return counts
