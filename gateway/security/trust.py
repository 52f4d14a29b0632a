"""Trust decisions about a signer's certificate: chain to an anchor, validity, revocation. Cached.

The trust directory (``certs/README.md``)::

    trust/anchors/*.pem        trust anchors (our national root, each ASW peer's root)
    trust/intermediates/*.pem  CA certificates that help build chains (senders may also present them)
    trust/crl/*.pem            CRLs, PEM or DER; matched to a CA by issuer name *and* signature

Order of checks, each failing closed with its own code:

1. the leaf's validity dates                                  -> CERT_EXPIRED
2. a chain to an anchor (``cryptography.x509.verification``)   -> CERT_UNTRUSTED, or CERT_EXPIRED
   when the only chain runs through a CA outside its validity
3. every non-anchor certificate of that chain against its issuer's CRL -> CERT_REVOKED; a CRL
   that is expired, not yet valid or not signed by the issuer makes the status unknown
   -> CERT_UNTRUSTED. No CRL at all for an issuer means "not revoked".

``revocation_coverage()`` says, per CA, until when its CRLs keep revocation status known: past that
moment every signer under the CA is refused, so it is what ``nswgw certs check`` and the
``nsw_crl_expiry_seconds`` metric warn about.

A positive decision is cached by leaf fingerprint for as long as it stays true: from the latest
notBefore / CRL thisUpdate to the earliest notAfter / CRL nextUpdate of what it relied on.
``reload()`` re-reads the directory and drops every cached decision.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Final, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gateway.errors import ConfigError, ErrorCode, Rejected

CACHE_SIZE: Final = 10_000
NEGATIVE_CACHE_SIZE: Final = 4_096
# A rejection is reused only for evaluations this close in time: a retry a minute later gets a fresh look.
NEGATIVE_TTL: Final = timedelta(seconds=60)
MAX_CHAIN_DEPTH: Final = 8
_FAR_FUTURE: Final = datetime.max.replace(tzinfo=UTC)
K = TypeVar("K")
V = TypeVar("V")


@lru_cache(maxsize=1024)
def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex without colons (the registry's form).

    Cached: every message asks for its signer's (the trust decision cache is keyed by it), and
    hashing the DER again costs ~7 us against ~2 us for the lookup."""
    return cert.fingerprint(hashes.SHA256()).hex()


def load_certs_pem(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order; [] when there is none."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return []
    return x509.load_pem_x509_certificates(data)


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _day(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _require_digital_signature(_policy: Policy, _cert: x509.Certificate, usage: x509.KeyUsage) -> None:
    if not usage.digital_signature:
        raise ValueError("KeyUsage does not allow digitalSignature")


def _forbid_ca_leaf(_policy: Policy, _cert: x509.Certificate, constraints: x509.BasicConstraints | None) -> None:
    if constraints is not None and constraints.ca:
        raise ValueError("a CA certificate cannot sign messages")


# Signing certificates of ministries and traders are not WebPKI server certificates: any extensions
# are fine (no SAN or EKU demanded), as signxml's X509CertChainVerifier does, but the key must be
# allowed to sign and must not be a CA's.
EE_POLICY: Final = (
    ExtensionPolicy.permit_all()
    .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _require_digital_signature)
    .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _forbid_ca_leaf)
)
# CAs keep the WebPKI rules (critical BasicConstraints ca=true, keyCertSign, AKI on non-roots, path
# length). The dev PKI satisfies them, and so does any sane national CA.
CA_POLICY: Final = ExtensionPolicy.webpki_defaults_ca()


@dataclass(frozen=True, slots=True)
class TrustDecision:
    fingerprint: str  # sha256 hex of the leaf
    subject: str  # RFC 4514
    issuer: str  # RFC 4514
    not_after: datetime
    chain: tuple[x509.Certificate, ...]  # leaf first, trust anchor last


@dataclass(frozen=True, slots=True)
class CrlCoverage:
    """How long one CA's revocation status stays known with the CRLs loaded now."""

    ca: x509.Certificate
    crls: int  # CRLs filed under the CA's name, genuine or not
    known_until: datetime | None  # when the last genuine CRL covering now runs out; None: it has no nextUpdate
    problem: str | None  # why the status is unknown *now* (stale, not yet valid, forged); None when known

    @property
    def subject(self) -> str:
        return self.ca.subject.rfc4514_string()


