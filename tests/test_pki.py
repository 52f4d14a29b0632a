"""The dev PKI generator: layout, certificate profiles, CRL, registry, and loopback mutual TLS."""

from __future__ import annotations

import itertools
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.partners import PartnerRegistry
from gateway.security.pki import TRADER, DevPki, init_dev_pki
from gateway.security.trust import fingerprint, load_certs_pem

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
RSA_PARTIES = ("VN-MOIT", "VN-MARD-PPD", "VN-CUSTOMS", TRADER, "VN-MOH")
EC_PARTIES = ("VN-NSW", "TH-NSW")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(tmp_path_factory.mktemp("pki") / "dev", now=NOW)


def chain_of(path: Path) -> list[x509.Certificate]:
    return load_certs_pem(path.read_bytes())


def test_writes_the_documented_layout(pki: DevPki) -> None:
    d = pki.dir
    expected = [
        "README.md",
        "partners.yaml",
        "trust/anchors/vn-nsw-dev-root.pem",
        "trust/anchors/th-nsw-dev-root.pem",
        "trust/intermediates/vn-nsw-dev-intermediate.pem",
        "trust/crl/vn-nsw-dev-intermediate.crl.pem",
        "gateway/key.pem",
        "gateway/cert.pem",
        *(f"parties/{p}/{f}" for p in (*RSA_PARTIES, *EC_PARTIES) for f in ("key.pem", "cert.pem")),
        *(
            f"test/{t}/{f}"
            for t in ("expired", "revoked", "untrusted", "trader-rollover")
            for f in ("key.pem", "cert.pem")
        ),
    ]
    missing = [name for name in expected if not (d / name).is_file()]
    assert missing == []
    assert sorted(p.name for p in (d / "trust" / "anchors").iterdir()) == ["th-nsw-dev-root.pem", "vn-nsw-dev-root.pem"]
    assert "never" in (d / "README.md").read_text().lower()
    assert pki.trust_dir == d / "trust"
    assert pki.partners == d / "partners.yaml"
    assert pki.peer_roots == {"TH-NSW": d / "trust/anchors/th-nsw-dev-root.pem"}


def test_private_keys_are_pkcs8_and_private_to_the_owner(pki: DevPki) -> None:
    keys = sorted(pki.dir.rglob("key.pem"))
    assert len(keys) == 15  # 3 CAs, the gateway, 7 parties, 4 test certs
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----"), path


