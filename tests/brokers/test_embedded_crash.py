"""The embedded broker across processes: a worker killed mid-handler, and a handler that outlives its lease."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from broker_kit import WAIT, Collector, make_delivery

from gateway.brokers.base import Ack, Outcome
from gateway.brokers.embedded import EmbeddedBroker
from gateway.model import Delivery

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LEASE = 1.0


async def test_a_killed_workers_delivery_goes_to_another_consumer(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    broker = EmbeddedBroker(path, lease_seconds=LEASE, poll_interval=0.02)
    delivery = make_delivery("customs")
    await broker.publish([delivery])

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "embedded_child.py"),
        str(path),
        "customs",
        str(LEASE),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(WAIT):
            line = await child.stdout.readline()
        assert line.decode().split() == ["claimed", delivery.message_id]
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    got = Collector()
    sub = await broker.consume("customs", got)
    await got.wait_for_ids({delivery.message_id})  # only once the dead child's lease has expired
    await sub.stop()
    await broker.close()
    (again,) = got.seen
    assert (again.message_id, again.attempt, again.payload) == (delivery.message_id, 1, delivery.payload)


async def test_a_long_handler_keeps_its_lease(tmp_path: Path) -> None:
    """Two brokers on one file stand for two worker processes."""
    path = tmp_path / "queue.sqlite3"
    first = EmbeddedBroker(path, lease_seconds=LEASE, poll_interval=0.02)
    second = EmbeddedBroker(path, lease_seconds=LEASE, poll_interval=0.02)
    delivery = make_delivery("customs")
    await first.publish([delivery])
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def slow(d: Delivery) -> Outcome:
        calls.append(d.message_id)
        started.set()
        await release.wait()
        return Ack()

    sub1 = await first.consume("customs", slow)
    async with asyncio.timeout(WAIT):
        await started.wait()
    other = Collector()
    sub2 = await second.consume("customs", other)
    # Three lease periods: without the heartbeat the second worker would take the delivery over.
    watcher = asyncio.create_task(other.wait_for_count(1))
    done, _ = await asyncio.wait({watcher}, timeout=3 * LEASE)
    watcher.cancel()
    release.set()
    await sub1.stop()
    await sub2.stop()
    await first.close()
    await second.close()
    assert not done
    assert other.seen == []
    assert calls == [delivery.message_id]  # nor did the first worker take it twice
