"""The NSW envelope (``urn:nsw:envelope:1``): names, reading the header, building envelopes.

Shape (see ``schemas/envelope.xsd``)::

    Envelope
      Header
        Reference   version, messageId
        From / To   name, identity, countryCode, ministryCode?, organizationCode?, unitCode?
        Subject     documentType, function, reference, preReference?, sendDate
      Body
        Content Id="content"   one business document in its own namespace
        ds:Signature?          the issuing authority's signature over Content
      ds:Signature             the SystemSignature (enveloped, over the whole Envelope)
"""

from __future__ import annotations

from copy import deepcopy
from datetime import UTC, datetime
from functools import lru_cache

from lxml import etree

from gateway.errors import ErrorCode, Rejected
from gateway.model import Header, PartyRef
from gateway.security.parse import copy_element

NS = "urn:nsw:envelope:1"
DS = "http://www.w3.org/2000/09/xmldsig#"
NSMAP = {"e": NS, "ds": DS}
CONTENT_ID = "content"

RECEIPT_FUNCTION = "99"
REJECTION_FUNCTION = "21"


def q(local: str) -> str:
    """Clark name of an envelope element."""
    return f"{{{NS}}}{local}"


ENVELOPE = q("Envelope")
HEADER = q("Header")
BODY = q("Body")
CONTENT = q("Content")
SIGNATURE = f"{{{DS}}}Signature"

_PARTY_FIELDS = (
    ("identity", "identity"),
    ("name", "name"),
    ("country_code", "countryCode"),
    ("ministry_code", "ministryCode"),
    ("organization_code", "organizationCode"),
    ("unit_code", "unitCode"),
)


def _header_fields(header: etree._Element) -> dict[str, str]:
    """``{"Block/field": stripped text}`` for the header's two levels, first occurrence wins (as ``find``).

    One pass over the header instead of a namespaced ``find`` per field: the header is read for every
    message, and 19 ``find`` calls cost about 50 us.
    """
    prefix = f"{{{NS}}}"
    fields: dict[str, str] = {}
    for block in header:
        tag = block.tag
        if not isinstance(tag, str) or not tag.startswith(prefix):
            continue
        name = tag[len(prefix) :]
        for leaf in block:
            leaf_tag = leaf.tag
            if isinstance(leaf_tag, str) and leaf_tag.startswith(prefix):
                fields.setdefault(f"{name}/{leaf_tag[len(prefix) :]}", (leaf.text or "").strip())
    return fields


def _text(fields: dict[str, str], path: str, *, required: bool = True) -> str | None:
    value = fields.get(path, "")
    if not value:
        if required:
            raise Rejected(
                ErrorCode.SCHEMA_INVALID,
                f"required header field {path.rsplit('/', 1)[-1]} is missing or empty",
                f"/Envelope/Header/{path}",
            )
        return None
    return value


def _party(fields: dict[str, str], block: str) -> PartyRef:
    values = {attr: _text(fields, f"{block}/{xml}", required=attr == "identity") or "" for attr, xml in _PARTY_FIELDS}
    return PartyRef(**values)


