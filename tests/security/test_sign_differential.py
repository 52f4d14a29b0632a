"""Differential proof of the SystemSignature fast path (``_SystemSignatureTemplate``): for any envelope,
``Signer.sign_envelope`` must give the BYTES stock signxml ``XMLSigner.sign`` gives -- the path the gateway
used before. Both our signatures are deterministic (RFC 6979 ECDSA, PKCS#1 v1.5 RSA), so equal bytes means
equal semantics: same c14n, same digest, same SignedInfo, same KeyInfo, same serialisation. Every output is
also checked by stock ``XMLVerifier`` and, where the signer is the envelope's sender, by our ``Verifier``.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree
from signxml import XMLSigner, XMLVerifier
from signxml.algorithms import DigestAlgorithm, SignatureMethod
from signxml.verifier import SignatureConfiguration

from gateway import receipts
from gateway.envelope import BODY, DS, NSMAP, SIGNATURE, build_envelope, parse_header
from gateway.errors import ErrorCode, Rejected
from gateway.model import PartyRef
from gateway.partners import PartnerRegistry
from gateway.receipts import ReceiptFactory
from gateway.samples import SAMPLE_DOCUMENT_TYPES, party_ref, sample_envelope
from gateway.security.parse import parse_message, parse_untrusted
from gateway.security.sign import EXC_C14N, Signer, to_bytes
from gateway.security.trust import TrustStore
from gateway.security.verify import Verifier

EC_PARTY = "VN-NSW"  # the gateway's own key in the dev PKI
RSA_PARTY = "VN-MOIT"
SYSTEM_SIGNATURE = SignatureConfiguration(location="./", expect_references=1)
BODY_SIGNATURE = SignatureConfiguration(location=f"./{BODY}/", expect_references=1)


def stock(signer: Signer, envelope: etree._Element) -> bytes:
    """The reference: the gateway's signing as it was -- a copy without SystemSignature, ``XMLSigner.sign``
    with the algorithms spelled out here, so a change of algorithm in ``Signer`` shows up too."""
    unsigned = etree.fromstring(etree.tostring(envelope))
    for old in unsigned.findall(SIGNATURE):
        unsigned.remove(old)
    is_ec = isinstance(signer.key, ec.EllipticCurvePrivateKey)
    xml_signer = XMLSigner(
        signature_algorithm=SignatureMethod.ECDSA_SHA256 if is_ec else SignatureMethod.RSA_SHA256,
        digest_algorithm=DigestAlgorithm.SHA256,
        c14n_algorithm=EXC_C14N,
    )
    # the key as the old path handed it to signxml (ECDSA wrapped for RFC 6979 nonces)
    return to_bytes(xml_signer.sign(unsigned, key=signer._signing_key, cert=list(signer.chain)))


def assert_stock_verifies(signed: bytes, signer: Signer) -> etree._Element:
    result = XMLVerifier().verify(signed, x509_cert=signer.chain[0], expect_config=SYSTEM_SIGNATURE)
    assert isinstance(result.signed_xml, etree._Element)
    return result.signed_xml


def system_signatures(signed: bytes) -> list[etree._Element]:
    return etree.fromstring(signed).findall(SIGNATURE)


@pytest.fixture(scope="module", params=[EC_PARTY, RSA_PARTY], ids=["ec", "rsa"])
def signer(request: pytest.FixtureRequest, signers: Callable[..., Signer]) -> Signer:
    chosen = signers(request.param)
    expected = ec.EllipticCurvePrivateKey if request.param == EC_PARTY else rsa.RSAPrivateKey
    assert isinstance(chosen.key, expected), "the dev PKI no longer gives this party the key kind under test"
    return chosen


@pytest.fixture(scope="module")
def verifier(pki_dir: Path) -> Verifier:
    return Verifier(TrustStore.load(pki_dir / "trust"), PartnerRegistry.load(pki_dir / "partners.yaml"))


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Records every envelope ``ReceiptFactory`` builds, serialised before it is signed."""
    seen: list[bytes] = []

    def recording(*args: Any, **options: Any) -> etree._Element:
        envelope = build_envelope(*args, **options)
        seen.append(etree.tostring(envelope))
        return envelope

    monkeypatch.setattr(receipts, "build_envelope", recording)
    return seen


