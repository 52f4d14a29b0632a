"""Queue names and queue arguments for the RabbitMQ backend: pure functions, tested on their own.

Topology per destination ``d`` (prefix ``nsw``), all durable quorum queues reached through the
default exchange (routing key = queue name), so no exchange or binding has to exist first:

* ``nsw.work.d``            consumers read here; a message redelivered more than ``delivery_limit``
                            times (a handler or worker that keeps crashing on it) is dead-lettered
                            to ``nsw.dead.d`` by the broker itself.
* ``nsw.retry.d.<ms>``      one per retry tier; no consumers; ``x-message-ttl`` = the tier, then the
                            broker dead-letters the message back to ``nsw.work.d``.
* ``nsw.dead.d``            dead letters: no TTL, no length limit, no delivery limit (listing
                            returns messages to it, which counts as a redelivery). RabbitMQ 4.x
                            gives quorum queues a default delivery limit of 20: there, add a policy
                            ``delivery-limit: -1`` on ``^nsw[.]dead[.]`` or listings would drop them.

Retry queues are per destination rather than shared per tier: a shared tier queue would need a
routing key per message to find its way home (an extra exchange and bindings), and one dead agency's
backlog would sit in the same FIFO as everyone else's retries. The cost is ``tiers`` queues per
destination, which is a few dozen quorum queues for a realistic deployment.

Quorum-queue arguments cannot change after the queue exists, so every function here is
deterministic in its inputs; ``declare`` sends exactly these arguments every time.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

DEFAULT_PREFIX = "nsw"
DEFAULT_RETRY_TIERS: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600)
DEFAULT_DELIVERY_LIMIT = 20

# AMQP allows nearly any character in a queue name (up to 255 bytes); keep the ones that read well
# and percent-encode the rest, so distinct destinations can never map to the same queue.
_SAFE = re.compile(r"[A-Za-z0-9_.:\-]")
_MAX_COMPONENT = 160  # leaves room for the prefix, the kind and a tier within 255 bytes


@lru_cache(maxsize=4096)  # every publish names its queue; destinations are few (the routing's)
def queue_component(destination: str) -> str:
    """The destination as it appears inside queue names: readable, injective, bounded in length."""
    if not destination:
        raise ValueError("destination name must not be empty")
    encoded = "".join(
        ch if _SAFE.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode("utf-8")) for ch in destination
    )
    if len(encoded) > _MAX_COMPONENT:
        digest = hashlib.sha256(destination.encode("utf-8")).hexdigest()[:16]
        encoded = f"{encoded[: _MAX_COMPONENT - 17]}~{digest}"
    return encoded


def _check_prefix(prefix: str) -> str:
    if not prefix or prefix.startswith("amq.") or queue_component(prefix) != prefix:
        raise ValueError(f"invalid queue prefix {prefix!r}")
    return prefix


def work_queue(destination: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{_check_prefix(prefix)}.work.{queue_component(destination)}"


def dead_queue(destination: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{_check_prefix(prefix)}.dead.{queue_component(destination)}"


def tier_ms(tier: float) -> int:
    """A retry tier in whole milliseconds (what ``x-message-ttl`` takes and the queue name shows)."""
    ms = math.ceil(tier * 1000)
    if ms < 1:
        raise ValueError(f"retry tier must be positive, got {tier!r}")
    return ms


def retry_queue(destination: str, tier: float, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{_check_prefix(prefix)}.retry.{queue_component(destination)}.{tier_ms(tier)}"


def normalise_tiers(tiers: Sequence[float]) -> tuple[float, ...]:
    """Sorted, de-duplicated (by millisecond) positive tiers; raises on an empty or bad list."""
    if not tiers:
        raise ValueError("at least one retry tier is required")
    by_ms = {tier_ms(t): t for t in tiers}
    return tuple(by_ms[ms] for ms in sorted(by_ms))


def pick_tier(tiers: Sequence[float], delay: float) -> float:
    """The smallest tier >= ``delay``; the largest tier when ``delay`` exceeds them all.

    ``tiers`` must come from ``normalise_tiers``.
    """
    for tier in tiers:
        if tier_ms(tier) >= math.ceil(delay * 1000):
            return tier
    return tiers[-1]


def _quorum(**extra: Any) -> dict[str, Any]:
    return {"x-queue-type": "quorum", **extra}


def _dead_letter_to(queue: str) -> dict[str, Any]:
    # At-least-once dead-lettering keeps the message in the source queue until the target has
    # confirmed it; RabbitMQ requires reject-publish overflow for that strategy.
    return {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def work_queue_arguments(
    destination: str, *, prefix: str = DEFAULT_PREFIX, delivery_limit: int = DEFAULT_DELIVERY_LIMIT
) -> dict[str, Any]:
    if delivery_limit < 1:
        raise ValueError(f"delivery_limit must be >= 1, got {delivery_limit}")
    return _quorum(**{"x-delivery-limit": delivery_limit}, **_dead_letter_to(dead_queue(destination, prefix)))


def retry_queue_arguments(destination: str, tier: float, *, prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    return _quorum(**{"x-message-ttl": tier_ms(tier)}, **_dead_letter_to(work_queue(destination, prefix)))


def dead_queue_arguments() -> dict[str, Any]:
    # Deliberately nothing else: no x-message-ttl, no x-max-length, no x-delivery-limit, no DLX.
    return _quorum()


def queue_plan(
    destination: str,
    tiers: Sequence[float],
    *,
    prefix: str = DEFAULT_PREFIX,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
) -> list[tuple[str, dict[str, Any]]]:
    """Every queue of one destination with its arguments, in declaration order (targets first)."""
    plan = [
        (dead_queue(destination, prefix), dead_queue_arguments()),
        (
            work_queue(destination, prefix),
            work_queue_arguments(destination, prefix=prefix, delivery_limit=delivery_limit),
        ),
    ]
    plan += [
        (retry_queue(destination, tier, prefix), retry_queue_arguments(destination, tier, prefix=prefix))
        for tier in normalise_tiers(tiers)
    ]
    return plan
