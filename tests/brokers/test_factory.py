from __future__ import annotations

from pathlib import Path

from gateway.brokers.embedded import EmbeddedBroker
from gateway.brokers.factory import make_broker
from gateway.brokers.rabbitmq import RabbitMQBroker


def test_no_url_means_the_embedded_queue_in_the_data_dir(tmp_path: Path) -> None:
    broker = make_broker(None, tmp_path, lease_seconds=2.0)
    assert isinstance(broker, EmbeddedBroker)
    assert broker.path == tmp_path / "queue.sqlite3"
    assert broker.lease_seconds == 2.0


def test_a_url_means_rabbitmq(tmp_path: Path) -> None:
    broker = make_broker("amqp://guest:guest@127.0.0.1:5672/", tmp_path, retry_tiers=(1, 2), queue_prefix="p")
    assert isinstance(broker, RabbitMQBroker)
    assert (broker.retry_tiers, broker.prefix) == ((1, 2), "p")
