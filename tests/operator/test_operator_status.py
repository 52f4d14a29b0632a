"""GET /v1/messages/{id}: the sender (signed query or TLS client certificate) and operators read it; nobody
else learns anything. The monotonic rule itself is tested in tests/stores/test_status.py (every
ordering of late and repeated events); here it is checked through HTTP."""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.access import CERT_HEADER, SIGNATURE_HEADER, sign_status_query
from gateway.events import Event
from gateway.ingress import create_app
from gateway.model import State
from gateway.security.sign import load_cert_chain, load_private_key
from gateway.server_tls import ServerTls
from tests.conftest import RunningGateway

TOKEN = "operator-secret-token"
TRADER = "VN-TRADER-0101234567"  # the sample sender of licence.import
OTHER = "VN-MOIT"


def party_files(pki_dir: Path, identity: str) -> tuple[Path, Path]:
    folder = pki_dir / identity if identity.startswith("test/") else pki_dir / "parties" / identity
    return folder / "key.pem", folder / "cert.pem"


def signed_query(pki_dir: Path, identity: str, message_id: str, *, now: float | None = None) -> dict[str, str]:
    key, cert = party_files(pki_dir, identity)
    return sign_status_query(load_private_key(key), load_cert_chain(cert), message_id, now=now)


async def accepted(gw: RunningGateway, signed: Callable[..., bytes]) -> str:
    message_id = str(uuid.uuid4())
    response = await gw.post(signed("licence.import", message_id=message_id))
    assert response.status == 202, await response.text()
    return message_id


async def get_status(gw: RunningGateway, message_id: str, headers: dict[str, str]) -> tuple[int, Any]:
    response = await gw.client.get(f"/v1/messages/{message_id}", headers=headers)
    return response.status, await response.json()


@pytest.fixture
async def gw(make_gateway: Callable[..., Any]) -> RunningGateway:
    return await make_gateway(operator_token=TOKEN)


