"""The gateway's own signing key and certificate renewed in place (gateway/signing_renewal.py).

Each test drives a real gateway: it answers a message, the pair behind ``gateway_key`` /
``gateway_cert`` is replaced, and the next receipt is checked with a ``Verifier`` of its own, as a
partner would check it.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.errors import ConfigError
from gateway.partners import PartnerRegistry
from gateway.security.parse import parse_message
from gateway.security.pki import TRADER, Issued, KeyPair, make_ca
from gateway.security.trust import TrustStore, fingerprint
from gateway.security.verify import Verifier
from tests.conftest import RunningGateway, free_port
from tests.e2e.conftest import child_env
from tests.operator.helpers import (
    DEADLINE,
    GATEWAY,
    install,
    new_pair,
    register,
    scrape,
    sha256_of,
    value,
    write_crl,
)


@pytest.fixture
def certs(pki_dir: Path, tmp_path: Path) -> Path:
    """A copy of the dev PKI this test may change."""
    return Path(shutil.copytree(pki_dir, tmp_path / "certs"))


def in_place(certs: Path) -> KeyPair:
    return KeyPair(certs / "gateway" / "key.pem", certs / "gateway" / "cert.pem")


def receipt_signer(certs: Path, receipt: bytes) -> str:
    """The fingerprint of the certificate that signed ``receipt``, which must verify as a partner checks it."""
    verifier = Verifier(TrustStore.load(certs / "trust"), PartnerRegistry.load(certs / "partners.yaml"))
    verified = verifier.verify(parse_message(receipt))
    assert verified.party == GATEWAY
    return fingerprint(verified.signer)


def poller(gw: RunningGateway) -> Callable[[], bool]:
    """One poll of the watcher, as it runs them: the trust and registry check first, then the pair."""
    gw.gateway.start_reloader(interval=3600)  # the tests poll themselves
    trust = gw.gateway.trust_reloader
    assert trust is not None

    def poll() -> bool:
        trust.check()
        return bool(gw.gateway.signer.renew_if_changed())

    return poll


def signing_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"].startswith("signing.")]


async def renewals_counted(gw: RunningGateway) -> tuple[float | None, float | None]:
    """``nsw_signing_renewals_total`` as scraped: (ok, error)."""
    m = await scrape(gw.client)
    return value(m, "nsw_signing_renewals_total", outcome="ok"), value(m, "nsw_signing_renewals_total", outcome="error")


async def receipt_of(gw: RunningGateway, signed: Callable[..., bytes]) -> bytes:
    response = await gw.post(signed("licence.import", sender=TRADER))
    assert response.status == 202
    return bytes(await response.read())


async def test_a_renewed_pair_signs_the_next_receipt_after_sighup(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    gw = await make_gateway(certs_dir=certs)
    reloader = gw.gateway.start_reloader(interval=3600)  # request() is what SIGHUP calls
    old = sha256_of(in_place(certs))
    assert receipt_signer(certs, await receipt_of(gw, signed)) == old

    renewed = new_pair(certs, "next")
    register(certs, renewed)
    install(certs, renewed)
    outcome = reloader.next_outcome()
    with capture_logs() as logs:
        reloader.request()
        await asyncio.wait_for(outcome, DEADLINE)
    renewals = signing_events(logs)
    assert [e["event"] for e in renewals] == ["signing.renewed"]
    assert (renewals[0]["previous"], renewals[0]["fingerprint"]) == (old, sha256_of(renewed))
    assert receipt_signer(certs, await receipt_of(gw, signed)) == sha256_of(renewed)
    assert await renewals_counted(gw) == (1, 0)


async def test_a_new_certificate_beside_the_old_key_waits_for_its_key(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    """A renewal copied one file at a time: the first poll sees half of it and refuses it."""
    gw = await make_gateway(certs_dir=certs)
    poll = poller(gw)
    old = sha256_of(in_place(certs))
    renewed = new_pair(certs, "next")
    register(certs, renewed)
    install(certs, renewed, key=False)
    with capture_logs() as captured:
        assert poll() is False
        assert poll() is False  # not tried again until a file changes
    logs = signing_events(captured)
    assert [e["event"] for e in logs] == ["signing.renewal_rejected"]
    assert "is not the key of the certificate" in logs[0]["error"]
    assert logs[0]["code"] is None
    assert receipt_signer(certs, await receipt_of(gw, signed)) == old

    install(certs, renewed, cert=False)
    assert poll() is True
    assert receipt_signer(certs, await receipt_of(gw, signed)) == sha256_of(renewed)
    assert await renewals_counted(gw) == (1, 1)


async def test_an_unregistered_certificate_is_put_in_force_once_the_registry_binds_it(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    """Peers find a signer by fingerprint: a pair swapped in before its fingerprint is registered would
    sign receipts nobody accepts. It waits, and the registry edit itself makes it be tried again."""
    gw = await make_gateway(certs_dir=certs)
    reloader = gw.gateway.start_reloader(interval=3600)
    old = sha256_of(in_place(certs))
    renewed = new_pair(certs, "next")
    install(certs, renewed)
    with capture_logs() as captured:
        assert gw.gateway.signer.renew_if_changed() is False
    logs = signing_events(captured)
    assert [(e["event"], e["code"]) for e in logs] == [("signing.renewal_rejected", "SENDER_MISMATCH")]
    assert sha256_of(renewed) in logs[0]["error"]
    assert receipt_signer(certs, await receipt_of(gw, signed)) == old

    register(certs, renewed)
    outcome = reloader.next_outcome()
    reloader.request()  # the trust reload reads the registry first, then the pair is probed against it
    await asyncio.wait_for(outcome, DEADLINE)
    assert receipt_signer(certs, await receipt_of(gw, signed)) == sha256_of(renewed)


def rogue_ca() -> Issued:
    now = datetime.now(UTC)
    return make_ca("Rogue Root", "VN", not_before=now - timedelta(days=1), not_after=now + timedelta(days=30))


# fault -> (the new pair, the party its certificate is registered to, the code, a piece of the detail)
REFUSALS: dict[str, tuple[Callable[[Path], KeyPair], str, str, str]] = {
    "expired": (
        lambda certs: new_pair(certs, "old", lifetime=(timedelta(days=-30), timedelta(days=-1))),
        GATEWAY,
        "CERT_EXPIRED",
        "expired",
    ),
    "not yet valid": (
        lambda certs: new_pair(certs, "early", lifetime=(timedelta(days=2), timedelta(days=30))),
        GATEWAY,
        "CERT_EXPIRED",
        "not valid before",
    ),
    "no chain to an anchor": (
        lambda certs: new_pair(certs, "rogue", issuer=rogue_ca()),
        GATEWAY,
        "CERT_UNTRUSTED",
        "Rogue Root",
    ),
    "registered to another party": (
        lambda certs: new_pair(certs, "moit"),
        "VN-MOIT",
        "SENDER_MISMATCH",
        "is signed by VN-MOIT but its From/identity is VN-NSW",
    ),
}


@pytest.mark.parametrize("fault", list(REFUSALS))
async def test_a_pair_that_would_not_verify_is_refused_with_its_code(
    fault: str, make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    make, registered_to, code, detail = REFUSALS[fault]
    gw = await make_gateway(certs_dir=certs)
    poll = poller(gw)
    old = sha256_of(in_place(certs))
    pair = make(certs)
    register(certs, pair, registered_to)
    install(certs, pair)
    with capture_logs() as captured:
        assert poll() is False
    logs = signing_events(captured)
    assert [(e["event"], e["code"]) for e in logs] == [("signing.renewal_rejected", code)]
    assert detail in logs[0]["error"]
    assert receipt_signer(certs, await receipt_of(gw, signed)) == old


async def test_a_revoked_certificate_is_refused(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    gw = await make_gateway(certs_dir=certs)
    old = sha256_of(in_place(certs))
    poll = poller(gw)
    pair = new_pair(certs, "revoked")
    register(certs, pair)
    fresh = datetime.now(UTC) - timedelta(minutes=1)
    write_crl(certs, this_update=fresh, lifetime=timedelta(days=1), revoked=[pair.cert])
    install(certs, pair)
    with capture_logs() as captured:
        assert poll() is False  # the CRL and the registry are read first, in the same poll
    logs = signing_events(captured)
    assert [(e["event"], e["code"]) for e in logs] == [("signing.renewal_rejected", "CERT_REVOKED")]
    assert receipt_signer(certs, await receipt_of(gw, signed)) == old


async def test_revoking_the_pair_in_force_is_warned_of(make_gateway: Callable[..., Any], certs: Path) -> None:
    """A CRL listing the gateway's own certificate: nothing to renew to, but every receipt it signs from
    now on is refused by partners sharing that trust, and the operator is told at the poll."""
    gw = await make_gateway(certs_dir=certs)
    poll = poller(gw)
    with capture_logs() as captured:
        assert poll() is False
    assert signing_events(captured) == []  # a poll with nothing changed says nothing
    fresh = datetime.now(UTC) - timedelta(minutes=1)
    write_crl(certs, this_update=fresh, lifetime=timedelta(days=1), revoked=[in_place(certs).cert])
    with capture_logs() as captured:
        assert poll() is False
        assert poll() is False  # said once per change
    logs = signing_events(captured)
    assert [(e["event"], e["code"]) for e in logs] == [("signing.unverifiable", "CERT_REVOKED")]
    assert logs[0]["fingerprint"] == sha256_of(in_place(certs))


async def test_files_that_do_not_load_are_refused(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    gw = await make_gateway(certs_dir=certs)
    old = sha256_of(in_place(certs))
    (certs / "gateway" / "cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")  # a truncated copy
    with capture_logs() as captured:
        assert gw.gateway.signer.renew_if_changed() is False
    logs = signing_events(captured)
    assert [(e["event"], e["code"]) for e in logs] == [("signing.renewal_rejected", None)]
    assert "do not load" in logs[0]["error"]
    assert receipt_signer(certs, await receipt_of(gw, signed)) == old


async def test_a_gateway_does_not_start_with_a_key_that_is_not_its_certificates(
    make_gateway: Callable[..., Any], certs: Path
) -> None:
    install(certs, new_pair(certs, "next"), cert=False)
    with pytest.raises(ConfigError, match="is not the key of its certificate"):
        await make_gateway(certs_dir=certs)


async def test_a_gateway_whose_pair_does_not_verify_here_starts_and_says_so(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    """As before renewal existed: an unregistered pair starts (a registry may not list its own gateway)."""
    pair = new_pair(certs, "unregistered")
    install(certs, pair)
    with capture_logs() as logs:
        gw = await make_gateway(certs_dir=certs)
    warnings = [e for e in logs if e["event"] == "signing.unverifiable"]
    assert [(e["code"], e["fingerprint"]) for e in warnings] == [("SENDER_MISMATCH", sha256_of(pair))]
    response = await gw.post(signed("licence.import", sender=TRADER))
    assert response.status == 202


async def test_nswgw_serve_processes_sign_with_the_renewed_pair_after_sighup(
    certs: Path, signed: Callable[..., bytes], tmp_path: Path
) -> None:
    """The wiring: `nswgw serve --processes 2`, the pair replaced, SIGHUP to the supervisor; every child
    signs with the new pair, with no restart."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/messages"
    log = tmp_path / "serve.log"
    args = ["serve", "--certs", certs, "--data", tmp_path / "var", "--port", port, "--processes", 2]
    with log.open("wb") as out:
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            *map(str, args),
            env=child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession() as session:

            async def signer_of_next_receipt() -> str:
                body = signed("licence.import", sender=TRADER)
                async with session.post(url, data=body, headers={"Content-Type": "application/xml"}) as answer:
                    assert answer.status == 202, await answer.text()
                    return receipt_signer(certs, await answer.read())

            old = sha256_of(in_place(certs))
            await until_answering(signer_of_next_receipt)
            renewed = new_pair(certs, "next")
            register(certs, renewed)
            install(certs, renewed)
            server.send_signal(signal.SIGHUP)
            async with asyncio.timeout(DEADLINE):
                while True:  # the connections are spread over both children: 12 in a row from the new pair
                    seen = [await signer_of_next_receipt() for _ in range(12)]
                    if set(seen) == {sha256_of(renewed)}:
                        break
                    assert set(seen) <= {old, sha256_of(renewed)}
                    await asyncio.sleep(0.2)
        assert server.returncode is None  # the same processes: nothing restarted
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), DEADLINE)
    assert log.read_text().count("signing.renewed") == 2  # once in each child


async def until_answering(answer: Callable[[], Any]) -> None:
    async with asyncio.timeout(DEADLINE):
        while True:
            try:
                await answer()
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
            else:
                return
