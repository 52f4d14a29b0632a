"""Typed values that flow between the stages, and the unit of work handed to brokers and adapters.

Each ingress stage takes one of these and returns the next, so a later stage cannot be handed
unverified input: ``ParsedMessage -> VerifiedMessage -> ValidatedMessage -> RoutedMessage``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from lxml import etree


@dataclass(frozen=True, slots=True)
class PartyRef:
    """The ``<From>`` / ``<To>`` block of an envelope header, as written by the sender."""

    identity: str
    name: str = ""
    country_code: str = ""
    ministry_code: str = ""
    organization_code: str = ""
    unit_code: str = ""


@dataclass(frozen=True, slots=True)
class Header:
    version: str
    message_id: str
    sender: PartyRef
    recipient: PartyRef
    document_type: str
    function: str
    reference: str
    pre_reference: str | None
    send_date: datetime


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """Well-formed, DTD-free, bounded XML. Nothing about it is trusted yet."""

    raw: bytes
    root: etree._Element
    digest: str  # SHA-256 hex of the exact received bytes
    received_at: datetime


@dataclass(frozen=True, slots=True)
class BodySignature:
    """Result of checking the issuing authority's signature over ``Body/Content``."""

    present: bool
    valid: bool
    signer_subject: str = ""
    authority: str | None = None  # registry identity of the authority, when the registry names one
    detail: str = ""


@dataclass(frozen=True, slots=True)
class VerifiedMessage:
    """Only the signed tree survives verification: ``envelope`` is what the SystemSignature covers."""

    raw: bytes  # the exact received bytes: what is delivered onward, signature intact
    digest: str
    received_at: datetime
    envelope: etree._Element  # signed tree (signxml's signed_xml), the Envelope minus its SystemSignature
    header: Header
    party: str  # registry identity bound to the signer's certificate (== header.sender.identity)
    signer: x509.Certificate
    signature_algorithm: str
    legacy_algorithm: bool  # RSA-SHA1 / inclusive C14N accepted under the party's explicit allowance
    body_signature: BodySignature


@dataclass(frozen=True, slots=True)
class ValidatedMessage:
    verified: VerifiedMessage
    document_type: str
    content: etree._Element  # the business document (the single child of Body/Content)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    destination: str  # e.g. "moit-licensing", "asw:TH"
    rule: str  # name of the rule that chose it


@dataclass(frozen=True, slots=True)
class RoutedMessage:
    validated: ValidatedMessage
    routes: tuple[RouteDecision, ...]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message's copy for one destination, as stored by a broker and handed to an adapter."""

    message_id: str
    sender: str
    destination: str
    document_type: str
    payload: bytes  # the signed envelope exactly as received
    digest: str  # SHA-256 hex of payload
    attempt: int = 1  # 1 on first delivery; incremented each time the message comes back for a retry
    first_enqueued_at: float = 0.0  # epoch seconds when ingress enqueued it
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def idempotency_key(self) -> str:
        return f"{self.message_id}:{self.destination}"


class State(StrEnum):
    """Per message and destination. Ordered: a state never moves to one of lower rank."""

    RECEIVED = "RECEIVED"
    REJECTED = "REJECTED"
    ACCEPTED = "ACCEPTED"
    QUEUED = "QUEUED"
    DELIVERING = "DELIVERING"
    RETRY_WAIT = "RETRY_WAIT"
    DELIVERED = "DELIVERED"
    DEAD = "DEAD"
    REPLAYED = "REPLAYED"
