"""The broker contract (gateway/brokers/base.py), written once and run against both backends."""

from __future__ import annotations

import asyncio
import time

import pytest
from broker_kit import TEST_DELIVERY_LIMIT, WAIT, Collector, consume_until, eventually, make_delivery
from structlog.testing import capture_logs

from gateway.brokers import names
from gateway.brokers.base import Ack, Broker, DeadLetter, Outcome, Retry
from gateway.brokers.rabbitmq import RabbitMQBroker
from gateway.model import Delivery


async def test_consumer_sees_every_delivery_with_its_fields(broker: Broker) -> None:
    sent = [make_delivery("asw:TH", n, headers={"traceparent": f"t{n}", "x-note": "é"}) for n in range(3)]
    await broker.publish(sent)
    got = await consume_until(broker, "asw:TH", 3)

    assert sorted(got, key=lambda d: d.message_id) == sorted(sent, key=lambda d: d.message_id)


async def test_ack_removes_the_delivery(broker: Broker) -> None:
    first = make_delivery("moit-licensing")
    await broker.publish([first])
    await consume_until(broker, "moit-licensing", {first.message_id})

    marker = make_delivery("moit-licensing")
    await broker.publish([marker])
    again = await consume_until(broker, "moit-licensing", {marker.message_id})

    # The queue is FIFO, so an unremoved first delivery would have come back before the marker.
    assert [d.message_id for d in again] == [marker.message_id]


@pytest.mark.parametrize(("count_attempt", "expected_attempt"), [(True, 2), (False, 1)])
async def test_retry_comes_back_after_the_delay(broker: Broker, count_attempt: bool, expected_attempt: int) -> None:
    delivery = make_delivery("customs")
    await broker.publish([delivery])
    seen_at: list[float] = []

    def decide(_d: Delivery, sightings: int) -> Outcome:
        seen_at.append(time.monotonic())
        if sightings == 0:
            return Retry(0.3, "agency answered 503", count_attempt=count_attempt)
        return Ack()

    got = await consume_until(broker, "customs", 2, decide)

    first, second = got
    assert second.message_id == first.message_id
    assert second.payload == first.payload
    assert (first.attempt, second.attempt) == (1, expected_attempt)
    assert seen_at[1] - seen_at[0] >= 0.3  # never early: the delay is a floor
    assert await broker.list_dead("customs") == []


async def test_release_makes_the_copies_waiting_for_a_retry_due_now(broker: Broker) -> None:
    if isinstance(broker, RabbitMQBroker):  # a tier an hour long (set before anything is declared)
        broker.retry_tiers = names.normalise_tiers((*broker.retry_tiers, 3600.0))
    waiting, other = make_delivery("customs"), make_delivery("moit-licensing")
    await broker.publish([waiting, other])
    got = Collector(lambda _d, sightings: Retry(3600.0, "held") if sightings == 0 else Ack())
    sub = await broker.consume("customs", got)
    try:
        await got.wait_for_count(1)
        assert await eventually(lambda: broker.release_waiting("customs")) == 1  # once its Retry is applied
        await got.wait_for_count(2)  # within the kit's WAIT, not an hour later
    finally:
        await sub.stop()
    first, second = got.seen
    assert first.attempt == 1
    assert (second.message_id, second.payload, second.attempt) == (waiting.message_id, waiting.payload, 2)
    assert await broker.release_waiting("customs") == 0  # nothing left waiting
    assert await broker.release_waiting("moit-licensing") == 0  # a ready copy is not "waiting"
    assert [d.message_id for d in await consume_until(broker, "moit-licensing", 1)] == [other.message_id]


async def test_dead_letter_is_listed_until_replayed_and_replay_resets_the_attempt(broker: Broker) -> None:
    doomed, other = make_delivery("customs"), make_delivery("customs")
    await broker.publish([doomed, other])

    def decide(d: Delivery, sightings: int) -> Outcome:
        if d.message_id == doomed.message_id and sightings == 0:
            return Retry(0.2, "timeout")
        return DeadLetter("HTTP_400", f"agency refused {d.message_id}")

    await consume_until(broker, "customs", 3, decide)  # returns once the outcomes are applied

    listed = await broker.list_dead("customs")
    assert await broker.list_dead("customs") == listed, "listing must leave dead letters in place"
    assert {r.delivery.message_id: (r.code, r.reason, r.delivery.attempt) for r in listed} == {
        doomed.message_id: ("HTTP_400", f"agency refused {doomed.message_id}", 2),
        other.message_id: ("HTTP_400", f"agency refused {other.message_id}", 1),
    }
    assert all(r.dead_at > 0 for r in listed)
    assert {r.delivery.payload for r in listed} == {doomed.payload, other.payload}
    assert await broker.list_dead(None) == listed

    assert await broker.replay_dead("customs", doomed.message_id) == 1
    assert [r.delivery.message_id for r in await broker.list_dead("customs")] == [other.message_id]

    (back,) = await consume_until(broker, "customs", 1)
    assert (back.message_id, back.attempt, back.payload) == (doomed.message_id, 1, doomed.payload)
    assert back.headers == {**doomed.headers, "x-replayed": "true"}
    assert back.first_enqueued_at > doomed.first_enqueued_at, "a replay is a new delivery generation"


