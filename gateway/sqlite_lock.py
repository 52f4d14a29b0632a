"""Taking SQLite's write lock when several processes share a database file.

SQLite's own busy handler (``sqlite3.connect(timeout=...)``) sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25,
50, 50, 100 ms between tries. Two gateway processes that each commit a batch every few milliseconds
kept missing the lock and sleeping: measured with two processes on one ledger file, the median
claim+accept doubled (12 -> 25 ms) and the p99 went from 21 to about 100 ms. Here the lock is
polled every ``POLL_SECONDS`` instead, with the connection's busy timeout set to zero only for that
statement, so every other statement keeps SQLite's normal waiting.

Every write path must take the lock this way: a process left on SQLite's sleeping handler starves
next to one that polls (seen: a worker starting next to a loaded ingress could not create its
schema within 10 s). ``prepare`` does the opening steps (WAL, schema) under the same rule.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Final

POLL_SECONDS: Final = 0.0002


def begin_immediate(conn: sqlite3.Connection, timeout: float) -> None:
    """``BEGIN IMMEDIATE`` on ``conn``, waiting up to ``timeout`` seconds for another process's lock.

    Raises ``sqlite3.OperationalError`` ("database is locked") when the wait runs out.
    """
    _execute_polling(conn, "BEGIN IMMEDIATE", time.monotonic() + timeout)


def _execute_polling(conn: sqlite3.Connection, statement: str, deadline: float) -> None:
    """``statement``, retried every ``POLL_SECONDS`` while another process holds the lock, until ``deadline``."""
    busy_ms = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                conn.execute(statement)
            except sqlite3.OperationalError as exc:
                contended = "locked" in str(exc) or "busy" in str(exc)
                if not contended or time.monotonic() >= deadline:
                    raise
                time.sleep(POLL_SECONDS)
            else:
                return
    finally:
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")


def prepare(
    conn: sqlite3.Connection, timeout: float, synchronous: str, create: Callable[[sqlite3.Connection], object]
) -> None:
    """Open a shared database: WAL mode (set once, by whichever process comes first), ``synchronous``
    for this connection, then ``create(conn)`` (idempotent DDL) in one write transaction."""
    deadline = time.monotonic() + timeout
    if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        _execute_polling(conn, "PRAGMA journal_mode = WAL", deadline)
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    _execute_polling(conn, "BEGIN IMMEDIATE", deadline)
    try:
        create(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
