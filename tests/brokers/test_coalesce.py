"""Coalescer: one flush per turn of the event loop, each caller gets its own item's outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.brokers.coalesce import Coalescer


class Recorder:
    """A flush that records its batches and fails the items named in ``refuse``."""

    def __init__(self, refuse: frozenset[str] = frozenset(), gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[str]] = []
        self.refuse = refuse
        self.gate = gate

    async def __call__(self, items: list[str]) -> Sequence[BaseException | None]:
        self.batches.append(items)
        if self.gate is not None:
            await self.gate.wait()
        return [ValueError(item) if item in self.refuse else None for item in items]


async def test_what_is_submitted_in_one_turn_is_flushed_together() -> None:
    flush = Recorder()
    coalescer = Coalescer(flush)
    await asyncio.gather(*(coalescer.submit(f"m{i}") for i in range(20)))
    assert flush.batches == [[f"m{i}" for i in range(20)]]


async def test_a_later_turn_goes_out_in_its_own_flush_without_waiting_for_the_first() -> None:
    gate = asyncio.Event()
    flush = Recorder(gate=gate)
    coalescer = Coalescer(flush)
    first = asyncio.gather(coalescer.submit("a"), coalescer.submit("b"))
    await asyncio.sleep(0.01)  # the first flush has started and waits on the gate
    second = asyncio.ensure_future(coalescer.submit("c"))
    await asyncio.sleep(0.01)
    assert flush.batches == [["a", "b"], ["c"]]  # the second went out while the first was in flight
    gate.set()
    await first
    await second


async def test_each_caller_gets_its_own_items_outcome() -> None:
    coalescer = Coalescer(Recorder(refuse=frozenset({"bad"})))
    results = await asyncio.gather(
        coalescer.submit("good1"), coalescer.submit("bad"), coalescer.submit("good2"), return_exceptions=True
    )
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "bad"


async def test_a_flush_that_fails_fails_every_caller_of_its_batch_and_only_those() -> None:
    calls = 0

    async def flaky(items: list[str]) -> Sequence[BaseException | None]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("broker gone")
        return [None] * len(items)

    coalescer = Coalescer(flaky)
    results = await asyncio.gather(coalescer.submit("a"), coalescer.submit("b"), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    await coalescer.submit("c")  # the next turn flushes anew


async def test_a_flush_with_the_wrong_number_of_outcomes_fails_its_callers_instead_of_leaving_them_waiting() -> None:
    async def short(items: list[str]) -> Sequence[BaseException | None]:
        return [None]

    coalescer = Coalescer(short)
    async with asyncio.timeout(1):
        results = await asyncio.gather(coalescer.submit("a"), coalescer.submit("b"), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    gate = asyncio.Event()
    flush = Recorder(gate=gate)
    coalescer = Coalescer(flush)
    leaving = asyncio.ensure_future(coalescer.submit("leaving"))
    staying = asyncio.ensure_future(coalescer.submit("staying"))
    await asyncio.sleep(0.01)
    leaving.cancel()
    gate.set()
    assert await staying is None
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert flush.batches == [["leaving", "staying"]]  # flushed anyway: the caller only stopped waiting


async def test_wait_idle_returns_once_flushes_in_flight_have_given_their_outcomes() -> None:
    gate = asyncio.Event()
    coalescer = Coalescer(Recorder(gate=gate))
    pending = asyncio.ensure_future(coalescer.submit("a"))
    await asyncio.sleep(0.01)
    idle = asyncio.ensure_future(coalescer.wait_idle())
    await asyncio.sleep(0.01)
    assert not idle.done()
    gate.set()
    await idle
    assert pending.done()
    assert pending.result() is None
