"""The ``broker`` fixture: each behaviour test runs once on the embedded backend and once on RabbitMQ."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from broker_kit import RABBIT_URL, TEST_DELIVERY_LIMIT, TEST_TIERS, require_rabbitmq

from gateway.brokers import names
from gateway.brokers.base import Broker
from gateway.brokers.embedded import EmbeddedBroker
from gateway.brokers.rabbitmq import RabbitMQBroker


def unique_prefix() -> str:
    return f"nswtest-{uuid.uuid4().hex[:10]}"


async def delete_queues(broker: RabbitMQBroker, url: str = RABBIT_URL) -> None:
    """Remove every queue the test's broker declared (its prefix is unique to the test)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for destination in broker.declared_destinations:
            plan = names.queue_plan(
                destination, broker.retry_tiers, prefix=broker.prefix, delivery_limit=broker.delivery_limit
            )
            for queue, _ in plan:
                await channel.queue_delete(queue)
    finally:
        await connection.close()


@pytest.fixture
async def embedded_broker(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    broker = EmbeddedBroker(
        tmp_path / "queue.sqlite3", lease_seconds=5.0, poll_interval=0.02, delivery_limit=TEST_DELIVERY_LIMIT
    )
    await broker.start()
    yield broker
    await broker.close()


@pytest.fixture
async def rabbitmq_broker() -> AsyncIterator[RabbitMQBroker]:
    require_rabbitmq()
    broker = RabbitMQBroker(
        RABBIT_URL,
        retry_tiers=TEST_TIERS,
        delivery_limit=TEST_DELIVERY_LIMIT,
        queue_prefix=unique_prefix(),
        publish_timeout=5.0,
    )
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()
        await delete_queues(broker)


@pytest.fixture(params=["embedded", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def broker(request: pytest.FixtureRequest) -> Broker:
    backend: Broker = request.getfixturevalue(f"{request.param}_broker")
    return backend
