"""The ASW peer adapter (``asw:<country>``): forward a message to a foreign single window and require
its signed receipt.

For one delivery:

1. forward   The envelope as received, addressed From this gateway To the peer NSW, ``sendDate`` set
             to when it was first enqueued, ``messageId`` kept, and a new SystemSignature by this
             gateway's key; the issuing authority's Body signature is not touched. A pure function of
             (payload, peer, gateway key, first_enqueued_at) -- gateway ECDSA signatures are
             deterministic (RFC 6979) -- so a retry sends the very same bytes, and the peer's duplicate
             check answers it with its original receipt instead of DUPLICATE.
2. exchange  Over a ``PeerTransport``: signed XML over HTTPS with mutual TLS here; an AS4 (ebMS 3)
             profile can sit behind the same Protocol.
3. judge     The answer must be an envelope signed by a certificate the partner registry binds to that
             peer (checked by the ingress's own ``Verifier``: trust store, then registry binding):
             * a receipt (99) naming this messageId and the SHA-256 of exactly the bytes sent:
               delivered; the receipt is stored as proof of delivery (``gateway.proofs``) and the
               delivery's audit record names its SHA-256;
             * a rejection (21) naming this messageId: ``PermanentFailure`` with the peer's code (dead
               letter), except the peer's own outages (UNAVAILABLE, RATE_LIMITED), which are retried;
             * anything else -- no answer, unsigned, signed by someone else, another id or digest:
               not delivered, ``TransientFailure``.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, Protocol

import aiohttp
from lxml import etree

from adapters.base import DeliveryReceipt, FileStamp, stamp_files
from adapters.held import HoldingAdapter
from adapters.http import client_ssl_context, parse_retry_after
from adapters.options import Options
from gateway.envelope import NSMAP, format_datetime, parse_header, q
from gateway.errors import ConfigError, ErrorCode, PermanentFailure, Rejected, TransientFailure
from gateway.model import Delivery, Header, PartyRef
from gateway.partners import PartnerRegistry, Party, PeerEndpoint
from gateway.proofs import ProofStore, proof_digest
from gateway.receipts import RECEIPT_NS
from gateway.retry import DeliveryHeld, RetryAfterFailure
from gateway.security.parse import parse_message, parse_untrusted
from gateway.security.sign import EnvelopeSigner, to_bytes
from gateway.security.verify import Verifier
from routing.config import DestinationConfig

ASW_KIND: Final = "asw"
PEER_PREFIX: Final = "asw:"
MAX_ANSWER_BYTES: Final = 1024 * 1024  # a receipt is a few kB; anything far larger is not one
WITHHELD_CODE: Final = "PEER_WITHHELD"
HELD_NOTE: Final = f"what is queued for it is not sent ({WITHHELD_CODE}) until the registry gives it an endpoint again"
PEER_TRANSIENT_CODES: Final = frozenset({"UNAVAILABLE", "RATE_LIMITED"})  # the peer's outage, not a verdict
RECEIPT: Final = f"{{{RECEIPT_NS}}}Receipt"
REJECTION: Final = f"{{{RECEIPT_NS}}}Rejection"
_R: Final = {"r": RECEIPT_NS}
_PARTY_FIELDS: Final = (
    ("name", "name"),
    ("identity", "identity"),
    ("countryCode", "country_code"),
    ("ministryCode", "ministry_code"),
    ("organizationCode", "organization_code"),
    ("unitCode", "unit_code"),
)


# -- the forwarded envelope ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forward:
    body: bytes  # exactly what is sent to the peer
    digest: str  # SHA-256 hex of body: what the peer's receipt must name
    header: Header  # the forwarded header (From this gateway, To the peer)


def _readdress(block: etree._Element, party: PartyRef) -> None:
    tail = block.tail
    block.clear()  # children are rebuilt in place so that they reuse the envelope's namespace prefix
    block.tail = tail
    for xml, attr in _PARTY_FIELDS:
        value = getattr(party, attr)
        if value or xml in ("name", "identity", "countryCode"):
            etree.SubElement(block, q(xml)).text = value


def forward_envelope(
    payload: bytes, *, sender: PartyRef, recipient: PartyRef, signer: EnvelopeSigner, send_date: datetime | None
) -> Forward:
    """``payload`` (a verified envelope) readdressed From ``sender`` To ``recipient`` and re-signed by
    ``signer``. ``send_date`` None keeps the original. Raises ``Rejected`` if ``payload`` is no envelope."""
    root = parse_untrusted(payload)
    for block, party in (("From", sender), ("To", recipient)):
        element = root.find(f"e:Header/e:{block}", NSMAP)
        if element is None:
            raise Rejected(ErrorCode.SCHEMA_INVALID, f"the envelope has no Header/{block}", "/Envelope/Header")
        _readdress(element, party)
    if send_date is not None:
        date = root.find("e:Header/e:Subject/e:sendDate", NSMAP)
        if date is not None:
            date.text = format_datetime(send_date)
    header = parse_header(root)
    body = to_bytes(signer.sign_envelope(root, copy=False))  # root was parsed here, nobody else holds it
    return Forward(body, hashlib.sha256(body).hexdigest(), header)


# -- transports ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerAnswer:
    status: int
    body: bytes
    retry_after: str | None = None


@dataclass(frozen=True, slots=True)
class TransportSettings:
    timeout: float  # a whole exchange: connect, send, answer
    connect_timeout: float
    max_in_flight: int


class PeerTransport(Protocol):
    async def exchange(self, body: bytes, headers: Mapping[str, str]) -> PeerAnswer:
        """Send one signed envelope; return the peer's answer. ``TransientFailure`` when none came back."""
        ...

    async def close(self) -> None: ...


