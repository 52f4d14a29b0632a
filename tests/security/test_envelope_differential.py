"""``build_envelope`` and the receipt/rejection documents fill in cached skeletons instead of building every
element: their bytes must be those of the element-by-element builders they replaced (kept here as the
reference), for every shape -- which optional party fields and preReference are present, empty names, text
that needs escaping, optional rejection fields -- and one envelope must never share elements with the next."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from lxml import etree

from gateway import receipts
from gateway.envelope import (
    BODY,
    CONTENT,
    CONTENT_ID,
    ENVELOPE,
    HEADER,
    NS,
    build_envelope,
    format_datetime,
    parse_header,
    q,
)
from gateway.errors import ErrorCode, Rejected
from gateway.model import Header, PartyRef
from gateway.receipts import RECEIPT_NS, ReceiptFactory
from gateway.samples import sample_envelope
from gateway.security.parse import copy_element
from gateway.security.sign import Signer

OPTIONAL = ("ministry_code", "organization_code", "unit_code")

# The reference below is the replaced builder verbatim (so it repeats envelope.py's table of party fields):
# an oracle written afresh from the new code could share its mistakes.


def _reference_party_block(parent: etree._Element, block: str, party: PartyRef) -> None:
    node = etree.SubElement(parent, q(block))
    for attr, xml in (
        ("name", "name"),
        ("identity", "identity"),
        ("country_code", "countryCode"),
        ("ministry_code", "ministryCode"),
        ("organization_code", "organizationCode"),
        ("unit_code", "unitCode"),
    ):
        value = getattr(party, attr)
        if value or attr in ("name", "identity", "country_code"):
            etree.SubElement(node, q(xml)).text = value


def reference_envelope(header: Header, document: etree._Element) -> etree._Element:
    """The builder before the skeleton: one SubElement per element."""
    root = etree.Element(ENVELOPE, nsmap={None: NS})
    head = etree.SubElement(root, HEADER)
    ref = etree.SubElement(head, q("Reference"))
    etree.SubElement(ref, q("version")).text = header.version
    etree.SubElement(ref, q("messageId")).text = header.message_id
    _reference_party_block(head, "From", header.sender)
    _reference_party_block(head, "To", header.recipient)
    subject = etree.SubElement(head, q("Subject"))
    etree.SubElement(subject, q("documentType")).text = header.document_type
    etree.SubElement(subject, q("function")).text = header.function
    etree.SubElement(subject, q("reference")).text = header.reference
    if header.pre_reference:
        etree.SubElement(subject, q("preReference")).text = header.pre_reference
    etree.SubElement(subject, q("sendDate")).text = format_datetime(header.send_date)
    body = etree.SubElement(root, BODY)
    content = etree.SubElement(body, CONTENT, Id=CONTENT_ID)
    content.append(copy_element(document))
    return root


def party(identity: str, present: tuple[str, ...], name: str = "Bo Cong Thuong") -> PartyRef:
    optional = {attr: f"{attr[:3].upper()}-{identity}" if attr in present else "" for attr in OPTIONAL}
    return PartyRef(identity=identity, name=name, country_code="VN", **optional)


def header(**changes: object) -> Header:
    fields: dict[str, object] = {
        "version": "1",
        "message_id": "7f1c0000-0000-4000-8000-000000000001",
        "sender": party("VN-MOIT", ("unit_code",)),
        "recipient": party("VN-NSW", ()),
        "document_type": "licence.import",
        "function": "01",
        "reference": "HS-2026/0042",
        "pre_reference": "m-0",
        "send_date": datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC),
    }
    fields.update(changes)
    return Header(**fields)  # type: ignore[arg-type]


def document() -> etree._Element:
    doc = etree.Element("{urn:example:doc}Licence", nsmap={"d": "urn:example:doc"})
    etree.SubElement(doc, "{urn:example:doc}number").text = "L-1"
    return doc


SUBSETS = [subset for size in range(len(OPTIONAL) + 1) for subset in itertools.combinations(OPTIONAL, size)]


@pytest.mark.parametrize("to_fields", SUBSETS, ids=lambda s: "+".join(s) or "bare")
@pytest.mark.parametrize("from_fields", SUBSETS, ids=lambda s: "+".join(s) or "bare")
@pytest.mark.parametrize("pre_reference", [None, "", "m-0"], ids=["no-pre", "empty-pre", "pre"])
def test_every_header_shape_gives_the_reference_bytes(
    from_fields: tuple[str, ...], to_fields: tuple[str, ...], pre_reference: str | None
) -> None:
    built = header(
        sender=party("VN-MOIT", from_fields), recipient=party("VN-NSW", to_fields), pre_reference=pre_reference
    )
    assert etree.tostring(build_envelope(built, document())) == etree.tostring(reference_envelope(built, document()))


@pytest.mark.parametrize(
    "changes",
    [
        {"sender": party("VN-TRADER", (), name="")},  # an empty name is still written, as <name></name>
        {"recipient": PartyRef(identity="VN-TRADER-0101234567", name="", country_code="")},
        {"reference": "a & b < c > d \" ' \u0111\u01b0\u1eddng"},
        {"message_id": "carriage\rreturn\nand\ttab"},  # \r must stay a character reference, not a newline
        {"send_date": datetime(2026, 1, 1, 6, 59, 59, tzinfo=timezone(timedelta(hours=7)))},
    ],
    ids=["empty-name", "bare-party", "escaped-unicode", "control-whitespace", "non-utc-date"],
)
def test_unusual_header_text_gives_the_reference_bytes(changes: dict[str, object]) -> None:
    built = header(**changes)
    assert etree.tostring(build_envelope(built, document())) == etree.tostring(reference_envelope(built, document()))


def test_a_sample_header_round_trips() -> None:
    original = parse_header(sample_envelope("eco.atiga-form-d"))
    assert parse_header(build_envelope(original, document())) == original


def test_envelopes_share_no_elements() -> None:
    built = header()
    first = build_envelope(built, document())
    expected = etree.tostring(first)
    first[0][0][0].text = "changed"
    first.find(f"{BODY}/{CONTENT}").set("Id", "changed")  # type: ignore[union-attr]
    etree.SubElement(first[0], q("extra"))
    second = build_envelope(built, document())
    assert etree.tostring(second) == expected
    assert etree.tostring(build_envelope(built, document())) == expected


def _leaf(parent: etree._Element, local: str, text: str, **attrs: str) -> None:
    etree.SubElement(parent, f"{{{RECEIPT_NS}}}{local}", attrs).text = text


def reference_receipt(message_id: str, digest: str, received_at: datetime, destinations: Sequence[str]) -> bytes:
    doc = etree.Element(f"{{{RECEIPT_NS}}}Receipt", nsmap={None: RECEIPT_NS})
    _leaf(doc, "messageId", message_id)
    _leaf(doc, "digest", digest, algorithm="sha-256")
    _leaf(doc, "receivedAt", format_datetime(received_at))
    _leaf(doc, "status", "ACCEPTED")
    dests = etree.SubElement(doc, f"{{{RECEIPT_NS}}}destinations")
    for name in destinations:
        _leaf(dests, "destination", name)
    return etree.tostring(doc)


def reference_rejection(error: Rejected, digest: str | None, message_id: str | None, rejected_at: str) -> bytes:
    doc = etree.Element(f"{{{RECEIPT_NS}}}Rejection", nsmap={None: RECEIPT_NS})
    if message_id:
        _leaf(doc, "messageId", message_id)
    if digest:
        _leaf(doc, "digest", digest, algorithm="sha-256")
    _leaf(doc, "code", error.code.value)
    _leaf(doc, "httpStatus", str(error.http_status))
    _leaf(doc, "detail", error.detail)
    if error.location:
        _leaf(doc, "location", error.location)
    _leaf(doc, "rejectedAt", rejected_at)
    return etree.tostring(doc)


@pytest.fixture
def documents(monkeypatch: pytest.MonkeyPatch) -> list[etree._Element]:
    """Every document ``ReceiptFactory`` wraps, as it was handed to ``build_envelope``."""
    seen: list[etree._Element] = []

    def recording(header: Header, document: etree._Element, **options: Any) -> etree._Element:
        seen.append(copy_element(document))
        return build_envelope(header, document, **options)

    monkeypatch.setattr(receipts, "build_envelope", recording)
    return seen


@pytest.fixture(scope="module")
def answers(signers: Callable[..., Signer]) -> ReceiptFactory:
    return ReceiptFactory(signers("VN-NSW"), party("VN-NSW", ()))


@pytest.mark.parametrize(
    "destinations", [[], ["customs"], ["customs", "moit", "TH-NSW & <peer> \u0111"]], ids=["none", "one", "three"]
)
def test_receipt_documents_give_the_reference_bytes(
    answers: ReceiptFactory, documents: list[etree._Element], destinations: list[str]
) -> None:
    received_at = datetime(2026, 11, 24, 17, 0, 1, tzinfo=timezone(timedelta(hours=7)))
    for message_id in ("m-1", "m-2 & <3>"):  # the second from the cached skeleton
        answers.receipt(header(message_id=message_id), "ab" * 32, received_at, destinations)
        expected = reference_receipt(message_id, "ab" * 32, received_at, destinations)
        assert etree.tostring(documents.pop()) == expected


@pytest.mark.parametrize("message_id", [None, "m-1"], ids=["no-id", "id"])
@pytest.mark.parametrize("digest", [None, "cd" * 32], ids=["no-digest", "digest"])
@pytest.mark.parametrize("location", [None, "/Envelope/Header/Subject/sendDate"], ids=["no-location", "location"])
def test_rejection_documents_give_the_reference_bytes(
    answers: ReceiptFactory,
    documents: list[etree._Element],
    message_id: str | None,
    digest: str | None,
    location: str | None,
) -> None:
    error = Rejected(ErrorCode.SCHEMA_INVALID, "sendDate 'x' is not <ISO> & \u00e9", location)
    for _ in range(2):  # the second from the cached skeleton
        answers.rejection(error, digest=digest, message_id=message_id)
        [document] = documents
        rejected_at = document.findtext(f"{{{RECEIPT_NS}}}rejectedAt")
        assert rejected_at is not None
        assert etree.tostring(documents.pop()) == reference_rejection(error, digest, message_id, rejected_at)