async def test_the_sender_and_an_operator_read_the_status_another_party_gets_403(
    gw: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    mid = await accepted(gw, signed)

    status, body = await get_status(gw, mid, signed_query(pki_dir, TRADER, mid))
    assert status == 200
    assert body["message_id"] == mid
    assert body["sender"] == TRADER
    assert body["state"] == "ACCEPTED"
    assert body["destinations"]
    assert {d["state"] for d in body["destinations"].values()} == {"QUEUED"}

    status, body = await get_status(gw, mid, {"Authorization": f"Bearer {TOKEN}"})
    assert (status, body["message_id"]) == (200, mid)

    status, body = await get_status(gw, mid, signed_query(pki_dir, OTHER, mid))
    assert status == 403
    assert mid not in str(body)


async def test_unknown_ids_are_404_only_for_operators(gw: RunningGateway, pki_dir: Path) -> None:
    unknown = str(uuid.uuid4())
    assert (await get_status(gw, unknown, {"Authorization": f"Bearer {TOKEN}"}))[0] == 404
    # A party cannot tell "does not exist" from "not yours".
    assert (await get_status(gw, unknown, signed_query(pki_dir, TRADER, unknown)))[0] == 403


async def test_without_valid_credentials_nothing_is_revealed(
    gw: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    mid = await accepted(gw, signed)
    unknown = str(uuid.uuid4())
    stale = time.time() - 3600
    for message_id in (mid, unknown):  # the same answer whether the id exists or not
        assert (await get_status(gw, message_id, {}))[0] == 401
        assert (await get_status(gw, message_id, {"Authorization": "Bearer wrong"}))[0] == 401
        assert (await get_status(gw, message_id, {"Authorization": f"Basic {TOKEN}"}))[0] == 401
        assert (await get_status(gw, message_id, signed_query(pki_dir, TRADER, message_id, now=stale)))[0] == 401
        # not bound to the trader (nor trusted): an untrusted certificate proves nothing
        assert (await get_status(gw, message_id, signed_query(pki_dir, "test/untrusted", message_id)))[0] == 401
        assert (await get_status(gw, message_id, signed_query(pki_dir, "test/revoked", message_id)))[0] == 401

    # A signature is for one message id: reused for another it does not verify.
    reused = signed_query(pki_dir, TRADER, unknown)
    assert (await get_status(gw, mid, reused))[0] == 401
    tampered = signed_query(pki_dir, TRADER, mid)
    tampered[SIGNATURE_HEADER] = tampered[SIGNATURE_HEADER].replace("sig=", "sig=AAAA")
    assert (await get_status(gw, mid, tampered))[0] == 401
    assert (await get_status(gw, mid, {CERT_HEADER: "not base64!", SIGNATURE_HEADER: "t=1, sig=AA=="}))[0] == 401


async def test_the_sender_reads_it_with_a_second_registered_certificate(
    gw: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    mid = await accepted(gw, signed)
    assert (await get_status(gw, mid, signed_query(pki_dir, "test/trader-rollover", mid)))[0] == 200


async def test_operators_are_refused_when_no_token_is_configured(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], pki_dir: Path
) -> None:
    gw = await make_gateway()
    mid = await accepted(gw, signed)
    assert (await get_status(gw, mid, {"Authorization": "Bearer "}))[0] == 401
    assert (await get_status(gw, mid, {"Authorization": "Bearer None"}))[0] == 401
    assert (await get_status(gw, mid, signed_query(pki_dir, TRADER, mid)))[0] == 200


async def test_status_never_regresses_over_http_under_out_of_order_events(
    gw: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    mid = await accepted(gw, signed)
    status, body = await get_status(gw, mid, {"Authorization": f"Bearer {TOKEN}"})
    destination = sorted(body["destinations"])[0]

    def event(state: State, attempt: int, at: float) -> Event:
        return Event(state, mid, destination, party=TRADER, attempt=attempt, at=at)

    now = time.time()
    ledger = gw.gateway.ledger
    await ledger.record([event(State.DELIVERING, 2, now + 3), event(State.DELIVERED, 2, now + 4)])
    # late and repeated events from an earlier attempt, delivered out of order
    await ledger.record([event(State.RETRY_WAIT, 1, now + 2)])
    await ledger.record([event(State.DELIVERING, 1, now + 1)])
    await ledger.record([event(State.DELIVERING, 2, now + 5)])

    status, body = await get_status(gw, mid, signed_query(pki_dir, TRADER, mid))
    assert status == 200
    got = body["destinations"][destination]
    assert (got["state"], got["attempt"]) == ("DELIVERED", 2)
    trace = [r.event for r in await ledger.trace(mid) if r.destination == destination]
    assert trace[-3:] == ["RETRY_WAIT", "DELIVERING", "DELIVERING"]  # audited, yet the status did not move back


# -- mutual TLS ---------------------------------------------------------------------------------------


@pytest.fixture
async def tls_gateway(make_gateway: Callable[..., Any], pki_dir: Path, tmp_path: Path) -> Any:
    """The gateway's app served over mutual TLS on loopback; yields (running gateway, base URL)."""
    client_ca = tmp_path / "client-ca.pem"
    anchors = sorted((pki_dir / "trust" / "anchors").glob("*.pem"))
    client_ca.write_bytes(b"".join(p.read_bytes() for p in anchors))
    gw = await make_gateway(
        operator_token=TOKEN,
        tls_cert=pki_dir / "gateway" / "cert.pem",
        tls_key=pki_dir / "gateway" / "key.pem",
        tls_client_ca=client_ca,
    )
    runner = web.AppRunner(create_app(gw.gateway), access_log=None)
    await runner.setup()
    tls = ServerTls.from_settings(gw.settings)
    assert tls is not None
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield gw, f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def client_context(pki_dir: Path, identity: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki_dir / "trust" / "anchors" / "vn-nsw-dev-root.pem")
    key, cert = party_files(pki_dir, identity)
    context.load_cert_chain(cert, key)
    return context


async def test_over_mutual_tls_the_client_certificate_identifies_the_sender(
    tls_gateway: Any, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    gw, base = tls_gateway
    mid = await accepted(gw, signed)

    async def read_as(identity: str, message_id: str) -> int:
        async with aiohttp.ClientSession() as session:
            url = f"{base}/v1/messages/{message_id}"
            async with session.get(url, ssl=client_context(pki_dir, identity)) as response:
                return response.status

    assert await read_as(TRADER, mid) == 200
    assert await read_as("test/trader-rollover", mid) == 200
    assert await read_as(OTHER, mid) == 403
    assert await read_as(TRADER, str(uuid.uuid4())) == 403
