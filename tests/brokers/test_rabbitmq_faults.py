"""RabbitMQ under faults: connections closed by the broker, a broker that is not there, a vanished queue."""

from __future__ import annotations

import asyncio
import shutil
import socket
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from broker_kit import RABBIT_URL, TEST_TIERS, WAIT, Collector, make_delivery, require_rabbitmq
from conftest import delete_queues, unique_prefix
from support.tcpproxy import TcpProxy

from gateway.brokers import names
from gateway.brokers.rabbitmq import RabbitMQBroker
from gateway.errors import BrokerUnavailable, ConfigError
from gateway.model import Delivery


async def rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, f"rabbitmqctl {args}: {out.decode()} {err.decode()}"


@pytest.fixture
async def vhost() -> AsyncIterator[str]:
    """A vhost of its own, so closing "all connections" there touches nobody else's tests."""
    require_rabbitmq()
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("!!! rabbitmqctl is not on PATH: cannot inject connection faults")
    name = f"nswtest-{uuid.uuid4().hex[:10]}"
    await rabbitmqctl("add_vhost", name)
    try:
        await rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        await rabbitmqctl("delete_vhost", name)


async def publish_until_accepted(broker: RabbitMQBroker, batch: list[Delivery]) -> None:
    """What a sender does on 503: try again. Each attempt is bounded by the broker's publish timeout."""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                await broker.publish(batch)
            except BrokerUnavailable:
                await asyncio.sleep(0.1)
            else:
                return


@pytest.fixture
async def broker() -> AsyncIterator[RabbitMQBroker]:
    """A broker with queues of its own and a short publish timeout; closed and its queues deleted after."""
    require_rabbitmq()
    broker = RabbitMQBroker(RABBIT_URL, retry_tiers=TEST_TIERS, queue_prefix=unique_prefix(), publish_timeout=3.0)
    try:
        yield broker
    finally:
        await broker.close()
        await delete_queues(broker)


async def delete_work_queue(broker: RabbitMQBroker, destination: str) -> None:
    """Delete a declared queue behind the broker's back (an operator's mistake, or a policy)."""
    connection = await aio_pika.connect(RABBIT_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(names.work_queue(destination, broker.prefix))


async def receive(broker: RabbitMQBroker, destination: str, ids: set[str]) -> None:
    """Consume ``destination`` until every one of ``ids`` has arrived."""
    got = Collector()
    sub = await broker.consume(destination, got)
    await got.wait_for_ids(ids)
    await sub.stop()


@pytest.mark.rabbitmq
async def test_every_message_is_handled_across_a_forced_reconnect(vhost: str) -> None:
    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}?reconnect_interval=0.3"
    broker = RabbitMQBroker(url, retry_tiers=TEST_TIERS, queue_prefix="nsw", publish_timeout=3.0)
    await broker.start()
    got = Collector()
    sub = await broker.consume("customs", got, prefetch=8)
    accepted: set[str] = set()
    try:
        for n in range(20):
            batch = [make_delivery("customs", n * 5 + i) for i in range(5)]
            await publish_until_accepted(broker, batch)
            accepted |= {d.message_id for d in batch}
            if n == 5:
                await got.wait_for_count(1)  # deliveries are flowing: now pull the rug
                await rabbitmqctl("close_all_connections", "--vhost", vhost, "--limit", "100", "fault test")
        await got.wait_for_ids(accepted)
    finally:
        await sub.stop()
        await broker.close()
    assert accepted <= got.ids()  # duplicates are allowed (at-least-once), losses are not


@pytest.mark.rabbitmq
async def test_an_outage_means_fast_refusals_then_recovery() -> None:
    require_rabbitmq()
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?reconnect_interval=0.3"
    broker = RabbitMQBroker(url, retry_tiers=TEST_TIERS, queue_prefix=unique_prefix(), publish_timeout=2.0)
    got = Collector()
    try:
        sub = await broker.consume("customs", got)
        before = make_delivery("customs")
        await broker.publish([before])
        await got.wait_for_ids({before.message_id})

        await proxy.cut()
        async with asyncio.timeout(broker.publish_timeout + 1):  # refused within the publish timeout
            with pytest.raises(BrokerUnavailable):
                await broker.publish([make_delivery("customs")])
        assert not await broker.ready()

        await proxy.restore()
        after = make_delivery("customs")
        await publish_until_accepted(broker, [after])
        await got.wait_for_ids({after.message_id})  # the consumer came back on its own
        assert await broker.ready()
        await sub.stop()
    finally:
        await broker.close()
        await proxy.cut()
        await delete_queues(broker)


