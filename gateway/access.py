"""Who may read a message's status: its sender, or an operator. Nobody else learns whether it exists.

A caller is identified, in this order, by

1. ``Authorization: Bearer <operator_token>`` -- an operator (compared in constant time; disabled
   when no token is configured). A wrong token is refused; it never falls through to a party.
2. A signed query (any client, no TLS requirement) -- two headers::

       X-NSW-Certificate: <base64 DER of the signing certificate>[,<base64 DER of an intermediate>...]
       X-NSW-Signature:   t=<unix seconds>, sig=<base64 signature>

   over the UTF-8 bytes of ``"NSW-STATUS-1\\nGET\\n<messageId>\\n<t>"`` -- RSA PKCS#1 v1.5 or ECDSA,
   both with SHA-256, made with the key of one of the party's registered signing certificates.
   The certificate must pass the same trust checks as a message signature (chain, validity, CRL)
   and be bound to a party in the partner registry; ``t`` must be within ``SIGNATURE_WINDOW`` of the
   gateway's clock. The signature names the message id, so it cannot be reused for another message;
   a captured one can be replayed within the window to read the same status again (which the
   eavesdropper already saw). ``sign_status_query`` makes the headers.
3. The TLS client certificate, when the ingress itself terminates mutual TLS: its SHA-256
   fingerprint must be bound to a party in the registry (and pass the trust checks). Behind a
   TLS-terminating proxy this step sees nothing; use 1 or 2 there.

Answers: no or bad credentials -> 401 (before the store is consulted); a party asking about a
message it did not send -> 403, and so does one asking about an id that does not exist (a 404 would
tell it that the other ids exist); an operator gets 404 for an unknown id.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.errors import Rejected
from gateway.partners import PartnerRegistry
from gateway.security.trust import TrustStore, fingerprint
from gateway.status import MessageStatus

if TYPE_CHECKING:
    from gateway.security.sign import PrivateKey

CERT_HEADER: Final = "X-NSW-Certificate"
SIGNATURE_HEADER: Final = "X-NSW-Signature"
SIGNATURE_WINDOW: Final = 300.0  # seconds either side of the gateway's clock
_PREFIX: Final = "NSW-STATUS-1"
_MAX_CHAIN: Final = 4


@dataclass(frozen=True, slots=True)
class Caller:
    party: str | None  # None: an operator
    via: str  # "operator" | "signature" | "mtls"

    @property
    def operator(self) -> bool:
        return self.party is None


class Denied(Exception):  # an answer to give, not a fault
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": 'Bearer realm="nsw"'} if self.status == 401 else None
        return web.json_response({"error": self.reason}, status=self.status, headers=headers)


def bearer_is(request: web.Request, token: bytes | None) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (constant-time; False without a token)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if token is None or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token)


def metrics_allowed(request: web.Request, token: bytes | None) -> bool:
    """``/metrics`` is open when no operator token is configured, else for operators only."""
    return token is None or bearer_is(request, token)


def signed_text(message_id: str, t: int) -> bytes:
    return f"{_PREFIX}\nGET\n{message_id}\n{t}".encode()


def sign_status_query(
    key: PrivateKey, chain: list[x509.Certificate], message_id: str, *, now: float | None = None
) -> dict[str, str]:
    """The headers of a signed status query for ``message_id`` (``chain``: the signing certificate first)."""
    t = int(time.time() if now is None else now)
    data = signed_text(message_id, t)
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
    certs = ",".join(base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in chain)
    return {CERT_HEADER: certs, SIGNATURE_HEADER: f"t={t}, sig={base64.b64encode(signature).decode()}"}


class StatusAccess:
    def __init__(
        self,
        *,
        operator_token: str | None,
        partners: PartnerRegistry,
        trust: TrustStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._token = operator_token.encode() if operator_token else None
        self._partners = partners
        self._trust = trust
        self._clock = clock

    def identify(self, request: web.Request, message_id: str) -> Caller:
        """The caller, or ``Denied(401)``."""
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            if self.is_operator(request):
                return Caller(None, "operator")
            raise Denied(401, "the bearer token is not the operator token")
        if SIGNATURE_HEADER in request.headers or CERT_HEADER in request.headers:
            return Caller(self._signed_party(request, message_id), "signature")
        peer = _peer_certificate(request)
        if peer is not None:
            return Caller(self._bound_party(peer, [], "the TLS client certificate"), "mtls")
        raise Denied(401, "identify as the sender (signed query or TLS client certificate) or as an operator")

    def is_operator(self, request: web.Request) -> bool:
        return bearer_is(request, self._token)

    def metrics_allowed(self, request: web.Request) -> bool:
        return metrics_allowed(request, self._token)

    @staticmethod
    def decide(caller: Caller, status: MessageStatus | None) -> int:
        """200, 403 or 404 for an identified caller."""
        if caller.operator:
            return 404 if status is None else 200
        return 200 if status is not None and status.sender == caller.party else 403

    def _signed_party(self, request: web.Request, message_id: str) -> str:
        chain = _certificates(request.headers.get(CERT_HEADER, ""))
        t, signature = _signature_fields(request.headers.get(SIGNATURE_HEADER, ""))
        if abs(self._clock() - t) > SIGNATURE_WINDOW:
            raise Denied(401, f"{SIGNATURE_HEADER} t={t} is outside the {SIGNATURE_WINDOW:.0f}s window")
        data = signed_text(message_id, t)
        public_key = chain[0].public_key()
        try:
            if isinstance(public_key, rsa.RSAPublicKey):
                public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(public_key, ec.EllipticCurvePublicKey):
                public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            else:
                raise Denied(401, "only RSA and ECDSA certificates can sign a status query")
        except InvalidSignature:
            raise Denied(401, f"the {SIGNATURE_HEADER} does not verify for message {message_id}") from None
        return self._bound_party(chain[0], chain[1:], "the query's certificate")

    def _bound_party(self, leaf: x509.Certificate, chain: list[x509.Certificate], what: str) -> str:
        try:
            self._trust.evaluate(leaf, chain)
        except Rejected as exc:
            raise Denied(401, f"{what} is not trusted: {exc.code.value}: {exc.detail}") from None
        party = self._partners.by_fingerprint(fingerprint(leaf))
        if party is None:
            raise Denied(401, f"{what} is not bound to any party in the partner registry")
        return party.identity


def _certificates(header: str) -> list[x509.Certificate]:
    blobs = [b.strip() for b in header.split(",") if b.strip()]
    if not blobs or len(blobs) > _MAX_CHAIN:
        raise Denied(401, f"{CERT_HEADER} must carry 1 to {_MAX_CHAIN} base64 DER certificates")
    try:
        return [x509.load_der_x509_certificate(base64.b64decode(b, validate=True)) for b in blobs]
    except (ValueError, binascii.Error) as exc:
        raise Denied(401, f"{CERT_HEADER} cannot be read: {exc}") from None


def _signature_fields(header: str) -> tuple[int, bytes]:
    fields = dict(part.strip().partition("=")[::2] for part in header.split(",") if "=" in part)
    try:
        return int(fields["t"]), base64.b64decode(fields["sig"], validate=True)
    except (KeyError, ValueError, binascii.Error):
        raise Denied(401, f"{SIGNATURE_HEADER} must be 't=<unix seconds>, sig=<base64>'") from None


def _peer_certificate(request: web.Request) -> x509.Certificate | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return x509.load_der_x509_certificate(der) if der else None
