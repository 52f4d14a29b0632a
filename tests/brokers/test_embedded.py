"""Embedded-only properties: the file it keeps, and what happens once it is closed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from broker_kit import make_delivery

from gateway.brokers.embedded import EmbeddedBroker
from gateway.errors import BrokerUnavailable


async def test_the_queue_is_a_wal_mode_sqlite_file_that_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "data" / "queue.sqlite3"
    broker = EmbeddedBroker(path)
    delivery = make_delivery("customs")
    await broker.publish([delivery])  # starts on first use
    await broker.close()

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT message_id FROM work_items").fetchall() == [(delivery.message_id,)]


async def test_a_closed_broker_refuses_work_and_is_not_ready(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "queue.sqlite3")
    await broker.start()
    assert await broker.ready()
    await broker.close()
    assert not await broker.ready()
    with pytest.raises(BrokerUnavailable):
        await broker.publish([make_delivery("customs")])
    with pytest.raises(BrokerUnavailable):
        await broker.start()


def test_unknown_synchronous_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        EmbeddedBroker(tmp_path / "q.sqlite3", synchronous="FULL; DROP TABLE work_items")