def factory(signer: Signer) -> ReceiptFactory:
    """Answers from the signer's own party, so our Verifier binds the certificate to the From block."""
    return ReceiptFactory(signer, party_ref(EC_PARTY if signer.identity == EC_PARTY else RSA_PARTY))


def assert_answer_matches_stock(answer: bytes, built: list[bytes], signer: Signer, verifier: Verifier) -> None:
    assert len(built) == 1
    assert answer == stock(signer, etree.fromstring(built[0]))
    assert_stock_verifies(answer, signer)
    verified = verifier.verify(parse_message(answer))
    assert verified.party == signer.identity


@pytest.mark.parametrize(
    "destinations",
    [[], ["customs"], ["customs", "moit", "TH-NSW & <peer> \u0111\u01b0\u1eddng"]],
    ids=["none", "one", "escaped-unicode"],
)
def test_receipts_are_byte_identical_to_stock_signxml(
    signer: Signer, verifier: Verifier, built: list[bytes], destinations: list[str]
) -> None:
    header = parse_header(sample_envelope("licence.import"))
    answer = factory(signer).receipt(header, "ab" * 32, datetime.now(UTC), destinations)
    assert_answer_matches_stock(answer, built, signer, verifier)


@pytest.mark.parametrize(
    ("error", "extra"),
    [
        (
            Rejected(ErrorCode.SCHEMA_INVALID, "sendDate 'x' is not <ISO> & \u00e9", "/Envelope/Header"),
            {"digest": "cd" * 32, "message_id": "m-1", "sender": PartyRef("VN-TRADER-0101234567", "", "")},
        ),
        (Rejected(ErrorCode.MALFORMED_XML, "not well-formed XML"), {"digest": "ef" * 32}),
        (Rejected(ErrorCode.TOO_LARGE, "too large"), {"digest": None}),
    ],
    ids=["full", "anonymous", "no-digest"],
)
def test_rejections_are_byte_identical_to_stock_signxml(
    signer: Signer, verifier: Verifier, built: list[bytes], error: Rejected, extra: dict[str, Any]
) -> None:
    answer = factory(signer).rejection(error, **extra)
    assert_answer_matches_stock(answer, built, signer, verifier)


@pytest.mark.parametrize("document_type", SAMPLE_DOCUMENT_TYPES)
@pytest.mark.parametrize("copy", [True, False], ids=["copy", "in-place"])
def test_sample_envelopes_are_byte_identical_to_stock_signxml(signer: Signer, document_type: str, copy: bool) -> None:
    envelope = sample_envelope(document_type)
    expected = stock(signer, envelope)
    before = etree.tostring(envelope)
    signed = to_bytes(signer.sign_envelope(envelope, copy=copy))
    assert signed == expected
    if copy:
        assert etree.tostring(envelope) == before, "sign_envelope() changed the caller's envelope"
    assert_stock_verifies(signed, signer)


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "in-place"])
def test_an_existing_system_signature_is_replaced(
    signer: Signer, signers: Callable[..., Signer], verifier: Verifier, copy: bool
) -> None:
    sender = signers("TH-NSW")  # a peer's signed answer that we sign again as ourselves
    forwarded = etree.fromstring(to_bytes(sender.sign_envelope(sample_envelope("nsw.receipt"))))
    expected = stock(signer, forwarded)
    signed = to_bytes(signer.sign_envelope(forwarded, copy=copy))
    assert signed == expected
    [ours] = system_signatures(signed)
    certificate = ours.findtext("ds:KeyInfo/ds:X509Data/ds:X509Certificate", namespaces=NSMAP)
    assert certificate is not None
    assert base64.b64decode(certificate) == signer.chain[0].public_bytes(Encoding.DER)
    assert_stock_verifies(signed, signer)


