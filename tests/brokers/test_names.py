"""Queue names and arguments (pure functions) and the AMQP message codec."""

from __future__ import annotations

import pytest
from broker_kit import make_delivery

from gateway.brokers import names
from gateway.brokers.rabbitmq import Encoded, decode, encode


def test_queue_names_per_destination() -> None:
    assert names.work_queue("asw:TH") == "nsw.work.asw:TH"
    assert names.dead_queue("moit-licensing") == "nsw.dead.moit-licensing"
    assert names.retry_queue("customs", 30) == "nsw.retry.customs.30000"
    assert names.retry_queue("customs", 0.2, prefix="t1") == "t1.retry.customs.200"


@pytest.mark.parametrize(
    ("destination", "component"),
    [
        ("asw:TH", "asw:TH"),
        ("moit_licensing.v2", "moit_licensing.v2"),
        ("a b/c", "a%20b%2Fc"),
        ("100%", "100%25"),
        ("hải-quan", "h%E1%BA%A3i-quan"),
    ],
)
def test_destination_names_are_kept_readable(destination: str, component: str) -> None:
    assert names.queue_component(destination) == component


def test_distinct_destinations_never_share_a_queue() -> None:
    destinations = ["a b", "a%20b", "a_b", "a/b", "a%2Fb", "A b", "x" * 300, "x" * 299 + "y"]
    queues = [names.work_queue(d) for d in destinations]
    assert len(set(queues)) == len(destinations)


def test_long_destination_names_fit_amqp_limits() -> None:
    queue = names.retry_queue("é" * 500, 3600)
    assert len(queue.encode()) <= 255
    assert queue.startswith("nsw.retry.%C3%A9")


def test_an_empty_destination_is_refused() -> None:
    with pytest.raises(ValueError, match="destination"):
        names.work_queue("")


@pytest.mark.parametrize("prefix", ["", "amq.nsw", "has space"])
def test_a_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        names.dead_queue("d", prefix=prefix)


def test_tiers_are_sorted_and_deduplicated_and_positive() -> None:
    assert names.normalise_tiers([30, 5, 5.0, 120]) == (5, 30, 120)
    with pytest.raises(ValueError, match="tier"):
        names.normalise_tiers([])
    with pytest.raises(ValueError, match="positive"):
        names.normalise_tiers([0])


@pytest.mark.parametrize(
    ("delay", "tier"), [(0, 5), (-1, 5), (5, 5), (5.001, 30), (29.9, 30), (120, 120), (10_000, 120)]
)
def test_a_delay_rounds_up_to_the_next_tier(delay: float, tier: float) -> None:
    assert names.pick_tier((5, 30, 120), delay) == tier


def test_work_queue_is_quorum_with_a_delivery_limit_and_safe_dead_lettering() -> None:
    assert names.work_queue_arguments("asw:TH", delivery_limit=7) == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 7,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "nsw.dead.asw:TH",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    with pytest.raises(ValueError, match="delivery_limit"):
        names.work_queue_arguments("d", delivery_limit=0)


def test_retry_queue_expires_back_into_the_work_queue() -> None:
    assert names.retry_queue_arguments("customs", 0.5, prefix="t1") == {
        "x-queue-type": "quorum",
        "x-message-ttl": 500,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "t1.work.customs",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def test_dead_letters_never_expire_and_are_never_dropped() -> None:
    # No TTL, no length limit, and no delivery limit (listing returns messages, which counts as a
    # redelivery: with a limit and no DLX, RabbitMQ would drop them).
    assert names.dead_queue_arguments() == {"x-queue-type": "quorum"}


def test_queue_plan_is_deterministic_and_declares_targets_first() -> None:
    plan = names.queue_plan("customs", (30, 5), prefix="p", delivery_limit=4)
    assert plan == names.queue_plan("customs", (5, 30), prefix="p", delivery_limit=4)
    assert [q for q, _ in plan] == ["p.dead.customs", "p.work.customs", "p.retry.customs.5000", "p.retry.customs.30000"]


class _Received:
    """The fields of an incoming AMQP message that ``decode`` reads, as the broker hands back ``message``."""

    def __init__(self, message: Encoded) -> None:
        self.message_id = message.properties.message_id
        self.body = message.body
        self.headers = {**(message.properties.headers or {}), "x-delivery-count": 2}


def test_codec_round_trip_keeps_every_field_exactly() -> None:
    delivery = make_delivery("asw:TH", attempt=3, first_enqueued_at=1_790_000_000.123456, headers={"k": "v"})
    message = encode(delivery, now=0.0)
    assert message.properties.delivery_mode == 2  # persistent
    assert message.properties.content_type == "application/xml"
    assert decode(_Received(message), "ignored") == delivery  # type: ignore[arg-type]


def test_codec_stamps_the_enqueue_time_when_missing() -> None:
    message = encode(make_delivery("d", first_enqueued_at=0.0), now=42.5)
    assert decode(_Received(message), "d").first_enqueued_at == 42.5  # type: ignore[arg-type]


def test_codec_refuses_headers_that_clash_with_its_own() -> None:
    with pytest.raises(ValueError, match="reserved"):
        encode(make_delivery("d", headers={"nsw-attempt": "9"}), now=0.0)
