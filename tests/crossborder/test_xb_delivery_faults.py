"""What can go wrong between the two gateways: TH down, TH's receipt lost, the envelope tampered with.

A retried forward is the same bytes with the same Idempotency-Key, so TH takes it once and answers a
retry with its original receipt; a signed rejection from TH dead-letters the delivery at VN with TH's code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.crossborder_demo import client_tls, issue_form_d, post, wait_for_destination
from gateway.ingress import create_app
from gateway.model import State
from tests.crossborder.conftest import CrossBorder, PairDirs
from tests.crossborder.peers import Relay


async def issue(pair: CrossBorder) -> str:
    form_d = issue_form_d(pair.dirs.signer("VN-MOIT"))
    status, answer, headers = await post(pair.vn.url, form_d, client_tls(pair.dirs.vn, pair.dirs.party("VN-MOIT")))
    assert status == 202, answer[:600]
    return headers["X-NSW-Message-Id"]


@pytest.fixture
async def relay(dirs: PairDirs) -> AsyncIterator[Callable[..., Awaitable[Relay]]]:
    started: list[Relay] = []

    async def start(**options: Any) -> Relay:
        relay = Relay(dirs.th, dirs.vn, **options)
        await relay.start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        await relay.stop()


async def test_th_down_then_up_is_delivered_once_with_the_same_idempotency_key(
    cross_border: Callable[..., Awaitable[CrossBorder]],
) -> None:
    pair = await cross_border(th_serving=False)
    eco_id = await issue(pair)
    waiting = await wait_for_destination(pair.vn.gateway.ledger, eco_id, "asw:TH", states=frozenset({State.RETRY_WAIT}))
    assert waiting.code == "CONNECT"  # TH's port refuses connections

    keys: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        keys.append(request.headers.get("Idempotency-Key", ""))
        return await handler(request)

    app = create_app(pair.th.gateway)  # TH's ingress, as Node.serve makes it, plus a recorder
    app.middlewares.append(record)
    pair.th.runner = web.AppRunner(app, access_log=None)
    await pair.th.runner.setup()
    await web.SockSite(pair.th.runner, pair.th.sock, ssl_context=pair.th.tls).start()

    delivered = await wait_for_destination(pair.vn.gateway.ledger, eco_id, "asw:TH")
    assert delivered.state is State.DELIVERED, delivered.detail
    assert delivered.attempt >= 2
    assert set(keys) == {f"{eco_id}:asw:TH"}
    assert len(await pair.th_agencies.wait_for("customs")) == 1
    assert (await wait_for_destination(pair.th.gateway.ledger, eco_id, "customs")).state is State.DELIVERED
    assert len(pair.th_agencies.received["customs"]) == 1


async def test_a_lost_receipt_is_answered_again_with_the_original_for_the_identical_retry(
    cross_border: Callable[..., Awaitable[CrossBorder]], relay: Callable[..., Awaitable[Relay]]
) -> None:
    lossy = await relay(lose=1)
    pair = await cross_border(vn_sees_th_at=lossy.url)
    lossy.upstream = pair.th.url
    eco_id = await issue(pair)

    delivered = await wait_for_destination(pair.vn.gateway.ledger, eco_id, "asw:TH")
    assert delivered.state is State.DELIVERED, delivered.detail
    first, second = lossy.seen[:2]
    assert first.lost
    assert not first.replayed
    assert second.replayed
    assert second.body == first.body  # the retried forward is the very same bytes ...
    assert second.idempotency_key == first.idempotency_key == f"{eco_id}:asw:TH"  # ... under the same key
    assert second.answer == first.answer  # TH's original receipt, now the proof at VN
    assert pair.vn.proofs.get(eco_id, "asw:TH") == first.answer
    trail = [(r.event, r.code) for r in await pair.vn.gateway.ledger.trace(eco_id) if r.destination == "asw:TH"]
    assert ("RETRY_WAIT", "PEER_ANSWER_INVALID") in trail
    await wait_for_destination(pair.th.gateway.ledger, eco_id, "customs")
    assert len(pair.th_agencies.received["customs"]) == 1


async def test_an_envelope_tampered_between_the_gateways_is_rejected_by_th_and_dead_lettered_at_vn(
    cross_border: Callable[..., Awaitable[CrossBorder]], relay: Callable[..., Awaitable[Relay]]
) -> None:
    tamperer = await relay(tamper=lambda body: body.replace(b"<hsCode>081090</hsCode>", b"<hsCode>081091</hsCode>"))
    pair = await cross_border(vn_sees_th_at=tamperer.url)
    tamperer.upstream = pair.th.url
    eco_id = await issue(pair)

    dead = await wait_for_destination(pair.vn.gateway.ledger, eco_id, "asw:TH")
    assert dead.state is State.DEAD
    assert dead.code == "SIGNATURE_INVALID"  # TH's code, from TH's signed rejection
    assert "rejected by TH-NSW" in dead.detail
    (seen,) = tamperer.seen
    assert seen.status == 401
    letters = [r for r in await pair.vn.gateway.broker.list_dead() if r.delivery.message_id == eco_id]
    assert [(r.delivery.destination, r.code) for r in letters] == [("asw:TH", "SIGNATURE_INVALID")]
    assert pair.vn.proofs.get(eco_id, "asw:TH") is None
    assert [(r.event, r.code) for r in await pair.th.gateway.ledger.trace(eco_id)] == [
        ("REJECTED", "SIGNATURE_INVALID")
    ]
    assert pair.th_agencies.received["customs"] == []
