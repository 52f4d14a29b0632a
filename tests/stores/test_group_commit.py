"""GroupCommit's linger: wait for company only after a batch that had company, never for a lone operation.

The committing function and the sleep are fakes the test steps by hand (events, no timing), so each test
states exactly which operations shared a transaction and when the group commit chose to wait.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.audit import AuditRecord
from gateway.events import Event
from gateway.model import State
from gateway.stores.batch import Op, RecordOp, Result
from gateway.stores.group import GroupCommit


def _op(name: str) -> RecordOp:
    return RecordOp((Event(State.RECEIVED, name),))


def _names(batch: list[Op]) -> list[str]:
    return [op.events[0].message_id for op in batch if isinstance(op, RecordOp)]


class Harness:
    """A GroupCommit whose commits and lingers wait for the test to let them go."""

    def __init__(self, *, linger: float = 0.002, max_batch: int = 1000) -> None:
        self.batches: list[list[str]] = []
        self.sleeps: list[float] = []
        self.committing = asyncio.Event()  # a commit has started and waits for ``finish_commit``
        self.lingering = asyncio.Event()  # the group commit sleeps and waits for ``end_linger``
        self._commit_gate = asyncio.Event()
        self._linger_gate = asyncio.Event()
        self.hold_commits = True
        self.group = GroupCommit(self._run, linger=linger, max_batch=max_batch, sleep=self._sleep)

    async def _run(self, ops: list[Op]) -> tuple[list[Result], list[AuditRecord]]:
        self.batches.append(_names(ops))
        if self.hold_commits:
            self.committing.set()
            await self._commit_gate.wait()
            self._commit_gate.clear()
        return [None] * len(ops), []

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.lingering.set()
        await self._linger_gate.wait()
        self._linger_gate.clear()

    def submit(self, name: str) -> asyncio.Task[object]:
        return asyncio.create_task(self.group.submit(_op(name)))

    async def started_commit(self) -> None:
        await asyncio.wait_for(self.committing.wait(), timeout=5)
        self.committing.clear()

    async def started_linger(self) -> None:
        await asyncio.wait_for(self.lingering.wait(), timeout=5)
        self.lingering.clear()

    def finish_commit(self) -> None:
        self._commit_gate.set()

    async def committing_with_company(self) -> list[asyncio.Task[object]]:
        """Submit a alone, then b and c while [a] commits; return once [b, c] is committing (held)."""
        a = self.submit("a")
        await self.started_commit()  # [a] alone
        b, c = self.submit("b"), self.submit("c")
        self.finish_commit()
        await self.started_commit()  # [b, c]: the batch before it was alone, so no wait before it
        return [a, b, c]

    def end_linger(self) -> None:
        self._linger_gate.set()


async def _settled(*tasks: asyncio.Task[object]) -> None:
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)


async def test_a_lone_operation_commits_without_waiting() -> None:
    h = Harness()
    h.hold_commits = False
    await _settled(h.submit("a"))
    await _settled(h.submit("b"))
    assert h.batches == [["a"], ["b"]]
    assert h.sleeps == []


async def test_after_a_batch_with_company_the_next_batch_waits_and_carries_what_came_meanwhile() -> None:
    h = Harness(linger=0.002)
    first = await h.committing_with_company()
    assert h.sleeps == []
    d = h.submit("d")
    h.finish_commit()
    await h.started_linger()  # [b, c] had company: wait before taking [d]
    e = h.submit("e")
    h.end_linger()
    await h.started_commit()
    h.finish_commit()
    await _settled(*first, d, e)
    assert h.batches == [["a"], ["b", "c"], ["d", "e"]]
    assert h.sleeps == [0.002]


async def test_a_quiet_spell_ends_the_waiting() -> None:
    h = Harness()
    first = await h.committing_with_company()
    h.finish_commit()
    await _settled(*first)  # nothing pending any more: the group commit goes idle
    h.hold_commits = False
    await _settled(h.submit("d"))
    assert h.batches == [["a"], ["b", "c"], ["d"]]
    assert h.sleeps == []


async def test_no_linger_never_waits() -> None:
    h = Harness(linger=0.0)
    first = await h.committing_with_company()
    d = h.submit("d")
    h.finish_commit()
    await h.started_commit()
    h.finish_commit()
    await _settled(*first, d)
    assert h.batches == [["a"], ["b", "c"], ["d"]]
    assert h.sleeps == []


async def test_a_full_batch_does_not_wait() -> None:
    h = Harness(max_batch=2)
    first = await h.committing_with_company()
    d, e = h.submit("d"), h.submit("e")
    h.finish_commit()
    await h.started_commit()  # [b, c] had company, but [d, e] fills a batch already: no reason to wait
    h.finish_commit()
    await _settled(*first, d, e)
    assert h.batches == [["a"], ["b", "c"], ["d", "e"]]
    assert h.sleeps == []


async def test_cancelled_while_waiting_leaves_nobody_waiting_forever() -> None:
    h = Harness()
    first = await h.committing_with_company()
    d = h.submit("d")
    h.finish_commit()
    await h.started_linger()
    drain = h.group._task
    assert drain is not None
    drain.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(d, timeout=5)
    await _settled(*first)
    assert h.batches == [["a"], ["b", "c"]]


def test_a_negative_linger_is_refused() -> None:
    async def run(ops: list[Op]) -> tuple[list[Result], list[AuditRecord]]:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="linger"):
        GroupCommit(run, linger=-0.001)