PeerTransportFactory = Callable[[PeerEndpoint, TransportSettings], PeerTransport]


class HttpsPeerTransport:
    """POST over HTTPS with mutual TLS: the peer's server certificate must chain to ``endpoint.ca`` and
    we present this gateway's client certificate."""

    def __init__(self, endpoint: PeerEndpoint, settings: TransportSettings) -> None:
        if endpoint.client_cert is None or endpoint.client_key is None:
            raise ValueError(f"endpoint {endpoint.url}: mutual TLS needs client_cert and client_key")
        self.url = endpoint.url
        self.settings = settings
        self.loaded_files = stamp_files((endpoint.ca, endpoint.client_cert, endpoint.client_key))  # see stamp_files
        self._ssl = client_ssl_context(endpoint.ca, endpoint.client_cert, endpoint.client_key)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop.
        connector = aiohttp.TCPConnector(limit=self.settings.max_in_flight, ssl=self._ssl or True)
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout, sock_connect=self.settings.connect_timeout)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._session

    async def exchange(self, body: bytes, headers: Mapping[str, str]) -> PeerAnswer:
        session = self._session or self._open()
        try:
            async with session.post(self.url, data=body, headers=dict(headers), allow_redirects=False) as response:
                data = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    data += chunk
                    if len(data) > MAX_ANSWER_BYTES:
                        raise TransientFailure(
                            "PEER_ANSWER_INVALID", f"POST {self.url}: answer larger than {MAX_ANSWER_BYTES} bytes"
                        )
                return PeerAnswer(response.status, bytes(data), response.headers.get("Retry-After"))
        except TimeoutError as exc:
            raise _no_answer("TIMEOUT", self.url, exc) from exc
        except aiohttp.ClientError as exc:
            if isinstance(exc, aiohttp.ClientSSLError) or isinstance(exc.__cause__, ssl.SSLError):
                raise _no_answer("TLS", self.url, exc) from exc
            code = "CONNECT" if isinstance(exc, aiohttp.ClientConnectorError) else "NETWORK"
            raise _no_answer(code, self.url, exc) from exc

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _no_answer(code: str, url: str, exc: BaseException) -> TransientFailure:
    return TransientFailure(code, f"POST {url}: {type(exc).__name__}: {exc}")


