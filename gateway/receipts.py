"""The gateway's own answers: a signed receipt (function 99) or a signed rejection (function 21).

Both are ordinary NSW envelopes (``schemas/receipt.xsd`` for their Content), signed by the gateway's
key, so a partner verifies them with the same code it uses for any other message.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from copy import deepcopy
from datetime import UTC, datetime
from functools import lru_cache
from typing import Final

from lxml import etree

from gateway.envelope import RECEIPT_FUNCTION, REJECTION_FUNCTION, build_envelope, format_datetime
from gateway.errors import Rejected
from gateway.model import Header, PartyRef
from gateway.security.sign import EnvelopeSigner, to_bytes

RECEIPT_NS: Final = "urn:nsw:receipt:1"
RECEIPT_TYPE: Final = "nsw.receipt"
REJECTION_TYPE: Final = "nsw.rejection"
UNKNOWN_PARTY: Final = PartyRef(identity="UNKNOWN", name="unidentified sender", country_code="ZZ")


def _r(local: str) -> str:
    return f"{{{RECEIPT_NS}}}{local}"


def _leaf(parent: etree._Element, local: str, text: str, **attrs: str) -> None:
    etree.SubElement(parent, _r(local), attrs).text = text


_ATTRIBUTES: Final = {"digest": {"algorithm": "sha-256"}}


@lru_cache(maxsize=32)
def _skeleton(root: str, names: tuple[str, ...]) -> etree._Element:
    """``root`` with one empty child per name, in order: a deep copy of it costs a third of building one
    (a new document and a ``SubElement`` per child, ~40 us for a receipt)."""
    doc = etree.Element(_r(root), nsmap={None: RECEIPT_NS})
    for name in names:
        etree.SubElement(doc, _r(name), _ATTRIBUTES.get(name, {}))
    return doc


def _document(root: str, fields: Sequence[tuple[str, str]]) -> etree._Element:
    """A receipt-namespace document ``root`` whose children are ``fields`` (name, text), in order."""
    doc = deepcopy(_skeleton(root, tuple(name for name, _ in fields)))
    for leaf, (_, text) in zip(doc, fields, strict=True):
        leaf.text = text
    return doc


class ReceiptFactory:
    """Builds and signs receipts and rejections on behalf of the gateway party ``gateway``."""

    def __init__(self, signer: EnvelopeSigner, gateway: PartyRef) -> None:
        self.signer = signer
        self.gateway = gateway

    def _header(
        self, document_type: str, function: str, to: PartyRef, answers: str | None, digest: str | None
    ) -> Header:
        return Header(
            version="1",
            message_id=str(uuid.uuid4()),
            sender=self.gateway,
            recipient=to,
            document_type=document_type,
            function=function,
            # what this answers: the messageId, or for an unreadable message the hash of its bytes
            reference=answers or (f"sha256:{digest}" if digest else "unidentified"),
            pre_reference=answers,
            send_date=datetime.now(UTC),
        )

    def receipt(self, header: Header, digest: str, received_at: datetime, destinations: Sequence[str]) -> bytes:
        doc = _document(
            "Receipt",
            [
                ("messageId", header.message_id),
                ("digest", digest),
                ("receivedAt", format_datetime(received_at)),
                ("status", "ACCEPTED"),
            ],
        )
        dests = etree.SubElement(doc, _r("destinations"))
        for name in destinations:
            _leaf(dests, "destination", name)
        envelope = build_envelope(
            self._header(RECEIPT_TYPE, RECEIPT_FUNCTION, header.sender, header.message_id, digest), doc, adopt=True
        )
        return to_bytes(self.signer.sign_envelope(envelope, copy=False))

    def rejection(
        self,
        error: Rejected,
        *,
        digest: str | None,
        message_id: str | None = None,
        sender: PartyRef | None = None,
    ) -> bytes:
        fields = [("messageId", message_id)] if message_id else []
        if digest:
            fields.append(("digest", digest))
        fields += [("code", error.code.value), ("httpStatus", str(error.http_status)), ("detail", error.detail)]
        if error.location:
            fields.append(("location", error.location))
        fields.append(("rejectedAt", format_datetime(datetime.now(UTC))))
        doc = _document("Rejection", fields)
        to = (
            PartyRef(
                identity=sender.identity, name=sender.name or sender.identity, country_code=sender.country_code or "ZZ"
            )
            if sender
            else UNKNOWN_PARTY
        )
        header = self._header(REJECTION_TYPE, REJECTION_FUNCTION, to, message_id, digest)
        return to_bytes(self.signer.sign_envelope(build_envelope(header, doc, adopt=True), copy=False))
