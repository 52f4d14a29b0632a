"""Helpers for the broker tests: deliveries, a collecting handler, the real-RabbitMQ check."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from gateway.brokers.base import Ack, Broker, Outcome
from gateway.model import Delivery

T = TypeVar("T")

RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
RABBIT_URL = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/"
TEST_TIERS = (0.2, 0.5, 1.0)
TEST_DELIVERY_LIMIT = 3
WAIT = 20.0  # generous: a deadline for things that must happen, never a measurement


def require_rabbitmq() -> None:
    """Skip loudly when RabbitMQ is not on 127.0.0.1:5672; under CI=true that is a failure."""
    try:
        socket.create_connection((RABBIT_HOST, RABBIT_PORT), timeout=1.0).close()
    except OSError as exc:
        message = f"RabbitMQ is not reachable on {RABBIT_HOST}:{RABBIT_PORT} ({exc})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true, so this is a failure")
        pytest.skip(f"!!! {message}: SKIPPING the real-RabbitMQ tests (start it: rabbitmq-server -detached)")


def make_delivery(destination: str, n: int = 0, *, size: int = 64, **fields: object) -> Delivery:
    payload = (f"<Envelope n='{n}'>".encode() + os.urandom(size // 2).hex().encode())[:size]
    values: dict[str, object] = {
        "message_id": str(uuid.uuid4()),
        "sender": "VN-MOIT",
        "destination": destination,
        "document_type": "licence.import",
        "payload": payload,
        "digest": hashlib.sha256(payload).hexdigest(),
        "first_enqueued_at": time.time(),
        "headers": {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"},
    }
    values.update(fields)
    return Delivery(**values)  # type: ignore[arg-type]


class Collector:
    """A handler that records every delivery it sees; ``decide`` chooses the outcome (default Ack)."""

    def __init__(self, decide: Callable[[Delivery, int], Outcome] | None = None) -> None:
        self.seen: list[Delivery] = []
        self._decide = decide or (lambda _d, _n: Ack())
        self._changed = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> Outcome:
        sightings = sum(1 for d in self.seen if d.message_id == delivery.message_id)
        self.seen.append(delivery)
        self._changed.set()
        return self._decide(delivery, sightings)

    def ids(self) -> set[str]:
        return {d.message_id for d in self.seen}

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def wait_for_ids(self, ids: set[str]) -> None:
        await self.wait_until(lambda: ids <= self.ids())

    async def wait_for_count(self, n: int) -> None:
        await self.wait_until(lambda: len(self.seen) >= n)


async def consume_until(
    broker: Broker,
    destination: str,
    until: int | set[str],
    decide: Callable[[Delivery, int], Outcome] | None = None,
    *,
    prefetch: int = 16,
) -> list[Delivery]:
    """Consume until ``until`` deliveries (a count, or every one of a set of message ids) were seen,
    then stop, which waits for their outcomes to be applied. Returns every delivery seen, in order."""
    got = Collector(decide)
    sub = await broker.consume(destination, got, prefetch=prefetch)
    try:
        await (got.wait_for_count(until) if isinstance(until, int) else got.wait_for_ids(until))
    finally:
        await sub.stop()
    return got.seen


async def eventually(probe: Callable[[], Awaitable[T]]) -> T:
    """Poll ``probe`` until it returns something truthy: for state the broker changes on its own,
    where there is no event to await (e.g. RabbitMQ dead-lettering past the delivery limit)."""
    async with asyncio.timeout(WAIT):
        while not (result := await probe()):  # noqa: ASYNC110 -- the change happens inside RabbitMQ
            await asyncio.sleep(0.05)
    return result