PEER_TRANSPORTS: dict[str, PeerTransportFactory] = {"https": HttpsPeerTransport}


# -- the adapter -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerContext:
    """What a peer adapter needs from its gateway: who it is, its key, whom it trusts, where proofs go."""

    gateway: PartyRef
    signer: EnvelopeSigner
    verifier: Verifier  # the trust store and partner registry the ingress uses
    proofs: ProofStore


@dataclass(frozen=True, slots=True)
class PeerReceipt:
    message_id: str  # the receipt's own messageId
    body: bytes  # the signed receipt exactly as received


class PeerWithheld(DeliveryHeld):
    """The registry gives the peer no endpoint (any more): nothing is sent, not to the endpoint it had
    either. Retried on the destination's schedule (RETRY_WAIT, code ``PEER_WITHHELD``, in the
    status and the audit trail), dead-lettered at the retry policy's limits like any delivery that cannot
    be made, and delivered once the registry gives the peer an endpoint again."""

    def __init__(self, why: str) -> None:
        super().__init__(WITHHELD_CODE, f"{why}: not sent; retried on the destination's schedule until it has one")


class AswAdapter:
    def __init__(self, name: str, peer: Party, context: PeerContext, transport: PeerTransport) -> None:
        self.name = name
        self.peer = peer
        self.context = context
        self.transport = transport
        self.loaded_files: tuple[FileStamp, ...] = getattr(transport, "loaded_files", ())  # the TLS files
        self.recipient = PartyRef(identity=peer.identity, name=peer.name or peer.identity, country_code=peer.country)

    def endpoint_moved(self) -> bool:
        """Whether the (reloaded) partner registry now gives this peer another endpoint than the one this
        adapter was built for: a routing reload rebuilds it then. A peer gone from the registry is not
        "moved": nothing could be built for it, and its receipts no longer verify anyway."""
        current = self.context.verifier.partners.get(self.peer.identity)
        return current is not None and current.endpoint is not None and current.endpoint != self.peer.endpoint

    def forward(self, delivery: Delivery) -> Forward:
        send_date = datetime.fromtimestamp(delivery.first_enqueued_at, UTC) if delivery.first_enqueued_at > 0 else None
        return forward_envelope(
            delivery.payload,
            sender=self.context.gateway,
            recipient=self.recipient,
            signer=self.context.signer,
            send_date=send_date,
        )

    def request_headers(self, delivery: Delivery, forward: Forward) -> dict[str, str]:
        return {
            "Content-Type": "application/xml",
            "Idempotency-Key": delivery.idempotency_key,
            "X-NSW-Message-Id": delivery.message_id,
            "X-NSW-Document-Type": delivery.document_type,
            "X-NSW-Sender": self.context.gateway.identity,
            "X-NSW-Digest": f"sha-256={forward.digest}",
        }

    def withheld(self) -> str | None:
        """Why this peer may not be sent to now, or None: the (reloaded) partner registry no longer gives
        it an endpoint, or no longer lists it."""
        current = self.context.verifier.partners.get(self.peer.identity)
        if current is None:
            return f"peer {self.peer.identity} is not in the partner registry"
        if current.endpoint is None:
            return f"peer {self.peer.identity} has no endpoint in the partner registry"
        return None

    def held(self) -> str | None:
        """``PEER_WITHHELD`` while each attempt sends nothing (``withheld``), else None."""
        return None if self.withheld() is None else WITHHELD_CODE

    async def deliver(self, delivery: Delivery) -> DeliveryReceipt:
        why = self.withheld()
        if why is not None:
            raise PeerWithheld(why)
        try:
            forward = self.forward(delivery)
        except Rejected as exc:
            raise PermanentFailure("FORWARD_FAILED", f"cannot forward {delivery.message_id}: {exc}") from exc
        answer = await self.transport.exchange(forward.body, self.request_headers(delivery, forward))
        receipt = self.judge(answer, delivery.message_id, forward.digest)
        path = await self.context.proofs.put(delivery.message_id, self.name, receipt.body)
        proof_sha = proof_digest(receipt.body)
        answers = f"; answers {forward.header.pre_reference}" if forward.header.pre_reference else ""
        return DeliveryReceipt(
            status=answer.status,
            detail=(
                f"{self.peer.identity} receipt {receipt.message_id} for sha256 {forward.digest}; "
                f"proof sha256 {proof_sha} in {path.name}{answers}"
            ),
            proof=receipt.body,
            extra={
                "peer": self.peer.identity,
                "sent_digest": forward.digest,
                "proof_sha256": proof_sha,
                "proof_path": str(path),
            },
        )

    def judge(self, answer: PeerAnswer, message_id: str, digest: str) -> PeerReceipt:
        """The peer's receipt for (``message_id``, ``digest``), or the failure its answer amounts to."""
        where = f"{self.peer.identity} answered HTTP {answer.status}"
        try:
            verified = self.context.verifier.verify(parse_message(answer.body))
        except Rejected as exc:
            raise TransientFailure("PEER_ANSWER_INVALID", f"{where} with no verifiable signed answer: {exc}") from exc
        if verified.party != self.peer.identity:
            raise TransientFailure(
                "PEER_ANSWER_WRONG_SIGNER", f"{where} with an answer signed by {verified.party}, not by the peer"
            )
        document = verified.envelope.find("e:Body/e:Content/*", NSMAP)
        function = verified.header.function
        if document is not None and document.tag == RECEIPT and function == "99":
            self._check_receipt(document, message_id, digest, where)
            if not 200 <= answer.status < 300:
                raise TransientFailure("PEER_ANSWER_INVALID", f"{where}: a receipt with a failure status")
            return PeerReceipt(verified.header.message_id, answer.body)
        if document is not None and document.tag == REJECTION and function == "21":
            raise self._rejection(answer, document, message_id, where)
        raise TransientFailure(
            "PEER_ANSWER_INVALID",
            f"{where} with a signed {verified.header.document_type} (function {function}), "
            "neither receipt nor rejection",
        )

    @staticmethod
    def _check_receipt(document: etree._Element, message_id: str, digest: str, where: str) -> None:
        named_id = document.findtext("r:messageId", namespaces=_R)
        named_digest = document.findtext("r:digest", namespaces=_R)
        if named_id != message_id or named_digest != digest:
            raise TransientFailure(
                "PEER_RECEIPT_MISMATCH",
                f"{where} with a receipt for {named_id} / sha256 {named_digest}; sent {message_id} / sha256 {digest}",
            )

    def _rejection(self, answer: PeerAnswer, document: etree._Element, message_id: str, where: str) -> Exception:
        code = document.findtext("r:code", namespaces=_R) or "PEER_REJECTED"
        detail = f"rejected by {self.peer.identity}: {document.findtext('r:detail', namespaces=_R) or ''}"
        location = document.findtext("r:location", namespaces=_R)
        if location:
            detail += f" (at {location})"
        if document.findtext("r:messageId", namespaces=_R) != message_id:
            # A rejection of bytes that did not even carry our id cannot be pinned on this message.
            return TransientFailure("PEER_RECEIPT_MISMATCH", f"{where} with a rejection of another message: {detail}")
        if code in PEER_TRANSIENT_CODES:
            return RetryAfterFailure(code, detail, parse_retry_after(answer.retry_after))
        return PermanentFailure(code, detail)

    async def close(self) -> None:
        await self.transport.close()


