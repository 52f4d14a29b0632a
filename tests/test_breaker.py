"""The circuit breaker's state machine (injected clock, no sleeps) and in-process retries with tenacity."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from adapters.base import DeliveryReceipt
from gateway.errors import PermanentFailure, TransientFailure
from gateway.model import Delivery
from gateway.policy import BreakerPolicy, RetryPolicy
from gateway.retry import (
    AdapterError,
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    RetryAfterFailure,
    deliver_with_retries,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, threshold: int = 3, reset_after: float = 30.0) -> CircuitBreaker:
    return CircuitBreaker(BreakerPolicy(failure_threshold=threshold, reset_after=reset_after), clock=clock)


def test_opens_after_threshold_consecutive_failures(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state is BreakerState.CLOSED
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not b.allow()
    assert b.retry_in() == 30.0


def test_success_resets_the_consecutive_count(clock: Clock) -> None:
    b = breaker(clock)
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_half_open_lets_exactly_one_probe_through(clock: Clock) -> None:
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.now += 29.5
    assert not b.allow()
    assert b.retry_in() == pytest.approx(0.5)
    clock.now += 0.5
    assert b.state is BreakerState.HALF_OPEN
    assert b.retry_in() == 0.0
    assert b.allow()
    assert not b.allow()  # the probe is out
    assert b.retry_in() == 30.0
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert b.allow()


def test_failed_probe_opens_again_for_a_full_period(clock: Clock) -> None:
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.now += 30
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert b.retry_in() == 30.0
    clock.now += 29
    assert not b.allow()


def test_released_probe_can_be_taken_again(clock: Clock) -> None:
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.now += 30
    assert b.allow()
    b.release()
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()


def test_stragglers_failing_while_open_do_not_extend_the_wait(clock: Clock) -> None:
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.now += 20
    b.record_failure()
    assert b.retry_in() == pytest.approx(10.0)


# -- deliver_with_retries ---------------------------------------------------------------------

FAST = RetryPolicy(in_process_attempts=3, in_process_wait=0.001)


def delivery() -> Delivery:
    return Delivery("m-1", "VN-MOIT", "agency", "licence", b"<Envelope/>", "ab" * 32)


class ScriptedAdapter:
    """Raises the scripted failures in order, then succeeds."""

    name = "agency"

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def deliver(self, d: Delivery) -> DeliveryReceipt:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return DeliveryReceipt(status=200, detail="ok")

    async def close(self) -> None:
        return None


def busy() -> TransientFailure:
    return TransientFailure("HTTP_503", "busy")


async def test_retries_transient_failures_in_process(clock: Clock) -> None:
    adapter = ScriptedAdapter(busy(), busy())
    receipt = await deliver_with_retries(adapter, delivery(), FAST, breaker(clock, threshold=5))
    assert receipt.detail == "ok"
    assert adapter.calls == 3


async def test_gives_up_after_in_process_attempts_with_the_last_failure(clock: Clock) -> None:
    adapter = ScriptedAdapter(busy(), busy(), TransientFailure("TIMEOUT", "slow"))
    with pytest.raises(TransientFailure) as caught:
        await deliver_with_retries(adapter, delivery(), FAST, breaker(clock, threshold=5))
    assert caught.value.code == "TIMEOUT"
    assert adapter.calls == 3


async def test_a_single_in_process_attempt_is_not_retried(clock: Clock) -> None:
    adapter = ScriptedAdapter(busy())
    with pytest.raises(TransientFailure) as caught:
        await deliver_with_retries(adapter, delivery(), replace(FAST, in_process_attempts=1), breaker(clock))
    assert caught.value.code == "HTTP_503"
    assert adapter.calls == 1


async def test_a_failed_probe_is_not_retried_in_process(clock: Clock) -> None:
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.now += 30  # half-open: this delivery is the probe
    adapter = ScriptedAdapter(busy(), busy())
    with pytest.raises(TransientFailure) as caught:
        await deliver_with_retries(adapter, delivery(), FAST, b)
    assert not isinstance(caught.value, CircuitOpen)
    assert adapter.calls == 1
    assert b.state is BreakerState.OPEN


async def test_permanent_failure_is_not_retried_and_not_a_breaker_failure(clock: Clock) -> None:
    b = breaker(clock, threshold=2)
    b.record_failure()
    adapter = ScriptedAdapter(PermanentFailure("HTTP_400", "bad"))
    with pytest.raises(PermanentFailure):
        await deliver_with_retries(adapter, delivery(), FAST, b)
    assert adapter.calls == 1
    b.record_failure()
    assert b.state is BreakerState.CLOSED  # the 400 proved the agency up: the count started over


async def test_stops_early_when_the_breaker_opens_mid_way(clock: Clock) -> None:
    b = breaker(clock, threshold=2)
    adapter = ScriptedAdapter(busy(), busy(), busy())
    with pytest.raises(TransientFailure) as caught:
        await deliver_with_retries(adapter, delivery(), FAST, b)
    assert not isinstance(caught.value, CircuitOpen)
    assert adapter.calls == 2
    assert b.state is BreakerState.OPEN


async def test_open_breaker_refuses_without_calling_the_adapter(clock: Clock) -> None:
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.now += 10
    adapter = ScriptedAdapter()
    started: list[bool] = []

    async def before() -> None:
        started.append(True)

    with pytest.raises(CircuitOpen) as caught:
        await deliver_with_retries(adapter, delivery(), FAST, b, before_first_attempt=before)
    assert caught.value.retry_after == pytest.approx(20.0)
    assert adapter.calls == 0
    assert started == []


async def test_retry_after_is_handed_back_instead_of_retried_in_process(clock: Clock) -> None:
    adapter = ScriptedAdapter(RetryAfterFailure("HTTP_429", "slow down", 60.0))
    with pytest.raises(RetryAfterFailure):
        await deliver_with_retries(adapter, delivery(), FAST, breaker(clock))
    assert adapter.calls == 1


async def test_adapter_bug_is_wrapped_and_releases_the_probe(clock: Clock) -> None:
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.now += 30
    adapter = ScriptedAdapter(KeyError("oops"))
    with pytest.raises(AdapterError) as caught:
        await deliver_with_retries(adapter, delivery(), FAST, b)
    assert isinstance(caught.value.__cause__, KeyError)
    assert adapter.calls == 1
    assert b.allow()  # no verdict: the next delivery may probe


async def test_before_first_attempt_runs_once_and_its_failure_propagates(clock: Clock) -> None:
    calls: list[int] = []

    async def before() -> None:
        calls.append(1)

    adapter = ScriptedAdapter(busy())
    await deliver_with_retries(adapter, delivery(), FAST, breaker(clock), before_first_attempt=before)
    assert calls == [1]

    async def broken() -> None:
        raise ConnectionError("store down")

    untouched = ScriptedAdapter()
    with pytest.raises(ConnectionError):
        await deliver_with_retries(untouched, delivery(), FAST, breaker(clock), before_first_attempt=broken)
    assert untouched.calls == 0


async def test_cancelled_probe_gives_the_permit_back(clock: Clock) -> None:
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.now += 30
    entered = asyncio.Event()

    class Hanging(ScriptedAdapter):
        async def deliver(self, d: Delivery) -> DeliveryReceipt:
            entered.set()
            await asyncio.Event().wait()
            raise AssertionError("never released")

    task = asyncio.create_task(deliver_with_retries(Hanging(), delivery(), FAST, b))
    await entered.wait()
    assert not b.allow()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.allow()
