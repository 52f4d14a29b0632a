"""The delivery worker against real aiohttp agencies on loopback, through the real HttpAdapter.

Each test runs on two brokers: ``MemoryBroker`` below (a faithful in-memory implementation of the
Broker Protocol that also remembers every outcome) and the embedded SQLite broker. Waiting is on
recorded events, never on sleeps; the only timeouts are guards against a hung test.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from adapters.base import Adapter, DeliveryReceipt
from adapters.held import removed_destination_adapter
from adapters.http import HttpAdapter
from gateway.brokers.base import (
    Ack,
    DeadLetter,
    DeadLetterRecord,
    Handler,
    Outcome,
    Retry,
)
from gateway.brokers.embedded import EmbeddedBroker
from gateway.errors import BrokerUnavailable, ConfigError
from gateway.events import Event, ListRecorder, Recorder
from gateway.model import Delivery, State
from gateway.policy import BreakerPolicy, RetryPolicy
from gateway.stores.sqlite import SqliteLedger
from gateway.worker import Worker

GUARD = 15.0  # seconds: only to turn a hang into a failure, never part of an assertion
LONG = 4 * GUARD  # announce_after that no attempt in these tests reaches
TIERS = (0.05, 0.1, 0.2)
QUICK = RetryPolicy(in_process_attempts=1, in_process_wait=0.01, tiers=TIERS, max_attempts=10)
STEADY = BreakerPolicy(failure_threshold=100, reset_after=60.0)


# -- an in-memory broker ------------------------------------------------------------------------


class MemorySubscription:
    def __init__(self, broker: MemoryBroker, destination: str, handler: Handler, prefetch: int) -> None:
        self._broker = broker
        self._queue = broker.queue(destination)
        self._handler = handler
        self._slots = asyncio.Semaphore(prefetch)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            delivery = await self._queue.get()
            task = asyncio.create_task(self._handle(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, delivery: Delivery) -> None:
        outcome: Outcome | None = None
        try:
            outcome = await self._handler(delivery)
        except Exception as exc:
            self._broker.handler_errors.append((delivery, exc))
        finally:
            self._slots.release()
        self._broker.settle(delivery, outcome)

    async def stop(self) -> None:
        self._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner
        await asyncio.gather(*self._tasks)


class MemoryBroker:
    """The Broker Protocol in memory: exact retry delays, redelivery when a handler raises."""

    name = "memory"

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[Delivery]] = defaultdict(asyncio.Queue)
        self._timers: set[asyncio.TimerHandle] = set()
        self.declared: set[str] = set()
        self.outcomes: list[tuple[Delivery, Outcome]] = []
        self.handler_errors: list[tuple[Delivery, Exception]] = []
        self.dead: list[DeadLetterRecord] = []

    def queue(self, destination: str) -> asyncio.Queue[Delivery]:
        return self._queues[destination]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()

    async def ready(self) -> bool:
        return True

    async def declare(self, destinations: Sequence[str]) -> None:
        self.declared.update(destinations)

    async def publish(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            self._queues[d.destination].put_nowait(d)

    async def consume(self, destination: str, handler: Handler, *, prefetch: int = 16) -> MemorySubscription:
        return MemorySubscription(self, destination, handler, prefetch)

    def settle(self, delivery: Delivery, outcome: Outcome | None) -> None:
        queue = self._queues[delivery.destination]
        if outcome is None:  # the handler raised: it comes back, as after a lease expiry
            queue.put_nowait(delivery)
            return
        self.outcomes.append((delivery, outcome))
        match outcome:
            case Retry(delay=delay, count_attempt=counted):
                again = replace(delivery, attempt=delivery.attempt + (1 if counted else 0))
                timer = asyncio.get_running_loop().call_later(delay, queue.put_nowait, again)
                self._timers.add(timer)
            case DeadLetter(code=code, reason=reason):
                self.dead.append(DeadLetterRecord(delivery, code, reason, time.time()))
            case Ack():
                pass

    async def list_dead(self, destination: str | None = None) -> list[DeadLetterRecord]:
        return [r for r in self.dead if destination in (None, r.delivery.destination)]

    async def replay_dead(self, destination: str | None = None, message_id: str | None = None) -> int:
        chosen = [
            r
            for r in self.dead
            if destination in (None, r.delivery.destination) and message_id in (None, r.delivery.message_id)
        ]
        for record in chosen:
            self.dead.remove(record)
            await self.publish([replace(record.delivery, attempt=1)])
        return len(chosen)


# -- a recorder that can be waited on (and made to fail) ------------------------------------------


class WatchingRecorder(ListRecorder):
    """Keeps every event, and every write as the list of its states (``writes``); ``inner`` (a real
    ledger) records them too. ``fail`` makes a write fail, all or none, as a ledger's would."""

    def __init__(self, inner: Recorder | None = None) -> None:
        super().__init__()
        self._changed = asyncio.Condition()
        self.inner = inner
        self.writes: list[list[State]] = []
        self.failed: list[list[Event]] = []
        self.fail: Callable[[Event], bool] = lambda e: False
        self.after: Callable[[Event], Awaitable[None]] | None = None

    async def record(self, events: Sequence[Event]) -> None:
        if any(self.fail(event) for event in events):
            self.failed.append(list(events))
            async with self._changed:
                self._changed.notify_all()
            raise BrokerUnavailable("status store down (test)")
        if self.inner is not None:
            await self.inner.record(events)
        await super().record(events)
        self.writes.append([e.state for e in events])
        if self.after is not None:
            for event in events:
                await self.after(event)
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[list[Event]], bool]) -> None:
        async with asyncio.timeout(GUARD), self._changed:
            await self._changed.wait_for(lambda: predicate(self.events))

    async def wait_failed(self) -> None:
        async with asyncio.timeout(GUARD), self._changed:
            await self._changed.wait_for(lambda: bool(self.failed))

    async def wait_state(self, message_id: str, state: State, count: int = 1) -> None:
        await self.wait_for(lambda events: len(self.of(message_id, state)) >= count)

    def of(self, message_id: str, state: State | None = None) -> list[Event]:
        return [e for e in self.events if e.message_id == message_id and state in (None, e.state)]

    def states(self, message_id: str) -> list[State]:
        return [e.state for e in self.of(message_id)]


