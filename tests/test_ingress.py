"""The ingress end to end on real parts: aiohttp server on loopback, embedded broker, SQLite ledger.

Every rejection test asserts the exact code, the HTTP status, that the answer is a rejection
(function 21) signed by the gateway, and that nothing was enqueued.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from lxml import etree
from signxml import XMLSigner
from structlog.testing import capture_logs

from gateway.envelope import NSMAP, SIGNATURE
from gateway.partners import PartnerRegistry
from gateway.pipeline import INGRESS_STAGES
from gateway.receipts import RECEIPT_NS
from gateway.samples import SAMPLE_SENDERS
from gateway.security.parse import parse_message
from gateway.security.sign import EXC_C14N, Signer, to_bytes
from gateway.security.trust import TrustStore
from gateway.security.verify import Verifier
from routing.engine import RoutingTable
from tests.conftest import RunningGateway, envelope

HOSTILE = Path(__file__).parent / "security" / "hostile"
R = {"r": RECEIPT_NS}


def check_answer(body: bytes, pki_dir: Path) -> etree._Element:
    """Verify the gateway's signature on an answer; return the signed tree."""
    verifier = Verifier(TrustStore.load(pki_dir / "trust"), PartnerRegistry.load(pki_dir / "partners.yaml"))
    verified = verifier.verify(parse_message(body))
    assert verified.party == "VN-NSW"
    gateway_cert = (pki_dir / "gateway" / "cert.pem").read_bytes()
    assert verified.signer.fingerprint(hashes.SHA256()).hex() in _pem_fingerprints(gateway_cert)
    return verified.envelope


def _pem_fingerprints(pem: bytes) -> set[str]:
    return {c.fingerprint(hashes.SHA256()).hex() for c in x509.load_pem_x509_certificates(pem)}


async def assert_rejected(
    gw: RunningGateway, body: bytes, code: str, status: int, pki_dir: Path, *, content_type: str = "application/xml"
) -> etree._Element:
    response = await gw.post(body, content_type)
    answer = await response.read()
    assert response.status == status, answer[:600]
    assert response.headers["X-NSW-Code"] == code
    signed = check_answer(answer, pki_dir)
    assert signed.findtext("e:Header/e:Subject/e:function", namespaces=NSMAP) == "21"
    rejection = signed.find("e:Body/e:Content/r:Rejection", {**NSMAP, **R})
    assert rejection is not None
    assert rejection.findtext("r:code", namespaces=R) == code
    assert rejection.findtext("r:httpStatus", namespaces=R) == str(status)
    assert rejection.findtext("r:detail", namespaces=R)
    assert gw.broker.published == [], "a rejected message must never be enqueued"
    return rejection


# -- accepted ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("document_type", sorted(SAMPLE_SENDERS))
async def test_every_shipped_type_is_accepted_with_a_signed_receipt(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path, document_type: str
) -> None:
    sender = SAMPLE_SENDERS[document_type][0]
    # The e-C/O sample is a certificate its ministry issues: signed over Body/Content too (schemas/registry.yaml).
    body = signed(document_type, body_signer=sender if document_type == "eco.atiga-form-d" else None)
    response = await running.post(body)
    answer = await response.read()
    assert response.status == 202, answer[:800]
    receipt_env = check_answer(answer, pki_dir)
    assert receipt_env.findtext("e:Header/e:Subject/e:function", namespaces=NSMAP) == "99"
    receipt = receipt_env.find("e:Body/e:Content/r:Receipt", {**NSMAP, **R})
    message_id = parse_message(body).root.findtext("e:Header/e:Reference/e:messageId", namespaces=NSMAP)
    assert receipt.findtext("r:messageId", namespaces=R) == message_id
    assert receipt.findtext("r:digest", namespaces=R) == hashlib.sha256(body).hexdigest()
    destinations = [d.text for d in receipt.iterfind("r:destinations/r:destination", R)]
    assert destinations
    published = running.broker.published
    assert sorted(d.destination for d in published) == sorted(destinations)
    assert all(d.payload == body and d.message_id == message_id for d in published)
    status = await running.gateway.ledger.status(message_id)
    assert status is not None
    assert status.state == "ACCEPTED"
    assert set(status.destinations) == set(destinations)