@dataclass(frozen=True, slots=True)
class _Cached:
    decision: TrustDecision
    valid_from: datetime
    valid_until: datetime


@dataclass(slots=True)
class _State:
    """Everything loaded from one read of the directory, and the decisions made with it."""

    anchors: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]
    crls: dict[x509.Name, list[x509.CertificateRevocationList]]
    store: Store
    anchor_fingerprints: frozenset[str]
    positive: dict[str, _Cached] = field(default_factory=dict)
    negative: dict[tuple[str, ...], tuple[Rejected, datetime]] = field(default_factory=dict)


class TrustStore:
    """Evaluates signer certificates against anchors, intermediates and CRLs. Safe to share: the loaded
    state is swapped in one assignment, the caches are guarded by a lock, and nothing awaits."""

    def __init__(
        self,
        anchors: Iterable[x509.Certificate],
        intermediates: Iterable[x509.Certificate] = (),
        crls: Iterable[x509.CertificateRevocationList] = (),
        *,
        source: Path | None = None,
    ) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._state = _build_state(tuple(anchors), tuple(intermediates), tuple(crls), source)

    @classmethod
    def load(cls, trust_dir: Path) -> TrustStore:
        anchors, intermediates, crls = _read_dir(trust_dir)
        return cls(anchors, intermediates, crls, source=trust_dir)

    def reload(self) -> None:
        """Re-read the directory (when loaded from one) and forget every cached decision."""
        if self.source is None:
            state = self._state
            fresh = _build_state(state.anchors, state.intermediates, _flatten(state.crls), None)
        else:
            anchors, intermediates, crls = _read_dir(self.source)
            fresh = _build_state(tuple(anchors), tuple(intermediates), crls, self.source)
        self._state = fresh

    def source_files(self) -> list[Path]:
        """The files ``reload()`` reads (none when not loaded from a directory): what to watch for changes."""
        if self.source is None:
            return []
        return [path for folder in _FOLDERS for path in _files(self.source / folder)]

    @property
    def anchors(self) -> tuple[x509.Certificate, ...]:
        return self._state.anchors

    def revocation_coverage(self, at: datetime | None = None) -> list[CrlCoverage]:
        """For each anchor or intermediate with CRLs filed under its name: until when they keep its
        revocation status known from ``at`` on. CAs without any CRL are left out (never revoked, never
        stale), as are CRLs of CAs the store does not hold."""
        at = _aware(at)
        state = self._state
        return [
            _coverage(ca, state.crls[ca.subject], at)
            for ca in (*state.anchors, *state.intermediates)
            if ca.subject in state.crls
        ]

    def evaluate(
        self,
        leaf: x509.Certificate,
        presented_chain: Sequence[x509.Certificate] = (),
        *,
        at: datetime | None = None,
    ) -> TrustDecision:
        """The decision for ``leaf`` at ``at`` (default now), or ``Rejected`` with CERT_EXPIRED,
        CERT_UNTRUSTED or CERT_REVOKED naming the certificate and the fault."""
        at = _aware(at)
        state = self._state
        fp = fingerprint(leaf)
        cached = state.positive.get(fp)
        if cached is not None and cached.valid_from <= at <= cached.valid_until:
            return cached.decision
        negative_key = (fp, *(fingerprint(c) for c in presented_chain))
        refused = state.negative.get(negative_key)
        if refused is not None and abs(at - refused[1]) <= NEGATIVE_TTL:
            raise Rejected(refused[0].code, refused[0].detail, refused[0].location)
        try:
            entry = _decide(state, leaf, fp, presented_chain, at)
        except Rejected as exc:
            with self._lock:
                _put(state.negative, negative_key, (exc, at), NEGATIVE_CACHE_SIZE)
            raise
        with self._lock:
            _put(state.positive, fp, entry, CACHE_SIZE)
        return entry.decision


def _put(cache: dict[K, V], key: K, value: V, limit: int) -> None:
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))  # oldest first: dicts keep insertion order
    cache[key] = value