@pytest.mark.rabbitmq
async def test_a_worker_can_shut_down_during_an_outage() -> None:
    require_rabbitmq()
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?reconnect_interval=0.3"
    broker = RabbitMQBroker(url, retry_tiers=TEST_TIERS, queue_prefix=unique_prefix(), publish_timeout=1.0)
    try:
        sub = await broker.consume("customs", Collector())
        await proxy.cut()
        async with asyncio.timeout(WAIT):  # bounded by the publish timeout, not by the outage
            await sub.stop()
            await broker.close()
    finally:
        await delete_queues(broker)  # directly, not through the cut proxy


async def test_an_unreachable_broker_makes_publish_fail_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again on exit: nothing listens there
    broker = RabbitMQBroker(f"amqp://guest:guest@127.0.0.1:{port}/", publish_timeout=2.0)
    async with asyncio.timeout(10):
        await broker.start()  # logs and carries on: /readyz says no, publishes get 503
        with pytest.raises(BrokerUnavailable):
            await broker.publish([make_delivery("customs")])
        assert not await broker.ready()
        with pytest.raises(BrokerUnavailable):
            await broker.consume("customs", Collector())
        await broker.close()


@pytest.mark.rabbitmq
async def test_a_queue_that_vanished_is_an_error_then_declared_again(broker: RabbitMQBroker) -> None:
    await broker.declare(["customs"])
    await delete_work_queue(broker, "customs")
    with pytest.raises(BrokerUnavailable, match="NO_ROUTE"):
        await broker.publish([make_delivery("customs")])  # mandatory: unroutable is not "accepted"
    delivery = make_delivery("customs")
    await broker.publish([delivery])
    await receive(broker, "customs", {delivery.message_id})


@pytest.mark.rabbitmq
async def test_concurrent_publishes_go_out_together_but_a_refusal_fails_only_its_own_call(
    broker: RabbitMQBroker,
) -> None:
    await broker.declare(["customs", "agriculture"])
    await delete_work_queue(broker, "customs")
    fine = [make_delivery("agriculture") for _ in range(5)]
    results = await asyncio.gather(
        *(broker.publish([d]) for d in fine[:3]),
        broker.publish([make_delivery("customs")]),
        *(broker.publish([d]) for d in fine[3:]),
        return_exceptions=True,
    )
    assert [r is None for r in results] == [True, True, True, False, True, True]
    assert isinstance(results[3], BrokerUnavailable)
    assert "NO_ROUTE" in str(results[3])
    await receive(broker, "agriculture", {d.message_id for d in fine})


@pytest.mark.rabbitmq
async def test_a_queue_that_cannot_be_declared_fails_only_the_publishes_to_it(broker: RabbitMQBroker) -> None:
    connection = await aio_pika.connect(RABBIT_URL)
    async with connection:
        channel = await connection.channel()
        # a classic queue where a quorum queue belongs: arguments differ
        await channel.declare_queue(names.work_queue("customs", broker.prefix), durable=True)
        try:
            fine = make_delivery("agriculture")
            results = await asyncio.gather(
                broker.publish([make_delivery("customs")]), broker.publish([fine]), return_exceptions=True
            )
            assert isinstance(results[0], ConfigError)
            assert "exists with other arguments" in str(results[0])
            assert results[1] is None
            await receive(broker, "agriculture", {fine.message_id})
        finally:  # "customs" never counted as declared: its queues are not the fixture's to find
            for queue, _arguments in names.queue_plan("customs", TEST_TIERS, prefix=broker.prefix):
                await channel.queue_delete(queue)
