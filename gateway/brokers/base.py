"""The broker Protocol shared by the RabbitMQ and embedded backends.

Semantics both backends guarantee (and ``tests/brokers/`` checks against both):

* ``publish`` returns only when every delivery is durably stored (publisher confirms / committed
  transaction); otherwise it raises ``BrokerUnavailable`` and the caller must treat *none* of them
  as accepted (a partial publish is harmless: the sender retries and receivers dedupe by
  ``Idempotency-Key``).
* ``consume`` hands each delivery to ``handler`` at least once. The handler's ``Outcome`` decides:
  ``Ack`` -> removed; ``Retry`` -> back after ``delay`` seconds (rounded up to a retry tier) with
  ``attempt + 1``; ``DeadLetter`` -> moved to the destination's dead-letter queue, which never expires.
  If the handler raises, or the consumer dies, the delivery comes back (lease expiry / channel close).
* Dead letters are listed and replayed by operators; replay keeps the original message id and starts a
  new delivery generation: ``attempt`` 1 and ``first_enqueued_at`` = the replay time (so the retry
  budget's age, and a cross-border forward's sendDate, count from the replay, not from the first try).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.model import Delivery


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float  # seconds; the backend rounds up to its nearest retry tier
    reason: str
    count_attempt: bool = True  # False when the attempt never reached the receiver (circuit open)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    code: str
    reason: str


Outcome = Ack | Retry | DeadLetter
Handler = Callable[[Delivery], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    delivery: Delivery
    code: str
    reason: str
    dead_at: float  # epoch seconds


class Subscription(Protocol):
    async def stop(self) -> None:
        """Stop taking new deliveries, wait for in-flight handlers to finish, then release."""


class Broker(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """True when a publish would currently succeed (for /readyz)."""
        ...

    async def declare(self, destinations: Sequence[str]) -> None:
        """Make sure every destination's work, retry and dead-letter queues exist."""
        ...

    async def publish(self, deliveries: Sequence[Delivery]) -> None: ...

    async def consume(self, destination: str, handler: Handler, *, prefetch: int = 16) -> Subscription: ...

    async def list_dead(self, destination: str | None = None) -> list[DeadLetterRecord]: ...

    async def replay_dead(self, destination: str | None = None, message_id: str | None = None) -> int:
        """Move matching dead letters back to their work queues; returns how many moved."""
        ...

    async def release_waiting(self, destination: str) -> int:
        """Make every copy of ``destination`` waiting for a retry due now (its lane's configuration changed:
        what it waited for may be there now); returns how many were released."""
        ...
