"""Choose the broker backend: RabbitMQ when an AMQP URL is configured, else the embedded SQLite queue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.brokers.base import Broker
from gateway.brokers.embedded import EmbeddedBroker
from gateway.brokers.rabbitmq import RabbitMQBroker

EMBEDDED_FILE = "queue.sqlite3"


def make_broker(amqp_url: str | None, data_dir: Path, **options: Any) -> Broker:
    """``options`` go to the chosen backend's constructor (e.g. ``retry_tiers`` or ``lease_seconds``)."""
    if amqp_url:
        return RabbitMQBroker(amqp_url, **options)
    return EmbeddedBroker(Path(data_dir) / EMBEDDED_FILE, **options)
