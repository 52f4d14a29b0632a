"""The gateway's own signing key and certificate, renewed in place: no restart to roll them over.

Every receipt, rejection and forward to a peer NSW carries the gateway's SystemSignature. Its
certificate expires like any other, and before this a new one took a restart of every process. Now
the files behind ``gateway_key`` / ``gateway_cert`` are polled with the routing rules (and read at once
on SIGHUP, ``RoutingReloader.also_poll``); when they change, the next envelope is signed with the new
pair. Envelopes being signed at that moment finish with the old one: ``RenewingSigner`` swaps one
reference, on the event loop, between two signatures.

A new pair is put in force only if what it signs would verify *here*: a rejection is signed with it
and checked by the gateway's own ``Verifier``, against the trust store and partner registry in force,
exactly as an inbound message is. So a renewal is refused (``signing.renewal_rejected``, with the
rejection code and detail; the old pair keeps signing) when

* the files do not load, or the key is not the one the certificate certifies (a half-done copy: the
  new certificate beside the old key);
* the certificate does not chain to a trust anchor, is not yet or no longer valid, or is revoked
  (``CERT_UNTRUSTED`` / ``CERT_EXPIRED`` / ``CERT_REVOKED``);
* its fingerprint is not bound to the gateway's identity in ``partners.yaml`` (``SENDER_MISMATCH``):
  peers look a signer up by fingerprint in their registries, so the new fingerprint belongs in theirs
  and in ours *before* the files are swapped.

A refused pair is tried again when the key, the certificate, the registry or a trust file changes
(the fingerprint registered after the files were copied, a missing intermediate added), never on every
poll. At start-up a key that does not match its certificate is fatal; a pair that does not verify
here only logs ``signing.unverifiable``, as a gateway whose registry does not list itself always could.
The same warning follows a registry or trust change that leaves the pair in force unverifiable (its
certificate revoked, its fingerprint taken out of the registry): receipts it signs are refused by
partners that share that trust.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from lxml import etree

from adapters.base import FileStamp, changed_paths, stamp_files
from gateway.errors import ConfigError, ErrorCode, Rejected
from gateway.model import PartyRef
from gateway.receipts import ReceiptFactory
from gateway.security.parse import parse_message
from gateway.security.sign import Signer, key_matches
from gateway.security.trust import fingerprint
from gateway.security.verify import Verifier

log = structlog.get_logger("nsw.signing")

Probe = Callable[[Signer], None]  # raises Rejected if what ``Signer`` signs would be refused


def verified_here(verifier: Verifier, gateway: PartyRef) -> Probe:
    """A probe: a rejection signed by the candidate, checked as any inbound message is."""

    def probe(candidate: Signer) -> None:
        signed = ReceiptFactory(candidate, gateway).rejection(
            Rejected(ErrorCode.UNAVAILABLE, "signing key probe"), digest=None
        )
        verifier.verify(parse_message(signed))

    return probe


class RenewingSigner:
    """The gateway's signer (an ``EnvelopeSigner``): the pair in force, replaced by ``renew_if_changed``.

    ``also_watch`` names further files whose change makes a refused pair worth trying again (the
    registry and the trust directory); ``on_renewal`` is told "ok" or "error" for every pair tried.
    """

    def __init__(
        self,
        key: Path,
        cert: Path,
        *,
        probe: Probe,
        also_watch: Callable[[], Iterable[Path]] = lambda: (),
        on_renewal: Callable[[str], None] = lambda _outcome: None,
    ) -> None:
        self.key, self.cert = key, cert
        self._probe, self._also_watch, self._on_renewal = probe, also_watch, on_renewal
        self._stamps = self._stamp()  # before reading: a file replaced while it is read is read again
        try:
            self._in_force = self._read()
        except OSError as exc:
            raise ConfigError(f"the gateway's signing key or certificate cannot be read: {exc}") from exc
        try:
            self.current = Signer.from_pem(*self._in_force, source=f"{key} / {cert}")
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"the gateway's signing key or certificate does not load: {exc}") from exc
        if not key_matches(self.current.key, self.current.chain[0]):
            raise ConfigError(f"the gateway's signing key {key} is not the key of its certificate {cert}")
        self._warn_if_unverifiable(self.current)

    def sign_envelope(self, envelope: etree._Element, *, copy: bool = True) -> etree._Element:
        return self.current.sign_envelope(envelope, copy=copy)

    def renew_if_changed(self) -> bool:
        """Put the files' pair in force if they changed and it verifies here; True if it was."""
        stamps = self._stamp()
        if stamps == self._stamps:
            return False
        changed = changed_paths(self._stamps, stamps)
        self._stamps = stamps  # a refused pair is not tried again until a watched file changes again
        try:
            files = self._read()
        except OSError as exc:
            return self._refused(changed, None, str(exc))
        if files == self._in_force:  # the registry or trust changed (or the same bytes were written again)
            self._warn_if_unverifiable(self.current)
            return False
        candidate = self._check(files)
        if isinstance(candidate, _Unfit):
            return self._refused(changed, candidate.code, candidate.error)
        previous, self.current, self._in_force = self.current, candidate, files
        self._on_renewal("ok")
        log.info(
            "signing.renewed",
            files=changed,
            previous=fingerprint(previous.chain[0]),
            **_described(candidate),
            detail="envelopes are signed with the new key from now on",
        )
        return True

    def _warn_if_unverifiable(self, signer: Signer) -> None:
        """The pair in force no longer verifies here (its certificate revoked or unbound in the registry,
        or never did at start-up): partners sharing our trust and registry refuse what it signs."""
        try:
            self._probe(signer)
        except Rejected as exc:
            log.warning("signing.unverifiable", code=exc.code.value, error=exc.detail, **_described(signer))

    def _check(self, files: tuple[bytes, bytes]) -> Signer | _Unfit:
        try:
            candidate = Signer.from_pem(*files, source=f"{self.key} / {self.cert}")
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            return _Unfit(None, f"the files do not load: {exc}")
        if not key_matches(candidate.key, candidate.chain[0]):
            return _Unfit(None, f"{self.key} is not the key of the certificate in {self.cert}")
        try:
            self._probe(candidate)
        except Rejected as exc:
            return _Unfit(exc.code, f"{exc.detail} ({_described(candidate)['subject']})")
        return candidate

    def _refused(self, changed: list[str], code: ErrorCode | None, error: str) -> bool:
        self._on_renewal("error")
        log.error(
            "signing.renewal_rejected",
            files=changed,
            code=code.value if code is not None else None,
            error=error,
            detail=f"the key in force keeps signing (sha256 {fingerprint(self.current.chain[0])})",
        )
        return False

    def _stamp(self) -> tuple[FileStamp, ...]:
        return stamp_files([self.key, self.cert, *self._also_watch()])

    def _read(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


@dataclass(frozen=True, slots=True)
class _Unfit:
    code: ErrorCode | None  # the rejection the probe answered; None: the files themselves are at fault
    error: str


def _described(signer: Signer) -> dict[str, str]:
    leaf = signer.chain[0]
    return {
        "subject": leaf.subject.rfc4514_string(),
        "fingerprint": fingerprint(leaf),
        "not_after": leaf.not_valid_after_utc.isoformat(),
    }
