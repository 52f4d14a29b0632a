"""The delivery worker: consume each destination's queue, hand deliveries to its adapter, decide the outcome.

One subscription, one adapter (with its own in-flight bound) and one circuit breaker per destination,
so a dead or hanging agency never delays another. Every decision is recorded as an ``Event`` before
the broker hears of it; if recording fails the handler raises and the broker redelivers, so nothing
is acknowledged unaudited.

An attempt's DELIVERING event (stamped when the first in-process attempt starts) is committed in
the same ledger write as the attempt's outcome, so a delivery costs one commit, not two. Only an
attempt still running after ``announce_after`` seconds has its DELIVERING committed on its own
first: a slow or hanging agency shows as DELIVERING while it lasts, and a crash during a long
attempt leaves a trace of it. What this gives up is the record of an attempt cut short by a crash
within ``announce_after`` of its start; the broker redelivers that delivery (it was never acked,
since the ack waits for the outcome's commit) with the same Idempotency-Key, so the receiver drops
the duplicate and the audit shows the attempt that counted. The in-process retries inside one
attempt were never recorded one by one either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from contextlib import contextmanager
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


@dataclass(eq=False)
class _AdapterInUse:
    """A lane's adapter and how many deliveries are using it: a retired one is closed when the last ends."""

    adapter: Adapter
    users: int = 0
    retired: bool = False


@dataclass
class _Lane:
    """Everything that belongs to one destination."""

    destination: str
    current: _AdapterInUse
    retry: RetryPolicy
    breaker_policy: BreakerPolicy
    breaker: CircuitBreaker
    subscription: Subscription | None = field(default=None)

    @property
    def adapter(self) -> Adapter:
        return self.current.adapter


