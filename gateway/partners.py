"""The partner registry: who each party is, which certificates speak for it, what it may send.

Read once from YAML (``certs/README.md`` documents the format; ``nswgw certs init`` writes a dev
one). Every entry is checked on load and a fault is a ``ConfigError`` naming the file, the party and
the field, so a typo never silently widens or narrows what a partner may do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import yaml

from gateway.errors import ConfigError

ROLES: Final = frozenset({"trader", "agency", "customs", "nsw", "peer"})
ANY: Final = "*"
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_FUNCTION = re.compile(r"^[0-9]{2}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_PARTY_KEYS: Final = frozenset(
    {
        "name",
        "role",
        "country",
        "ministry_code",
        "certificates",
        "may_send",
        "allow_legacy_sha1",
        "authority_for",
        "endpoint",
    }
)


@dataclass(frozen=True, slots=True)
class PeerEndpoint:
    """Where and how to reach a foreign NSW. Paths are already resolved against the registry's folder."""

    url: str
    ca: Path | None = None  # CA bundle that must have issued the peer's TLS server certificate
    client_cert: Path | None = None  # our client certificate chain for mutual TLS
    client_key: Path | None = None


@dataclass(frozen=True, slots=True)
class Party:
    identity: str
    name: str
    role: str
    country: str
    ministry_code: str | None
    fingerprints: frozenset[str]
    may_send: Mapping[str, frozenset[str] | None] = field(hash=False)  # None = any function the type allows
    allow_legacy_sha1: bool = False
    authority_for: frozenset[str] = frozenset()
    endpoint: PeerEndpoint | None = None

    def may(self, document_type: str, function: str) -> bool:
        """Whether this party may send ``function`` of ``document_type``. Which functions a type
        allows at all is the document-type registry's business, not this one's."""
        if document_type not in self.may_send:
            return False
        allowed = self.may_send[document_type]
        return allowed is None or function in allowed


class PartnerRegistry:
    """Parties by identity and by certificate fingerprint. Shared by everything that checks a party;
    ``adopt`` swaps in a reloaded registry's contents in one assignment, so a lookup sees the old
    registry or the new one, never half of each."""

    def __init__(self, parties: Iterable[Party], *, source: str = "partner registry") -> None:
        self.source = source
        by_identity: dict[str, Party] = {}
        by_fingerprint: dict[str, Party] = {}
        for party in parties:
            if party.identity in by_identity:
                raise ConfigError(f"{source}: party {party.identity} is defined twice")
            by_identity[party.identity] = party
            for fp in party.fingerprints:
                other = by_fingerprint.get(fp)
                if other is not None:
                    raise ConfigError(
                        f"{source}: certificate sha256 {fp} is bound to two parties, {other.identity} and "
                        f"{party.identity}; a certificate must speak for exactly one party"
                    )
                by_fingerprint[fp] = party
        self._index = (by_identity, by_fingerprint)

    def adopt(self, reloaded: PartnerRegistry) -> None:
        """Take ``reloaded``'s parties (a registry file read again) for every lookup from now on."""
        self._index = reloaded._index
        self.source = reloaded.source

    @classmethod
    def load(cls, path: Path) -> PartnerRegistry:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the partner registry: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        return cls.from_dict(data, base_dir=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, base_dir: Path, source: str = "partner registry") -> PartnerRegistry:
        """Build from the parsed YAML document; relative paths resolve against ``base_dir``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping with 'version' and 'parties'")
        unknown = set(data) - {"version", "parties"}
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}")
        if data.get("version", 1) != 1:
            raise ConfigError(f"{source}: version {data.get('version')!r} is not supported (expected 1)")
        entries = data.get("parties")
        if not isinstance(entries, dict) or not entries:
            raise ConfigError(f"{source}: 'parties' must be a non-empty mapping of identity -> entry")
        parties = [_party(str(identity), entry, base_dir, source) for identity, entry in entries.items()]
        return cls(parties, source=source)

    def get(self, identity: str) -> Party | None:
        return self._index[0].get(identity)

    def by_fingerprint(self, sha256_hex: str) -> Party | None:
        return self._index[1].get(_normalise_fingerprint(sha256_hex))

    def parties(self) -> Iterable[Party]:
        return self._index[0].values()

    def authorities_for(self, document_type: str, country: str | None = None) -> list[Party]:
        """Parties whose Body signature is the issuing authority's for ``document_type``, optionally
        only those of ``country``; sorted by identity."""
        return sorted(
            (
                p
                for p in self._index[0].values()
                if document_type in p.authority_for and (country is None or p.country == country)
            ),
            key=lambda p: p.identity,
        )


def peer_destinations(partners: PartnerRegistry) -> frozenset[str]:
    """``asw:<country>`` for every foreign NSW with an endpoint: routing may name them without listing them."""
    return frozenset(f"asw:{p.country}" for p in partners.parties() if p.role == "peer" and p.endpoint is not None)


def _normalise_fingerprint(value: str) -> str:
    return value.replace(":", "").strip().lower()


class _Entry:
    """Reads one party's mapping, naming the party and field in every error."""

    def __init__(self, identity: str, data: Any, source: str) -> None:
        self.identity, self.source = identity, source
        if not isinstance(data, dict):
            raise self.error("entry", "must be a mapping")
        unknown = set(data) - _PARTY_KEYS
        if unknown:
            raise self.error(", ".join(sorted(unknown)), f"unknown field(s); expected some of {sorted(_PARTY_KEYS)}")
        self.data: dict[str, Any] = data

    def error(self, field_name: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: party {self.identity}: {field_name}: {problem}")

    def text(self, key: str, *, required: bool = True) -> str | None:
        value = self.data.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def strings(self, key: str) -> list[str]:
        value = self.data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"must be a list of strings, got {value!r}")
        return value


