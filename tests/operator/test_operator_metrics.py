"""Metrics after a scripted run, scraped from /metrics and parsed with prometheus_client's parser.

The run: 3 valid messages (each routed to two loopback agencies: one fails once with 503 then takes
everything, the other refuses everything with 400), 1 identical resubmission, 4 invalid messages.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import structlog
from lxml import etree
from structlog.testing import capture_logs

from gateway.events import Event
from gateway.metrics import start_metrics_server
from gateway.model import State
from gateway.pipeline import INGRESS_STAGES
from gateway.security.sign import to_bytes
from routing.engine import RoutingTable
from tests.conftest import RunningGateway, envelope
from tests.operator.helpers import DEADLINE, Samples, rules, scrape, value
from tests.support.agency import Agency

TRADER = "VN-TRADER-0101234567"
N = 3
TOKEN = "metrics-operator-token"


class Settled:
    """Between the worker and the ledger: lets the test await what the worker has recorded."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    async def record(self, events: Sequence[Event]) -> None:
        await self.inner.record(events)
        self.events.extend(events)
        self._changed.set()

    def count(self, state: State, destination: str) -> int:
        return sum(1 for e in self.events if e.state is state and e.destination == destination)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def invalid_messages(signed: Callable[..., bytes]) -> list[bytes]:
    tampered = etree.fromstring(signed("licence.import"))
    hs = tampered.find(".//{urn:nsw:licence:1}hsCode")
    assert hs is not None
    hs.text = "9999999999"
    return [
        b"<Envelope xmlns='urn:nsw:envelope:1'><Header>",  # MALFORMED_XML, sender unknown
        to_bytes(tampered),  # SIGNATURE_INVALID, claimed by the trader
        to_bytes(envelope("licence.import")),  # SIGNATURE_MISSING, claimed by the trader
        to_bytes(envelope("licence.import", sender="XX-NOBODY")),  # SIGNATURE_MISSING, unregistered sender
    ]