# -- agencies: real aiohttp servers on 127.0.0.1 ---------------------------------------------------


@dataclass
class Agency:
    """Answers with ``statuses`` in turn, then ``default``; holds every request while ``gate`` is shut."""

    statuses: list[int] = field(default_factory=list)
    default: int = 200
    gate: asyncio.Event | None = None
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/inbox"

    async def inbox(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests.append(dict(request.headers))
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        status = self.statuses.pop(0) if self.statuses else self.default
        return web.Response(status=status, text=f"agency says {status}", headers=self.headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/inbox", self.inbox)
        self.server = TestServer(app, host="127.0.0.1", port=self.port)
        await self.server.start_server()
        self.port = self.server.port

    async def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        if self.server is not None:
            await self.server.close()

    def keys(self) -> list[str]:
        return [r["Idempotency-Key"] for r in self.requests]


# -- assembling a worker -------------------------------------------------------------------------


@dataclass
class Rig:
    broker: Any
    recorder: WatchingRecorder
    agencies: dict[str, Agency]
    workers: list[Worker]
    breaker_clock: list[float]

    def worker(
        self,
        policies: dict[str, tuple[RetryPolicy, BreakerPolicy]] | None = None,
        adapters: dict[str, Adapter] | None = None,
        **kwargs: Any,
    ) -> Worker:
        adapters = adapters or {name: HttpAdapter(name, a.url) for name, a in self.agencies.items()}
        policies = policies or dict.fromkeys(adapters, (QUICK, STEADY))
        w = Worker(
            self.broker, adapters, policies, self.recorder, breaker_clock=lambda: self.breaker_clock[0], **kwargs
        )
        self.workers.append(w)
        return w

    async def agency(self, name: str, agency: Agency | None = None, *, started: bool = True) -> Agency:
        agency = agency or Agency()
        if started:
            await agency.start()
        else:  # a port nobody listens on yet: the agency is down
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                agency.port = s.getsockname()[1]
        self.agencies[name] = agency
        return agency

    async def send(self, destination: str, message_id: str | None = None) -> Delivery:
        payload = f"<Envelope><messageId>{message_id}</messageId></Envelope>".encode()
        d = Delivery(
            message_id=message_id or f"m-{next(_ids)}",
            sender="VN-MOIT",
            destination=destination,
            document_type="licence.import",
            payload=payload,
            digest=hashlib.sha256(payload).hexdigest(),
            first_enqueued_at=time.time(),
        )
        await self.broker.publish([d])
        return d


_ids = itertools.count(1)


@contextlib.asynccontextmanager
async def open_rig(broker: Any, recorder: WatchingRecorder | None = None) -> AsyncIterator[Rig]:
    await broker.start()
    r = Rig(broker, recorder or WatchingRecorder(), {}, [], [0.0])
    try:
        yield r
    finally:
        for agency in r.agencies.values():  # release hanging requests so in-flight deliveries can end
            if agency.gate is not None:
                agency.gate.set()
        for w in r.workers:
            await w.stop()
        for agency in r.agencies.values():
            await agency.close()
        await broker.close()


@pytest.fixture(params=["memory", "embedded"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    if request.param == "memory":
        broker: Any = MemoryBroker()
    else:
        broker = EmbeddedBroker(tmp_path / "queue.sqlite3", poll_interval=0.01, synchronous="OFF")
    async with open_rig(broker) as r:
        yield r


@pytest.fixture
async def memory_rig() -> AsyncIterator[Rig]:
    """For tests that inspect the outcomes the broker was handed (only the in-memory one keeps them)."""
    async with open_rig(MemoryBroker()) as r:
        yield r


# -- the tests -----------------------------------------------------------------------------------


async def test_agency_down_then_up_delivers_once(rig: Rig) -> None:
    agency = await rig.agency("moit", started=False)

    async def come_up_after_two_failures(event: Event) -> None:
        if (
            event.state is State.RETRY_WAIT
            and len([e for e in rig.recorder.events if e.state is State.RETRY_WAIT]) == 2
        ):
            await agency.start()  # before the worker hands the delivery back: the third attempt finds it up

    rig.recorder.after = come_up_after_two_failures
    await rig.worker().start()
    d = await rig.send("moit")
    await rig.recorder.wait_state(d.message_id, State.DELIVERED)
    assert rig.recorder.states(d.message_id) == [
        State.DELIVERING, State.RETRY_WAIT, State.DELIVERING, State.RETRY_WAIT, State.DELIVERING, State.DELIVERED,
    ]  # fmt: skip
    assert [e.code for e in rig.recorder.of(d.message_id, State.RETRY_WAIT)] == ["CONNECT", "CONNECT"]
    assert [e.attempt for e in rig.recorder.of(d.message_id)] == [1, 1, 2, 2, 3, 3]
    assert agency.keys() == [f"{d.message_id}:moit"]
    assert agency.requests[0]["X-NSW-Attempt"] == "3"


async def test_every_attempt_carries_the_same_idempotency_key(rig: Rig) -> None:
    agency = await rig.agency("moit", Agency(statuses=[503, 502]))
    await rig.worker().start()
    d = await rig.send("moit")
    await rig.recorder.wait_state(d.message_id, State.DELIVERED)
    assert agency.keys() == [d.idempotency_key] * 3
    assert [r["X-NSW-Attempt"] for r in agency.requests] == ["1", "2", "3"]
    assert [e.code for e in rig.recorder.of(d.message_id, State.RETRY_WAIT)] == ["HTTP_503", "HTTP_502"]
    delivered = rig.recorder.of(d.message_id, State.DELIVERED)
    assert [(e.detail, e.party, e.digest) for e in delivered] == [("agency says 200", "VN-MOIT", d.digest)]


async def test_in_process_retries_hide_short_blips(rig: Rig) -> None:
    agency = await rig.agency("moit", Agency(statuses=[503, 503]))
    patient = replace(QUICK, in_process_attempts=3)
    await rig.worker({"moit": (patient, STEADY)}).start()
    d = await rig.send("moit")
    await rig.recorder.wait_state(d.message_id, State.DELIVERED)
    assert rig.recorder.states(d.message_id) == [State.DELIVERING, State.DELIVERED]
    assert [r["X-NSW-Attempt"] for r in agency.requests] == ["1", "1", "1"]


async def test_refused_content_is_dead_at_once(rig: Rig) -> None:
    agency = await rig.agency("moit", Agency(default=400))
    await rig.worker().start()
    d = await rig.send("moit")
    await rig.recorder.wait_state(d.message_id, State.DEAD)
    assert rig.recorder.states(d.message_id) == [State.DELIVERING, State.DEAD]
    (dead,) = rig.recorder.of(d.message_id, State.DEAD)
    assert dead.code == "HTTP_400"
    assert "agency says 400" in dead.detail
    assert len(agency.requests) == 1
    await rig.workers[0].stop()  # waits for in-flight deliveries, so the broker has settled them
    records = await rig.broker.list_dead("moit")
    assert [(r.delivery.message_id, r.code) for r in records] == [(d.message_id, "HTTP_400")]


async def test_a_hanging_agency_does_not_delay_another(rig: Rig) -> None:
    hanging = await rig.agency("slow", Agency(gate=asyncio.Event()))
    healthy = await rig.agency("fast")
    await rig.worker(prefetch=2).start()
    stuck = [await rig.send("slow") for _ in range(3)]  # more than the slow lane can hold in flight
    await hanging.arrived.wait()
    quick = [await rig.send("fast") for _ in range(3)]
    for d in quick:
        await rig.recorder.wait_state(d.message_id, State.DELIVERED)
    assert all(State.DELIVERED not in rig.recorder.states(d.message_id) for d in stuck)
    assert hanging.gate is not None
    hanging.gate.set()
    for d in stuck:
        await rig.recorder.wait_state(d.message_id, State.DELIVERED)
    order = [e.message_id for e in rig.recorder.events if e.state is State.DELIVERED]
    assert set(order[:3]) == {d.message_id for d in quick}
    assert set(order[3:]) == {d.message_id for d in stuck}
    assert len(healthy.requests) == 3


async def test_open_circuit_holds_deliveries_until_a_probe_succeeds(rig: Rig) -> None:
    agency = await rig.agency("moit", Agency(default=503))
    breaker = BreakerPolicy(failure_threshold=2, reset_after=0.05)  # also the delay while open (real seconds)
    worker = rig.worker({"moit": (QUICK, breaker)})
    await worker.start()
    first = await rig.send("moit")
    await rig.recorder.wait_for(lambda _: _codes(rig, first)[:3] == ["HTTP_503", "HTTP_503", "CIRCUIT_OPEN"])
    assert worker.breaker_states() == {"moit": "open"}
    second = await rig.send("moit")
    await rig.recorder.wait_for(lambda _: "CIRCUIT_OPEN" in _codes(rig, second))
    await rig.recorder.wait_for(lambda _: _codes(rig, first).count("CIRCUIT_OPEN") >= 3)  # it keeps waiting...
    assert len(agency.requests) == 2  # ... without touching the agency
    assert State.DELIVERING not in rig.recorder.states(second.message_id)

    agency.default = 200
    rig.breaker_clock[0] += 0.05  # reset_after has passed: the next delivery is the probe
    for d in (first, second):
        await rig.recorder.wait_state(d.message_id, State.DELIVERED)
    assert len(agency.requests) == 4  # two failures, the probe, the other one
    assert worker.breaker_states() == {"moit": "closed"}
    (delivered,) = rig.recorder.of(first.message_id, State.DELIVERED)
    assert delivered.attempt == 3  # waiting on an open circuit does not spend the retry budget


async def test_reconfigure_resets_the_breaker_only_for_a_new_adapter_or_breaker_policy(rig: Rig) -> None:
    agency = await rig.agency("moit", Agency(default=503))
    tripping = BreakerPolicy(failure_threshold=1, reset_after=0.05)  # also the delay while open (real seconds)
    worker = rig.worker({"moit": (QUICK, tripping)})
    await worker.start()
    first = await rig.send("moit")
    await rig.recorder.wait_for(lambda _: "CIRCUIT_OPEN" in _codes(rig, first))
    assert worker.breaker_states() == {"moit": "open"}

    patient = replace(QUICK, max_attempts=20)
    worker.reconfigure("moit", None, patient, tripping)  # a retry policy alone: the same endpoint, same breaker
    assert worker.breaker_states() == {"moit": "open"}

    worker.reconfigure("moit", None, patient, STEADY)  # a new breaker policy starts closed
    assert worker.breaker_states() == {"moit": "closed"}
    agency.default = 200  # ``first`` comes back from its wait on the open circuit; the new breaker lets it through
    await rig.recorder.wait_state(first.message_id, State.DELIVERED)

    agency.default = 503
    second = await rig.send("moit")
    worker.reconfigure("moit", None, patient, tripping)
    await rig.recorder.wait_for(lambda _: "CIRCUIT_OPEN" in _codes(rig, second))
    moved = await rig.agency("moit-new")
    worker.reconfigure("moit", HttpAdapter("moit", moved.url), patient, tripping)  # another endpoint: closed
    assert worker.breaker_states() == {"moit": "closed"}
    await rig.recorder.wait_state(second.message_id, State.DELIVERED)
    assert [r["Idempotency-Key"] for r in moved.requests] == [f"{second.message_id}:moit"]
    with pytest.raises(ConfigError, match="no adapter for destination 'customs'"):
        worker.reconfigure("customs", None, QUICK, STEADY)


async def test_a_held_lane_keeps_each_copys_reason_and_never_trips_the_breaker(rig: Rig) -> None:
    # A lane whose adapter sends nothing (adapters.held): no receiver was tried, so no breaker verdict.
    tripping = BreakerPolicy(failure_threshold=1, reset_after=60.0)
    worker = rig.worker(
        {"gone": (replace(QUICK, max_attempts=3), tripping)}, {"gone": removed_destination_adapter("gone")}
    )
    await worker.start()
    copies = [await rig.send("gone") for _ in range(4)]
    for d in copies:
        await rig.recorder.wait_state(d.message_id, State.DEAD)
        assert _codes(rig, d) == ["DESTINATION_REMOVED"] * 2  # never CIRCUIT_OPEN
        (dead,) = rig.recorder.of(d.message_id, State.DEAD)
        assert dead.code == "DESTINATION_REMOVED"
        assert "'gone' is not in the routing rules in force: not sent" in dead.detail
    assert worker.breaker_states() == {"gone": "closed"}


async def test_exhausted_budget_is_dead(rig: Rig) -> None:
    agency = await rig.agency("moit", Agency(default=503))
    short = replace(QUICK, max_attempts=3)
    await rig.worker({"moit": (short, STEADY)}).start()
    d = await rig.send("moit")
    await rig.recorder.wait_state(d.message_id, State.DEAD)
    assert rig.recorder.states(d.message_id) == [
        State.DELIVERING, State.RETRY_WAIT, State.DELIVERING, State.RETRY_WAIT, State.DELIVERING, State.DEAD,
    ]  # fmt: skip
    (dead,) = rig.recorder.of(d.message_id, State.DEAD)
    assert dead.code == "HTTP_503"
    assert dead.detail.startswith("retry budget exhausted after 3 attempts")
    assert len(agency.requests) == 3


async def test_old_messages_are_dead_even_with_attempts_left(rig: Rig) -> None:
    await rig.agency("moit", Agency(default=503))
    await rig.worker({"moit": (replace(QUICK, max_age=3600.0), STEADY)}, clock=lambda: time.time() + 7200).start()
    d = await rig.send("moit")
    await rig.recorder.wait_state(d.message_id, State.DEAD)
    assert rig.recorder.states(d.message_id) == [State.DELIVERING, State.DEAD]


async def test_recorder_failure_means_not_acked(rig: Rig) -> None:
    agency = await rig.agency("moit")
    rig.recorder.fail = lambda e: e.state is State.DELIVERED and not rig.recorder.failed
    await rig.worker(announce_after=LONG).start()
    d = await rig.send("moit")
    await rig.recorder.wait_state(d.message_id, State.DELIVERED)
    # Taken by the agency, but its attempt and outcome were not recorded (one write, all or none):
    # the broker redelivered, the agency dedupes by key, the audit shows the attempt that counted.
    assert agency.keys() == [d.idempotency_key] * 2
    assert [[e.state for e in write] for write in rig.recorder.failed] == [[State.DELIVERING, State.DELIVERED]]
    assert rig.recorder.states(d.message_id) == [State.DELIVERING, State.DELIVERED]
    assert [e.attempt for e in rig.recorder.of(d.message_id)] == [1, 1]


async def test_a_quick_attempt_is_recorded_with_its_outcome_in_one_write(rig: Rig) -> None:
    await rig.agency("moit", Agency(statuses=[503], default=400))
    await rig.agency("customs")
    await rig.worker(announce_after=LONG).start()
    refused, delivered = await rig.send("moit"), await rig.send("customs")
    await rig.recorder.wait_state(refused.message_id, State.DEAD)
    await rig.recorder.wait_state(delivered.message_id, State.DELIVERED)
    assert sorted(rig.recorder.writes) == sorted(
        [[State.DELIVERING, State.RETRY_WAIT], [State.DELIVERING, State.DEAD], [State.DELIVERING, State.DELIVERED]]
    )
    started, done = rig.recorder.of(delivered.message_id)
    assert started.at <= done.at  # DELIVERING keeps the time the attempt started


async def test_a_slow_attempt_is_announced_before_its_outcome(rig: Rig) -> None:
    agency = await rig.agency("moit", Agency(gate=asyncio.Event()))
    await rig.worker(announce_after=0.01).start()
    d = await rig.send("moit")
    await rig.recorder.wait_state(d.message_id, State.DELIVERING)
    assert rig.recorder.writes == [[State.DELIVERING]]  # recorded while the agency still holds the request
    assert len(agency.requests) == 1
    assert agency.gate is not None
    agency.gate.set()
    await rig.recorder.wait_state(d.message_id, State.DELIVERED)
    assert rig.recorder.writes == [[State.DELIVERING], [State.DELIVERED]]


async def test_a_failed_announcement_means_not_acked(memory_rig: Rig) -> None:
    rig = memory_rig
    agency = await rig.agency("moit", Agency(gate=asyncio.Event()))
    rig.recorder.fail = lambda e: e.state is State.DELIVERING and not rig.recorder.failed
    await rig.worker(announce_after=0.01).start()
    d = await rig.send("moit")
    await rig.recorder.wait_failed()
    assert agency.gate is not None
    agency.gate.set()  # the attempt succeeds, but it was not audited as started: no ack
    await rig.recorder.wait_state(d.message_id, State.DELIVERED)
    assert [(x.message_id, type(e)) for x, e in rig.broker.handler_errors] == [(d.message_id, BrokerUnavailable)]
    await rig.workers[0].stop()
    assert [type(o) for _, o in rig.broker.outcomes] == [Ack]
    assert agency.keys() == [d.idempotency_key] * 2
    assert rig.recorder.states(d.message_id) == [State.DELIVERING, State.DELIVERED]


async def test_status_and_audit_trace_stay_coherent(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3", synchronous="NORMAL")
    await ledger.open()
    try:
        async with open_rig(MemoryBroker(), WatchingRecorder(ledger)) as rig:
            slow = await rig.agency("slow", Agency(gate=asyncio.Event()))
            await rig.agency("fast", Agency(statuses=[503]))
            quick, held = await rig.send("fast"), await rig.send("slow")
            for d in (quick, held):  # as the ingress leaves them: accepted, queued for their destination
                await ledger.claim(d.message_id, d.sender, d.digest, d.document_type, [])
                await ledger.accept(d.message_id, b"<receipt/>", [d.destination], [])
            await rig.worker(announce_after=0.01).start()
            await rig.recorder.wait_state(held.message_id, State.DELIVERING)
            status = await ledger.status(held.message_id)
            assert status is not None
            assert status.destinations["slow"].state is State.DELIVERING  # while the agency holds it
            assert slow.gate is not None
            slow.gate.set()
            for d in (quick, held):
                await rig.recorder.wait_state(d.message_id, State.DELIVERED)
        expected = {
            quick.message_id: [("DELIVERING", 1), ("RETRY_WAIT", 1), ("DELIVERING", 2), ("DELIVERED", 2)],
            held.message_id: [("DELIVERING", 1), ("DELIVERED", 1)],
        }
        for d in (quick, held):
            trace = await ledger.trace(d.message_id)
            assert [(r.event, r.attempt) for r in trace] == expected[d.message_id]
            assert [r.at for r in trace] == sorted(r.at for r in trace)
            status = await ledger.status(d.message_id)
            assert status is not None
            final = status.destinations[d.destination]
            assert (final.state, final.attempt) == (State.DELIVERED, expected[d.message_id][-1][1])
        assert (await ledger.verify_audit()).ok
    finally:
        await ledger.close()


async def test_retry_after_lengthens_the_delay(memory_rig: Rig) -> None:
    rig = memory_rig
    await rig.agency("moit", Agency(default=429, headers={"Retry-After": "42"}))
    await rig.worker().start()
    d = await rig.send("moit")
    await rig.recorder.wait_state(d.message_id, State.RETRY_WAIT)
    await rig.workers[0].stop()
    ((_, outcome),) = rig.broker.outcomes
    assert isinstance(outcome, Retry)
    assert outcome.delay == 42.0
    assert outcome.count_attempt


async def test_adapter_bug_is_logged_and_retried(rig: Rig) -> None:
    class Buggy:
        name = "moit"
        calls = 0
        closed = False

        async def deliver(self, delivery: Delivery) -> DeliveryReceipt:
            self.calls += 1
            if self.calls == 1:
                raise ZeroDivisionError("division by zero in the adapter")
            return DeliveryReceipt(detail="fine now")

        async def close(self) -> None:
            self.closed = True

    buggy = Buggy()
    worker = rig.worker(adapters={"moit": buggy})
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await worker.start()
        d = await rig.send("moit")
        await rig.recorder.wait_state(d.message_id, State.DELIVERED)
    (retry,) = rig.recorder.of(d.message_id, State.RETRY_WAIT)
    assert retry.code == "ADAPTER_ERROR"
    assert "ZeroDivisionError" in retry.detail
    (error,) = [entry for entry in logs if entry["event"] == "worker.adapter_error"]
    assert error["log_level"] == "error"
    assert error["exc_info"] is True
    assert (error["messageId"], error["destination"], error["party"]) == (d.message_id, "moit", "VN-MOIT")
    delivered = [entry for entry in logs if entry["event"] == "worker.delivered"]
    assert [entry["messageId"] for entry in delivered] == [d.message_id]
    await worker.stop()
    assert buggy.closed


async def test_start_rejects_destinations_without_an_adapter(rig: Rig) -> None:
    await rig.agency("moit")
    with pytest.raises(ConfigError, match="no adapter for destination\\(s\\) 'customs'"):
        await rig.worker().start(["moit", "customs"])


async def test_start_consumes_only_the_chosen_destinations(rig: Rig) -> None:
    await rig.agency("moit")
    other = await rig.agency("customs")
    await rig.worker().start(["moit"])
    held = await rig.send("customs")
    d = await rig.send("moit")
    await rig.recorder.wait_state(d.message_id, State.DELIVERED)
    assert rig.recorder.of(held.message_id) == []
    assert other.requests == []


# -- helpers ------------------------------------------------------------------------------------


def _codes(rig: Rig, d: Delivery) -> list[str | None]:
    return [e.code for e in rig.recorder.of(d.message_id, State.RETRY_WAIT)]
