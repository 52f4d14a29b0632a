"""begin_immediate: waits for another connection's write lock by polling, gives up after its timeout,
and leaves the connection's own busy timeout as it was."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.sqlite_lock import begin_immediate


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