@pytest.mark.parametrize("identity", [*RSA_PARTIES, *EC_PARTIES])
def test_party_certificate_profile(pki: DevPki, identity: str) -> None:
    pair = pki.parties[identity]
    leaf, *rest = chain_of(pair.cert)
    key = load_pem_private_key(pair.key.read_bytes(), password=None)
    assert key.public_key() == leaf.public_key()
    if identity in RSA_PARTIES:
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == 2048
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)

    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity
    assert leaf.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == identity[:2]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.content_commitment
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    server = identity in EC_PARTIES
    assert eku == (
        {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
        if server
        else {ExtendedKeyUsageOID.CLIENT_AUTH}
    )
    has_san = any(isinstance(e.value, x509.SubjectAlternativeName) for e in leaf.extensions)
    assert has_san == server
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert leaf.not_valid_before_utc == NOW - timedelta(days=1)
    assert leaf.not_valid_after_utc == NOW + timedelta(days=730)

    # leaf -> (intermediate ->) the anchor: every signature verifies
    anchor_file = pki.peer_roots.get(identity, pki.root)
    path = [leaf, *rest, *chain_of(anchor_file)]
    for child, parent in itertools.pairwise(path):
        child.verify_directly_issued_by(parent)
    assert len(rest) == (0 if identity == "TH-NSW" else 1)


def test_cas_are_ca_certificates_with_ten_years(pki: DevPki) -> None:
    root, intermediate = chain_of(pki.root)[0], chain_of(pki.intermediate)[0]
    th_root = chain_of(pki.peer_roots["TH-NSW"])[0]
    for ca in (root, intermediate, th_root):
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign
        assert usage.crl_sign
        assert ca.not_valid_after_utc == NOW + timedelta(days=3650)
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    intermediate.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    assert "VN NSW Dev Root" in root.subject.rfc4514_string()
    assert "TH NSW Dev Root" in th_root.subject.rfc4514_string()
    assert th_root.public_key() != root.public_key()


def test_gateway_files_are_the_vn_nsw_party(pki: DevPki) -> None:
    assert pki.gateway.cert.read_bytes() == pki.parties["VN-NSW"].cert.read_bytes()
    assert len(chain_of(pki.gateway.cert)) == 2  # leaf + intermediate


def test_test_certificates(pki: DevPki) -> None:
    expired = chain_of(pki.expired.cert)[0]
    assert expired.not_valid_before_utc == NOW - timedelta(days=400)
    assert expired.not_valid_after_utc == NOW - timedelta(days=10)
    revoked = chain_of(pki.revoked.cert)[0]
    assert revoked.serial_number == pki.revoked_serial
    untrusted, rogue_root = chain_of(pki.untrusted.cert)
    assert untrusted.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == TRADER
    assert "Rogue Root" in rogue_root.subject.rfc4514_string()
    untrusted.verify_directly_issued_by(rogue_root)
    rollover = chain_of(pki.rollover.cert)[0]
    assert rollover.public_key() != chain_of(pki.parties[TRADER].cert)[0].public_key()


def test_crl_is_signed_by_the_intermediate_and_lists_the_revoked_serial(pki: DevPki) -> None:
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    intermediate = chain_of(pki.intermediate)[0]
    assert crl.issuer == intermediate.subject
    assert crl.is_signature_valid(intermediate.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc == NOW + timedelta(days=7)
    assert [r.serial_number for r in crl] == [pki.revoked_serial]


def test_registry_binds_the_trader_to_its_certificates_but_not_the_rogue_one(pki: DevPki) -> None:
    registry = PartnerRegistry.load(pki.partners)
    assert {p.identity for p in registry.parties()} == {*RSA_PARTIES, *EC_PARTIES}
    trader = registry.get(TRADER)
    assert trader is not None
    main, rollover = (fingerprint(chain_of(p.cert)[0]) for p in (pki.parties[TRADER], pki.rollover))
    assert main != rollover
    assert {main, rollover} <= trader.fingerprints
    for pair in (pki.expired, pki.revoked, pki.rollover):
        assert registry.by_fingerprint(fingerprint(chain_of(pair.cert)[0])) is trader
    assert registry.by_fingerprint(fingerprint(chain_of(pki.untrusted.cert)[0])) is None
    for identity, pair in pki.parties.items():
        party = registry.by_fingerprint(fingerprint(chain_of(pair.cert)[0]))
        assert party is not None
        assert party.identity == identity
    assert pki.fingerprints[TRADER] == main


def test_refuses_a_non_empty_folder_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        init_dev_pki(tmp_path, peers=())
    stale = tmp_path / "trust" / "anchors" / "old-root.pem"
    stale.parent.mkdir(parents=True)
    stale.write_text("stale")
    pki = init_dev_pki(tmp_path, peers=(), force=True)
    assert not stale.exists()  # a stale anchor would otherwise stay trusted
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert pki.peer_roots == {}
    assert [p.name for p in (tmp_path / "trust" / "anchors").iterdir()] == ["vn-nsw-dev-root.pem"]


def test_peers_are_generic(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path / "dev", peers=("TH-NSW", "SG-NSW"), now=NOW)
    assert set(pki.peer_roots) == {"TH-NSW", "SG-NSW"}
    sg_leaf = chain_of(pki.parties["SG-NSW"].cert)[0]
    sg_leaf.verify_directly_issued_by(chain_of(pki.peer_roots["SG-NSW"])[0])
    registry = PartnerRegistry.load(pki.partners)
    sg = registry.get("SG-NSW")
    assert sg is not None
    assert sg.role == "peer"
    assert sg.country == "SG"
    assert sg.endpoint is not None
    with pytest.raises(ValueError, match="distinct"):
        init_dev_pki(tmp_path / "other", peers=("VN-MOIT",))


def _handshake(client: ssl.SSLObject, server: ssl.SSLObject, bios: list[ssl.MemoryBIO]) -> None:
    c_in, c_out, s_in, s_out = bios
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not complete")


@pytest.mark.parametrize(
    ("server_id", "client_id", "hostname"), [("TH-NSW", "VN-NSW", "127.0.0.1"), ("VN-NSW", "TH-NSW", "localhost")]
)
def test_nsw_certificates_serve_mutual_tls_on_loopback(
    pki: DevPki, server_id: str, client_id: str, hostname: str
) -> None:
    anchor = {"VN-NSW": pki.root, "TH-NSW": pki.peer_roots["TH-NSW"]}
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.parties[server_id].cert, pki.parties[server_id].key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(anchor[client_id])
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(anchor[server_id])
    client_ctx.load_cert_chain(pki.parties[client_id].cert, pki.parties[client_id].key)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname=hostname)
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    _handshake(client, server, bios)
    peer = server.getpeercert()
    assert peer is not None
    assert (("commonName", client_id),) in peer["subject"]
