"""Certificate expiry: which certificates the gateway relies on, and which of them run out soon.

The partner registry binds parties to certificate *fingerprints*; the certificates themselves are
looked up on disk, under the certificate folder (``Settings.certs_dir``):

* ``trust/anchors``, ``trust/intermediates``   the CAs every chain runs through (kind ``anchor`` /
  ``intermediate``; no party);
* ``gateway/cert.pem``                         this gateway's signing certificate (kind ``gateway``);
* ``Settings.tls_cert``                        the ingress's TLS server certificate (kind ``tls``);
* every other PEM file anywhere below the folder (conventionally ``parties/<identity>/*.pem``):
  each leaf certificate whose fingerprint the registry binds to a party (kind ``party``). Leaves bound
  to nobody and CAs outside ``trust/`` are ignored: nothing relies on them.

A registry binding with no certificate file is reported as *unknown* (its expiry cannot be known).

A party may hold several bound certificates, so a renewal overlaps the old one. A certificate that
expires within the window is **superseded** when a certificate of the same party (or, for a CA, with
the same subject) is already valid and outlives the window: nothing needs doing but to drop the old
binding eventually. Only the gateway's own signing and TLS certificates cannot be superseded -- the
gateway uses exactly one of each. ``ExpiryReport.failing`` is true when an expiring certificate is
not superseded: an operator must act.

CRLs run out too, and much sooner: a CA's CRL lasts days. When none of a CA's CRLs covers the present
any more, every signer under that CA is refused ``CERT_UNTRUSTED`` (``gateway.security.trust``). So the
report also lists each CA whose revocation status stops being known within a window of its own
(``crl_within``, 24 h by default: a 30-day window would flag every CRL), or already has; each such CA
fails the check too, as does a trust directory the gateway could not load.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509

from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.partners import PartnerRegistry
from gateway.security.trust import CrlCoverage, TrustStore, fingerprint, load_certs_pem

CERT_SUFFIXES: Final = frozenset({".pem", ".crt", ".cer"})
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*\Z")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}
CRL_WINDOW: Final = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    party: str  # registry identity; "" for a CA
    kind: str  # "party" | "gateway" | "tls" | "anchor" | "intermediate"
    subject: str  # RFC 4514
    fingerprint: str  # sha256 hex of the DER certificate
    not_before: datetime
    not_after: datetime
    path: Path


@dataclass(frozen=True, slots=True)
class ExpiryFinding:
    cert: CertificateInfo
    remaining: timedelta  # negative once expired
    superseded_by: CertificateInfo | None = None

    @property
    def expired(self) -> bool:
        return self.remaining <= timedelta(0)

    @property
    def action_needed(self) -> bool:
        return self.superseded_by is None


@dataclass(frozen=True, slots=True)
class CrlFinding:
    """A CA whose revocation status is unknown already (``problem``) or stops being known within the window."""

    ca_subject: str
    ca_fingerprint: str
    crls: int  # CRLs filed under the CA's name
    known_until: datetime | None  # the last covering nextUpdate; when stale, the one that ran out (if any)
    remaining: timedelta | None  # known_until - now; negative once stale
    problem: str | None  # why signers under this CA are refused now; None while it is still known


@dataclass(frozen=True, slots=True)
class ExpiryReport:
    within: timedelta
    checked: int  # certificates found
    findings: tuple[ExpiryFinding, ...]  # certificates expiring within the window, soonest first
    unknown: tuple[tuple[str, str], ...] = ()  # (party, fingerprint): bound, but no certificate file found
    problems: tuple[str, ...] = field(default=())  # unreadable files
    crl_within: timedelta = CRL_WINDOW
    crl_cas: int = 0  # CAs with CRLs filed under their name
    crl_findings: tuple[CrlFinding, ...] = ()  # stale or running out within crl_within, soonest first
    trust_error: str | None = None  # the trust directory does not load: the gateway would not start

    @property
    def failing(self) -> bool:
        return bool(any(f.action_needed for f in self.findings) or self.crl_findings or self.trust_error is not None)


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w``; a bare number is days."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 30d, 12h or 2w")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _info(cert: x509.Certificate, party: str, kind: str, path: Path) -> CertificateInfo:
    return CertificateInfo(
        party=party,
        kind=kind,
        subject=cert.subject.rfc4514_string(),
        fingerprint=fingerprint(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        path=path,
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _read(path: Path, problems: list[str]) -> list[x509.Certificate]:
    try:
        return load_certs_pem(path.read_bytes())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: {exc}")
        return []


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CERT_SUFFIXES)


def collect_certificates(
    certs_dir: Path,
    partners: PartnerRegistry,
    *,
    gateway_identity: str,
    gateway_cert: Path | None = None,
    tls_cert: Path | None = None,
    problems: list[str] | None = None,
) -> list[CertificateInfo]:
    """Every certificate the gateway relies on (see the module docstring), each once."""
    problems = problems if problems is not None else []
    found: dict[str, CertificateInfo] = {}

    def add(info: CertificateInfo) -> None:
        found.setdefault(info.fingerprint, info)

    for kind, path in (("gateway", gateway_cert), ("tls", tls_cert)):
        if path is not None and path.is_file():
            chain = _read(path, problems)
            if chain:
                add(_info(chain[0], gateway_identity, kind, path))
    trust = certs_dir / "trust"
    for kind, folder in (("anchor", trust / "anchors"), ("intermediate", trust / "intermediates")):
        for path in _files(folder):
            for cert in _read(path, problems):
                add(_info(cert, "", kind, path))
    for path in _files(certs_dir):
        if path.is_relative_to(trust):
            continue
        for cert in _read(path, problems):
            party = partners.by_fingerprint(fingerprint(cert))
            if party is not None and not _is_ca(cert):
                add(_info(cert, party.identity, "party", path))
    return sorted(found.values(), key=lambda c: (c.not_after, c.party, c.fingerprint))


def collect_for_settings(
    settings: Settings, partners: PartnerRegistry, problems: list[str] | None = None
) -> list[CertificateInfo]:
    return collect_certificates(
        settings.certs_dir,
        partners,
        gateway_identity=settings.gateway_identity,
        gateway_cert=settings.gateway_cert,
        tls_cert=settings.tls_cert,
        problems=problems,
    )


def _successor(
    cert: CertificateInfo, certs: Sequence[CertificateInfo], now: datetime, horizon: datetime
) -> CertificateInfo | None:
    if cert.kind in {"gateway", "tls"}:
        return None
    if cert.kind == "party":
        peers = [c for c in certs if c.kind == "party" and c.party == cert.party]
    else:
        peers = [c for c in certs if c.kind in {"anchor", "intermediate"} and c.subject == cert.subject]
    candidates = [c for c in peers if c.not_before <= now and c.not_after > horizon and c is not cert]
    return max(candidates, key=lambda c: c.not_after, default=None)


def check_expiry(
    certs: Sequence[CertificateInfo],
    within: timedelta,
    *,
    partners: PartnerRegistry | None = None,
    now: datetime | None = None,
    problems: Iterable[str] = (),
) -> ExpiryReport:
    """Which of ``certs`` expire before ``now + within``, and whether each is already superseded."""
    now = now or datetime.now(UTC)
    horizon = now + within
    findings = tuple(
        ExpiryFinding(cert, cert.not_after - now, _successor(cert, certs, now, horizon))
        for cert in sorted(certs, key=lambda c: c.not_after)
        if cert.not_after <= horizon
    )
    unknown: list[tuple[str, str]] = []
    if partners is not None:
        seen = {c.fingerprint for c in certs}
        for party in sorted(partners.parties(), key=lambda p: p.identity):
            unknown.extend((party.identity, fp) for fp in sorted(party.fingerprints) if fp not in seen)
    return ExpiryReport(within, len(certs), findings, tuple(unknown), tuple(problems))


def check_crls(
    coverage: Sequence[CrlCoverage], within: timedelta = CRL_WINDOW, *, now: datetime | None = None
) -> tuple[CrlFinding, ...]:
    """The CAs of ``coverage`` whose revocation status is unknown now or stops being known before ``now + within``."""
    now = now or datetime.now(UTC)
    findings = [
        CrlFinding(
            ca_subject=c.subject,
            ca_fingerprint=fingerprint(c.ca),
            crls=c.crls,
            known_until=c.known_until,
            remaining=None if c.known_until is None else c.known_until - now,
            problem=c.problem,
        )
        for c in coverage
        if c.problem is not None or (c.known_until is not None and c.known_until <= now + within)
    ]
    return tuple(sorted(findings, key=lambda f: f.known_until or datetime.min.replace(tzinfo=UTC)))


def report_for_settings(
    settings: Settings, partners: PartnerRegistry, within: timedelta, crl_within: timedelta = CRL_WINDOW
) -> ExpiryReport:
    """What ``nswgw certs check`` prints: certificates, registry bindings and CRLs of one gateway."""
    now = datetime.now(UTC)
    problems: list[str] = []
    certs = collect_for_settings(settings, partners, problems)
    report = check_expiry(certs, within, partners=partners, now=now, problems=problems)
    try:
        coverage = TrustStore.load(settings.trust_dir).revocation_coverage(now)  # as the gateway would load it
    except ConfigError as exc:
        return replace(report, crl_within=crl_within, trust_error=str(exc))
    return replace(
        report, crl_within=crl_within, crl_cas=len(coverage), crl_findings=check_crls(coverage, crl_within, now=now)
    )


def _span(delta: timedelta) -> str:
    seconds = abs(delta.total_seconds())
    days, rest = divmod(int(seconds), 86400)
    text = f"{days}d {rest // 3600}h" if days else f"{rest // 3600}h {rest % 3600 // 60}m"
    return f"{text} ago" if delta.total_seconds() < 0 else f"in {text}"


def _window(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds >= 2 * 86400 and seconds % 86400 == 0:
        return f"{seconds / 86400:g} days"
    return f"{seconds / 3600:g} hours"


def render(report: ExpiryReport) -> list[str]:
    """Human-readable lines for ``nswgw certs check``."""
    lines = [f"{report.checked} certificates checked; expiring within {_window(report.within)}: {len(report.findings)}"]
    for f in report.findings:
        c = f.cert
        who = c.party or "(CA)"
        when = f"{'expired' if f.expired else 'expires'} {c.not_after:%Y-%m-%dT%H:%M:%SZ} ({_span(f.remaining)})"
        verdict = "EXPIRING " if f.action_needed else "superseded"
        line = f"{verdict} {who:<24} {c.kind:<12} {when}  sha256 {c.fingerprint}  {c.subject}  [{c.path}]"
        if f.superseded_by is not None:
            s = f.superseded_by
            line += f"  -> by sha256 {s.fingerprint} valid until {s.not_after:%Y-%m-%d}"
        lines.append(line)
    for party, fp in report.unknown:
        lines.append(f"unknown    {party:<24} sha256 {fp}: bound in the registry, no certificate file found")
    lines.extend(f"unreadable {problem}" for problem in report.problems)
    lines.extend(_render_crls(report))
    return lines


def _render_crls(report: ExpiryReport) -> list[str]:
    if report.trust_error is not None:
        return [f"TRUST      the trust directory does not load, so the gateway would not start: {report.trust_error}"]
    lines = [
        f"{report.crl_cas} CAs with CRLs checked; revocation status unknown or running out within "
        f"{_window(report.crl_within)}: {len(report.crl_findings)}"
    ]
    for f in report.crl_findings:
        if f.problem is None and f.known_until is not None and f.remaining is not None:
            until = f"{f.known_until:%Y-%m-%dT%H:%M:%SZ} ({_span(f.remaining)})"
            what = f"CRL ENDING revocation status known until {until}; a fresh CRL is due"
        else:
            what = f"STALE      revocation status unknown, CRL {f.problem}: signers under this CA are refused"
        lines.append(f"{what}  CA {f.ca_subject}  sha256 {f.ca_fingerprint}  ({f.crls} CRL files)")
    return lines


class CertificateInventory:
    """The certificates of one gateway, re-read at most every ``ttl`` seconds (for the metric)."""

    def __init__(self, settings: Settings, partners: PartnerRegistry, *, ttl: float = 300.0) -> None:
        self._settings = settings
        self._partners = partners
        self._ttl = ttl
        self._read_at = -ttl
        self._certs: list[CertificateInfo] = []

    def current(self) -> list[CertificateInfo]:
        if time.monotonic() - self._read_at >= self._ttl:
            self._certs = collect_for_settings(self._settings, self._partners)
            self._read_at = time.monotonic()
        return self._certs