class Worker:
    """``policies`` maps destination -> (retry, breaker); a destination missing there gets the defaults.

    ``announce_after`` (seconds): an attempt running longer has its DELIVERING committed before its
    outcome (see the module docstring). ``clock`` (epoch seconds) measures a message's age against
    ``RetryPolicy.max_age`` and stamps events; ``breaker_clock`` (monotonic) drives the breakers'
    reset timers.
    """

    def __init__(
        self,
        broker: Broker,
        adapters: Mapping[str, Adapter],
        policies: Mapping[str, tuple[RetryPolicy, BreakerPolicy]],
        recorder: Recorder,
        *,
        prefetch: int = 16,
        announce_after: float = 1.0,
        clock: Callable[[], float] = time.time,
        breaker_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self._recorder = recorder
        self._prefetch = prefetch
        self._announce_after = announce_after
        self._stragglers: set[asyncio.Task[None]] = set()  # announcements outliving their delivery
        self._clock = clock
        self._breaker_clock = breaker_clock
        self._closing: set[asyncio.Task[None]] = set()  # retired adapters being closed
        self._lanes: dict[str, _Lane] = {}
        for name, adapter in adapters.items():
            retry, breaker = policies.get(name, (RetryPolicy(), BreakerPolicy()))
            self._lanes[name] = _Lane(
                name, _AdapterInUse(adapter), retry, breaker, CircuitBreaker(breaker, clock=breaker_clock)
            )

    @property
    def destinations(self) -> frozenset[str]:
        """The destinations this worker has an adapter for (consumed or not)."""
        return frozenset(self._lanes)

    def reconfigure(
        self,
        destination: str,
        adapter: Adapter | None,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
    ) -> None:
        """New settings for ``destination`` from a routing reload, for every attempt that starts from now on.

        ``adapter`` (None: keep the current one) takes over at once; deliveries already talking to the
        old adapter finish with it, and it is closed when the last of them ends. A new adapter or a new
        breaker policy gets a fresh, closed circuit breaker: the old one counted another endpoint's
        failures. ``retry`` and ``breaker`` None keep the lane's. Runs without awaiting, so no delivery
        sees half of the change.
        """
        lane = self._lanes.get(destination)
        if lane is None:
            raise ConfigError(f"worker: no adapter for destination {destination!r}")
        retry = lane.retry if retry is None else retry
        breaker = lane.breaker_policy if breaker is None else breaker
        if adapter is not None and adapter is not lane.adapter:
            old, lane.current = lane.current, _AdapterInUse(adapter)
            old.retired = True
            if old.users == 0:
                self._close_retired(old)
        if adapter is not None or breaker != lane.breaker_policy:
            lane.breaker = CircuitBreaker(breaker, clock=self._breaker_clock)
        lane.retry, lane.breaker_policy = retry, breaker

    @contextmanager
    def _using(self, lane: _Lane) -> Iterator[Adapter]:
        """The lane's adapter for one delivery; a reload's replacement waits for it before closing it."""
        in_use = lane.current
        in_use.users += 1
        try:
            yield in_use.adapter
        finally:
            in_use.users -= 1
            if in_use.retired and in_use.users == 0:
                self._close_retired(in_use)

    def _close_retired(self, retired: _AdapterInUse) -> None:
        task = asyncio.ensure_future(retired.adapter.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        task.add_done_callback(partial(_log_close_failure, retired.adapter))

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
        await asyncio.gather(*self._closing, return_exceptions=True)  # failures are logged by the task

    def breaker_states(self) -> dict[str, str]:
        return {name: lane.breaker.state.value for name, lane in self._lanes.items()}

    async def _handle(self, lane: _Lane, delivery: Delivery) -> Outcome:
        # Plain bind/reset: bound_contextvars() costs several passes over the whole context per call.
        tokens = structlog.contextvars.bind_contextvars(
            messageId=delivery.message_id, destination=lane.destination, party=delivery.sender
        )
        attempt = _Attempt(self, delivery)
        breaker_before = lane.breaker.state
        try:
            return await self._deliver(lane, attempt)
        finally:
            attempt.abandon()
            if lane.breaker.state is not breaker_before:
                log.warning("worker.breaker", before=breaker_before.value, after=lane.breaker.state.value)
            structlog.contextvars.reset_contextvars(**tokens)

    async def _deliver(self, lane: _Lane, attempt: _Attempt) -> Outcome:
        delivery = attempt.delivery
        try:
            with self._using(lane) as adapter:
                receipt = await deliver_with_retries(
                    adapter, delivery, lane.retry, lane.breaker, before_first_attempt=attempt.begin
                )
        except CircuitOpen as exc:
            return await self._circuit_open(lane, attempt, exc)
        except PermanentFailure as exc:
            return await self._dead(attempt, exc.code, exc.detail)
        except TransientFailure as exc:
            return await self._transient(lane, attempt, exc)
        except AdapterError as exc:
            log.exception("worker.adapter_error", attempt=delivery.attempt)
            delay = lane.retry.delay_for(delivery.attempt)
            await attempt.settle(State.RETRY_WAIT, "ADAPTER_ERROR", f"{exc}; next attempt in {delay:.1f}s")
            return Retry(delay=delay, reason=f"ADAPTER_ERROR: {exc}")
        await attempt.settle(State.DELIVERED, detail=receipt.detail)
        log.debug("worker.delivered", attempt=delivery.attempt, status=receipt.status)
        return Ack()

    async def _circuit_open(self, lane: _Lane, attempt: _Attempt, exc: CircuitOpen) -> Outcome:
        # The attempt count does not grow while the circuit is open, so age alone bounds the wait.
        delivery = attempt.delivery
        age = self._age(delivery)
        if age >= lane.retry.max_age:
            return await self._dead(
                attempt, exc.code, f"retry budget exhausted: {age:.0f}s old while the circuit stayed open"
            )
        delay = exc.retry_after or 0.0
        await attempt.settle(State.RETRY_WAIT, exc.code, f"circuit open; next attempt in {delay:.1f}s")
        log.info("worker.circuit_open", attempt=delivery.attempt, delay=delay)
        return Retry(delay=delay, reason="circuit open", count_attempt=False)

    async def _transient(self, lane: _Lane, attempt: _Attempt, exc: TransientFailure) -> Outcome:
        delivery = attempt.delivery
        age = self._age(delivery)
        if lane.retry.exhausted(delivery.attempt, age):
            return await self._dead(
                attempt,
                exc.code,
                f"retry budget exhausted after {delivery.attempt} attempts ({age:.0f}s): {exc.detail}",
            )
        delay = max(lane.retry.delay_for(delivery.attempt), retry_after_of(exc) or 0.0)
        await attempt.settle(State.RETRY_WAIT, exc.code, f"{exc.detail}; next attempt in {delay:.1f}s")
        log.warning("worker.retry", attempt=delivery.attempt, code=exc.code, delay=delay, detail=exc.detail)
        return Retry(delay=delay, reason=f"{exc.code}: {exc.detail}")

    async def _dead(self, attempt: _Attempt, code: str, detail: str) -> Outcome:
        await attempt.settle(State.DEAD, code, detail)
        log.error("worker.dead_letter", attempt=attempt.delivery.attempt, code=code, detail=detail)
        return DeadLetter(code=code, reason=detail)

    def _event(self, delivery: Delivery, state: State, code: str | None = None, detail: str = "") -> Event:
        return Event(
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

    def _age(self, delivery: Delivery) -> float:
        # 0.0 means "not stamped" (older producers, tests): treat as new rather than as 56 years old.
        return self._clock() - delivery.first_enqueued_at if delivery.first_enqueued_at > 0 else 0.0


class _Attempt:
    """One delivery's audit facts: DELIVERING when its first attempt starts, then the outcome.

    DELIVERING waits to be committed with the outcome, in one ledger write; if the attempt is still
    running ``announce_after`` seconds after it started, DELIVERING is committed on its own then.
    """

    def __init__(self, worker: Worker, delivery: Delivery) -> None:
        self.delivery = delivery
        self._worker = worker
        self._started: Event | None = None  # None: no attempt was made (the circuit was open)
        self._timer: asyncio.TimerHandle | None = None
        self._announced: asyncio.Task[None] | None = None

    async def begin(self) -> None:
        """Called just before the first attempt (never when the breaker refuses it)."""
        self._started = self._worker._event(self.delivery, State.DELIVERING)
        self._timer = asyncio.get_running_loop().call_later(self._worker._announce_after, self._announce)

    def _announce(self) -> None:
        self._timer = None
        if self._started is not None:
            self._announced = asyncio.ensure_future(self._worker._recorder.record([self._started]))

    async def settle(self, state: State, code: str | None = None, detail: str = "") -> None:
        """Durably record the outcome, with DELIVERING unless that is already recorded (or on its way).

        Raises if either could not be recorded: the caller must not let the broker ack then.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        events = [self._worker._event(self.delivery, state, code, detail)]
        if self._announced is not None:
            announced, self._announced = self._announced, None
            await announced  # committed before the outcome, in this order; a failure propagates
        elif self._started is not None:
            events.insert(0, self._started)
        await self._worker._recorder.record(events)

    def abandon(self) -> None:
        """The delivery ended without ``settle`` (cancelled, or settle failed): drop what is pending."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._announced is not None:
            task, self._announced = self._announced, None
            stragglers = self._worker._stragglers  # the loop keeps only weak references to tasks
            stragglers.add(task)
            task.add_done_callback(stragglers.discard)
            task.add_done_callback(_log_announce_failure)


def _log_close_failure(adapter: Adapter, task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("worker.adapter_close_failed", adapter=repr(adapter), exc_info=task.exception())


def _log_announce_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("worker.announce_failed", error=repr(task.exception()))


async def _all_or_log(event: str, steps: list[Coroutine[Any, Any, None]]) -> None:
    """Run every shutdown step even if some fail; failures are logged, never silently dropped."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            log.error(event, exc_info=result)