# -- building one from the routing config and the partner registry ---------------------------------


def build_peer_adapter(
    name: str,
    options: Mapping[str, Any],
    context: PeerContext,
    *,
    transports: Mapping[str, PeerTransportFactory] = PEER_TRANSPORTS,
) -> AswAdapter:
    """The adapter for destination ``name`` (``asw:<country>``; option ``peer`` names the registry
    identity when a country has several). Options: ``timeout``, ``connect_timeout``, ``max_in_flight``,
    ``transport``. Faults are ``ConfigError``s naming the destination."""
    opts = Options(name, ASW_KIND, options, context.proofs.directory)
    peers = {p.identity: p for p in context.verifier.partners.parties() if p.role == "peer" and p.endpoint is not None}
    country = name.removeprefix(PEER_PREFIX) if name.startswith(PEER_PREFIX) else None
    of_country = sorted(identity for identity, p in peers.items() if p.country == country)
    identity = opts.choice("peer", sorted(peers), default=of_country[0] if len(of_country) == 1 else "")
    if not identity:
        raise opts.error(
            "peer", f"must name the peer NSW: {len(of_country)} peers with an endpoint are registered for {country}"
        )
    peer = peers[identity]
    settings = TransportSettings(
        timeout=opts.number("timeout", 30.0),
        connect_timeout=opts.number("connect_timeout", 10.0),
        max_in_flight=opts.integer("max_in_flight", 4),
    )
    kind = opts.choice("transport", sorted(transports), default="https")
    opts.finish()
    assert peer.endpoint is not None  # filtered above; tells the type checker
    try:
        transport = transports[kind](peer.endpoint, settings)
    except (ValueError, OSError, ssl.SSLError) as exc:
        raise ConfigError(f"destination {name!r} ({ASW_KIND} adapter): peer {identity}: {exc}") from exc
    return AswAdapter(name, peer, context, transport)


