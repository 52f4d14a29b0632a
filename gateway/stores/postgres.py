"""The PostgreSQL ledger: one store shared by gateway processes on several hosts (asyncpg, a pool).

Batches come from the same ``GroupCommit`` as SQLite's. Each batch is one transaction that first
locks the single row of ``audit_head`` (``SELECT ... FOR UPDATE``): that lock serialises every
ledger writer on every host, so the chain stays gapless and a message id is claimed exactly once.
``lock_timeout`` bounds the wait; past it the caller gets ``BrokerUnavailable``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from gateway.audit import GENESIS_HASH, AuditRecord, AuditReport, ChainHead, ChainVerifier
from gateway.errors import BrokerUnavailable
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

SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
STORE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
DDL_LOCK = 0x4E5357  # advisory lock key: two processes creating the tables at once would collide

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        message_id TEXT PRIMARY KEY, sender TEXT NOT NULL, digest TEXT NOT NULL, document_type TEXT NOT NULL,
        state TEXT NOT NULL, receipt BYTEA, received_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL, code TEXT, detail TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS destinations (
        message_id TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL,
        generation INTEGER NOT NULL, updated_at DOUBLE PRECISION NOT NULL, code TEXT, detail TEXT NOT NULL,
        PRIMARY KEY (message_id, destination))""",
    """CREATE TABLE IF NOT EXISTS audit (
        seq BIGINT PRIMARY KEY, at TEXT NOT NULL, event TEXT NOT NULL, message_id TEXT NOT NULL, party TEXT,
        document_type TEXT, destination TEXT, digest TEXT, attempt INTEGER, code TEXT, detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_by_message ON audit (message_id, seq)",
    sql.PENDING_INDEX,
    """CREATE TABLE IF NOT EXISTS audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL, hash TEXT NOT NULL)""",
)
LOCK_HEAD = sql.SELECT_HEAD + " FOR UPDATE"
IN_LIST = " = ANY($1::text[])"
SELECT_MESSAGES = sql.MESSAGES_WHERE_ID + IN_LIST
SELECT_DESTINATIONS = sql.DESTINATIONS_WHERE_ID + IN_LIST
DELETE_MESSAGES = sql.DELETE_MESSAGES_WHERE_ID + IN_LIST
INSERT_GENESIS = sql.numbered(sql.INSERT_GENESIS)
UPDATE_HEAD = sql.numbered(sql.UPDATE_HEAD)
AUDIT_AFTER = sql.numbered(sql.AUDIT_AFTER)
AUDIT_OF_MESSAGE = sql.numbered(sql.AUDIT_OF_MESSAGE)


def _unnest(insert: sql.RowsInsert, types: tuple[str, ...]) -> str:
    """``insert`` for any number of rows: each parameter is one column's values, as an array."""
    if len(types) != len(insert.columns):
        raise ValueError(f"{insert.table}: {len(insert.columns)} columns but {len(types)} types")
    arrays = ", ".join(f"${n}::{t}[]" for n, t in enumerate(types, 1))
    return f"{insert.head}SELECT * FROM unnest({arrays}){insert.tail}"  # noqa: S608 -- our own names, no input


UPSERT_MESSAGES = _unnest(
    sql.UPSERT_MESSAGES, ("text", "text", "text", "text", "text", "bytea", "float8", "float8", "text", "text")
)
UPSERT_DESTINATIONS = _unnest(
    sql.UPSERT_DESTINATIONS, ("text", "text", "text", "int4", "int4", "float8", "text", "text")
)
INSERT_AUDIT = _unnest(
    sql.INSERT_AUDIT,
    ("int8", "text", "text", "text", "text", "text", "text", "text", "int4", "text", "text", "text", "text"),
)


