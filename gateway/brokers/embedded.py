"""The embedded broker: one SQLite file in WAL mode, shared safely by several processes.

Every database call runs on one dedicated thread with its own connection, so the event loop never
blocks on disk. A consumer claims work by writing a lease (``lease_owner``, ``lease_until``) in one
``UPDATE ... RETURNING`` statement, which SQLite's write lock makes atomic across processes; a
process that dies leaves leases that simply expire, and another consumer takes the work over.

Semantics match the RabbitMQ backend (see ``gateway/brokers/base.py``), including its poison
message guard: an item handed out more than ``delivery_limit`` + 1 times without an outcome (its
handler keeps raising, or its worker keeps dying) is dead-lettered with code ``DELIVERY_LIMIT``.
Retry delays are kept exact; there are no tiers to round to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog

from gateway.brokers.base import Ack, DeadLetter, DeadLetterRecord, Handler, Outcome, Retry
from gateway.errors import BrokerUnavailable
from gateway.model import Delivery
from gateway.sqlite_lock import begin_immediate, prepare

log = structlog.get_logger("nsw.broker")

T = TypeVar("T")

DELIVERY_LIMIT_CODE = "DELIVERY_LIMIT"
LOCK_TIMEOUT_SECONDS = 10.0  # waiting for another process's write lock
REPLAYED_HEADER = "x-replayed"
_SYNCHRONOUS = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})

# The Delivery columns are spelled out in each statement (no string building around SQL).
_INSERT_WORK = """
INSERT INTO work_items (destination, message_id, sender, document_type, payload, digest, attempt,
                        first_enqueued_at, headers, available_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_CLAIM = """
UPDATE work_items SET lease_owner = ?, lease_until = ?, deliveries = deliveries + 1
WHERE id IN (SELECT id FROM work_items
             WHERE destination = ? AND available_at <= ? AND (lease_until IS NULL OR lease_until < ?)
             ORDER BY available_at, id LIMIT ?)
RETURNING id, destination, message_id, sender, document_type, payload, digest, attempt,
          first_enqueued_at, headers, deliveries, available_at
"""
_ANY_DUE = """
SELECT 1 FROM work_items
WHERE destination = ? AND available_at <= ? AND (lease_until IS NULL OR lease_until < ?)
LIMIT 1
"""
_RELEASE_WAITING = """
UPDATE work_items SET available_at = ? WHERE destination = ? AND available_at > ? AND lease_owner IS NULL
"""
_MOVE_TO_DEAD = """
INSERT INTO dead_letters (destination, message_id, sender, document_type, payload, digest, attempt,
                          first_enqueued_at, headers, code, reason, dead_at)
SELECT destination, message_id, sender, document_type, payload, digest, attempt,
       first_enqueued_at, headers, ?, ?, ?
FROM work_items WHERE id = ? AND lease_owner = ?
"""
_SELECT_DEAD = """
SELECT id, destination, message_id, sender, document_type, payload, digest, attempt,
       first_enqueued_at, headers, code, reason, dead_at
FROM dead_letters
WHERE (?1 IS NULL OR destination = ?1) AND (?2 IS NULL OR message_id = ?2)
ORDER BY id
"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS work_items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    document_type TEXT NOT NULL,
    payload BLOB NOT NULL,
    digest TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    first_enqueued_at REAL NOT NULL,
    headers TEXT NOT NULL,
    available_at REAL NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS work_items_due ON work_items (destination, available_at, id);
CREATE INDEX IF NOT EXISTS work_items_lease ON work_items (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    document_type TEXT NOT NULL,
    payload BLOB NOT NULL,
    digest TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    first_enqueued_at REAL NOT NULL,
    headers TEXT NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    dead_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_destination ON dead_letters (destination, id);
"""


def _create_schema(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


@dataclass(frozen=True, slots=True)
class _Claimed:
    row_id: int
    owner: str
    delivery: Delivery
    deliveries: int


def _row_to_delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        message_id=row["message_id"],
        sender=row["sender"],
        destination=row["destination"],
        document_type=row["document_type"],
        payload=bytes(row["payload"]),
        digest=row["digest"],
        attempt=row["attempt"],
        first_enqueued_at=row["first_enqueued_at"],
        headers=json.loads(row["headers"]),
    )


def _delivery_row(d: Delivery, now: float) -> tuple[Any, ...]:
    return (
        d.destination,
        d.message_id,
        d.sender,
        d.document_type,
        d.payload,
        d.digest,
        d.attempt,
        d.first_enqueued_at or now,
        json.dumps(d.headers, sort_keys=True),
        now,
    )


class EmbeddedBroker:
    """Broker backed by one SQLite file; see the module docstring for the guarantees."""

    name = "embedded"

    def __init__(
        self,
        path: Path,
        *,
        lease_seconds: float = 30.0,
        poll_interval: float = 0.05,
        synchronous: str = "FULL",
        delivery_limit: int = 20,
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}, got {synchronous!r}")
        if lease_seconds <= 0 or poll_interval <= 0:
            raise ValueError("lease_seconds and poll_interval must be positive")
        self.path = Path(path)
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.delivery_limit = delivery_limit
        self._synchronous = synchronous.upper()
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._start_lock = asyncio.Lock()
        self._subscriptions: dict[str, set[EmbeddedSubscription]] = {}
        self._pending: list[tuple[list[tuple[Any, ...]], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._closed:
                raise BrokerUnavailable("embedded broker is closed")
            if self._executor is not None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsw-embedded-broker")
            try:
                await self._call(self._open)
            except sqlite3.Error as exc:
                self._executor.shutdown(wait=False)
                self._executor = None
                raise BrokerUnavailable(f"cannot open the queue database {self.path}: {exc}") from exc

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=LOCK_TIMEOUT_SECONDS)
        try:
            conn.row_factory = sqlite3.Row
            prepare(conn, LOCK_TIMEOUT_SECONDS, self._synchronous, _create_schema)
        except sqlite3.Error:
            conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        for subs in list(self._subscriptions.values()):
            for sub in list(subs):
                await sub.stop()
        if self._flusher is not None:
            await self._flusher  # publishes already accepted for commit get their answer first
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._close_connection)
        executor.shutdown(wait=True)

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def ready(self) -> bool:
        try:
            await self._call(self._check_writable)
        except (sqlite3.Error, BrokerUnavailable):
            return False
        return True

    def _check_writable(self) -> None:
        conn = self._db()
        begin_immediate(conn, LOCK_TIMEOUT_SECONDS)
        conn.execute("ROLLBACK")

    async def declare(self, destinations: Sequence[str]) -> None:
        """Nothing to create per destination; only makes sure the database is open."""
        await self._ensure_started()

    # -- thread plumbing ---------------------------------------------------------------------

    async def _ensure_started(self) -> ThreadPoolExecutor:
        if self._executor is None:
            await self.start()
        assert self._executor is not None
        return self._executor

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        executor = self._executor or await self._ensure_started()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except RuntimeError as exc:  # the executor was shut down by close()
            raise BrokerUnavailable(f"embedded broker is closed: {exc}") from exc

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BrokerUnavailable("embedded broker is closed")
        return self._conn

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._db()
        begin_immediate(conn, LOCK_TIMEOUT_SECONDS)
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                conn.execute("ROLLBACK")
            raise
        return result

    # -- publish -----------------------------------------------------------------------------

    async def publish(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        await self._ensure_started()
        rows = [_delivery_row(d, time.time()) for d in deliveries]
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Retrieve the outcome even when the caller was cancelled meanwhile (no "never retrieved" noise).
        committed.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending.append((rows, committed))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="nsw-embedded-group-commit")
        await asyncio.shield(committed)  # a caller that gives up must not cancel the others' commit
        self._wake({d.destination for d in deliveries})

    async def _flush(self) -> None:
        """Group commit: every publish that arrived while the previous commit ran shares one transaction
        (one fsync), which is what keeps many concurrent senders fast on a real disk."""
        while self._pending:
            batch, self._pending = self._pending, []
            insert = partial(self._insert_work, rows=[row for rows, _ in batch for row in rows])
            error: BaseException | None = None
            try:
                await self._call(self._transaction, insert)
            except (sqlite3.Error, BrokerUnavailable) as exc:
                error = BrokerUnavailable(f"embedded broker could not store the message: {exc}")
            except Exception as exc:  # noqa: BLE001 -- a bug: every waiting publisher must get it, not hang
                error = exc
            for _, committed in batch:
                if committed.done():
                    continue
                if error is None:
                    committed.set_result(None)
                else:
                    committed.set_exception(error)

    @staticmethod
    def _insert_work(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        conn.executemany(_INSERT_WORK, rows)

    def _wake(self, destinations: set[str]) -> None:
        for destination in destinations:
            for sub in self._subscriptions.get(destination, ()):
                sub.wake()

    # -- consume -----------------------------------------------------------------------------

    async def consume(self, destination: str, handler: Handler, *, prefetch: int = 16) -> EmbeddedSubscription:
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        await self._ensure_started()
        sub = EmbeddedSubscription(self, destination, handler, prefetch)
        self._subscriptions.setdefault(destination, set()).add(sub)
        sub.begin()
        return sub

    def _forget(self, sub: EmbeddedSubscription) -> None:
        self._subscriptions.get(sub.destination, set()).discard(sub)

    def _claim(self, destination: str, owner: str, limit: int) -> list[_Claimed]:
        # An idle consumer polls often: look first with a plain read, so that an empty poll never
        # takes the database's write lock away from publishers in other processes.
        now = time.time()
        if self._db().execute(_ANY_DUE, (destination, now, now)).fetchone() is None:
            return []

        def work(conn: sqlite3.Connection) -> list[_Claimed]:
            now = time.time()
            rows = conn.execute(
                _CLAIM,
                (owner, now + self.lease_seconds, destination, now, now, limit),
            ).fetchall()
            rows.sort(key=lambda r: (r["available_at"], r["id"]))
            claimed = [_Claimed(r["id"], owner, _row_to_delivery(r), r["deliveries"]) for r in rows]
            # Handed out before and never settled (its worker died each time): a poison message.
            poisoned = [c for c in claimed if c.deliveries - 1 > self.delivery_limit]
            for item in poisoned:
                self._poisoned(conn, item, item.deliveries - 1, now)
            return [c for c in claimed if c not in poisoned]

        return self._transaction(work)

    def _renew(self, leases: list[tuple[int, str]]) -> None:
        until = time.time() + self.lease_seconds
        self._transaction(
            lambda conn: conn.executemany(
                "UPDATE work_items SET lease_until = ? WHERE id = ? AND lease_owner = ?",
                [(until, row_id, owner) for row_id, owner in leases],
            )
        )

    def _release_owned(self, owner_prefix: str) -> None:
        self._transaction(
            lambda conn: conn.execute(
                "UPDATE work_items SET lease_owner = NULL, lease_until = NULL WHERE lease_owner LIKE ?",
                (owner_prefix + "%",),
            )
        )

    def _settle(self, item: _Claimed, outcome: Outcome | None) -> bool:
        """Apply a handler's outcome (``None``: it raised). False when the lease had been lost."""

        def work(conn: sqlite3.Connection) -> bool:
            key = (item.row_id, item.owner)
            match outcome:
                case Ack():
                    cur = conn.execute("DELETE FROM work_items WHERE id = ? AND lease_owner = ?", key)
                case Retry(delay=delay, count_attempt=count_attempt):
                    cur = conn.execute(
                        "UPDATE work_items SET attempt = attempt + ?, available_at = ?, deliveries = 0,"
                        " lease_owner = NULL, lease_until = NULL WHERE id = ? AND lease_owner = ?",
                        (1 if count_attempt else 0, time.time() + max(delay, 0.0), *key),
                    )
                case DeadLetter():
                    return self._move_to_dead(conn, item, outcome, time.time())
                case None if item.deliveries > self.delivery_limit:
                    self._poisoned(conn, item, item.deliveries, now=time.time())
                    return True
                case None:
                    cur = conn.execute(
                        "UPDATE work_items SET lease_owner = NULL, lease_until = NULL WHERE id = ? AND lease_owner = ?",
                        key,
                    )
            return cur.rowcount == 1

        return self._transaction(work)

    def _poisoned(self, conn: sqlite3.Connection, item: _Claimed, failures: int, now: float) -> None:
        reason = f"handed out {failures} times without an outcome (handler raised or worker died)"
        self._move_to_dead(conn, item, DeadLetter(DELIVERY_LIMIT_CODE, reason), now)
        log.warning(
            "broker.delivery_limit",
            destination=item.delivery.destination,
            message_id=item.delivery.message_id,
            failures=failures,
        )

    @staticmethod
    def _move_to_dead(conn: sqlite3.Connection, item: _Claimed, dead: DeadLetter, now: float) -> bool:
        cur = conn.execute(
            _MOVE_TO_DEAD,
            (dead.code, dead.reason, now, item.row_id, item.owner),
        )
        conn.execute("DELETE FROM work_items WHERE id = ? AND lease_owner = ?", (item.row_id, item.owner))
        return cur.rowcount == 1

    # -- dead letters ------------------------------------------------------------------------

    async def list_dead(self, destination: str | None = None) -> list[DeadLetterRecord]:
        rows = await self._call(self._select_dead, destination, None)
        return [DeadLetterRecord(_row_to_delivery(r), r["code"], r["reason"], r["dead_at"]) for r in rows]

    def _select_dead(self, destination: str | None, message_id: str | None) -> list[sqlite3.Row]:
        return self._db().execute(_SELECT_DEAD, (destination, message_id)).fetchall()

    async def replay_dead(self, destination: str | None = None, message_id: str | None = None) -> int:
        def work(conn: sqlite3.Connection) -> list[Delivery]:
            rows = self._select_dead(destination, message_id)
            now = time.time()
            replayed = [
                replace(d, attempt=1, first_enqueued_at=now, headers={**d.headers, REPLAYED_HEADER: "true"})
                for d in map(_row_to_delivery, rows)
            ]
            self._insert_work(conn, [_delivery_row(d, now) for d in replayed])
            conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(r["id"],) for r in rows])
            return replayed

        try:
            replayed = await self._call(self._transaction, work)
        except sqlite3.Error as exc:
            raise BrokerUnavailable(f"embedded broker could not replay dead letters: {exc}") from exc
        self._wake({d.destination for d in replayed})
        return len(replayed)

    async def release_waiting(self, destination: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            now = time.time()
            return conn.execute(_RELEASE_WAITING, (now, destination, now)).rowcount

        try:
            released = await self._call(self._transaction, work)
        except sqlite3.Error as exc:
            raise BrokerUnavailable(f"embedded broker could not release {destination}'s retries: {exc}") from exc
        self._wake({destination})
        return int(released)


class EmbeddedSubscription:
    """One consumer task for one destination; at most ``prefetch`` handlers run at once."""

    _owner_seq = itertools.count()

    def __init__(self, broker: EmbeddedBroker, destination: str, handler: Handler, prefetch: int) -> None:
        self.destination = destination
        self._broker = broker
        self._handler = handler
        self._prefetch = prefetch
        self._token = uuid.uuid4().hex
        self._wake = asyncio.Event()
        self._stopping = False
        self._in_flight: dict[asyncio.Task[None], _Claimed] = {}
        self._runner: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    def begin(self) -> None:
        self._runner = asyncio.create_task(self._run(), name=f"nsw-embedded-consume-{self.destination}")
        self._heartbeat = asyncio.create_task(self._renew_leases(), name="nsw-embedded-heartbeat")

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            self._wake.clear()
            free = self._prefetch - len(self._in_flight)
            if free > 0:
                owner = f"{self._token}:{next(self._owner_seq)}"
                try:
                    claimed = await self._broker._call(self._broker._claim, self.destination, owner, free)
                    failures = 0
                except Exception:  # the consumer must outlive a locked, full or corrupt database
                    failures += 1
                    log.exception("broker.claim_failed", destination=self.destination, failures=failures)
                    claimed = []
                    await asyncio.sleep(min(self._broker.poll_interval * 2**failures, 5.0))
                for item in claimed:
                    task = asyncio.create_task(self._handle(item))
                    self._in_flight[task] = item
                    task.add_done_callback(self._finished)
                if claimed and len(claimed) == free:
                    continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._broker.poll_interval):
                    await self._wake.wait()

    async def _handle(self, item: _Claimed) -> None:
        d = item.delivery
        outcome: Outcome | None
        try:
            outcome = await self._handler(d)
        except Exception:
            log.exception("broker.handler_failed", destination=d.destination, message_id=d.message_id)
            outcome = None
        if outcome is not None and not isinstance(outcome, Ack | Retry | DeadLetter):
            log.error("broker.bad_outcome", destination=d.destination, message_id=d.message_id, outcome=repr(outcome))
            outcome = None
        try:
            kept = await self._broker._call(self._broker._settle, item, outcome)
        except (sqlite3.Error, BrokerUnavailable) as exc:
            log.warning("broker.settle_failed", destination=d.destination, message_id=d.message_id, error=str(exc))
        else:
            if not kept:
                log.warning("broker.lease_lost", destination=d.destination, message_id=d.message_id)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._wake.set()

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self._broker.lease_seconds / 3)
            leases = [(item.row_id, item.owner) for item in self._in_flight.values()]
            if not leases:
                continue
            try:
                await self._broker._call(self._broker._renew, leases)
            except Exception:  # keep renewing: a missed renewal only risks a duplicate delivery
                log.exception("broker.lease_renewal_failed", destination=self.destination)

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        if self._runner is not None:
            await self._runner
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        try:
            await self._broker._call(self._broker._release_owned, self._token + ":")
        except (sqlite3.Error, BrokerUnavailable) as exc:
            log.warning("broker.release_failed", destination=self.destination, error=str(exc))
        self._broker._forget(self)