async def test_identical_resubmission_gets_the_original_receipt_and_is_not_enqueued_again(
    running: RunningGateway, signed: Callable[..., bytes]
) -> None:
    body = signed("licence.import")
    first = await running.post(body)
    receipt = await first.read()
    enqueued = len(running.broker.published)
    second = await running.post(body)
    assert second.status == 202
    assert await second.read() == receipt
    assert second.headers["X-NSW-Replayed"] == "true"
    assert len(running.broker.published) == enqueued


async def test_stage_times_are_observed_once_per_accepted_message_only(
    running: RunningGateway, signed: Callable[..., bytes]
) -> None:
    observed: list[list[float]] = []
    running.gateway.pipeline.on_stages = lambda seconds: observed.append(list(seconds))
    body = signed("licence.import")
    assert (await running.post(body)).status == 202
    assert (await running.post(body)).status == 202  # the original receipt again: no new stages
    assert (await running.post(to_bytes(envelope("licence.import")))).status == 401  # unsigned
    assert len(observed) == 1
    assert len(observed[0]) == len(INGRESS_STAGES)
    assert all(seconds >= 0 for seconds in observed[0])
    assert observed[0][INGRESS_STAGES.index("verify")] > 0


async def test_a_failing_stage_observer_does_not_fail_an_accepted_message(
    running: RunningGateway, signed: Callable[..., bytes]
) -> None:
    def broken(_seconds: object) -> None:
        raise RuntimeError("metrics store gone")

    running.gateway.pipeline.on_stages = broken
    with capture_logs() as logs:
        response = await running.post(signed("licence.import"))
    assert response.status == 202
    assert len(running.broker.published) == 1
    assert [line["event"] for line in logs if line["log_level"] == "error"] == ["ingress.stage_timings_lost"]


async def test_legacy_sha1_accepted_from_a_party_allowed_it_and_audited(
    running: RunningGateway, signed: Callable[..., bytes]
) -> None:
    body = signed("licence.import", sender="VN-MOH", recipient="VN-NSW", function="27", legacy_sha1=True)
    response = await running.post(body)
    assert response.status == 202, (await response.read())[:600]
    message_id = response.headers["X-NSW-Message-Id"]
    trail = await running.gateway.ledger.trace(message_id)
    received = [r for r in trail if r.event == "RECEIVED"]
    assert received
    assert received[0].code == "LEGACY_SHA1"


async def test_issuer_body_signature_is_verified_and_recorded(
    running: RunningGateway, signed: Callable[..., bytes]
) -> None:
    body = signed("eco.atiga-form-d", body_signer="VN-MOIT")
    response = await running.post(body)
    assert response.status == 202, (await response.read())[:600]
    trail = await running.gateway.ledger.trace(response.headers["X-NSW-Message-Id"])
    assert "body signature by VN-MOIT" in trail[0].detail


# -- hostile XML ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in HOSTILE.glob("*.xml") if p.name != "xinclude.xml"),
)
async def test_hostile_xml_is_malformed(running: RunningGateway, pki_dir: Path, name: str) -> None:
    rejection = await assert_rejected(running, (HOSTILE / name).read_bytes(), "MALFORMED_XML", 400, pki_dir)
    assert rejection.findtext("r:location", namespaces=R)


async def test_xinclude_is_never_processed(running: RunningGateway, pki_dir: Path) -> None:
    rejection = await assert_rejected(
        running, (HOSTILE / "xinclude.xml").read_bytes(), "SIGNATURE_MISSING", 401, pki_dir
    )
    assert "root:" not in etree.tostring(rejection).decode()


