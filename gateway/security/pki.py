"""A development PKI for ``nswgw certs init DIR``: test keys only, never for production.

It builds what a real deployment gets from its national CA and its peers: a VN root and
intermediate, one signing certificate per party, a separate root per foreign peer NSW (another
country's PKI, trusted as an anchor), the intermediate's CRL, a partner registry binding every
party to its fingerprints, and the bad certificates the tests need (expired, revoked, untrusted)
plus a second trader certificate to show key rollover.

Layout written into DIR (also in certs/README.md)::

    DIR/README.md                     "dev/test keys only"
    DIR/partners.yaml                 the partner registry (fingerprints of the certs below)
    DIR/trust/anchors/*.pem           trust anchors: the VN root, each peer's root
    DIR/trust/intermediates/*.pem     intermediate CA certificates (help chain building)
    DIR/trust/crl/*.pem               CRLs (the VN intermediate's)
    DIR/ca/<name>/key.pem, cert.pem   CA keys (to issue more dev certs or CRLs; tests use them)
    DIR/gateway/key.pem, cert.pem     this gateway's signing key; cert.pem = leaf + chain
    DIR/parties/<identity>/key.pem, cert.pem   every party's key and leaf + chain (the gateway too)
    DIR/test/{expired,revoked,untrusted,trader-rollover}/key.pem, cert.pem

Keys are unencrypted PKCS#8 PEM with mode 0600.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.security.trust import fingerprint

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
KeyKind = Literal["rsa", "ec"]

LEAF_LIFETIME: Final = timedelta(days=730)
CA_LIFETIME: Final = timedelta(days=3650)
# CAs start well before the expired test certificate so that it was issued within its CA's lifetime.
CA_BACKDATE: Final = timedelta(days=500)
CRL_LIFETIME: Final = timedelta(days=7)
_OWNED = ("README.md", "partners.yaml", "trust", "ca", "gateway", "parties", "test")


@dataclass(frozen=True, slots=True)
class PartySpec:
    """One party of the dev registry: who it is, what it may send, which key type it signs with."""

    identity: str
    name: str
    role: str
    country: str
    ministry_code: str | None = None
    key: KeyKind = "rsa"
    may_send: Mapping[str, Sequence[str] | str] = field(default_factory=dict)
    allow_legacy_sha1: bool = False
    authority_for: tuple[str, ...] = ()


NEW_AMEND_CANCEL = ("01", "02", "03", "04")
TRADER = "VN-TRADER-0101234567"
TRADER_NAME = "An Phat Import Export JSC"

DEV_PARTIES: Final[tuple[PartySpec, ...]] = (
    PartySpec(
        "VN-NSW",
        "Viet Nam National Single Window",
        "nsw",
        "VN",
        key="ec",
        may_send={"nsw.receipt": "*", "nsw.rejection": "*", "eco.atiga-form-d": "*", "sps.ephyto": "*"},
    ),
    PartySpec(
        "VN-MOIT",
        "Ministry of Industry and Trade",
        "agency",
        "VN",
        "BCT",
        may_send={"eco.atiga-form-d": "*", "licence.import": "*", "licence.export": "*"},
        authority_for=("eco.atiga-form-d",),
    ),
    PartySpec(
        "VN-MARD-PPD",
        "Plant Protection Department",
        "agency",
        "VN",
        "BNNPTNT",
        may_send={"sps.ephyto": "*", "permit.quarantine": "*"},
        authority_for=("sps.ephyto",),
    ),
    PartySpec(
        "VN-CUSTOMS",
        "General Department of Viet Nam Customs",
        "customs",
        "VN",
        "TCHQ",
        may_send={
            "licence.import": "*",
            "licence.export": "*",
            "permit.quarantine": "*",
            "eco.atiga-form-d": "*",
            "sps.ephyto": "*",
            "wco.res.notification": "*",
            "wco.fileupload.response": "*",
        },
    ),
    PartySpec(
        TRADER,
        TRADER_NAME,
        "trader",
        "VN",
        may_send={
            "licence.import": "*",
            "licence.export": "*",
            "permit.quarantine": "*",
            "eco.atiga-form-d": NEW_AMEND_CANCEL,
            "wco.dec.submit": "*",
            "wco.dec.amend": "*",
            "wco.dec.cancel": "*",
            "wco.fileupload.request": "*",
        },
    ),
    PartySpec(
        "VN-MOH",
        "Ministry of Health",
        "agency",
        "VN",
        "BYT",
        may_send={"licence.import": "*", "permit.quarantine": "*"},
        allow_legacy_sha1=True,
    ),
)
DEV_PEERS: Final[Mapping[str, PartySpec]] = {
    "TH-NSW": PartySpec(
        "TH-NSW",
        "Thailand National Single Window",
        "peer",
        "TH",
        key="ec",
        may_send={"eco.atiga-form-d": "*", "sps.ephyto": "*", "nsw.receipt": "*", "nsw.rejection": "*"},
    ),
}


@dataclass(frozen=True, slots=True)
class KeyPair:
    key: Path
    cert: Path  # leaf first, then the chain up to (not including) the anchor


@dataclass(frozen=True, slots=True)
class DevPki:
    """Paths of everything ``init_dev_pki`` wrote (see the module docstring for the layout)."""

    dir: Path
    trust_dir: Path  # DIR/trust: anchors/, intermediates/, crl/ -- feed to TrustStore.load
    root: Path  # the VN root certificate (a trust anchor)
    intermediate: Path  # the VN intermediate certificate
    crl: Path  # the VN intermediate's CRL
    root_ca: KeyPair
    intermediate_ca: KeyPair
    peer_roots: Mapping[str, Path]  # peer identity -> its root (an anchor)
    gateway: KeyPair
    parties: Mapping[str, KeyPair]  # identity -> key/cert, every party incl. the gateway and peers
    expired: KeyPair
    revoked: KeyPair
    untrusted: KeyPair  # issued by a "Rogue Root" that is not an anchor; cert.pem carries that root
    rollover: KeyPair  # a second, valid certificate of the trader (DIR/test/trader-rollover)
    partners: Path  # DIR/partners.yaml -- feed to PartnerRegistry.load
    readme: Path
    revoked_serial: int
    fingerprints: Mapping[str, str] = field(default_factory=dict)  # "identity" or "test/<name>" -> sha256


@dataclass(frozen=True, slots=True)
class Issued:
    key: PrivateKey
    cert: x509.Certificate


def new_key(kind: KeyKind) -> PrivateKey:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common: str, organisation: str, country: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COUNTRY_NAME, country),
        ]
    )


def _certificate(
    key: PrivateKey,
    subject: x509.Name,
    signer: Issued | None,
    *,
    not_before: datetime,
    not_after: datetime,
    ca: bool,
    path_length: int | None = None,
) -> x509.CertificateBuilder:
    """The parts every dev certificate shares; ``signer`` None means self-signed."""
    signing_key = signer.key if signer else key
    # CA keys sign certificates and CRLs; party keys sign messages (non-repudiation), nothing else.
    usage = x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=not ca,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.cert.subject if signer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False)
    )


def make_ca(
    common: str,
    country: str,
    *,
    issuer: Issued | None = None,
    kind: KeyKind = "rsa",
    not_before: datetime,
    not_after: datetime,
    path_length: int | None = None,
) -> Issued:
    """A CA certificate: self-signed root when ``issuer`` is None, else an intermediate under it."""
    key = new_key(kind)
    subject = _name(common, f"{common} - test keys only", country)
    builder = _certificate(
        key, subject, issuer, not_before=not_before, not_after=not_after, ca=True, path_length=path_length
    )
    return Issued(key, builder.sign(issuer.key if issuer else key, hashes.SHA256()))


def issue_leaf(
    issuer: Issued,
    identity: str,
    organisation: str,
    country: str,
    *,
    kind: KeyKind = "rsa",
    not_before: datetime,
    not_after: datetime,
    server: bool = False,
) -> Issued:
    """A signing certificate (digitalSignature + nonRepudiation, clientAuth). ``server`` adds serverAuth
    and a loopback SAN so the same certificate can serve mutual TLS on 127.0.0.1."""
    key = new_key(kind)
    subject = _name(identity, organisation, country)
    builder = _certificate(key, subject, issuer, not_before=not_before, not_after=not_after, ca=False)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH, *([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])]
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return Issued(key, builder.sign(issuer.key, hashes.SHA256()))


def make_crl(
    issuer: Issued,
    revoked: Mapping[int, datetime],
    *,
    this_update: datetime,
    next_update: datetime,
    number: int = 1,
    signing_key: PrivateKey | None = None,
) -> x509.CertificateRevocationList:
    """A CRL for ``issuer`` listing ``revoked`` (serial -> revocation date). ``signing_key`` overrides
    the issuer's key: that is how tests forge a CRL."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    )
    for serial, when in revoked.items():
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(when)
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(signing_key or issuer.key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)  # the umask must not widen or narrow what we asked for
        out.write(data)
    return path


