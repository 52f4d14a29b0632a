"""The ingress path of one message, composed in one place, top to bottom.

    raw bytes
      -> parse            hardened parser                              ParsedMessage
      -> verify           SystemSignature, trust, party binding         VerifiedMessage
      -> check header     rate per party, freshness window
      -> authorise        document type known; party allowed this type and function
      -> validate         envelope XSD + the body's XSD                 ValidatedMessage
      -> route            routing rules                                 RoutedMessage
      -> claim            duplicate detection, atomic in the ledger (RECEIVED audited)
      -> enqueue          one durable copy per destination, confirmed
      -> accept           signed receipt stored, ACCEPTED + QUEUED audited
    <- 202 + receipt   |   4xx/503 + signed rejection (REJECTED audited)

The synchronous stages (parse .. route) are pure CPU and raise ``Rejected``; the asynchronous tail
talks to the ledger and the broker. The 202 is returned only after every destination's copy is
confirmed by the broker *and* the acceptance is recorded. The duplicate claim sits just before
enqueue (not with the header checks as DESIGN.md draws it) so that it is one atomic write, and a
message refused by validation never occupies its messageId.

For every accepted message the time spent in each of ``INGRESS_STAGES`` goes to the ``on_stages``
observer (the gateway's metrics). The asynchronous stages' times include waiting: for a group
commit, the broker's confirms, the event loop's other work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from typing import Final

import structlog

from gateway.brokers.base import Broker
from gateway.config import Settings
from gateway.envelope import NSMAP
from gateway.errors import BrokerUnavailable, ErrorCode, Rejected
from gateway.events import Event
from gateway.limits import RateLimiter, check_freshness
from gateway.model import Delivery, ParsedMessage, PartyRef, RoutedMessage, State, ValidatedMessage, VerifiedMessage
from gateway.partners import PartnerRegistry
from gateway.receipts import ReceiptFactory
from gateway.security.parse import parse_message
from gateway.security.verify import BODY_SIGNATURE_AT, Verifier
from gateway.stores.base import ClaimKind, Ledger
from gateway.validation import Validator
from routing.engine import RoutingTable

log = structlog.get_logger("nsw.ingress")

# validate: the header checks (rate, freshness), authorisation and both schemas
INGRESS_STAGES: Final = ("parse", "verify", "validate", "route", "claim", "publish", "receipt", "accept")
StageObserver = Callable[[Sequence[float]], None]  # seconds spent in each of INGRESS_STAGES, in that order


@dataclass(frozen=True, slots=True)
class IngressResult:
    status: int
    body: bytes
    message_id: str | None
    code: str | None = None  # rejection code; None when accepted
    replayed: bool = False  # the original receipt of an identical earlier submission


@dataclass(slots=True)
class _Seen:
    """What is known about a message when it is rejected, for the rejection and the audit record."""

    digest: str | None = None
    claimed_id: str | None = None
    claimed_sender: PartyRef | None = None
    verified: VerifiedMessage | None = None


class Admission:
    """The synchronous stages: pure CPU, no I/O. Also used offline by ``nswgw verify``."""

    def __init__(
        self,
        *,
        settings: Settings,
        verifier: Verifier,
        validator: Validator,
        partners: PartnerRegistry,
        routing: RoutingTable,
        extra_destinations: Collection[str] = (),
        withheld: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.verifier = verifier
        self.validator = validator
        self.partners = partners
        self.routing = routing  # replaced atomically on reload
        self.extra_destinations = frozenset(extra_destinations)  # ASW peers routable without being named
        self.withheld: Mapping[str, str] = withheld or {}  # named ASW peers with no endpoint: why (replaced on reload)
        self.limiter = RateLimiter(settings.rate_per_party, settings.rate_burst)
        self.clock = clock

    def parse(self, raw: bytes, seen: _Seen) -> ParsedMessage:
        parsed = parse_message(raw, max_depth=self.settings.max_depth)
        seen.digest = parsed.digest
        seen.claimed_id = parsed.root.findtext("e:Header/e:Reference/e:messageId", namespaces=NSMAP)
        identity = parsed.root.findtext("e:Header/e:From/e:identity", namespaces=NSMAP)
        if identity:
            seen.claimed_sender = PartyRef(identity=identity.strip())
        return parsed

    def verify(self, parsed: ParsedMessage, seen: _Seen) -> VerifiedMessage:
        verified = self.verifier.verify(parsed)
        seen.verified = verified
        seen.claimed_id = verified.header.message_id
        seen.claimed_sender = verified.header.sender
        return verified

    def check_header(self, verified: VerifiedMessage) -> None:
        self.limiter.take(verified.party)
        check_freshness(
            verified.header,
            self.clock(),
            past=self.settings.freshness_past_seconds,
            future=self.settings.freshness_future_seconds,
        )

    def authorise(self, verified: VerifiedMessage) -> None:
        header = verified.header
        doc_type = self.validator.registry.get(header.document_type)
        party = self.partners.get(verified.party)
        where = "/Envelope/Header/Subject/function"
        if party is None:  # the verifier bound it, so only a registry reload in between gets here
            raise Rejected(ErrorCode.SENDER_MISMATCH, f"party {verified.party} is no longer registered", where)
        if party.role not in doc_type.roles_for(header.function):
            raise Rejected(
                ErrorCode.SENDER_MISMATCH,
                f"a {party.role} may not send function {header.function} of {header.document_type}",
                where,
            )
        if not party.may(header.document_type, header.function):
            raise Rejected(
                ErrorCode.SENDER_MISMATCH,
                f"{party.identity} is not registered to send function {header.function} of {header.document_type}",
                where,
            )
        if doc_type.needs_body_signature(header.function, party.role) and not verified.body_signature.present:
            # Verify already checked a Body signature that is there; this refuses one that is missing where the
            # registry requires it (an e-C/O that no issuing authority signed, sent on by a peer or a ministry).
            raise Rejected(
                ErrorCode.SIGNATURE_MISSING,
                f"function {header.function} of {header.document_type} from {party.identity} ({party.role}) must carry "
                "the issuing authority's signature over Body/Content (a ds:Signature in Body); this message has none",
                BODY_SIGNATURE_AT,
            )

    def validate(self, verified: VerifiedMessage) -> ValidatedMessage:
        return self.validator.validate(verified)

    def route(self, validated: ValidatedMessage) -> RoutedMessage:
        routes = self.routing.route(
            validated.verified.header,
            validated.content,
            extra_destinations=self.extra_destinations,
            withheld=self.withheld,
        )
        return RoutedMessage(validated=validated, routes=routes)

    def admit(self, raw: bytes, seen: _Seen | None = None, marks: list[float] | None = None) -> RoutedMessage:
        """Every CPU-bound stage, in order. Raises ``Rejected``. ``marks`` gets the time at the end of each."""
        seen = seen if seen is not None else _Seen()
        mark = marks.append if marks is not None else _no_mark
        parsed = self.parse(raw, seen)
        mark(time.perf_counter())
        verified = self.verify(parsed, seen)
        mark(time.perf_counter())
        self.check_header(verified)
        self.authorise(verified)
        validated = self.validate(verified)
        mark(time.perf_counter())
        routed = self.route(validated)
        mark(time.perf_counter())
        return routed


class Pipeline:
    """The whole ingress path: ``Admission``, then claim, enqueue and accept (or a signed rejection)."""

    def __init__(
        self,
        admission: Admission,
        *,
        broker: Broker,
        ledger: Ledger,
        receipts: ReceiptFactory,
        on_stages: StageObserver | None = None,
    ) -> None:
        self.admission = admission
        self.broker = broker
        self.ledger = ledger
        self.receipts = receipts
        self.on_stages = on_stages

    # -- the asynchronous tail ----------------------------------------------------------------

    async def submit(self, raw: bytes) -> IngressResult:
        seen = _Seen()
        marks = [time.perf_counter()]
        try:
            routed = self.admission.admit(raw, seen, marks)
        except Rejected as error:
            return await self.reject(error, seen)
        # Every later log line of this message's handling carries its id and party. Plain bind/reset:
        # bound_contextvars() makes several passes over the whole context per call.
        tokens = structlog.contextvars.bind_contextvars(
            message_id=routed.validated.verified.header.message_id, party=routed.validated.verified.party
        )
        try:
            result = await self._enqueue(routed, seen, marks)
        except BrokerUnavailable as exc:
            log.warning("ingress.unavailable", error=str(exc))
            return await self.reject(Rejected(ErrorCode.UNAVAILABLE, f"message not accepted: {exc}"), seen)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
        if self.on_stages is not None and len(marks) == len(INGRESS_STAGES) + 1:  # accepted anew
            try:
                self.on_stages([end - start for start, end in pairwise(marks)])
            except Exception:  # the message is accepted: a metrics fault must not turn its 202 into a 500
                log.exception("ingress.stage_timings_lost")
        return result

    async def _enqueue(self, routed: RoutedMessage, seen: _Seen, marks: list[float]) -> IngressResult:
        verified = routed.validated.verified
        header = verified.header
        mid, doc_type = header.message_id, header.document_type
        received = _event(
            State.RECEIVED,
            verified,
            code="LEGACY_SHA1" if verified.legacy_algorithm else None,
            detail=_received_detail(verified),
        )
        claim = await self.ledger.claim(mid, verified.party, verified.digest, doc_type, [received])
        marks.append(time.perf_counter())
        if claim.kind is ClaimKind.CONFLICT:
            duplicate = Rejected(
                ErrorCode.DUPLICATE,
                f"messageId {mid} was already used by {claim.existing_sender} for different content "
                f"(sha256 {claim.existing_digest})",
                "/Envelope/Header/Reference/messageId",
            )
            return await self.reject(duplicate, seen)
        if claim.kind is ClaimKind.REPLAY and claim.receipt is not None:
            log.info("ingress.replayed_receipt")
            return IngressResult(202, claim.receipt, mid, replayed=True)

        destinations = [route.destination for route in routed.routes]
        now = time.time()
        deliveries = [
            Delivery(
                message_id=mid,
                sender=verified.party,
                destination=dest,
                document_type=doc_type,
                payload=verified.raw,
                digest=verified.digest,
                first_enqueued_at=now,
                headers={"function": header.function, "reference": header.reference},
            )
            for dest in destinations
        ]
        try:
            await self.broker.publish(deliveries)
        except BrokerUnavailable:
            if claim.kind is ClaimKind.NEW:  # free the id for the sender's retry; reject() audits the refusal
                await self.ledger.release(mid, [])
            raise
        marks.append(time.perf_counter())
        receipt = self.receipts.receipt(header, verified.digest, verified.received_at, destinations)
        marks.append(time.perf_counter())
        accepted = [_event(State.ACCEPTED, verified, detail=f"routes: {_routes_text(routed)}")]
        accepted += [_event(State.QUEUED, verified, destination=dest) for dest in destinations]
        await self.ledger.accept(mid, receipt, destinations, accepted)
        marks.append(time.perf_counter())
        log.debug("ingress.accepted", document_type=doc_type, destinations=destinations)
        return IngressResult(202, receipt, mid)

    async def reject(self, error: Rejected, seen: _Seen) -> IngressResult:
        verified = seen.verified
        event = Event(
            State.REJECTED,
            message_id=seen.claimed_id or "",
            party=verified.party if verified else None,
            document_type=verified.header.document_type if verified else None,
            digest=seen.digest,
            code=error.code.value,
            detail=_rejection_detail(error, seen),
            claimed_party=seen.claimed_sender.identity if seen.claimed_sender else None,
        )
        try:
            await self.ledger.record([event])
        except BrokerUnavailable as exc:
            log.error("ingress.audit_unavailable", error=str(exc), rejected=error.code.value)  # noqa: TRY400
            if error.code is not ErrorCode.UNAVAILABLE:
                error = Rejected(ErrorCode.UNAVAILABLE, f"audit store unavailable: {exc}")
        log.info(
            "ingress.rejected",
            code=error.code.value,
            detail=error.detail,
            location=error.location,
            message_id=seen.claimed_id,
            party=verified.party if verified else None,
            claimed_sender=seen.claimed_sender.identity if seen.claimed_sender else None,
        )
        body = self.receipts.rejection(
            error, digest=seen.digest, message_id=seen.claimed_id, sender=seen.claimed_sender
        )
        return IngressResult(error.http_status, body, seen.claimed_id, code=error.code.value)

    async def reject_early(self, error: Rejected) -> IngressResult:
        """A rejection decided before the body was read (size, content type)."""
        return await self.reject(error, _Seen())


def _no_mark(_at: float) -> None:
    return None


def _event(
    state: State,
    verified: VerifiedMessage,
    *,
    destination: str | None = None,
    code: str | None = None,
    detail: str = "",
) -> Event:
    header = verified.header
    return Event(
        state,
        header.message_id,
        destination,
        party=verified.party,
        document_type=header.document_type,
        digest=verified.digest,
        code=code,
        detail=detail,
    )


def _received_detail(verified: VerifiedMessage) -> str:
    parts = [f"signed with {verified.signature_algorithm}"]
    if verified.header.pre_reference:
        parts.append(f"answers {verified.header.pre_reference}")
    if verified.legacy_algorithm:
        parts.append("legacy SHA-1 algorithm accepted under the party's registry allowance")
    body = verified.body_signature
    if body.present:
        parts.append(f"body signature by {body.authority or body.signer_subject}: {body.detail}")
    return "; ".join(parts)


def _routes_text(routed: RoutedMessage) -> str:
    return ", ".join(f"{r.destination} (rule {r.rule})" for r in routed.routes)


def _rejection_detail(error: Rejected, seen: _Seen) -> str:
    who = seen.claimed_sender.identity if seen.claimed_sender else "unknown"
    verified = "verified" if seen.verified else "unverified"
    where = f" at {error.location}" if error.location else ""
    return f"{error.detail}{where} (sender {who}, {verified})"