def _aware(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(UTC)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _flatten(crls: dict[x509.Name, list[x509.CertificateRevocationList]]) -> list[x509.CertificateRevocationList]:
    return [crl for group in crls.values() for crl in group]


def _build_state(
    anchors: tuple[x509.Certificate, ...],
    intermediates: tuple[x509.Certificate, ...],
    crls: Sequence[x509.CertificateRevocationList],
    source: Path | None,
) -> _State:
    if not anchors:
        raise ConfigError(f"{source or 'trust store'}: no trust anchors; nothing could ever be trusted")
    by_issuer: dict[x509.Name, list[x509.CertificateRevocationList]] = {}
    for crl in crls:
        by_issuer.setdefault(crl.issuer, []).append(crl)
    return _State(
        anchors=anchors,
        intermediates=intermediates,
        crls=by_issuer,
        store=Store(list(anchors)),
        anchor_fingerprints=frozenset(fingerprint(a) for a in anchors),
    )


def _read_dir(
    trust_dir: Path,
) -> tuple[list[x509.Certificate], list[x509.Certificate], list[x509.CertificateRevocationList]]:
    if not trust_dir.is_dir():
        raise ConfigError(f"{trust_dir}: trust directory not found (expected anchors/, intermediates/, crl/)")
    anchors = [c for path in _files(trust_dir / "anchors") for c in _read_certs(path)]
    intermediates = [c for path in _files(trust_dir / "intermediates") for c in _read_certs(path)]
    crls = [_read_crl(path) for path in _files(trust_dir / "crl")]
    return anchors, intermediates, crls


_FOLDERS = ("anchors", "intermediates", "crl")


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in {".pem", ".crt", ".cer", ".crl"})


def _read_certs(path: Path) -> list[x509.Certificate]:
    data = path.read_bytes()
    try:
        certs = load_certs_pem(data) if b"-----BEGIN" in data else [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise ConfigError(f"{path}: not a certificate: {exc}") from exc
    if not certs:
        raise ConfigError(f"{path}: no certificate in this file")
    return certs


def _read_crl(path: Path) -> x509.CertificateRevocationList:
    data = path.read_bytes()
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a CRL: {exc}") from exc


def _decide(
    state: _State, leaf: x509.Certificate, fp: str, presented: Sequence[x509.Certificate], at: datetime
) -> _Cached:
    _check_validity(leaf, at)
    pool = [*presented, *state.intermediates]
    verifier = (
        PolicyBuilder()
        .store(state.store)
        .time(at)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=CA_POLICY, ee_policy=EE_POLICY)
        .build_client_verifier()
    )
    try:
        chain = tuple(verifier.verify(leaf, pool).chain)
    except VerificationError as exc:
        raise _diagnose(state, leaf, pool, at, str(exc)) from exc
    valid_from = max(c.not_valid_before_utc for c in chain)
    valid_until = min(c.not_valid_after_utc for c in chain)
    for cert, issuer in pairwise(chain):
        crl = _current_crl(state, issuer, at)
        if crl is None:
            continue
        valid_from = max(valid_from, crl.last_update_utc)
        valid_until = min(valid_until, crl.next_update_utc or _FAR_FUTURE)
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            raise Rejected(
                ErrorCode.CERT_REVOKED,
                f"certificate {_subject(cert)} (serial 0x{cert.serial_number:x}) was revoked on "
                f"{_day(entry.revocation_date_utc)} by {_subject(issuer)}",
            )
    decision = TrustDecision(
        fingerprint=fp,
        subject=_subject(leaf),
        issuer=leaf.issuer.rfc4514_string(),
        not_after=leaf.not_valid_after_utc,
        chain=chain,
    )
    return _Cached(decision, valid_from, valid_until)


def _validity_problem(cert: x509.Certificate, at: datetime) -> str | None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if start <= at <= end:
        return None
    state = f"expired on {_day(end)}" if at > end else f"not valid before {_day(start)}"
    return f"{_subject(cert)} {state} (valid {_day(start)} to {_day(end)}, checked at {_day(at)})"


def _check_validity(cert: x509.Certificate, at: datetime) -> None:
    problem = _validity_problem(cert, at)
    if problem is not None:
        raise Rejected(ErrorCode.CERT_EXPIRED, f"certificate {problem}")


