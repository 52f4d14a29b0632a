"""The bench's floors: the delivery floor (`bench.servers deliver`), whose real consumer processes drain a
real RabbitMQ quorum queue into the loopback agency, each message exactly once, the queue deleted
afterwards; and how the report combines floors (the like-for-like floor for `run`, the bracketing naive)."""

from __future__ import annotations

from pathlib import Path

import aio_pika
import pytest
from aio_pika.exceptions import ChannelNotFoundEntity

from bench import delivery_floor, floors, report
from bench import messages as msgs
from bench.gateway_runs import AMQP_URL
from tests.conftest import require_service


@pytest.mark.rabbitmq
async def test_naive_delivery_drains_every_message_once_and_deletes_its_queue(
    pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    queues: list[str] = []
    real_declare = floors.declare_quorum

    async def spy(url: str, queue: str, *, delete: bool = False) -> None:
        queues.append(queue)
        await real_declare(url, queue, delete=delete)

    monkeypatch.setattr(delivery_floor, "declare_quorum", spy)
    body = msgs.signed_messages(pki_dir, 5_000, 1)[0]

    result = await delivery_floor.naive_delivery(AMQP_URL, tmp_path, body, 300, copies=2)

    assert result["all_delivered"] is True
    assert result["delivered"] == 300  # distinct Idempotency-Keys: one per message, none lost
    assert result["delivered_per_s"] > 0
    assert result["cpu"]["ms_per_message"]["gateway"] > 0  # the floor processes' own CPU was metered
    assert len(result["peak_rss_kb"]) == 2
    assert queues == [queues[0], queues[0]]  # declared, then deleted
    connection = await aio_pika.connect(AMQP_URL)
    try:
        with pytest.raises(ChannelNotFoundEntity):
            await (await connection.channel()).declare_queue(queues[0], passive=True)
    finally:
        await connection.close()


def test_the_floor_that_also_delivers_costs_one_ingress_and_one_delivery_per_message() -> None:
    assert report._combined(1_000.0, 3_000.0) == pytest.approx(750.0)
    assert report._combined(1_000.0, None) is None
    assert report._combined(None, 3_000.0) is None


def test_the_naive_floor_brackets_the_gateway_runs_with_its_two_measurements() -> None:
    floor = {"naive_pipeline_n": {"accepted_per_s": 1_200.0}, "naive_pipeline_n_after": {"accepted_per_s": 1_000.0}}
    assert report.naive_bracketed(floor) == pytest.approx(1_100.0)
    del floor["naive_pipeline_n_after"]
    assert report.naive_bracketed(floor) == pytest.approx(1_200.0)
    assert report.naive_bracketed({}) is None