class PostgresLedger(GroupCommitLedger):
    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        timeout: float = 10.0,
        max_batch: int = 1000,
        pool_size: int = 4,
        linger: float = 0.0,
    ) -> None:
        """``schema``: created if missing and used for every table (default: the DSN's search_path).

        ``timeout``: seconds for a connection, a lock or a statement before ``BrokerUnavailable``;
        ``linger``: the group commit's wait for company (``gateway/stores/group.py``).
        """
        if schema is not None and not SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema must match {SCHEMA_NAME.pattern}, not {schema!r}")
        self._dsn = dsn
        self.name = "PostgreSQL ledger"
        self._schema = schema
        self._timeout = timeout
        self._max_batch = max_batch
        self._pool_size = pool_size
        self._linger = linger
        self._pool: asyncpg.Pool | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    async def open(self) -> None:
        settings = {"lock_timeout": str(int(self._timeout * 1000))}
        if self._schema is not None:
            settings["search_path"] = self._schema
        with _unavailable("connect"):
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._timeout,
                command_timeout=self._timeout,
                server_settings=settings,
            )
        try:
            with _unavailable("create tables"):
                async with pool.acquire(timeout=self._timeout) as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", DDL_LOCK)
                    if self._schema is not None:
                        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema}")
                    for statement in SCHEMA:
                        await conn.execute(statement)
                    await conn.execute(INSERT_GENESIS, GENESIS_HASH)
        except BrokerUnavailable:
            await pool.close()
            raise
        self._pool = pool
        self._group = GroupCommit(self._run_batch, max_batch=self._max_batch, linger=self._linger)

    async def close(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            await group.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def ready(self) -> bool:
        try:
            with _unavailable("ready"):
                await self._connected().fetchval(sql.SELECT_HEAD, timeout=self._timeout)
        except BrokerUnavailable:
            return False
        return True

    # -- reads --------------------------------------------------------------------------------------

    async def status(self, message_id: str) -> MessageStatus | None:
        with _unavailable("status"):
            async with self._connected().acquire(timeout=self._timeout) as conn, _snapshot(conn):
                row = await conn.fetchrow(SELECT_MESSAGES, [message_id])
                if row is None:
                    return None
                return message_status(row, await conn.fetch(SELECT_DESTINATIONS, [message_id]))

    async def dead_destinations(self) -> list[str]:
        with _unavailable("dead destinations"):
            rows = await self._connected().fetch(sql.DEAD_DESTINATIONS)
        return [str(r[0]) for r in rows]

    async def pending_destinations(self) -> dict[str, int]:
        with _unavailable("pending destinations"):
            rows = await self._connected().fetch(sql.PENDING_DESTINATIONS)
        return {str(r[0]): int(r[1]) for r in rows}

    async def audit_tail(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        with _unavailable("audit tail"):
            rows = await self._connected().fetch(AUDIT_AFTER, after_seq, limit)
        return [audit_from_row(r) for r in rows]

    async def trace(self, message_id: str) -> list[AuditRecord]:
        with _unavailable("trace"):
            rows = await self._connected().fetch(AUDIT_OF_MESSAGE, message_id)
        return [audit_from_row(r) for r in rows]

    async def verify_audit(self) -> AuditReport:
        verifier = ChainVerifier()
        with _unavailable("verify"):
            # The timeout bounds each fetch of ``prefetch`` rows, not the whole (arbitrarily long) log.
            async with self._connected().acquire(timeout=self._timeout) as conn, _snapshot(conn):
                head = ChainHead(*await conn.fetchrow(sql.SELECT_HEAD))
                async for row in conn.cursor(sql.AUDIT_ALL, prefetch=2000):
                    if not verifier.feed(audit_from_row(row)):
                        break
        return verifier.report(head)

    # -- the batch ----------------------------------------------------------------------------------

    def _connected(self) -> asyncpg.Pool:
        if self._pool is None:
            raise BrokerUnavailable(f"the {self.name} is not open")
        return self._pool

    async def _run_batch(self, ops: list[Op]) -> tuple[list[Result], list[AuditRecord]]:
        message_ids, destination_ids = touched(ops)
        with _unavailable("write"):
            async with self._connected().acquire(timeout=self._timeout) as conn, conn.transaction():
                head = ChainHead(*await conn.fetchrow(LOCK_HEAD))
                messages = []
                if message_ids:  # a batch of delivery events touches destination rows only
                    messages = [MessageRow.from_row(r) for r in await conn.fetch(SELECT_MESSAGES, message_ids)]
                destinations = []
                if destination_ids:
                    rows = await conn.fetch(SELECT_DESTINATIONS, destination_ids)
                    destinations = [destination_from_row(r) for r in rows]
                # Deciding a big batch (hashing, JSON) takes milliseconds of CPU: not on the event loop.
                results, changes = await asyncio.to_thread(decide, messages, destinations, head, ops)
                if changes.deletes:
                    await conn.execute(DELETE_MESSAGES, changes.deletes)
                for statement, rows in (
                    (UPSERT_MESSAGES, changes.upserts),
                    (UPSERT_DESTINATIONS, changes.destinations),
                    (INSERT_AUDIT, changes.audit),
                ):
                    if rows:  # one statement whatever the row count: a column array per parameter
                        await conn.execute(statement, *zip(*rows, strict=True))
                if changes.audit:
                    await conn.execute(UPDATE_HEAD, changes.head.seq, changes.head.hash)
        return results, changes.records


def _snapshot(conn: asyncpg.Connection) -> asyncpg.transaction.Transaction:
    """One read-only transaction, so a multi-query read sees a single committed state."""
    return conn.transaction(isolation="repeatable_read", readonly=True)


@contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except STORE_ERRORS as exc:
        raise BrokerUnavailable(f"PostgreSQL ledger ({what}): {type(exc).__name__}: {exc}") from exc