async def scripted_run(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> tuple[RunningGateway, list[str], Agency, Agency]:
    flaky = await agencies(answers=[503])
    refusing = await agencies(default=400)
    routing = RoutingTable.from_mapping(rules({"agency": flaky.url, "refusing": refusing.url}), source="<test>")
    gw = await make_gateway(routing=routing, operator_token=TOKEN)

    ids = [str(uuid.uuid4()) for _ in range(N)]
    bodies = [signed("licence.import", message_id=mid) for mid in ids]
    for body in [*bodies, bodies[0]]:
        response = await gw.post(body)
        assert response.status == 202, await response.text()
    for body in invalid_messages(signed):
        response = await gw.post(body)
        assert response.status in {400, 401}, await response.text()

    spy = Settled(gw.gateway.ledger)
    gw.gateway.ledger = spy
    try:
        await gw.gateway.start_worker()
    finally:
        gw.gateway.ledger = spy.inner
    await spy.wait_for(lambda: spy.count(State.DELIVERED, "agency") == N and spy.count(State.DEAD, "refusing") == N)
    return gw, ids, flaky, refusing


async def test_metrics_count_a_scripted_run_exactly(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    gw, ids, flaky, _refusing = await scripted_run(make_gateway, agencies, signed)
    assert len(flaky.delivered_keys()) == N
    assert [r.status for r in flaky.requests].count(503) == 1

    response = await gw.client.get("/metrics")
    assert response.status == 401  # an operator token is configured: metrics are for operators
    m = await scrape(gw.client, {"Authorization": f"Bearer {TOKEN}"})

    assert value(m, "nsw_messages_received_total") == N + 1 + 4
    assert value(m, "nsw_messages_accepted_total") == N
    assert value(m, "nsw_receipts_replayed_total") == 1
    assert value(m, "nsw_messages_rejected_total", code="MALFORMED_XML") == 1
    assert value(m, "nsw_messages_rejected_total", code="SIGNATURE_INVALID") == 1
    assert value(m, "nsw_messages_rejected_total", code="SIGNATURE_MISSING") == 2
    assert value(m, "nsw_messages_rejected_total", code="UNAVAILABLE") == 0
    assert sum(v for (name, _), v in m.items() if name == "nsw_messages_rejected_total") == 4

    signature = {
        dict(labels)["party"] + "/" + dict(labels)["code"]: v
        for (name, labels), v in m.items()
        if name == "nsw_signature_failures_total"
    }
    assert signature == {
        f"{TRADER}/SIGNATURE_INVALID": 1,
        f"{TRADER}/SIGNATURE_MISSING": 1,
        "unknown/SIGNATURE_MISSING": 1,
    }

    for dest in ("agency", "refusing"):
        assert value(m, "nsw_deliveries_queued_total", destination=dest) == N
        assert value(m, "nsw_deliveries_in_flight", destination=dest) == 0
        assert value(m, "nsw_circuit_breaker_state", destination=dest, state="closed") == 1
        assert value(m, "nsw_circuit_breaker_state", destination=dest, state="open") == 0
    assert value(m, "nsw_delivery_attempts_total", destination="agency") == N + 1
    assert value(m, "nsw_delivery_attempts_total", destination="refusing") == N
    assert value(m, "nsw_messages_delivered_total", destination="agency") == N
    assert value(m, "nsw_messages_delivered_total", destination="refusing") is None
    assert value(m, "nsw_delivery_retries_total", destination="agency", code="HTTP_503") == 1
    assert value(m, "nsw_delivery_retries_total", destination="refusing", code="HTTP_400") is None
    assert value(m, "nsw_dead_letters_total", destination="refusing", code="HTTP_400") == N
    assert value(m, "nsw_dead_letters_total", destination="agency", code="HTTP_503") is None
    assert value(m, "nsw_delivery_duration_seconds_count", destination="agency") == N
    assert value(m, "nsw_delivery_duration_seconds_bucket", destination="agency", le="+Inf") == N
    assert value(m, "nsw_routing_reloads_total", outcome="error") == 0
    for stage in INGRESS_STAGES:  # each accepted message once: not the resubmission, not the rejections
        assert value(m, "nsw_ingress_stage_seconds_count", stage=stage) == N, stage
        assert value(m, "nsw_ingress_stage_seconds_bucket", stage=stage, le="+Inf") == N, stage
    assert (value(m, "nsw_ingress_stage_seconds_sum", stage="verify") or 0) > 0

    gateway_cert = [
        v
        for (name, labels), v in m.items()
        if name == "nsw_certificate_expiry_seconds" and dict(labels)["kind"] == "gateway"
    ]
    assert len(gateway_cert) == 1
    assert 700 * 86400 < gateway_cert[0] < 731 * 86400  # the dev PKI's two-year leaf

    assert_naming(m, ids)


def assert_naming(m: Samples, message_ids: list[str]) -> None:
    names = {name for name, _ in m}
    ours = {n for n in names if not n.startswith(("process_", "python_"))}
    assert all(n.startswith("nsw_") for n in ours), ours
    label_values = {v for _, labels in m for _, v in labels}
    assert not label_values & set(message_ids), "a message id must never be a label"
    assert not any("message" in key for _, labels in m for key, _ in labels)


async def test_a_gateway_without_operator_token_serves_metrics_openly(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    gw = await make_gateway()
    assert (await gw.post(signed("licence.import"))).status == 202
    m = await scrape(gw.client)
    assert value(m, "nsw_messages_accepted_total") == 1
    other = await make_gateway()  # one registry per gateway: nothing leaks between them
    assert value(await scrape(other.client), "nsw_messages_accepted_total") == 0


async def test_a_worker_only_process_exposes_metrics_on_its_own_port(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    gw, _ids, _flaky, _refusing = await scripted_run(make_gateway, agencies, signed)
    runner = await start_metrics_server(gw.gateway.metrics, TOKEN, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            assert (await session.get("/metrics")).status == 401
            m = await scrape(session, {"Authorization": f"Bearer {TOKEN}"})
    finally:
        await runner.cleanup()
    assert value(m, "nsw_messages_delivered_total", destination="agency") == N


async def test_worker_log_lines_carry_message_destination_and_party(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        _gw, ids, _flaky, _refusing = await scripted_run(make_gateway, agencies, signed)
    worker_lines = [e for e in logs if str(e["event"]).startswith("worker.") and e["event"] != "worker.consuming"]
    assert {e["event"] for e in worker_lines} >= {"worker.delivered", "worker.retry", "worker.dead_letter"}
    for line in worker_lines:
        assert line["messageId"] in ids, line
        assert line["destination"] in {"agency", "refusing"}, line
        assert line["party"] == TRADER, line


async def test_metrics_start_at_zero(running: RunningGateway) -> None:
    response = await running.client.get("/metrics")
    assert response.status == 200
    assert "nsw_messages_received_total 0.0" in await response.text()
