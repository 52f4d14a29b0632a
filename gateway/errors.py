"""The gateway's error tree and the one table that decides what each error means.

Branches say what happens next:

* ``Rejected``          -- refused at ingress; the sender gets a signed function-21 rejection
                          with ``code`` and the HTTP status from ``HTTP_STATUS``.
* ``TransientFailure``  -- a delivery attempt failed but may succeed later: retry.
* ``PermanentFailure``  -- a delivery can never succeed as it is: dead letter at once.
* ``BrokerUnavailable`` -- the broker (or another durable store) cannot take the message;
                          at ingress this becomes ``Rejected(UNAVAILABLE)``.
* ``ConfigError``       -- a configuration file (routing, registry, settings) is invalid.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    MALFORMED_XML = "MALFORMED_XML"
    TOO_LARGE = "TOO_LARGE"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    RATE_LIMITED = "RATE_LIMITED"
    SIGNATURE_MISSING = "SIGNATURE_MISSING"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    CERT_UNTRUSTED = "CERT_UNTRUSTED"
    CERT_EXPIRED = "CERT_EXPIRED"
    CERT_REVOKED = "CERT_REVOKED"
    SENDER_MISMATCH = "SENDER_MISMATCH"
    STALE = "STALE"
    DUPLICATE = "DUPLICATE"
    SCHEMA_INVALID = "SCHEMA_INVALID"
    UNKNOWN_DOCUMENT_TYPE = "UNKNOWN_DOCUMENT_TYPE"
    NO_ROUTE = "NO_ROUTE"
    UNAVAILABLE = "UNAVAILABLE"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.MALFORMED_XML: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.SIGNATURE_MISSING: 401,
    ErrorCode.SIGNATURE_INVALID: 401,
    ErrorCode.CERT_UNTRUSTED: 401,
    ErrorCode.CERT_EXPIRED: 401,
    ErrorCode.CERT_REVOKED: 401,
    ErrorCode.SENDER_MISMATCH: 403,
    ErrorCode.STALE: 409,
    ErrorCode.DUPLICATE: 409,
    ErrorCode.SCHEMA_INVALID: 422,
    ErrorCode.UNKNOWN_DOCUMENT_TYPE: 422,
    ErrorCode.NO_ROUTE: 422,
    ErrorCode.UNAVAILABLE: 503,
}


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class Rejected(GatewayError):
    """A message refused at ingress. ``location`` names where the fault is (line, XPath, field)."""

    def __init__(self, code: ErrorCode, detail: str, location: str | None = None) -> None:
        self.code = code
        self.detail = detail
        self.location = location
        super().__init__(f"{code}: {detail}" + (f" (at {location})" if location else ""))

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


class DeliveryFailure(GatewayError):
    """A delivery attempt failed. ``code`` is a short machine-readable reason (e.g. ``HTTP_503``)."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


class TransientFailure(DeliveryFailure):
    """Worth retrying: timeouts, connection errors, 408/429/5xx, a missing peer receipt."""


class PermanentFailure(DeliveryFailure):
    """Never worth retrying as it is: the receiver refused the content. Goes to the dead-letter queue."""


class BrokerUnavailable(GatewayError):
    """The broker or a durable store could not take the message; nothing was accepted."""


class ConfigError(GatewayError):
    """A configuration file is invalid. The message names the file and the rule or entry at fault."""