def _current_crl(state: _State, issuer: x509.Certificate, at: datetime) -> x509.CertificateRevocationList | None:
    """The newest CRL of ``issuer`` that it really signed; None when it publishes none here.
    Raises CERT_UNTRUSTED when revocation cannot be known (stale or forged CRLs only)."""
    candidates = state.crls.get(issuer.subject)
    if not candidates:
        return None
    genuine = [c for c in candidates if c.is_signature_valid(issuer.public_key())]  # type: ignore[arg-type]
    name = _subject(issuer)
    if not genuine:
        raise Rejected(
            ErrorCode.CERT_UNTRUSTED,
            f"revocation status unknown: the CRL for {name} is not signed by that CA's key",
        )
    current = [c for c in genuine if c.last_update_utc <= at <= (c.next_update_utc or _FAR_FUTURE)]
    if current:
        return max(current, key=lambda c: c.last_update_utc)
    raise Rejected(ErrorCode.CERT_UNTRUSTED, f"revocation status unknown: CRL for {name} {_why_unknown(genuine, at)}")


def _why_unknown(genuine: Sequence[x509.CertificateRevocationList], at: datetime) -> str:
    """Why none of a CA's genuine CRLs covers ``at``."""
    newest = max(genuine, key=lambda c: c.last_update_utc)
    if newest.last_update_utc > at:
        return f"not valid before {_day(newest.last_update_utc)}"
    return f"expired at {_day(newest.next_update_utc or _FAR_FUTURE)}"


def _coverage(ca: x509.Certificate, filed: Sequence[x509.CertificateRevocationList], at: datetime) -> CrlCoverage:
    genuine = [c for c in filed if c.is_signature_valid(ca.public_key())]  # type: ignore[arg-type]
    if not genuine:
        return CrlCoverage(ca, len(filed), None, "not signed by that CA's key")
    # A CA may publish the next CRL before the current one runs out: follow the overlapping ones.
    covered_until = at
    while True:
        covering = [c for c in genuine if c.last_update_utc <= covered_until <= (c.next_update_utc or _FAR_FUTURE)]
        if not covering:
            break
        furthest = max((c.next_update_utc or _FAR_FUTURE) for c in covering)
        if furthest == _FAR_FUTURE:
            return CrlCoverage(ca, len(filed), None, None)
        if furthest <= covered_until:
            break
        covered_until = furthest
    if covered_until > at:
        return CrlCoverage(ca, len(filed), covered_until, None)
    ran_out = [c.next_update_utc for c in genuine if c.next_update_utc is not None and c.next_update_utc < at]
    return CrlCoverage(ca, len(filed), max(ran_out, default=None), _why_unknown(genuine, at))


def _issuers(cert: x509.Certificate, candidates: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    found = []
    for candidate in candidates:
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        found.append(candidate)
    return found


def _diagnose(
    state: _State, leaf: x509.Certificate, pool: Sequence[x509.Certificate], at: datetime, reason: str
) -> Rejected:
    """Say why no chain was found: a CA outside its validity, or where the issuers run out."""
    cert, seen = leaf, {fingerprint(leaf)}
    candidates = [*state.anchors, *pool]
    for _ in range(MAX_CHAIN_DEPTH):
        if cert is not leaf and fingerprint(cert) in state.anchor_fingerprints:
            break  # a chain exists by name and signature, so the policy refused it: say what it said
        issuers = [i for i in _issuers(cert, candidates) if fingerprint(i) != fingerprint(cert)]
        if not issuers:
            if cert is not leaf and cert.issuer == cert.subject:
                where = f"it ends at the self-signed {_subject(cert)}, which is not a trust anchor"
            else:
                where = f"its issuer {cert.issuer.rfc4514_string()} is neither a trust anchor nor a known CA"
            return Rejected(ErrorCode.CERT_UNTRUSTED, f"no chain from {_subject(leaf)} to a trust anchor: {where}")
        current = [i for i in issuers if i.not_valid_before_utc <= at <= i.not_valid_after_utc]
        if not current:
            problem = _validity_problem(issuers[0], at)
            return Rejected(ErrorCode.CERT_EXPIRED, f"CA certificate {problem}, in the chain of {_subject(leaf)}")
        issuer = current[0]
        if fingerprint(issuer) in seen:
            break
        seen.add(fingerprint(issuer))
        cert = issuer
    return Rejected(
        ErrorCode.CERT_UNTRUSTED,
        f"no acceptable chain from {_subject(leaf)} (issuer {leaf.issuer.rfc4514_string()}) to a trust anchor: "
        f"{reason}",
    )