def withheld_peer_adapter(name: str, why: str) -> HoldingAdapter:
    """The lane, at start-up, of a peer the registry gives no endpoint, which the rules file names or for
    which accepted copies are still queued: it holds them (``PeerWithheld`` at every attempt, as a built
    peer adapter does once the registry takes its endpoint away) until the routing reload that follows
    the registry giving the peer an endpoint replaces it with the real adapter."""
    return HoldingAdapter(name, partial(PeerWithheld, why))


def withheld_peers(destinations: Mapping[str, DestinationConfig], partners: PartnerRegistry) -> dict[str, str]:
    """The rules file's ASW destinations whose peer NSW the partner registry gives no endpoint, each with why.

    The registry decides which peers are live, named in the rules file or not: such a destination is
    not routed to (NO_ROUTE at the ingress), and what is queued for it is held (``PeerWithheld``), until
    the registry gives its peer an endpoint, with no edit of the rules. A destination whose peer cannot
    be told (several peers for the country and no ``peer`` option, or a ``peer`` option naming a party
    that is not a peer) is not withheld: that is a fault of the rules file, which ``build_peer_adapter``
    reports.
    """
    live = {p.identity: p for p in partners.parties() if p.role == "peer" and p.endpoint is not None}
    withheld: dict[str, str] = {}
    for name, destination in destinations.items():
        if destination.adapter != ASW_KIND:
            continue
        named = destination.options.get("peer")
        if isinstance(named, str):
            party = partners.get(named)
            if party is None:
                withheld[name] = f"peer {named} is not in the partner registry"
            elif party.role == "peer" and party.endpoint is None:
                withheld[name] = f"peer {named} has no endpoint in the partner registry"
        elif name.startswith(PEER_PREFIX):
            country = name.removeprefix(PEER_PREFIX)
            if not any(p.country == country for p in live.values()):
                withheld[name] = no_live_peer(name)
    return withheld


def no_live_peer(destination: str) -> str:
    """Why ``asw:<country>`` cannot be sent to when no peer NSW of that country has an endpoint."""
    return f"no peer NSW for {destination.removeprefix(PEER_PREFIX)} has an endpoint in the partner registry"
