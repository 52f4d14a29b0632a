"""The cross-border round trip on two real gateways: VN-MOIT's e-Form D to TH customs through VN-NSW and
TH-NSW, TH's receipt kept as proof at VN, TH customs' acceptance back to VN-MOIT."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable

from cryptography import x509
from lxml import etree
from signxml import SignatureConfiguration, XMLVerifier

from adapters.asw import forward_envelope
from gateway.crossborder_demo import (
    answer_certificate,
    client_tls,
    issue_form_d,
    party_ref,
    post,
    wait_for_destination,
)
from gateway.envelope import NS, NSMAP
from gateway.model import PartyRef, State
from gateway.receipts import RECEIPT_NS
from gateway.security.parse import parse_message, parse_untrusted
from gateway.security.sign import common_name
from gateway.security.trust import TrustStore
from gateway.security.verify import Verifier
from gateway.stores.base import Ledger
from tests.crossborder.conftest import CrossBorder, PairDirs

R = {**NSMAP, "r": RECEIPT_NS}


def verifier(dirs: PairDirs, side: str) -> Verifier:
    return Verifier(TrustStore.load(getattr(dirs, side) / "trust"), dirs.registry(side))


async def timeline(ledger: Ledger, message_id: str) -> list[tuple[str, str | None, str | None]]:
    return [(r.event, r.destination, r.party) for r in await ledger.trace(message_id)]


async def issue_at_vn(pair: CrossBorder) -> tuple[bytes, str]:
    form_d = issue_form_d(pair.dirs.signer("VN-MOIT"))
    status, answer, headers = await post(pair.vn.url, form_d, client_tls(pair.dirs.vn, pair.dirs.party("VN-MOIT")))
    assert status == 202, answer[:600]
    return form_d, headers["X-NSW-Message-Id"]


async def test_e_form_d_goes_to_th_customs_and_the_acceptance_comes_back_to_the_ministry(
    cross_border: Callable[..., Awaitable[CrossBorder]],
) -> None:
    pair = await cross_border()
    dirs = pair.dirs
    _, eco_id = await issue_at_vn(pair)

    # TH customs gets VN-NSW's forward: same messageId, readdressed, the ministry's Body signature verified.
    delivered = (await pair.th_agencies.wait_for("customs"))[0]
    at_th = verifier(dirs, "th").verify(parse_message(delivered.body))
    assert (at_th.party, at_th.header.message_id) == ("VN-NSW", eco_id)
    assert (at_th.header.sender.identity, at_th.header.recipient.identity) == ("VN-NSW", "TH-NSW")
    assert (at_th.body_signature.valid, at_th.body_signature.authority) == (True, "VN-MOIT")
    assert delivered.headers["Idempotency-Key"] == f"{eco_id}:customs"

    # VN counts asw:TH delivered only on TH's signed receipt for exactly those bytes, kept as proof.
    to_th = await wait_for_destination(pair.vn.gateway.ledger, eco_id, "asw:TH")
    assert to_th.state is State.DELIVERED, to_th.detail
    proof = pair.vn.proofs.get(eco_id, "asw:TH")
    assert proof is not None
    receipt = verifier(dirs, "vn").verify(parse_message(proof))
    assert receipt.party == "TH-NSW"
    assert receipt.envelope.findtext("e:Body/e:Content/r:Receipt/r:messageId", namespaces=R) == eco_id
    sent_digest = hashlib.sha256(delivered.body).hexdigest()
    assert receipt.envelope.findtext("e:Body/e:Content/r:Receipt/r:digest", namespaces=R) == sent_digest
    assert hashlib.sha256(proof).hexdigest() in to_th.detail

    # TH customs accepts, addressed to the issuing ministry; the answer crosses back to VN-MOIT.
    customs = party_ref(dirs.registry("th"), "TH-CUSTOMS")
    acceptance = answer_certificate(delivered.body, dirs.signer("TH-CUSTOMS"), customs)
    status, answer, headers = await post(pair.th.url, acceptance, client_tls(dirs.th, dirs.party("TH-CUSTOMS")))
    assert status == 202, answer[:600]
    answer_id = headers["X-NSW-Message-Id"]
    back = (await pair.vn_agencies.wait_for("moit"))[0]
    at_moit = verifier(dirs, "vn").verify(parse_message(back.body))
    header = at_moit.header
    assert (at_moit.party, header.message_id, header.function, header.pre_reference) == (
        "TH-NSW",
        answer_id,
        "23",
        eco_id,
    )
    to_vn = await wait_for_destination(pair.th.gateway.ledger, answer_id, "asw:VN")
    assert to_vn.state is State.DELIVERED
    assert f"answers {eco_id}" in to_vn.detail
    assert pair.th.proofs.get(answer_id, "asw:VN") is not None

    # The conversation, in both ledgers (once each worker has recorded the agencies' answers).
    vn, th = pair.vn.gateway.ledger, pair.th.gateway.ledger
    assert (await wait_for_destination(th, eco_id, "customs")).state is State.DELIVERED
    assert (await wait_for_destination(vn, answer_id, "moit")).state is State.DELIVERED
    assert ("RECEIVED", None, "VN-MOIT") in await timeline(vn, eco_id)
    assert ("DELIVERED", "asw:TH", "VN-MOIT") in await timeline(vn, eco_id)
    assert ("RECEIVED", None, "VN-NSW") in await timeline(th, eco_id)
    assert ("DELIVERED", "customs", "VN-NSW") in await timeline(th, eco_id)
    assert ("RECEIVED", None, "TH-CUSTOMS") in await timeline(th, answer_id)
    assert ("DELIVERED", "asw:VN", "TH-CUSTOMS") in await timeline(th, answer_id)
    assert ("RECEIVED", None, "TH-NSW") in await timeline(vn, answer_id)
    assert ("DELIVERED", "moit", "TH-NSW") in await timeline(vn, answer_id)
    assert [d.body for d in pair.vn_agencies.received["moit"]] == [back.body]  # only the answer went to MOIT
    for node in (pair.vn, pair.th):
        report = await node.gateway.ledger.verify_audit()
        assert report.ok, report


def _body_c14n(envelope: bytes) -> bytes:
    body = parse_untrusted(envelope).find("e:Body", NSMAP)
    assert body is not None
    return etree.tostring(body, method="c14n", exclusive=True)


async def test_the_ministrys_body_signature_survives_re_signing_by_both_gateways(
    cross_border: Callable[..., Awaitable[CrossBorder]],
) -> None:
    pair = await cross_border()
    form_d, eco_id = await issue_at_vn(pair)
    delivered = (await pair.th_agencies.wait_for("customs"))[0].body
    ministry = x509.load_pem_x509_certificates(pair.dirs.party("VN-MOIT").cert.read_bytes())[0]
    body_only = SignatureConfiguration(location=f"./{{{NS}}}Body/", expect_references=1)

    # What TH customs received was re-signed by VN-NSW; TH-NSW re-signs it again to forward it on.
    onward = forward_envelope(
        delivered,
        sender=PartyRef("TH-NSW", "Thailand National Single Window", "TH"),
        recipient=PartyRef("MY-NSW", "Malaysia National Single Window", "MY"),
        signer=pair.dirs.signer("TH-NSW"),
        send_date=None,
    ).body
    for envelope, system_signer in ((delivered, "VN-NSW"), (onward, "TH-NSW")):
        assert _body_c14n(envelope) == _body_c14n(form_d)  # the Body, byte for byte
        root = parse_untrusted(envelope)
        result = XMLVerifier().verify(root, x509_cert=ministry, expect_config=body_only)
        assert result.signed_xml is not None
        assert result.signed_xml.tag == f"{{{NS}}}Content"
        system = root.findtext("ds:Signature/ds:KeyInfo/ds:X509Data/ds:X509Certificate", namespaces=NSMAP) or ""
        assert common_name(x509.load_der_x509_certificate(base64.b64decode(system))) == system_signer
    assert parse_untrusted(delivered).findtext("e:Header/e:Reference/e:messageId", namespaces=NSMAP) == eco_id
