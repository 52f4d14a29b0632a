"""One ledger behaviour suite, two backends: SQLite in tmp_path, and the real PostgreSQL on 127.0.0.1.

Each PostgreSQL test gets its own schema (``nsw_test_<run>_<n>``), dropped afterwards. Without a
reachable server the PostgreSQL half skips loudly, or fails when CI=true.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.stores.base import Ledger
from gateway.stores.postgres import PostgresLedger
from gateway.stores.sqlite import SqliteLedger

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
IN_CI = os.environ.get("CI", "").lower() == "true"
RUN = uuid.uuid4().hex[:8]
_schemas = itertools.count(1)


@dataclass
class Backend:
    """A store, and ways to reach it besides the ledger under test."""

    name: str
    make: Callable[..., Ledger]  # another ledger on the same store (keyword arguments passed through)
    sql: Callable[[str], Coroutine[Any, Any, None]]  # run statements directly, as a tamperer would
    hold_write_lock: Callable[[], AbstractAsyncContextManager[None]]  # another session holding the writer lock
    unreachable: Callable[[], Ledger]  # a ledger whose store cannot be reached at all


async def _require_postgres() -> None:
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        message = f"PostgreSQL is not reachable at {PG_DSN}: {exc}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: a missing real service is a failure, not a skip)")
        pytest.skip(f"{message} -- SKIPPING the PostgreSQL ledger tests; start it to run them")
    await conn.close()


def _sqlite_backend(path: Path, tmp_path: Path) -> Backend:
    async def run_sql(statements: str) -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.executescript(statements)
        finally:
            conn.close()

    @asynccontextmanager
    async def hold_write_lock() -> AsyncIterator[None]:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()

    return Backend(
        "sqlite",
        lambda **kw: SqliteLedger(path, **kw),
        run_sql,
        hold_write_lock,
        lambda: SqliteLedger(tmp_path / "no-such-folder" / "ledger.db"),
    )


def _postgres_backend(schema: str) -> Backend:
    settings = {"search_path": schema}

    async def run_sql(statements: str) -> None:
        conn = await asyncpg.connect(PG_DSN, server_settings=settings)
        try:
            await conn.execute(statements)
        finally:
            await conn.close()

    @asynccontextmanager
    async def hold_write_lock() -> AsyncIterator[None]:
        conn = await asyncpg.connect(PG_DSN, server_settings=settings)
        try:
            async with conn.transaction():
                await conn.execute("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")
                yield
        finally:
            await conn.close()

    return Backend(
        "postgres",
        lambda **kw: PostgresLedger(PG_DSN, schema=schema, **kw),
        run_sql,
        hold_write_lock,
        lambda: PostgresLedger("postgresql://postgres@127.0.0.1:1/test", schema=schema, timeout=2),
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        yield _sqlite_backend(tmp_path / "ledger.db", tmp_path)
        return
    await _require_postgres()
    schema = f"nsw_test_{RUN}_{next(_schemas)}"
    try:
        yield _postgres_backend(schema)
    finally:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


@pytest.fixture
async def ledger(backend: Backend) -> AsyncIterator[Ledger]:
    opened = backend.make()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