def test_a_body_signature_is_kept_and_still_verifies(signer: Signer, signers: Callable[..., Signer]) -> None:
    issuer = signers("VN-MOIT")
    issued = issuer.sign_content(sample_envelope("eco.atiga-form-d"))
    body_signature = etree.tostring(issued.find(f"{BODY}/{SIGNATURE}"))
    signed = to_bytes(signer.sign_envelope(issued))
    assert signed == stock(signer, issued)
    tree = etree.fromstring(signed)
    assert etree.tostring(tree.find(f"{BODY}/{SIGNATURE}")) == body_signature
    assert len(tree.findall(SIGNATURE)) == 1
    assert_stock_verifies(signed, signer)
    XMLVerifier().verify(signed, x509_cert=issuer.chain[0], expect_config=BODY_SIGNATURE)


def test_the_envelopes_own_sender_passes_our_verifier(signers: Callable[..., Signer], verifier: Verifier) -> None:
    for document_type, party in (("eco.atiga-form-d", RSA_PARTY), ("nsw.receipt", "TH-NSW")):
        envelope = sample_envelope(document_type, sender=party)
        signer = signers(party)
        signed = to_bytes(signer.sign_envelope(envelope))
        assert signed == stock(signer, envelope)
        assert verifier.verify(parse_message(signed)).party == party


def _pretty(envelope: etree._Element) -> etree._Element:
    etree.indent(envelope, space="  ")
    return envelope


def _with_comment_and_pi(envelope: etree._Element) -> etree._Element:
    content = envelope.find(f"{BODY}/*")
    assert content is not None
    content.insert(0, etree.Comment(" not signed: exclusive c14n drops comments "))
    content.append(etree.ProcessingInstruction("nsw", "kept by c14n"))
    return envelope


def _with_top_level_siblings(envelope: etree._Element) -> etree._Element:
    # a document-level comment and PI: neither signxml's copy nor the signed output carries them
    return etree.fromstring(b"<!-- from the partner tool --><?nsw forwarded?>" + etree.tostring(envelope))


def _inside_another_document(envelope: etree._Element) -> etree._Element:
    # e.g. an envelope taken out of a batch file: ancestors declare namespaces, the element has a tail
    batch = etree.Element("{urn:example:batch}Batch", nsmap={"b": "urn:example:batch"})
    batch.append(envelope)
    etree.SubElement(batch, "{urn:example:batch}next")
    etree.indent(batch)
    return envelope


def _with_root_id(envelope: etree._Element) -> etree._Element:
    envelope.set("Id", "envelope-1")  # signxml then references "#envelope-1": the stock path signs it
    return envelope


def _with_placeholder(envelope: etree._Element) -> etree._Element:
    body = envelope.find(BODY)
    assert body is not None
    etree.SubElement(body, SIGNATURE, Id="placeholder", nsmap={"ds": DS})  # signxml fills this one in
    return envelope


def _foreign_prefixes(envelope: etree._Element) -> etree._Element:
    # a document whose namespaces use prefixes, one of them declared high up and only used deep down
    raw = etree.tostring(envelope).replace(b"<Envelope ", b'<Envelope xmlns:x="urn:example:x" ', 1)
    tree = etree.fromstring(raw)
    content = tree.find(f"{BODY}/*")
    assert content is not None
    etree.SubElement(content, "{urn:example:x}note", {"{urn:example:x}lang": "vi"}).text = "ghi ch\u00fa"
    return tree


@pytest.mark.parametrize(
    "shape",
    [
        _pretty,
        _with_comment_and_pi,
        _with_top_level_siblings,
        _inside_another_document,
        _with_root_id,
        _with_placeholder,
        _foreign_prefixes,
    ],
    ids=lambda shape: shape.__name__.strip("_"),
)
@pytest.mark.parametrize("copy", [True, False], ids=["copy", "in-place"])
def test_unusual_shapes_are_byte_identical_to_stock_signxml(
    signer: Signer, shape: Callable[[etree._Element], etree._Element], copy: bool
) -> None:
    envelope = shape(sample_envelope("permit.quarantine", message_id=str(uuid.uuid4())))
    expected = stock(signer, envelope)
    assert to_bytes(signer.sign_envelope(envelope, copy=copy)) == expected
    if shape is not _with_placeholder:  # signxml puts a placeholder's signature where the placeholder is
        assert_stock_verifies(expected, signer)


