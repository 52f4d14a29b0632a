"""begin_immediate: waits for another connection's write lock by polling, gives up after its timeout,
and leaves the connection's own busy timeout as it was."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from gateway.sqlite_lock import begin_immediate, prepare


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=7.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    return conn


def test_it_takes_the_lock_once_the_other_writer_commits(tmp_path: Path) -> None:
    holder, waiter = _connect(tmp_path / "db"), _connect(tmp_path / "db")
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    trying = threading.Event()

    def take() -> None:
        trying.set()
        begin_immediate(waiter, timeout=30.0)
        waiter.execute("INSERT INTO t VALUES (2)")
        waiter.execute("COMMIT")

    thread = threading.Thread(target=take)
    thread.start()
    trying.wait()
    holder.execute("COMMIT")
    thread.join(30)
    assert not thread.is_alive()
    assert [r[0] for r in holder.execute("SELECT x FROM t ORDER BY x")] == [1, 2]
    assert waiter.execute("PRAGMA busy_timeout").fetchone()[0] == 7000


def test_it_gives_up_with_database_is_locked_and_restores_the_busy_timeout(tmp_path: Path) -> None:
    holder, waiter = _connect(tmp_path / "db"), _connect(tmp_path / "db")
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(waiter, timeout=0.05)
    assert not waiter.in_transaction
    assert waiter.execute("PRAGMA busy_timeout").fetchone()[0] == 7000
    holder.execute("ROLLBACK")


def test_a_process_opening_next_to_a_busy_writer_is_not_starved(tmp_path: Path) -> None:
    """A writer that commits back to back (2 ms transactions, microsecond gaps) leaves a waiter that
    sleeps 1, 2, 5 ... 100 ms between tries almost no chance; polling gets in within a few gaps."""
    busy = _connect(tmp_path / "db")
    busy.execute("CREATE TABLE t (x)")
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            begin_immediate(busy, timeout=30.0)
            busy.execute("INSERT INTO t VALUES (1)")
            time.sleep(0.002)
            busy.execute("COMMIT")

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        opener = sqlite3.connect(tmp_path / "db", isolation_level=None, timeout=3.0, check_same_thread=False)
        prepare(opener, 3.0, "NORMAL", lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS u (y)"))
        begin_immediate(opener, timeout=3.0)
        opener.execute("INSERT INTO u VALUES (2)")
        opener.execute("COMMIT")
    finally:
        stop.set()
        thread.join(30)
    assert [r[0] for r in opener.execute("SELECT y FROM u")] == [2]