async def test_oversize_body_is_too_large(
    make_gateway: Callable[..., Any], pki_dir: Path, signed: Callable[..., bytes]
) -> None:
    gw = await make_gateway(max_body_bytes=4096)
    body = signed("eco.atiga-form-d")
    assert len(body) > 4096
    await assert_rejected(gw, body, "TOO_LARGE", 413, pki_dir)


async def test_non_xml_content_type_is_refused(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    await assert_rejected(
        running, signed("licence.import"), "UNSUPPORTED_MEDIA_TYPE", 415, pki_dir, content_type="text/plain"
    )


# -- signatures -----------------------------------------------------------------------------------


async def test_unsigned_message(running: RunningGateway, pki_dir: Path) -> None:
    await assert_rejected(running, to_bytes(envelope("licence.import")), "SIGNATURE_MISSING", 401, pki_dir)


async def test_content_tampered_after_signing(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    body = signed("licence.import")
    root = etree.fromstring(body)
    hs = root.find(".//{urn:nsw:licence:1}hsCode")
    assert hs is not None
    hs.text = "9999999999"
    await assert_rejected(running, to_bytes(root), "SIGNATURE_INVALID", 401, pki_dir)


async def test_wrapping_second_unsigned_content_inserted(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    root = etree.fromstring(signed("licence.import"))
    body = root.find("e:Body", NSMAP)
    forged = etree.fromstring(etree.tostring(body.find("e:Content", NSMAP)))
    forged.set("Id", "forged")
    body.insert(0, forged)
    await assert_rejected(running, to_bytes(root), "SIGNATURE_INVALID", 401, pki_dir)


async def test_wrapping_signed_envelope_moved_under_a_forged_one(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    genuine = etree.fromstring(signed("licence.import"))
    forged = envelope("licence.import", function="03")
    signature = genuine.find(SIGNATURE)
    genuine.remove(signature)
    forged.append(signature)  # the genuine signature now hangs under the forged envelope ...
    forged.find("e:Header", NSMAP).append(genuine)  # ... with the signed envelope hidden inside it
    await assert_rejected(running, to_bytes(forged), "SIGNATURE_INVALID", 401, pki_dir)


async def test_wrapping_issuer_signed_content_moved_and_forged_content_put_in_its_place(
    running: RunningGateway, signers: Callable[..., Signer], pki_dir: Path
) -> None:
    issued = signers("VN-MOIT").sign_content(envelope("eco.atiga-form-d"))
    body = issued.find("e:Body", NSMAP)
    genuine = body.find("e:Content", NSMAP)
    forged = etree.fromstring(etree.tostring(genuine))
    forged.find(".//{urn:nsw:eco:atiga-form-d:1}importingCountry").text = "KH"
    forged.set("Id", "forged-content")
    body.replace(genuine, forged)
    issued.find("e:Header", NSMAP).append(genuine)  # the signed original, moved out of the Body
    wrapped = signers("VN-MOIT").sign_envelope(issued)  # an insider re-signs the envelope itself
    await assert_rejected(running, to_bytes(wrapped), "SIGNATURE_INVALID", 401, pki_dir)


async def test_wrapping_system_signature_referencing_an_id_instead_of_the_envelope(
    running: RunningGateway, signers: Callable[..., Signer], pki_dir: Path
) -> None:
    trader = signers("VN-TRADER-0101234567")
    root = envelope("licence.import")
    partial = XMLSigner(c14n_algorithm=EXC_C14N).sign(
        root, key=trader.key, cert=list(trader.chain), reference_uri="#content"
    )
    rejection = await assert_rejected(running, to_bytes(partial), "SIGNATURE_INVALID", 401, pki_dir)
    assert "whole envelope" in rejection.findtext("r:detail", namespaces=R)


async def test_wrong_key_for_the_embedded_certificate(
    running: RunningGateway, signers: Callable[..., Signer], pki_dir: Path
) -> None:
    trader, moit = signers("VN-TRADER-0101234567"), signers("VN-MOIT")
    impostor = Signer(key=moit.key, chain=trader.chain)
    await assert_rejected(
        running, to_bytes(impostor.sign_envelope(envelope("licence.import"))), "SIGNATURE_INVALID", 401, pki_dir
    )


@pytest.mark.parametrize(
    ("cert", "code"),
    [("test/expired", "CERT_EXPIRED"), ("test/revoked", "CERT_REVOKED"), ("test/untrusted", "CERT_UNTRUSTED")],
)
async def test_certificate_problems(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path, cert: str, code: str
) -> None:
    await assert_rejected(running, signed("licence.import", signer=cert), code, 401, pki_dir)


async def test_rollover_certificate_is_accepted(running: RunningGateway, signed: Callable[..., bytes]) -> None:
    response = await running.post(signed("licence.import", signer="test/trader-rollover"))
    assert response.status == 202, (await response.read())[:600]


async def test_trader_signing_as_a_ministry(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    body = signed("eco.atiga-form-d", sender="VN-MOIT", signer="VN-TRADER-0101234567")
    await assert_rejected(running, body, "SENDER_MISMATCH", 403, pki_dir)


@pytest.mark.parametrize("function", ["01", "02", "03"])
async def test_a_certificate_of_origin_its_ministry_sends_without_the_body_signature_is_signature_missing(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path, function: str
) -> None:
    # Signed by VN-MOIT's system, but not over Body/Content: nothing would let customs or the importing
    # country check the certificate itself once a gateway has re-signed the envelope.
    body = signed("eco.atiga-form-d", sender="VN-MOIT", function=function, pre_reference=str(uuid.uuid4()))
    rejection = await assert_rejected(running, body, "SIGNATURE_MISSING", 401, pki_dir)
    assert rejection.findtext("r:location", namespaces=R) == "/Envelope/Body/ds:Signature"
    detail = rejection.findtext("r:detail", namespaces=R) or ""
    assert f"function {function} of eco.atiga-form-d from VN-MOIT (agency)" in detail


async def test_a_traders_application_for_a_certificate_of_origin_needs_no_body_signature(
    running: RunningGateway, signed: Callable[..., bytes]
) -> None:
    # The same function code from the exporter is an application to the ministry, not a certificate.
    body = signed("eco.atiga-form-d", sender="VN-TRADER-0101234567", recipient="VN-MOIT", function="01")
    response = await running.post(body)
    assert response.status == 202, (await response.read())[:600]


async def test_forged_issuer_signature_on_a_certificate_of_origin(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    # The trader signs the Body itself, pretending to be the issuing authority of the e-C/O.
    body = signed("eco.atiga-form-d", body_signer="VN-TRADER-0101234567")
    await assert_rejected(running, body, "SENDER_MISMATCH", 403, pki_dir)


async def test_an_answer_may_carry_the_answering_partys_own_body_signature(
    running: RunningGateway, signed: Callable[..., bytes]
) -> None:
    # Customs accepting an e-C/O (23) signs its answer itself; only issuing functions (01-04) need the
    # issuing authority's signature.
    body = signed(
        "eco.atiga-form-d",
        sender="VN-CUSTOMS",
        recipient="VN-MOIT",
        function="23",
        pre_reference=str(uuid.uuid4()),
        body_signer="VN-CUSTOMS",
    )
    response = await running.post(body)
    assert response.status == 202, (await response.read())[:600]
    trail = await running.gateway.ledger.trace(response.headers["X-NSW-Message-Id"])
    assert "answers " in trail[0].detail


async def test_party_sending_a_function_it_is_not_allowed(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    # A trader may apply for a licence but never approve one (27).
    body = signed("licence.import", function="27")
    await assert_rejected(running, body, "SENDER_MISMATCH", 403, pki_dir)


async def test_party_sending_a_type_it_is_not_allowed(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    body = signed("sps.ephyto", sender="VN-TRADER-0101234567", function="01")
    await assert_rejected(running, body, "SENDER_MISMATCH", 403, pki_dir)


async def test_sha1_from_a_party_not_allowed_it(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    body = signed("licence.import", legacy_sha1=True)
    rejection = await assert_rejected(running, body, "SIGNATURE_INVALID", 401, pki_dir)
    assert "SHA-1" in rejection.findtext("r:detail", namespaces=R)


# -- header, schema, routing -------------------------------------------------------------------------


async def test_stale_send_date(running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path) -> None:
    body = signed("licence.import", send_date=datetime.now(UTC) - timedelta(days=3))
    rejection = await assert_rejected(running, body, "STALE", 409, pki_dir)
    assert rejection.findtext("r:location", namespaces=R) == "/Envelope/Header/Subject/sendDate"


async def test_send_date_from_the_future(running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path) -> None:
    body = signed("licence.import", send_date=datetime.now(UTC) + timedelta(hours=2))
    await assert_rejected(running, body, "STALE", 409, pki_dir)


async def test_duplicate_id_with_different_bytes(
    running: RunningGateway, signed: Callable[..., bytes], pki_dir: Path
) -> None:
    message_id = str(uuid.uuid4())
    first = await running.post(signed("licence.import", message_id=message_id))
    assert first.status == 202
    enqueued = list(running.broker.published)
    running.broker.published.clear()
    other = signed("licence.import", message_id=message_id, function="02")
    rejection = await assert_rejected(running, other, "DUPLICATE", 409, pki_dir)
    assert rejection.findtext("r:messageId", namespaces=R) == message_id
    assert enqueued


async def test_unknown_document_type(running: RunningGateway, signers: Callable[..., Signer], pki_dir: Path) -> None:
    root = envelope("licence.import")
    root.find("e:Header/e:Subject/e:documentType", NSMAP).text = "licence.space-travel"
    body = to_bytes(signers("VN-TRADER-0101234567").sign_envelope(root))
    rejection = await assert_rejected(running, body, "UNKNOWN_DOCUMENT_TYPE", 422, pki_dir)
    assert rejection.findtext("r:location", namespaces=R) == "/Envelope/Header/Subject/documentType"


async def test_schema_invalid_body_names_the_place(
    running: RunningGateway, signers: Callable[..., Signer], pki_dir: Path
) -> None:
    root = envelope("licence.import")
    hs = root.find(".//{urn:nsw:licence:1}hsCode")
    hs.getparent().remove(hs)
    body = to_bytes(signers("VN-TRADER-0101234567").sign_envelope(root))
    rejection = await assert_rejected(running, body, "SCHEMA_INVALID", 422, pki_dir)
    assert rejection.findtext("r:location", namespaces=R).startswith("/")


async def test_no_route(make_gateway: Callable[..., Any], signed: Callable[..., bytes], pki_dir: Path) -> None:
    only_customs = RoutingTable.from_mapping(
        {
            "version": 1,
            "destinations": {"customs": {"adapter": "http", "url": "http://127.0.0.1:9/"}},
            "rules": [{"name": "declarations", "when": {"documentType": "wco.dec.submit"}, "to": ["customs"]}],
        }
    )
    gw = await make_gateway(routing=only_customs)
    rejection = await assert_rejected(gw, signed("licence.import"), "NO_ROUTE", 422, pki_dir)
    assert "licence.import" in rejection.findtext("r:detail", namespaces=R)


async def test_rejections_are_audited(running: RunningGateway, signed: Callable[..., bytes]) -> None:
    body = signed("licence.import", send_date=datetime.now(UTC) - timedelta(days=3))
    response = await running.post(body)
    assert response.status == 409
    trail = await running.gateway.ledger.trace(response.headers["X-NSW-Message-Id"])
    assert [(r.event, r.code) for r in trail] == [("REJECTED", "STALE")]