def test_in_place_signing_keeps_cdata_and_signs_the_same_canonical_form(signer: Signer) -> None:
    envelope = parse_untrusted(etree.tostring(sample_envelope("licence.import")))  # keeps CDATA, as ingress does
    document = envelope.find(f"{BODY}/*/*")
    assert document is not None
    etree.SubElement(document, "{urn:example:x}remark").text = etree.CDATA("pallets < 10 & wrapped")
    expected = stock(signer, envelope)
    assert to_bytes(signer.sign_envelope(envelope)) == expected  # the copy drops CDATA, as signxml's did

    in_place = to_bytes(signer.sign_envelope(envelope, copy=False))
    assert b"<![CDATA[pallets < 10 & wrapped]]>" in in_place
    assert b"pallets &lt; 10 &amp; wrapped" in expected
    assert etree.tostring(etree.fromstring(in_place).find(SIGNATURE)) == etree.tostring(
        etree.fromstring(expected).find(SIGNATURE)
    )
    assert_stock_verifies(in_place, signer)


def test_only_unusual_shapes_and_legacy_sha1_go_through_xmlsigner_sign(
    signer: Signer, signers: Callable[..., Signer], monkeypatch: pytest.MonkeyPatch
) -> None:
    legacy = signers(RSA_PARTY, legacy_sha1=True)
    calls: list[str] = []
    stock_sign = XMLSigner.sign

    def counting(self: XMLSigner, data: Any, **options: Any) -> etree._Element:
        calls.append(self.sign_alg.name)
        return stock_sign(self, data, **options)

    monkeypatch.setattr(XMLSigner, "sign", counting)
    header = parse_header(sample_envelope("licence.import"))
    factory(signer).receipt(header, "ab" * 32, datetime.now(UTC), ["customs"])
    factory(signer).rejection(Rejected(ErrorCode.MALFORMED_XML, "not well-formed XML"), digest=None)
    signer.sign_envelope(sample_envelope("eco.atiga-form-d"))
    assert calls == []
    signer.sign_envelope(_with_root_id(sample_envelope("eco.atiga-form-d")))
    legacy.sign_envelope(sample_envelope("licence.import"))
    assert calls == [signer._signer().sign_alg.name, "RSA_SHA1"]


def test_signing_twice_gives_the_same_bytes(signer: Signer) -> None:
    envelope = sample_envelope("sps.ephyto")
    assert to_bytes(signer.sign_envelope(envelope)) == to_bytes(signer.sign_envelope(envelope))


def _receipt_document() -> etree._Element:
    doc = etree.Element(f"{{{receipts.RECEIPT_NS}}}Receipt", nsmap={None: receipts.RECEIPT_NS})
    etree.SubElement(doc, f"{{{receipts.RECEIPT_NS}}}messageId").text = "m-1 & <2>"
    return doc


def _parsed_document(document_type: str) -> Callable[[], etree._Element]:
    def parsed() -> etree._Element:
        document = sample_envelope(document_type).find(f"{BODY}/*/*")
        assert document is not None
        return etree.fromstring(etree.tostring(document))

    return parsed


@pytest.mark.parametrize(
    "document",
    [_receipt_document, _parsed_document("sps.ephyto"), _parsed_document("eco.atiga-form-d")],
    ids=["receipt", "ephyto", "eco"],
)
def test_an_adopted_document_gives_the_bytes_of_a_copied_one(
    signer: Signer, document: Callable[[], etree._Element]
) -> None:
    header = parse_header(sample_envelope("licence.import"))
    copied = build_envelope(header, document())
    adoptable = document()
    adopted = build_envelope(header, adoptable, adopt=True)
    assert adopted.find(f"{BODY}/*/*") is adoptable, "the document was copied, not adopted"
    assert etree.tostring(adopted) == etree.tostring(copied)
    assert to_bytes(signer.sign_envelope(adopted, copy=False)) == stock(signer, copied)


def test_only_a_document_root_is_adopted() -> None:
    envelope = sample_envelope("sps.ephyto")
    document = envelope.find(f"{BODY}/*/*")
    assert document is not None
    with pytest.raises(ValueError, match="adopted"):
        build_envelope(parse_header(envelope), document, adopt=True)
    assert document.getparent() is not None, "the refused document was moved anyway"
