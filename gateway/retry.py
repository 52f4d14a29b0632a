"""Applying a destination's ``RetryPolicy`` and ``BreakerPolicy`` to one delivery.

``deliver_with_retries`` makes the short in-process attempts (tenacity) and keeps the destination's
``CircuitBreaker`` informed; the broker-level retries between deliveries are the worker's business.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from enum import StrEnum

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from adapters.base import Adapter, DeliveryReceipt
from gateway.errors import GatewayError, PermanentFailure, TransientFailure
from gateway.model import Delivery
from gateway.policy import BreakerPolicy, RetryPolicy


class RetryAfterFailure(TransientFailure):
    """A transient failure where the receiver said when to come back (HTTP ``Retry-After``).

    ``retry_after`` is in seconds from now. It is not retried in-process: the receiver asked us to
    wait, so the worker hands the delivery back with at least that delay.
    """

    def __init__(self, code: str, detail: str, retry_after: float | None) -> None:
        super().__init__(code, detail)
        self.retry_after = retry_after


class DeliveryHeld(RetryAfterFailure):
    """The gateway held the attempt back itself (its configuration gives the destination nowhere to send
    to): nothing reached the receiver, so the breaker hears no verdict, and the status keeps this reason
    rather than turning into CIRCUIT_OPEN after a few held copies. ``retry_after`` 0: never retried in
    process, where waiting a moment cannot change the configuration."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code, detail, retry_after=0.0)


class CircuitOpen(RetryAfterFailure):
    """The destination's circuit is open: the attempt was not made and never reached the receiver."""

    def __init__(self, retry_in: float) -> None:
        super().__init__("CIRCUIT_OPEN", f"circuit open; next probe in {retry_in:.1f}s", retry_in)


class AdapterError(GatewayError):
    """An adapter raised something other than a ``DeliveryFailure``: a bug. ``__cause__`` is the original."""


def retry_after_of(failure: TransientFailure) -> float | None:
    return failure.retry_after if isinstance(failure, RetryAfterFailure) else None


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per-destination breaker: consecutive transient failures open it; one probe at a time closes it.

    Not thread-safe; every method runs on the event loop without awaiting, which makes it atomic there.
    """

    def __init__(self, policy: BreakerPolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """``half_open`` as soon as ``reset_after`` has passed (a probe may go), even before one does."""
        if self._state is BreakerState.OPEN and self._open_for() >= self._policy.reset_after:
            return BreakerState.HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """May an attempt be made now? In half-open, ``True`` hands out the single probe permit."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._state = BreakerState.HALF_OPEN
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probing = False

    def record_failure(self) -> None:
        """A transient failure. Permanent ones must not be recorded: the receiver was up."""
        if self._state is BreakerState.HALF_OPEN:
            self._open()
        elif self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self._policy.failure_threshold:
                self._open()
        # Already open: a straggler that started before the circuit opened; keep the original timer.

    def release(self) -> None:
        """Give back a probe permit without a verdict (the attempt was cancelled or broke locally)."""
        self._probing = False

    def retry_in(self) -> float:
        """Seconds until an attempt would be allowed (0 when one is allowed now)."""
        state = self.state
        if state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._probing):
            return 0.0
        if state is BreakerState.HALF_OPEN:
            # A probe is out; its verdict decides. Waiting a full period is the conservative guess.
            return self._policy.reset_after
        return max(0.0, self._policy.reset_after - self._open_for())

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probing = False
        self._failures = 0

    def _open_for(self) -> float:
        return self._clock() - self._opened_at


class _stop_unless_closed(stop_base):  # noqa: N801 -- tenacity's naming for stop conditions
    """Stop in-process retrying once the breaker is no longer closed (it opened mid-way)."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._breaker.state is not BreakerState.CLOSED


def _retry_in_process(exc: BaseException) -> bool:
    return isinstance(exc, TransientFailure) and retry_after_of(exc) is None


async def deliver_with_retries(
    adapter: Adapter,
    delivery: Delivery,
    policy: RetryPolicy,
    breaker: CircuitBreaker,
    *,
    before_first_attempt: Callable[[], Awaitable[None]] | None = None,
) -> DeliveryReceipt:
    """Up to ``policy.in_process_attempts`` attempts, each only if the breaker allows it.

    Raises ``CircuitOpen`` when the breaker refuses the first attempt (the adapter is not called and
    ``before_first_attempt`` does not run), the last ``TransientFailure`` when attempts run out or the
    breaker opens mid-way, ``PermanentFailure`` at once, and ``AdapterError`` for any other exception
    from the adapter. Exceptions from ``before_first_attempt`` propagate unchanged.
    """
    if not breaker.allow():
        raise CircuitOpen(breaker.retry_in())
    if before_first_attempt is not None:
        try:
            await before_first_attempt()
        except BaseException:
            breaker.release()
            raise
    try:
        return await _attempt(adapter, delivery, breaker)
    except TransientFailure as failure:
        if policy.in_process_attempts <= 1 or not _retry_in_process(failure):
            raise
        first = failure
    return await _retry(adapter, delivery, policy, breaker, first)


async def _retry(
    adapter: Adapter, delivery: Delivery, policy: RetryPolicy, breaker: CircuitBreaker, first: TransientFailure
) -> DeliveryReceipt:
    """Attempts 2.. after the first one failed with ``first``, driven by tenacity.

    The first attempt is made without tenacity (most deliveries succeed at once, and building the
    retrying machinery costs more than the attempt's own bookkeeping); it is replayed to tenacity as
    its attempt 1, so the waits and the stop conditions count exactly as if tenacity had made it.
    """
    last = first
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.in_process_attempts) | _stop_unless_closed(breaker),
        wait=wait_exponential_jitter(
            multiplier=policy.in_process_wait, jitter=policy.in_process_wait, max=policy.in_process_wait * 16
        ),
        retry=retry_if_exception(_retry_in_process),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            if attempt.retry_state.attempt_number == 1:
                raise first
            if not breaker.allow():
                # Opened by other deliveries while we waited: report what this delivery last saw.
                raise last
            try:
                return await _attempt(adapter, delivery, breaker)
            except TransientFailure as failure:
                last = failure
                raise
    raise AssertionError("unreachable: tenacity either returns, reraises or keeps iterating")


async def _attempt(adapter: Adapter, delivery: Delivery, breaker: CircuitBreaker) -> DeliveryReceipt:
    try:
        receipt = await adapter.deliver(delivery)
    except DeliveryHeld:
        breaker.release()
        raise
    except TransientFailure:
        breaker.record_failure()
        raise
    except PermanentFailure:
        breaker.record_success()  # the receiver answered; it refused this content, not the traffic
        raise
    except Exception as exc:
        breaker.release()
        raise AdapterError(f"adapter {adapter.name!r} raised {type(exc).__name__}: {exc}") from exc
    except BaseException:  # cancellation: no verdict on the receiver
        breaker.release()
        raise
    breaker.record_success()
    return receipt
