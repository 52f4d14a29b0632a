"""Inbound from a peer, through the same pipeline: the peer may send only what the registry allows it,
and a certificate issued abroad is checked against the issuing country's authority where one is named."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.crossborder_demo import client_tls, post, wait_for_destination
from gateway.envelope import NSMAP
from gateway.model import State
from gateway.receipts import RECEIPT_NS
from gateway.samples import ECO_NS, sample_envelope
from gateway.security.parse import parse_message
from gateway.security.sign import Signer, to_bytes
from gateway.security.trust import TrustStore
from gateway.security.verify import Verifier
from tests.crossborder.conftest import CrossBorder, PairDirs

R = {**NSMAP, "r": RECEIPT_NS}
E = {"eco": ECO_NS}


def edit_registry(certs: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = certs / "partners.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data["parties"])
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def thai_form_d(issuer: Signer) -> bytes:
    """An e-Form D issued in Thailand by TH-DFT for goods going to Viet Nam; Body signed by TH-DFT."""
    root = sample_envelope("eco.atiga-form-d", sender="TH-DFT", recipient="TH-NSW")
    document = root.find("e:Body/e:Content/eco:CertificateOfOrigin", {**NSMAP, **E})
    assert document is not None
    for path, value in (
        ("eco:exportingCountry", "TH"),
        ("eco:importingCountry", "VN"),
        ("eco:issuingAuthority/eco:identity", "TH-DFT"),
        ("eco:issuingAuthority/eco:name", "Department of Foreign Trade"),
        ("eco:issuingAuthority/eco:country", "TH"),
    ):
        node = document.find(path, E)
        assert node is not None, path
        node.text = value
    return to_bytes(issuer.sign_envelope(issuer.sign_content(root)))


async def rejected_at_vn(pair: CrossBorder, body: bytes) -> tuple[int, str, str]:
    """Post ``body`` to VN's ingress as TH-NSW would (its client certificate); the signed rejection's code."""
    status, answer, _ = await post(pair.vn.url, body, client_tls(pair.dirs.th, pair.dirs.party("TH-NSW")))
    verified = Verifier(TrustStore.load(pair.dirs.th / "trust"), pair.dirs.registry("th")).verify(parse_message(answer))
    assert verified.party == "VN-NSW"
    rejection = verified.envelope.find("e:Body/e:Content/r:Rejection", R)
    assert rejection is not None
    return status, rejection.findtext("r:code", namespaces=R) or "", rejection.findtext("r:detail", namespaces=R) or ""


@pytest.mark.parametrize(
    ("document_type", "narrowed", "fault"),
    [
        ("licence.import", None, "a peer may not send function 01 of licence.import"),  # the type registry
        ("sps.ephyto", "sps.ephyto", "TH-NSW is not registered to send function 01 of sps.ephyto"),  # its entry
    ],
    ids=["no peer may send it", "its registry entry does not allow it"],
)
async def test_a_peer_sending_a_type_it_is_not_allowed_is_sender_mismatch(
    dirs: PairDirs,
    cross_border: Callable[..., Awaitable[CrossBorder]],
    document_type: str,
    narrowed: str | None,
    fault: str,
) -> None:
    if narrowed is not None:
        edit_registry(dirs.vn, lambda parties: parties["TH-NSW"]["may_send"].pop(narrowed))
    pair = await cross_border()
    envelope = sample_envelope(document_type, sender="TH-NSW", recipient="VN-NSW")
    status, code, detail = await rejected_at_vn(pair, to_bytes(pair.dirs.signer("TH-NSW").sign_envelope(envelope)))
    assert (status, code) == (403, "SENDER_MISMATCH")
    assert fault in detail


async def test_a_certificate_a_peer_sends_without_its_issuing_authoritys_signature_is_signature_missing(
    cross_border: Callable[..., Awaitable[CrossBorder]],
) -> None:
    # TH-NSW's own signature proves only that TH-NSW sent it, not that any Thai authority issued it.
    pair = await cross_border()
    envelope = sample_envelope("eco.atiga-form-d", sender="TH-NSW", recipient="VN-NSW")
    status, code, detail = await rejected_at_vn(pair, to_bytes(pair.dirs.signer("TH-NSW").sign_envelope(envelope)))
    assert (status, code) == (401, "SIGNATURE_MISSING")
    assert "function 01 of eco.atiga-form-d from TH-NSW (peer) must carry the issuing authority's signature" in detail


async def test_a_forward_vn_does_not_allow_from_th_is_dead_lettered_at_th_with_sender_mismatch(
    dirs: PairDirs, cross_border: Callable[..., Awaitable[CrossBorder]]
) -> None:
    edit_registry(dirs.vn, lambda parties: parties["TH-NSW"]["may_send"].pop("eco.atiga-form-d"))
    pair = await cross_border()
    status, answer, headers = await post(
        pair.th.url, thai_form_d(dirs.signer("TH-DFT")), client_tls(dirs.th, dirs.party("TH-DFT"))
    )
    assert status == 202, answer[:600]
    dead = await wait_for_destination(pair.th.gateway.ledger, headers["X-NSW-Message-Id"], "asw:VN")
    assert (dead.state, dead.code) == (State.DEAD, "SENDER_MISMATCH")
    assert "rejected by VN-NSW" in dead.detail


@pytest.mark.parametrize(
    ("registered", "recorded"),
    [(True, "body signature by TH-DFT: issuing authority verified"), (False, "issuer trusted but not registered")],
    ids=["TH-DFT registered at VN", "TH-DFT not registered at VN"],
)
async def test_a_thai_issued_form_d_reaches_vn_customs_with_its_body_signature_checked_and_recorded(
    dirs: PairDirs, cross_border: Callable[..., Awaitable[CrossBorder]], registered: bool, recorded: str
) -> None:
    if not registered:
        edit_registry(dirs.vn, lambda parties: parties.pop("TH-DFT"))
    pair = await cross_border()
    status, answer, headers = await post(
        pair.th.url, thai_form_d(dirs.signer("TH-DFT")), client_tls(dirs.th, dirs.party("TH-DFT"))
    )
    assert status == 202, answer[:600]
    eco_id = headers["X-NSW-Message-Id"]
    assert (await wait_for_destination(pair.th.gateway.ledger, eco_id, "asw:VN")).state is State.DELIVERED

    delivered = (await pair.vn_agencies.wait_for("customs"))[0]
    at_customs = Verifier(TrustStore.load(dirs.vn / "trust"), dirs.registry("vn")).verify(parse_message(delivered.body))
    assert (at_customs.party, at_customs.header.message_id) == ("TH-NSW", eco_id)
    assert at_customs.body_signature.valid
    assert at_customs.body_signature.authority == ("TH-DFT" if registered else None)
    received = [r for r in await pair.vn.gateway.ledger.trace(eco_id) if r.event == "RECEIVED"]
    assert [r.party for r in received] == ["TH-NSW"]
    assert recorded in received[0].detail
