"""Group commit: operations that arrive while a batch is committing go together in the next one.

One batch is in flight at a time per ledger, so under load a single transaction (and a single
fsync) carries hundreds of claims, accepts and records, while a lone operation still commits at
once, without waiting for company. Each caller's future is resolved only after its batch commits.

``linger``: after a batch that carried more than one operation (there is company), wait that long
before taking the next batch, so it carries more. Without it, at moderate load the batches stay at
one or two operations: every commit wakes the writer thread, hands the GIL back and forth with the
event loop a dozen times and takes the shared database lock, and that per-commit cost, not the
messages, filled the CPU (`nswgw run` on RabbitMQ, 2 ms: 3.9 -> 3.6 ms of CPU per message and p99
150 -> 100 ms at 500 msg/s offered). At saturation it makes no measurable difference: measured later in
alternation with the naive floor (`python -m bench.paired`), 0, 2 and 5 ms gave the same ratio within
the noise; the ~15% more messages per second first seen there did not hold. A lone operation after a
quiet spell still commits at once.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from gateway import audit
from gateway.audit import AuditRecord
from gateway.errors import BrokerUnavailable
from gateway.events import Event
from gateway.stores.base import Claim
from gateway.stores.batch import AcceptOp, ClaimOp, Op, RecordOp, ReleaseOp, Result

RunBatch = Callable[[list[Op]], Awaitable[tuple[list[Result], list[AuditRecord]]]]


class GroupCommit:
    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch: int = 1000,
        linger: float = 0.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if linger < 0:
            raise ValueError(f"linger must be >= 0 seconds, not {linger}")
        self._run = run
        self._max_batch = max_batch
        self._linger = linger
        self._sleep = sleep
        self._pending: list[tuple[Op, asyncio.Future[Result]]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Audit log lines are written off the event loop, in commit order, after each commit.
        self._log = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsw-audit-log")

    async def submit(self, op: Op) -> Claim | None:
        if self._closed:
            raise BrokerUnavailable("the ledger is closed")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        result = await future
        if isinstance(result, BrokerUnavailable):
            raise result
        return result

    async def close(self) -> None:
        """Refuse new operations, let those already submitted commit, flush the audit log lines."""
        self._closed = True
        if self._task is not None:
            await self._task
        await asyncio.get_running_loop().run_in_executor(None, self._log.shutdown)

    async def _drain(self) -> None:
        company = False  # the last batch carried several operations: more are likely on their way
        try:
            while self._pending:
                if company and self._linger and len(self._pending) < self._max_batch:
                    await self._sleep(self._linger)
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                company = len(batch) > 1
                await self._commit(batch)
        except asyncio.CancelledError:  # the loop is going away: nobody may be left waiting forever
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            raise
        finally:
            self._task = None

    async def _commit(self, batch: list[tuple[Op, asyncio.Future[Result]]]) -> None:
        try:
            results, records = await self._run([op for op, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:  # the loop is going away: do not leave callers waiting forever
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 -- not swallowed: every caller of the batch gets it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # its caller may have been cancelled; the operation committed anyway
                future.set_result(result)
        if records:
            self._log.submit(audit.emit, records).add_done_callback(_report_log_failure)


def _report_log_failure(done: Future[None]) -> None:
    # The records are committed and verifiable; only their log copy is missing. Say so where we still can.
    exc = done.exception()
    if exc is not None:
        print(f"nsw.audit: could not write audit log lines: {exc!r}", file=sys.stderr)


class GroupCommitLedger:
    """The writing half of a ``Ledger``, the same for every backend: each call is one batched operation."""

    _group: GroupCommit | None = None
    name: str = "ledger"

    async def claim(
        self, message_id: str, sender: str, digest: str, document_type: str, events: Sequence[Event]
    ) -> Claim:
        claim = await self._submit(ClaimOp(message_id, sender, digest, document_type, tuple(events), time.time()))
        assert claim is not None  # a ClaimOp always yields its Claim
        return claim

    async def accept(
        self, message_id: str, receipt: bytes, destinations: Sequence[str], events: Sequence[Event]
    ) -> None:
        await self._submit(AcceptOp(message_id, receipt, tuple(destinations), tuple(events), time.time()))

    async def release(self, message_id: str, events: Sequence[Event]) -> None:
        await self._submit(ReleaseOp(message_id, tuple(events)))

    async def record(self, events: Sequence[Event]) -> None:
        if events:
            await self._submit(RecordOp(tuple(events)))

    async def _submit(self, op: Op) -> Claim | None:
        if self._group is None:
            raise BrokerUnavailable(f"the {self.name} is not open")
        return await self._group.submit(op)
