"""A certificate with a real-sized attachment: an ePhyto whose AttachmentBinaryObject carries ~12 MB of
base64 (libxml2's default would refuse any text node over 10 MB as "not well-formed")."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from lxml import etree

from gateway.samples import EPHYTO_RAM, attach_to_ephyto, sample_envelope
from gateway.security.parse import parse_untrusted
from gateway.security.sign import Signer, to_bytes
from tests.conftest import RunningGateway

ATTACHMENT_BYTES = 9 * 1024 * 1024  # a 9 MB PDF: 12.6 MB of base64 in one text node


def test_one_text_node_over_10_mb_parses() -> None:
    root = parse_untrusted(b"<a><b>" + b"x" * 12_000_000 + b"</b></a>")
    assert len(root[0].text or "") == 12_000_000


def _ephyto_with_attachment(pdf: bytes) -> etree._Element:
    envelope = sample_envelope("sps.ephyto", message_id=str(uuid.uuid4()), send_date=datetime.now(UTC))
    attach_to_ephyto(envelope, pdf, "lab-report.pdf", reference_id="VN-PPD-2026-0004711-LAB")
    return envelope


async def test_a_certificate_with_a_12_mb_attachment_is_accepted_and_enqueued_intact(
    make_gateway: Callable[..., object], signers: Callable[..., Signer]
) -> None:
    pdf = b"%PDF-1.7\n" + os.urandom(ATTACHMENT_BYTES)
    body = to_bytes(signers("VN-MARD-PPD").sign_envelope(_ephyto_with_attachment(pdf)))
    assert len(body) > 12_000_000
    running: RunningGateway = await make_gateway()  # type: ignore[assignment]

    response = await running.post(body)

    text = await response.text()
    assert response.status == 202, text
    assert "<status>ACCEPTED</status>" in text
    assert [d.payload for d in running.broker.published] == [body] * len(running.broker.published)
    assert running.broker.published, "routed to at least one destination"
    carried = parse_untrusted(running.broker.published[0].payload)
    attachment = carried.find(f".//{{{EPHYTO_RAM}}}AttachmentBinaryObject")
    assert attachment is not None
    assert base64.b64decode(attachment.text or "") == pdf