def _write_pair(folder: Path, issued: Issued, chain: Sequence[x509.Certificate]) -> KeyPair:
    key_pem = issued.key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key = _write(folder / "key.pem", key_pem, 0o600)
    cert = _write(folder / "cert.pem", b"".join(_pem(c) for c in (issued.cert, *chain)))
    return KeyPair(key, cert)


def _prepare(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"{out_dir} is not empty; pass force=True (--force) to regenerate the dev PKI")
        # Only what we write ourselves: a stale anchor left behind would stay trusted.
        for name in _OWNED:
            target = out_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _peer_spec(identity: str) -> PartySpec:
    if identity in DEV_PEERS:
        return DEV_PEERS[identity]
    country = identity.split("-", 1)[0].upper()
    return PartySpec(
        identity,
        f"{country} National Single Window",
        "peer",
        country,
        key="ec",
        may_send={"eco.atiga-form-d": ["01", "02", "03", "22", "23"], "nsw.receipt": ["99"]},
    )


def _registry_entry(spec: PartySpec, fingerprints: Sequence[tuple[str, str]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": spec.name, "role": spec.role, "country": spec.country}
    if spec.ministry_code:
        entry["ministry_code"] = spec.ministry_code
    entry["certificates"] = [{"sha256": fp, "note": note} for fp, note in fingerprints]
    entry["may_send"] = {doc: fn if isinstance(fn, str) else list(fn) for doc, fn in spec.may_send.items()}
    entry["allow_legacy_sha1"] = spec.allow_legacy_sha1
    entry["authority_for"] = list(spec.authority_for)
    return entry


def _dump_registry(path: Path, registry: Mapping[str, Any]) -> Path:
    header = "# Dev partner registry written by `nswgw certs init` -- TEST KEYS ONLY, never for production.\n"
    return _write(path, (header + yaml.safe_dump(dict(registry), sort_keys=False)).encode())


README = """\
DEVELOPMENT / TEST KEYS ONLY -- NEVER USE IN PRODUCTION
=======================================================

Everything in this folder was generated by `nswgw certs init` on {now}.
The private keys are unencrypted and the CAs ({cas}) exist only here.
Anyone with this folder can sign as any party below.

Certificate fingerprints (sha256, as bound in partners.yaml):

{listing}
Layout: trust/ (anchors, intermediates, crl) is what the gateway trusts; partners.yaml binds party
identities to certificate fingerprints; parties/<identity>/ and gateway/ hold each party's key and
certificate chain; ca/ holds the CA keys; test/ holds the deliberately bad certificates
(expired, revoked, untrusted) and the trader's second (rollover) certificate.
"""


@dataclass
class _Build:
    """The pieces of one ``init_dev_pki`` run, accumulated as they are written."""

    out: Path
    now: datetime
    parties: dict[str, KeyPair] = field(default_factory=dict)
    bound: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # identity -> (sha256, note)
    specs: list[PartySpec] = field(default_factory=list)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    cas: list[x509.Certificate] = field(default_factory=list)

    @property
    def leaf_from(self) -> datetime:
        return self.now - timedelta(days=1)

    @property
    def leaf_to(self) -> datetime:
        return self.now + LEAF_LIFETIME

    def ca(self, common: str, country: str, *, issuer: Issued | None = None, kind: KeyKind = "rsa") -> Issued:
        path_length = 0 if issuer is not None else None
        ca = make_ca(
            common,
            country,
            issuer=issuer,
            kind=kind,
            not_before=self.now - CA_BACKDATE,
            not_after=self.now + CA_LIFETIME,
            path_length=path_length,
        )
        self.cas.append(ca.cert)
        return ca

    def party(self, spec: PartySpec, issuer: Issued, chain: Sequence[x509.Certificate], *, server: bool) -> Issued:
        issued = issue_leaf(
            issuer,
            spec.identity,
            spec.name,
            spec.country,
            kind=spec.key,
            not_before=self.leaf_from,
            not_after=self.leaf_to,
            server=server,
        )
        self.parties[spec.identity] = _write_pair(self.out / "parties" / spec.identity, issued, chain)
        self.bound[spec.identity] = [(fingerprint(issued.cert), f"dev signing cert until {self.leaf_to:%Y-%m-%d}")]
        self.specs.append(spec)
        return issued

    def peer(self, identity: str, port: int) -> Path:
        """A foreign NSW: its own national root (a trust anchor here) issues its certificate directly,
        a different chain shape from ours."""
        spec = _peer_spec(identity)
        root = self.ca(f"{spec.country} NSW Dev Root", spec.country, kind="ec")
        stem = f"{identity.lower()}-dev-root"
        anchor = _write(self.out / "trust" / "anchors" / f"{stem}.pem", _pem(root.cert))
        _write_pair(self.out / "ca" / stem, root, ())
        self.party(spec, root, (), server=True)
        tls = {"ca": f"trust/anchors/{stem}.pem", "client_cert": "gateway/cert.pem", "client_key": "gateway/key.pem"}
        self.endpoints[identity] = {"url": f"https://127.0.0.1:{port}/v1/messages", "tls": tls}
        return anchor

    def trader_cert(self, issuer: Issued, not_before: datetime, not_after: datetime) -> Issued:
        return issue_leaf(issuer, TRADER, TRADER_NAME, "VN", not_before=not_before, not_after=not_after)

    def bind(self, identity: str, cert: x509.Certificate, note: str) -> None:
        self.bound[identity].append((fingerprint(cert), note))

    def write_registry(self) -> Path:
        registry: dict[str, Any] = {"version": 1, "parties": {}}
        for spec in self.specs:
            entry = _registry_entry(spec, self.bound[spec.identity])
            entry["endpoint"] = self.endpoints.get(spec.identity)
            registry["parties"][spec.identity] = entry
        return _dump_registry(self.out / "partners.yaml", registry)

    def write_readme(self, fingerprints: Mapping[str, str]) -> Path:
        listing = "".join(f"  {k:<28} {v}\n" for k, v in fingerprints.items())
        cas = ", ".join(f'"{_common_name(c)}"' for c in self.cas)
        return _write(
            self.out / "README.md", README.format(now=self.now.isoformat(), cas=cas, listing=listing).encode()
        )


def init_dev_pki(
    out_dir: Path,
    *,
    gateway_identity: str = "VN-NSW",
    country: str = "VN",
    peers: Sequence[str] = ("TH-NSW",),
    now: datetime | None = None,
    force: bool = False,
) -> DevPki:
    """Generate the dev PKI into ``out_dir`` (see the module docstring). Refuses a non-empty
    ``out_dir`` unless ``force``, in which case it replaces only what it writes itself."""
    taken = {gateway_identity, *(s.identity for s in DEV_PARTIES if s.role != "nsw")}
    if taken.intersection(peers) or len(set(peers)) != len(peers):
        raise ValueError(f"peer identities {list(peers)} must be distinct and differ from {sorted(taken)}")
    _prepare(out_dir, force)
    build = _Build(out_dir, (now or datetime.now(UTC)).replace(microsecond=0))
    now = build.now
    prefix, trust = country.lower(), out_dir / "trust"

    root = build.ca(f"{country} NSW Dev Root", country)
    inter = build.ca(f"{country} NSW Dev Intermediate", country, issuer=root)
    anchor = _write(trust / "anchors" / f"{prefix}-nsw-dev-root.pem", _pem(root.cert))
    intermediate = _write(trust / "intermediates" / f"{prefix}-nsw-dev-intermediate.pem", _pem(inter.cert))
    root_pair = _write_pair(out_dir / "ca" / f"{prefix}-nsw-dev-root", root, ())
    inter_pair = _write_pair(out_dir / "ca" / f"{prefix}-nsw-dev-intermediate", inter, (root.cert,))

    for base in DEV_PARTIES:
        is_gateway = base.role == "nsw"
        spec = replace(base, identity=gateway_identity, country=country) if is_gateway else base
        issued = build.party(spec, inter, (inter.cert,), server=is_gateway)
        if is_gateway:
            gateway = _write_pair(out_dir / "gateway", issued, (inter.cert,))
    peer_roots = {identity: build.peer(identity, 9443 + index) for index, identity in enumerate(peers)}

    expired = build.trader_cert(inter, now - timedelta(days=400), now - timedelta(days=10))
    revoked = build.trader_cert(inter, build.leaf_from, build.leaf_to)
    rollover = build.trader_cert(inter, now, build.leaf_to + timedelta(days=365))
    rogue = make_ca("Rogue Root", "VN", kind="ec", not_before=now - CA_BACKDATE, not_after=now + CA_LIFETIME)
    untrusted = build.trader_cert(rogue, build.leaf_from, build.leaf_to)
    # Bound to the trader on purpose: in those tests the certificate must be the only fault.
    build.bind(TRADER, rollover.cert, "rollover: second signing cert")
    build.bind(TRADER, expired.cert, "TEST ONLY: expired")
    build.bind(TRADER, revoked.cert, "TEST ONLY: revoked on the intermediate's CRL")
    tests = {"expired": expired, "revoked": revoked, "untrusted": untrusted, "trader-rollover": rollover}
    pairs = {
        name: _write_pair(out_dir / "test" / name, issued, (rogue.cert if name == "untrusted" else inter.cert,))
        for name, issued in tests.items()
    }

    crl = make_crl(
        inter,
        {revoked.cert.serial_number: now - timedelta(hours=1)},
        this_update=now - timedelta(hours=1),
        next_update=now + CRL_LIFETIME,
    )
    crl_path = _write(trust / "crl" / f"{prefix}-nsw-dev-intermediate.crl.pem", crl.public_bytes(Encoding.PEM))

    fingerprints = {identity: fps[0][0] for identity, fps in build.bound.items()}
    fingerprints.update({f"test/{name}": fingerprint(issued.cert) for name, issued in tests.items()})
    return DevPki(
        dir=out_dir,
        trust_dir=trust,
        root=anchor,
        intermediate=intermediate,
        crl=crl_path,
        root_ca=root_pair,
        intermediate_ca=inter_pair,
        peer_roots=peer_roots,
        gateway=gateway,
        parties=build.parties,
        expired=pairs["expired"],
        revoked=pairs["revoked"],
        untrusted=pairs["untrusted"],
        rollover=pairs["trader-rollover"],
        partners=build.write_registry(),
        readme=build.write_readme(fingerprints),
        revoked_serial=revoked.cert.serial_number,
        fingerprints=fingerprints,
    )


def _common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def load_issued(pair: KeyPair) -> Issued:
    """Read back a key and its (leaf) certificate, e.g. a CA from ``DevPki.intermediate_ca``."""
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TypeError(f"{pair.key}: only RSA and ECDSA keys are supported")
    return Issued(key, x509.load_pem_x509_certificates(pair.cert.read_bytes())[0])


# -- two gateways that trust each other (cross-border exchange) -------------------------------------

# The peer country's customs and e-C/O issuing authority, by country; other countries get plain names.
_PEER_COUNTRY_PARTIES: Final[Mapping[str, tuple[tuple[str, str], tuple[str, str]]]] = {
    "TH": (("TH-CUSTOMS", "Thai Customs Department"), ("TH-DFT", "Department of Foreign Trade, Ministry of Commerce")),
}
_GATEWAY_SENDS: Final[Mapping[str, str]] = {
    "nsw.receipt": "*",
    "nsw.rejection": "*",
    "eco.atiga-form-d": "*",
    "sps.ephyto": "*",
}
DEFAULT_HOME_URL: Final = "https://127.0.0.1:8443/v1/messages"


@dataclass(frozen=True, slots=True)
class DevPkiPair:
    """Two dev PKIs whose gateways trust each other (``init_dev_pki_pair``)."""

    home: DevPki  # e.g. VN: the ``init_dev_pki`` layout; its registry also names the peer's issuing authority
    peer_dir: Path  # e.g. TH: the same layout (without test/), usable as ``Settings.certs_dir``
    home_identity: str  # the home gateway, e.g. VN-NSW
    peer_identity: str  # the peer gateway, e.g. TH-NSW
    peer_customs: str  # e.g. TH-CUSTOMS
    peer_issuer: str  # the peer country's e-C/O issuing authority, e.g. TH-DFT

    def party(self, identity: str) -> KeyPair:
        """Key and certificate of any party of either side (peer side first)."""
        folder = self.peer_dir / "parties" / identity
        if not folder.is_dir():
            folder = self.home.dir / "parties" / identity
        return KeyPair(folder / "key.pem", folder / "cert.pem")


def _copy(source: Path, target: Path) -> Path:
    return _write(target, source.read_bytes(), source.stat().st_mode & 0o777)


def init_dev_pki_pair(
    out_dir: Path,
    *,
    home_identity: str = "VN-NSW",
    home_country: str = "VN",
    peer_identity: str = "TH-NSW",
    home_url: str = DEFAULT_HOME_URL,
    peer_url: str | None = None,
    now: datetime | None = None,
    force: bool = False,
) -> DevPkiPair:
    """``out_dir/<home>`` and ``out_dir/<peer>`` (lower-case country codes): the home gateway's dev PKI
    (``init_dev_pki``, with ``peer_identity`` as its peer) and the peer gateway's, built on the peer root
    the home PKI made. Each trusts the other's root, registers the other gateway as a ``peer`` with its
    real certificate fingerprint and endpoint (``home_url`` / ``peer_url``; mutual TLS with the gateway
    certificates), and names the other country's issuing authorities, so a Body signed by a ministry on
    one side verifies on the other. The peer side has a customs party and an e-C/O issuing authority."""
    home_dir = out_dir / home_country.lower()
    home = init_dev_pki(
        home_dir, gateway_identity=home_identity, country=home_country, peers=(peer_identity,), now=now, force=force
    )
    spec = _peer_spec(peer_identity)
    peer_dir = out_dir / spec.country.lower()
    _prepare(peer_dir, force)
    build = _Build(peer_dir, (now or datetime.now(UTC)).replace(microsecond=0))
    stem = f"{peer_identity.lower()}-dev-root"
    root = load_issued(KeyPair(home_dir / "ca" / stem / "key.pem", home_dir / "ca" / stem / "cert.pem"))
    build.cas.append(root.cert)
    for name in ("key.pem", "cert.pem"):
        _copy(home_dir / "ca" / stem / name, peer_dir / "ca" / stem / name)

    # Trust: our own root, the home root, the home intermediate and its CRL.
    _write(peer_dir / "trust" / "anchors" / f"{stem}.pem", _pem(root.cert))
    _copy(home.root, peer_dir / "trust" / "anchors" / home.root.name)
    _copy(home.intermediate, peer_dir / "trust" / "intermediates" / home.intermediate.name)
    _copy(home.crl, peer_dir / "trust" / "crl" / home.crl.name)

    # The peer gateway signs with the very certificate the home registry binds to it.
    gateway_spec = PartySpec(peer_identity, spec.name, "nsw", spec.country, key="ec", may_send=_GATEWAY_SENDS)
    for name in ("key.pem", "cert.pem"):
        source = home_dir / "parties" / peer_identity / name
        _copy(source, peer_dir / "gateway" / name)
        _copy(source, peer_dir / "parties" / peer_identity / name)
    build.parties[peer_identity] = KeyPair(peer_dir / "gateway" / "key.pem", peer_dir / "gateway" / "cert.pem")
    build.bound[peer_identity] = [(home.fingerprints[peer_identity], "dev gateway cert (from the peer root)")]
    build.specs.append(gateway_spec)

    (customs, customs_name), (issuer, issuer_name) = _PEER_COUNTRY_PARTIES.get(
        spec.country,
        ((f"{spec.country}-CUSTOMS", f"{spec.country} Customs"), (f"{spec.country}-MOC", f"{spec.country} Ministry")),
    )
    customs_spec = PartySpec(
        customs, customs_name, "customs", spec.country, may_send={"eco.atiga-form-d": "*", "sps.ephyto": "*"}
    )
    build.party(customs_spec, root, (), server=False)
    issuer_cert = build.party(
        PartySpec(
            issuer,
            issuer_name,
            "agency",
            spec.country,
            may_send={"eco.atiga-form-d": "*"},
            authority_for=("eco.atiga-form-d",),
        ),
        root,
        (),
        server=False,
    )

    # The home gateway as this side's peer, and the home country's issuing authorities (they never send here).
    home_spec = PartySpec(
        home_identity, f"{home_country} National Single Window", "peer", home_country, may_send=_GATEWAY_SENDS
    )
    build.specs.append(home_spec)
    build.bound[home_identity] = [(home.fingerprints[home_identity], "the peer gateway's signing cert")]
    tls = {"ca": f"trust/anchors/{home.root.name}", "client_cert": "gateway/cert.pem", "client_key": "gateway/key.pem"}
    build.endpoints[home_identity] = {"url": home_url, "tls": tls}
    for base in DEV_PARTIES:
        if base.authority_for:
            build.specs.append(replace(base, may_send={}, allow_legacy_sha1=False))
            build.bound[base.identity] = [(home.fingerprints[base.identity], f"{home_country} issuing authority")]
    build.write_registry()
    build.write_readme({identity: fps[0][0] for identity, fps in build.bound.items()})

    # The home side learns the peer's issuing authority and where the peer listens.
    registry = yaml.safe_load(home.partners.read_text(encoding="utf-8"))
    registry["parties"][issuer] = _registry_entry(
        PartySpec(issuer, issuer_name, "agency", spec.country, authority_for=("eco.atiga-form-d",)),
        [(fingerprint(issuer_cert.cert), f"{spec.country} issuing authority")],
    )
    if peer_url is not None:
        registry["parties"][peer_identity]["endpoint"]["url"] = peer_url
    _dump_registry(home.partners, registry)
    return DevPkiPair(home, peer_dir, home_identity, peer_identity, customs, issuer)


def set_peer_endpoint(partners: Path, identity: str, endpoint: Mapping[str, Any] | None) -> Any:
    """Give a dev registry's peer ``identity`` this ``endpoint`` (None: not live); returns the one it had."""
    registry = yaml.safe_load(partners.read_text(encoding="utf-8"))
    before = registry["parties"][identity].get("endpoint")
    registry["parties"][identity]["endpoint"] = None if endpoint is None else dict(endpoint)
    _dump_registry(partners, registry)
    return before


def set_peer_url(partners: Path, identity: str, url: str) -> None:
    """Point a dev registry's peer ``identity`` at ``url`` (tests and demos pick free loopback ports)."""
    registry = yaml.safe_load(partners.read_text(encoding="utf-8"))
    endpoint = registry["parties"][identity].get("endpoint")
    if not endpoint:
        raise KeyError(f"{partners}: party {identity} has no endpoint")
    endpoint["url"] = url
    _dump_registry(partners, registry)