async def test_replay_everything_of_a_destination(broker: Broker) -> None:
    sent = [make_delivery("customs", n) for n in range(3)]
    await broker.publish(sent)
    got = Collector(lambda _d, _n: DeadLetter("SCHEMA", "no"))
    sub = await broker.consume("customs", got)
    await got.wait_for_count(3)
    await sub.stop()

    assert await broker.replay_dead("customs") == 3
    assert await broker.list_dead("customs") == []
    assert await broker.replay_dead("customs") == 0


async def test_a_handler_that_raises_gets_the_delivery_again(broker: Broker) -> None:
    delivery = make_delivery("customs")
    await broker.publish([delivery])

    def decide(_d: Delivery, sightings: int) -> Outcome:
        if sightings == 0:
            raise RuntimeError("adapter bug")
        return Ack()

    with capture_logs() as logs:
        got = await consume_until(broker, "customs", 2, decide)
    assert [(d.message_id, d.attempt) for d in got] == [(delivery.message_id, 1)] * 2
    failures = [e for e in logs if e["event"] == "broker.handler_failed"]
    assert [(e["destination"], e["message_id"], e["log_level"]) for e in failures] == [
        ("customs", delivery.message_id, "error")
    ]


async def test_a_handler_that_returns_no_outcome_counts_as_a_failure(broker: Broker) -> None:
    delivery = make_delivery("customs")
    await broker.publish([delivery])

    def decide(_d: Delivery, sightings: int) -> Outcome:
        return Ack() if sightings else "done"  # type: ignore[return-value]

    got = await consume_until(broker, "customs", 2, decide)
    assert [d.message_id for d in got] == [delivery.message_id] * 2


async def test_a_delivery_that_always_crashes_its_handler_ends_dead(broker: Broker) -> None:
    poison = make_delivery("customs")
    await broker.publish([poison])

    def decide(_d: Delivery, _sightings: int) -> Outcome:
        raise RuntimeError("crashes every time")

    got = await consume_until(broker, "customs", TEST_DELIVERY_LIMIT + 1, decide)
    dead = await eventually(lambda: broker.list_dead("customs"))
    assert [(r.delivery.message_id, r.code) for r in dead] == [(poison.message_id, "DELIVERY_LIMIT")]
    assert len(got) == TEST_DELIVERY_LIMIT + 1


async def test_stop_waits_for_the_handler_in_flight(broker: Broker) -> None:
    delivery = make_delivery("customs")
    await broker.publish([delivery])
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def slow(d: Delivery) -> Outcome:
        started.set()
        await release.wait()
        finished.append(d.message_id)
        return Ack()

    sub = await broker.consume("customs", slow)
    async with asyncio.timeout(WAIT):
        await started.wait()
    stopping = asyncio.create_task(sub.stop())
    done, _ = await asyncio.wait({stopping}, timeout=0.3)
    assert not done, "stop() returned while a handler was still running"
    release.set()
    await stopping
    assert finished == [delivery.message_id]

    marker = make_delivery("customs")
    await broker.publish([marker])
    after = await consume_until(broker, "customs", {marker.message_id})
    assert [d.message_id for d in after] == [marker.message_id], "the in-flight ack was lost"


async def test_one_publish_to_several_destinations(broker: Broker) -> None:
    destinations = ["customs", "moit-licensing", "asw:TH"]
    sent = [make_delivery(destinations[n % 3], n) for n in range(30)]
    await broker.publish(sent)
    expected = {d: {s.message_id for s in sent if s.destination == d} for d in destinations}
    got = await asyncio.gather(*(consume_until(broker, d, expected[d], prefetch=4) for d in destinations))
    for d, seen in zip(destinations, got, strict=True):
        assert [s.destination for s in seen] == [d] * 10


async def test_concurrent_publishes_are_all_delivered(broker: Broker) -> None:
    batches = [[make_delivery("customs", n * 5 + i) for i in range(5)] for n in range(20)]
    await asyncio.gather(*(broker.publish(batch) for batch in batches))
    got = await consume_until(broker, "customs", {d.message_id for batch in batches for d in batch}, prefetch=32)
    assert len(got) == 100


async def test_prefetch_bounds_the_handlers_in_flight(broker: Broker) -> None:
    await broker.publish([make_delivery("customs", n) for n in range(8)])
    running, peak = 0, 0
    handled = Collector()

    async def handler(d: Delivery) -> Outcome:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)  # keeps handlers overlapping; the assertion does not depend on it
        running -= 1
        return await handled(d)

    sub = await broker.consume("customs", handler, prefetch=3)
    await handled.wait_for_count(8)
    await sub.stop()
    assert 1 <= peak <= 3


async def test_ready_and_declare(broker: Broker) -> None:
    await broker.declare(["customs", "asw:TH"])
    await broker.declare(["customs"])  # idempotent
    assert await broker.ready()
    assert await broker.list_dead("asw:TH") == []
    assert await broker.list_dead("never-declared") == []
    assert await broker.replay_dead("never-declared") == 0
