"""The delivery worker: consume each destination's queue, hand deliveries to its adapter, decide the outcome.

One subscription, one adapter (with its own in-flight bound) and one circuit breaker per destination,
so a dead or hanging agency never delays another. Every decision is recorded as an ``Event`` before
the broker hears of it; if recording fails the handler raises and the broker redelivers, so nothing
is acknowledged unaudited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog

from adapters.base import Adapter
from gateway.brokers.base import Ack, Broker, DeadLetter, Outcome, Retry, Subscription
from gateway.errors import ConfigError, PermanentFailure, TransientFailure
from gateway.events import Event, Recorder
from gateway.model import Delivery, State
from gateway.policy import BreakerPolicy, RetryPolicy
from gateway.retry import AdapterError, CircuitBreaker, CircuitOpen, deliver_with_retries, retry_after_of

log = structlog.get_logger("nsw.worker")


@dataclass
class _Lane:
    """Everything that belongs to one destination."""

    destination: str
    adapter: Adapter
    retry: RetryPolicy
    breaker: CircuitBreaker
    subscription: Subscription | None = field(default=None)


class Worker:
    """``policies`` maps destination -> (retry, breaker); a destination missing there gets the defaults.

    ``clock`` (epoch seconds) measures a message's age against ``RetryPolicy.max_age`` and stamps
    events; ``breaker_clock`` (monotonic) drives the breakers' reset timers.
    """

    def __init__(
        self,
        broker: Broker,
        adapters: Mapping[str, Adapter],
        policies: Mapping[str, tuple[RetryPolicy, BreakerPolicy]],
        recorder: Recorder,
        *,
        prefetch: int = 16,
        clock: Callable[[], float] = time.time,
        breaker_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self._recorder = recorder
        self._prefetch = prefetch
        self._clock = clock
        self._lanes: dict[str, _Lane] = {}
        for name, adapter in adapters.items():
            retry, breaker = policies.get(name, (RetryPolicy(), BreakerPolicy()))
            self._lanes[name] = _Lane(name, adapter, retry, CircuitBreaker(breaker, clock=breaker_clock))

    async def start(self, destinations: Iterable[str] | None = None) -> None:
        """Declare and consume the given destinations' queues (all destinations with an adapter if None)."""
        names = list(self._lanes) if destinations is None else list(dict.fromkeys(destinations))
        unknown = [name for name in names if name not in self._lanes]
        if unknown:
            raise ConfigError(f"worker: no adapter for destination(s) {', '.join(map(repr, unknown))}")
        await self._broker.declare(names)
        for name in names:
            lane = self._lanes[name]
            if lane.subscription is None:
                lane.subscription = await self._broker.consume(
                    name, partial(self._handle, lane), prefetch=self._prefetch
                )
                log.info("worker.consuming", destination=name, prefetch=self._prefetch)

    async def stop(self) -> None:
        """Stop consuming, let in-flight deliveries finish, then close every adapter."""
        subscriptions = [lane.subscription for lane in self._lanes.values() if lane.subscription is not None]
        for lane in self._lanes.values():
            lane.subscription = None
        await _all_or_log("worker.subscription_stop_failed", [sub.stop() for sub in subscriptions])
        await _all_or_log("worker.adapter_close_failed", [lane.adapter.close() for lane in self._lanes.values()])

    def breaker_states(self) -> dict[str, str]:
        return {name: lane.breaker.state.value for name, lane in self._lanes.items()}

    async def _handle(self, lane: _Lane, delivery: Delivery) -> Outcome:
        with structlog.contextvars.bound_contextvars(
            messageId=delivery.message_id, destination=lane.destination, party=delivery.sender
        ):
            breaker_before = lane.breaker.state
            try:
                return await self._deliver(lane, delivery)
            finally:
                if lane.breaker.state is not breaker_before:
                    log.warning("worker.breaker", before=breaker_before.value, after=lane.breaker.state.value)

    async def _deliver(self, lane: _Lane, delivery: Delivery) -> Outcome:
        try:
            receipt = await deliver_with_retries(
                lane.adapter,
                delivery,
                lane.retry,
                lane.breaker,
                before_first_attempt=partial(self._record, delivery, State.DELIVERING),
            )
        except CircuitOpen as exc:
            return await self._circuit_open(lane, delivery, exc)
        except PermanentFailure as exc:
            return await self._dead(delivery, exc.code, exc.detail)
        except TransientFailure as exc:
            return await self._transient(lane, delivery, exc)
        except AdapterError as exc:
            log.exception("worker.adapter_error", attempt=delivery.attempt)
            delay = lane.retry.delay_for(delivery.attempt)
            await self._record(delivery, State.RETRY_WAIT, "ADAPTER_ERROR", f"{exc}; next attempt in {delay:.1f}s")
            return Retry(delay=delay, reason=f"ADAPTER_ERROR: {exc}")
        await self._record(delivery, State.DELIVERED, detail=receipt.detail)
        log.info("worker.delivered", attempt=delivery.attempt, status=receipt.status)
        return Ack()

    async def _circuit_open(self, lane: _Lane, delivery: Delivery, exc: CircuitOpen) -> Outcome:
        # The attempt count does not grow while the circuit is open, so age alone bounds the wait.
        age = self._age(delivery)
        if age >= lane.retry.max_age:
            return await self._dead(
                delivery, exc.code, f"retry budget exhausted: {age:.0f}s old while the circuit stayed open"
            )
        delay = exc.retry_after or 0.0
        await self._record(delivery, State.RETRY_WAIT, exc.code, f"circuit open; next attempt in {delay:.1f}s")
        log.info("worker.circuit_open", attempt=delivery.attempt, delay=delay)
        return Retry(delay=delay, reason="circuit open", count_attempt=False)

    async def _transient(self, lane: _Lane, delivery: Delivery, exc: TransientFailure) -> Outcome:
        age = self._age(delivery)
        if lane.retry.exhausted(delivery.attempt, age):
            return await self._dead(
                delivery,
                exc.code,
                f"retry budget exhausted after {delivery.attempt} attempts ({age:.0f}s): {exc.detail}",
            )
        delay = max(lane.retry.delay_for(delivery.attempt), retry_after_of(exc) or 0.0)
        await self._record(delivery, State.RETRY_WAIT, exc.code, f"{exc.detail}; next attempt in {delay:.1f}s")
        log.warning("worker.retry", attempt=delivery.attempt, code=exc.code, delay=delay, detail=exc.detail)
        return Retry(delay=delay, reason=f"{exc.code}: {exc.detail}")

    async def _dead(self, delivery: Delivery, code: str, detail: str) -> Outcome:
        await self._record(delivery, State.DEAD, code, detail)
        log.error("worker.dead_letter", attempt=delivery.attempt, code=code, detail=detail)
        return DeadLetter(code=code, reason=detail)

    async def _record(self, delivery: Delivery, state: State, code: str | None = None, detail: str = "") -> None:
        await self._recorder.record(
            [
                Event(
                    state,
                    delivery.message_id,
                    destination=delivery.destination,
                    party=delivery.sender,
                    document_type=delivery.document_type,
                    digest=delivery.digest,
                    attempt=delivery.attempt,
                    code=code,
                    detail=detail,
                    at=self._clock(),
                )
            ]
        )

    def _age(self, delivery: Delivery) -> float:
        # 0.0 means "not stamped" (older producers, tests): treat as new rather than as 56 years old.
        return self._clock() - delivery.first_enqueued_at if delivery.first_enqueued_at > 0 else 0.0


async def _all_or_log(event: str, steps: list[Coroutine[Any, Any, None]]) -> None:
    """Run every shutdown step even if some fail; failures are logged, never silently dropped."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            log.error(event, exc_info=result)
