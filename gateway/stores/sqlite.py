"""The SQLite ledger: one file, WAL, shared safely by every gateway process on one host.

All writes run in one dedicated thread with its own connection, batched by ``GroupCommit``: one
``BEGIN IMMEDIATE`` transaction (SQLite's single writer lock, held across processes) per batch.
Reads run in a second thread with a read-only connection, which WAL lets proceed during a write.
The event loop never waits on SQLite.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from gateway.audit import GENESIS_HASH, AuditRecord, AuditReport, ChainHead, ChainVerifier
from gateway.errors import BrokerUnavailable
from gateway.sqlite_lock import begin_immediate, prepare
from gateway.status import MessageStatus
from gateway.stores import sql
from gateway.stores.batch import (
    MessageRow,
    Op,
    Result,
    audit_from_row,
    decide,
    destination_from_row,
    message_status,
    touched,
)
from gateway.stores.group import GroupCommit, GroupCommitLedger

T = TypeVar("T")

SYNCHRONOUS = frozenset({"FULL", "NORMAL", "EXTRA"})

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        message_id TEXT PRIMARY KEY, sender TEXT NOT NULL, digest TEXT NOT NULL, document_type TEXT NOT NULL,
        state TEXT NOT NULL, receipt BLOB, received_at REAL NOT NULL, updated_at REAL NOT NULL,
        code TEXT, detail TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS destinations (
        message_id TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL,
        generation INTEGER NOT NULL, updated_at REAL NOT NULL, code TEXT, detail TEXT NOT NULL,
        PRIMARY KEY (message_id, destination)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY, at TEXT NOT NULL, event TEXT NOT NULL, message_id TEXT NOT NULL, party TEXT,
        document_type TEXT, destination TEXT, digest TEXT, attempt INTEGER, code TEXT, detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_by_message ON audit (message_id, seq)",
    sql.PENDING_INDEX,
    """CREATE TABLE IF NOT EXISTS audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL)""",
)
IN_LIST = " IN (SELECT value FROM json_each(?))"  # one parameter: the ids as a JSON array
SELECT_MESSAGES = sql.MESSAGES_WHERE_ID + IN_LIST
SELECT_DESTINATIONS = sql.DESTINATIONS_WHERE_ID + IN_LIST
DELETE_MESSAGES = sql.DELETE_MESSAGES_WHERE_ID + IN_LIST
MAX_ROWS = 128  # rows per INSERT statement: 13 columns x 128 = 1,664 parameters (SQLite allows 32,766)


class SqliteLedger(GroupCommitLedger):
    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        timeout: float = 10.0,
        max_batch: int = 1000,
        linger: float = 0.0,
    ) -> None:
        """``timeout``: seconds to wait for another process's write lock before ``BrokerUnavailable``;
        ``linger``: the group commit's wait for company (``gateway/stores/group.py``)."""
        if synchronous.upper() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {sorted(SYNCHRONOUS)}, not {synchronous!r}")
        self.path = path
        self.name = f"SQLite ledger {path}"
        self._synchronous = synchronous.upper()
        self._timeout = timeout
        self._max_batch = max_batch
        self._linger = linger
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsw-ledger-writer")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsw-ledger-reader")
        try:
            self._wconn = await self._call(self._writer, self._connect_writer)
            self._rconn = await self._call(self._reader, self._connect_reader)
        except BrokerUnavailable:
            await self.close()
            raise
        self._group = GroupCommit(self._run_batch, max_batch=self._max_batch, linger=self._linger)

    async def close(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            await group.close()
        for executor, conn in ((self._writer, self._wconn), (self._reader, self._rconn)):
            if executor is not None:
                if conn is not None:
                    await asyncio.get_running_loop().run_in_executor(executor, conn.close)
                executor.shutdown(wait=False)
        self._writer = self._reader = None
        self._wconn = self._rconn = None

    async def ready(self) -> bool:
        try:
            await self._read(lambda conn: conn.execute(sql.SELECT_HEAD).fetchone())
        except BrokerUnavailable:
            return False
        return True

    # -- reads --------------------------------------------------------------------------------------

    async def status(self, message_id: str) -> MessageStatus | None:
        ids = (_json_list([message_id]),)

        def read(conn: sqlite3.Connection) -> MessageStatus | None:
            with _snapshot(conn):
                row = conn.execute(SELECT_MESSAGES, ids).fetchone()
                return None if row is None else message_status(row, conn.execute(SELECT_DESTINATIONS, ids))

        return await self._read(read)

    async def dead_destinations(self) -> list[str]:
        return await self._read(lambda conn: [str(r[0]) for r in conn.execute(sql.DEAD_DESTINATIONS)])

    async def pending_destinations(self) -> dict[str, int]:
        return await self._read(lambda conn: {str(d): int(n) for d, n in conn.execute(sql.PENDING_DESTINATIONS)})

    async def audit_tail(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        return await self._read(
            lambda conn: [audit_from_row(r) for r in conn.execute(sql.AUDIT_AFTER, (after_seq, limit))]
        )

    async def trace(self, message_id: str) -> list[AuditRecord]:
        return await self._read(
            lambda conn: [audit_from_row(r) for r in conn.execute(sql.AUDIT_OF_MESSAGE, (message_id,))]
        )

    async def verify_audit(self) -> AuditReport:
        def verify(conn: sqlite3.Connection) -> AuditReport:
            verifier = ChainVerifier()
            with _snapshot(conn):
                head = ChainHead(*conn.execute(sql.SELECT_HEAD).fetchone())
                cursor = conn.execute(sql.AUDIT_ALL)
                try:
                    for row in cursor:
                        if not verifier.feed(audit_from_row(row)):
                            break
                finally:
                    cursor.close()
            return verifier.report(head)

        return await self._read(verify)

    # -- the two threads ----------------------------------------------------------------------------

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._rconn
        if self._reader is None or conn is None:
            raise BrokerUnavailable(f"the {self.name} is not open")
        return await self._call(self._reader, lambda: work(conn))

    async def _call(self, executor: ThreadPoolExecutor, work: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, work)
        except sqlite3.Error as exc:
            raise BrokerUnavailable(f"{self.name}: {exc}") from exc

    async def _run_batch(self, ops: list[Op]) -> tuple[list[Result], list[AuditRecord]]:
        if self._writer is None:
            raise BrokerUnavailable(f"the {self.name} is not open")
        return await self._call(self._writer, lambda: self._write_batch(ops))

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; timeout is SQLite's busy wait.
        return sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)

    def _connect_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            prepare(conn, self._timeout, self._synchronous, _create_schema)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only = ON")
        return conn

    def _write_batch(self, ops: list[Op]) -> tuple[list[Result], list[AuditRecord]]:
        conn = self._wconn
        assert conn is not None
        message_ids, destination_ids = touched(ops)
        begin_immediate(conn, self._timeout)
        try:
            head = ChainHead(*conn.execute(sql.SELECT_HEAD).fetchone())
            messages = []
            if message_ids:  # a batch of delivery events touches destination rows only
                rows = conn.execute(SELECT_MESSAGES, (_json_list(message_ids),))
                messages = [MessageRow.from_row(r) for r in rows]
            destinations = []
            if destination_ids:
                rows = conn.execute(SELECT_DESTINATIONS, (_json_list(destination_ids),))
                destinations = [destination_from_row(r) for r in rows]
            results, changes = decide(messages, destinations, head, ops)
            if changes.deletes:
                conn.execute(DELETE_MESSAGES, (_json_list(changes.deletes),))
            _insert(conn, sql.UPSERT_MESSAGES, changes.upserts)
            _insert(conn, sql.UPSERT_DESTINATIONS, changes.destinations)
            if changes.audit:
                _insert(conn, sql.INSERT_AUDIT, changes.audit)
                conn.execute(sql.UPDATE_HEAD, (changes.head.seq, changes.head.hash))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results, changes.records


def _insert(conn: sqlite3.Connection, insert: sql.RowsInsert, rows: list[tuple[Any, ...]]) -> None:
    """``rows`` in a few multi-row statements: as many of ``MAX_ROWS`` as fit, then the rest in powers of
    two, so that only a few distinct statements are ever prepared (the connection caches them)."""
    start = 0
    while start < len(rows):
        count = min(MAX_ROWS, 1 << (len(rows) - start).bit_length() - 1)
        conn.execute(insert.values(count), tuple(itertools.chain.from_iterable(rows[start : start + count])))
        start += count


def _create_schema(conn: sqlite3.Connection) -> None:
    for statement in SCHEMA:
        conn.execute(statement)
    conn.execute(sql.INSERT_GENESIS, (GENESIS_HASH,))


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction, so a multi-query read sees a single committed state."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _json_list(values: list[str]) -> str:
    return json.dumps(values)