def _party(identity: str, data: Any, base_dir: Path, source: str) -> Party:
    entry = _Entry(identity, data, source)
    if not identity or any(ch.isspace() for ch in identity):
        raise entry.error("identity", "must be a non-empty identity without spaces")
    role = entry.text("role")
    if role not in ROLES:
        raise entry.error("role", f"unknown role {role!r}; expected one of {sorted(ROLES)}")
    country = entry.text("country") or ""
    if not _COUNTRY.match(country):
        raise entry.error("country", f"must be an ISO 3166 alpha-2 code such as VN, got {country!r}")
    legacy = entry.data.get("allow_legacy_sha1", False)
    if not isinstance(legacy, bool):
        raise entry.error("allow_legacy_sha1", f"must be true or false, got {legacy!r}")
    endpoint = _endpoint(entry, base_dir)
    if endpoint is not None and role != "peer":
        raise entry.error("endpoint", f"only peers have an endpoint; this party's role is {role}")
    return Party(
        identity=identity,
        name=entry.text("name") or "",
        role=role,
        country=country,
        ministry_code=entry.text("ministry_code", required=False),
        fingerprints=_fingerprints(entry),
        may_send=_may_send(entry),
        allow_legacy_sha1=legacy,
        authority_for=frozenset(entry.strings("authority_for")),
        endpoint=endpoint,
    )


def _fingerprints(entry: _Entry) -> frozenset[str]:
    items = entry.data.get("certificates") or []
    if not isinstance(items, list):
        raise entry.error("certificates", "must be a list of {sha256: ..., note: ...}")
    found = set()
    for index, item in enumerate(items):
        value = item.get("sha256") if isinstance(item, dict) else None
        if not isinstance(value, str) or not _FINGERPRINT.match(_normalise_fingerprint(value)):
            raise entry.error(f"certificates[{index}].sha256", f"must be 64 hex digits, got {value!r}")
        extra = set(item) - {"sha256", "note"}
        if extra:
            raise entry.error(f"certificates[{index}]", f"unknown field(s) {sorted(extra)}")
        found.add(_normalise_fingerprint(value))
    return frozenset(found)


def _may_send(entry: _Entry) -> Mapping[str, frozenset[str] | None]:
    table = entry.data.get("may_send") or {}
    if not isinstance(table, dict):
        raise entry.error("may_send", 'must map document type -> list of function codes or "*"')
    out: dict[str, frozenset[str] | None] = {}
    for document_type, functions in table.items():
        where = f"may_send.{document_type}"
        if functions == ANY:
            out[str(document_type)] = None
            continue
        if not isinstance(functions, list) or not functions:
            raise entry.error(where, f'must be a non-empty list of function codes or "*", got {functions!r}')
        for code in functions:
            # Unquoted 01 in YAML is the integer 1: insist on strings rather than guess.
            if not isinstance(code, str) or not _FUNCTION.match(code):
                raise entry.error(where, f'function codes are two-digit quoted strings such as "01", got {code!r}')
        out[str(document_type)] = frozenset(functions)
    return MappingProxyType(out)


def _endpoint(entry: _Entry, base_dir: Path) -> PeerEndpoint | None:
    value = entry.data.get("endpoint")
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"url", "tls"}:
        raise entry.error("endpoint", f"must be a mapping with url and optional tls, got {value!r}")
    url = value.get("url")
    if not isinstance(url, str) or not url.startswith("https://"):
        raise entry.error("endpoint.url", f"must be an https:// URL, got {url!r}")
    tls = value.get("tls") or {}
    if not isinstance(tls, dict) or set(tls) - {"ca", "client_cert", "client_key"}:
        raise entry.error("endpoint.tls", f"must be a mapping with ca, client_cert, client_key; got {tls!r}")
    paths: dict[str, Path | None] = {}
    for key in ("ca", "client_cert", "client_key"):
        raw = tls.get(key)
        if raw is not None and not isinstance(raw, str):
            raise entry.error(f"endpoint.tls.{key}", f"must be a path, got {raw!r}")
        paths[key] = None if raw is None else base_dir / Path(raw)
    if (paths["client_cert"] is None) != (paths["client_key"] is None):
        raise entry.error("endpoint.tls", "client_cert and client_key go together")
    return PeerEndpoint(url=url, **paths)