def parse_send_date(value: str, location: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise Rejected(ErrorCode.SCHEMA_INVALID, f"sendDate {value!r} is not an ISO 8601 date-time", location) from exc
    if parsed.tzinfo is None:
        raise Rejected(ErrorCode.SCHEMA_INVALID, "sendDate must carry a time zone (e.g. Z)", location)
    return parsed.astimezone(UTC)


def parse_header(envelope: etree._Element) -> Header:
    """Read the header of a (signed) envelope tree. Raises ``Rejected(SCHEMA_INVALID)`` naming the field."""
    if envelope.tag != ENVELOPE:
        raise Rejected(
            ErrorCode.SCHEMA_INVALID,
            f"root element is {envelope.tag}, expected {{{NS}}}Envelope",
            "/*[1]",
        )
    header = envelope.find("e:Header", NSMAP)
    if header is None:
        raise Rejected(ErrorCode.SCHEMA_INVALID, "the envelope has no Header", "/Envelope/Header")
    fields = _header_fields(header)
    send_date = _text(fields, "Subject/sendDate") or ""
    return Header(
        version=_text(fields, "Reference/version") or "",
        message_id=_text(fields, "Reference/messageId") or "",
        sender=_party(fields, "From"),
        recipient=_party(fields, "To"),
        document_type=_text(fields, "Subject/documentType") or "",
        function=_text(fields, "Subject/function") or "",
        reference=_text(fields, "Subject/reference") or "",
        pre_reference=_text(fields, "Subject/preReference", required=False),
        send_date=parse_send_date(send_date, "/Envelope/Header/Subject/sendDate"),
    )


def content_document(envelope: etree._Element) -> etree._Element:
    """The single business document inside ``Body/Content``."""
    content = envelope.find("e:Body/e:Content", NSMAP)
    if content is None:
        raise Rejected(ErrorCode.SCHEMA_INVALID, "the envelope has no Body/Content", "/Envelope/Body/Content")
    children = [child for child in content if isinstance(child.tag, str)]
    if len(children) != 1:
        raise Rejected(
            ErrorCode.SCHEMA_INVALID,
            f"Body/Content must hold exactly one document, found {len(children)}",
            "/Envelope/Body/Content",
        )
    return children[0]


_PARTY_BLOCK_FIELDS = (
    ("name", "name"),
    ("identity", "identity"),
    ("country_code", "countryCode"),
    ("ministry_code", "ministryCode"),
    ("organization_code", "organizationCode"),
    ("unit_code", "unitCode"),
)
_REQUIRED_PARTY_FIELDS = frozenset({"name", "identity", "country_code"})


def _party_rows(block: str, party: PartyRef) -> list[tuple[str, str, str]]:
    rows = []
    for attr, xml in _PARTY_BLOCK_FIELDS:
        value = getattr(party, attr)
        if value or attr in _REQUIRED_PARTY_FIELDS:
            rows.append((block, xml, value))
    return rows


def _header_rows(header: Header) -> list[tuple[str, str, str]]:
    """``(block, field, text)`` for every Header leaf, in document order."""
    rows = [("Reference", "version", header.version), ("Reference", "messageId", header.message_id)]
    rows += _party_rows("From", header.sender)
    rows += _party_rows("To", header.recipient)
    rows += [
        ("Subject", "documentType", header.document_type),
        ("Subject", "function", header.function),
        ("Subject", "reference", header.reference),
    ]
    if header.pre_reference:
        rows.append(("Subject", "preReference", header.pre_reference))
    rows.append(("Subject", "sendDate", format_datetime(header.send_date)))
    return rows


@lru_cache(maxsize=64)
def _skeleton(shape: tuple[tuple[str, str], ...]) -> etree._Element:
    """An envelope with the Header leaves ``shape`` names, all without text, and an empty Content.

    Building ~25 elements one ``SubElement`` at a time costs ~50 us; a deep copy of this ~10 us. There are
    few shapes (which optional party fields and preReference are present), so they are kept.
    """
    root = etree.Element(ENVELOPE, nsmap={None: NS})
    head = etree.SubElement(root, HEADER)
    blocks: dict[str, etree._Element] = {}
    for block, name in shape:
        if block not in blocks:
            blocks[block] = etree.SubElement(head, q(block))
        etree.SubElement(blocks[block], q(name))
    etree.SubElement(etree.SubElement(root, BODY), CONTENT, Id=CONTENT_ID)
    return root


def build_envelope(header: Header, document: etree._Element, *, adopt: bool = False) -> etree._Element:
    """An unsigned envelope around ``document``, which is copied, not moved.

    ``adopt=True`` is for a document the caller has just built and holds no other reference to (the
    gateway's receipts and rejections): it is moved into the envelope instead, saving the copy (a
    serialise and re-parse). The envelope's bytes are the same either way.
    """
    if adopt and document.getparent() is not None:
        raise ValueError("only a document root can be adopted: this one is part of another tree")
    rows = _header_rows(header)
    root = deepcopy(_skeleton(tuple((block, name) for block, name, _ in rows)))
    leaves = [leaf for block in root[0] for leaf in block]
    for leaf, (_, _, text) in zip(leaves, rows, strict=True):
        leaf.text = text
    root[1][0].append(document if adopt else copy_element(document))
    return root


def format_datetime(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
