"""TrustStore against real certificates from the dev PKI: chain, validity, CRL, cache."""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.errors import ConfigError, ErrorCode, Rejected
from gateway.security.pki import (
    TRADER,
    DevPki,
    init_dev_pki,
    issue_leaf,
    load_issued,
    make_ca,
    make_crl,
    new_key,
)
from gateway.security.trust import TrustStore, fingerprint, load_certs_pem

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(tmp_path_factory.mktemp("pki") / "dev", now=NOW)


@pytest.fixture
def store(pki: DevPki) -> TrustStore:
    return TrustStore.load(pki.trust_dir)


@pytest.fixture
def trust_copy(pki: DevPki, tmp_path: Path) -> Path:
    """A private copy of the trust folder that a test may change."""
    return Path(shutil.copytree(pki.trust_dir, tmp_path / "trust"))


def chain_of(path: Path) -> list[x509.Certificate]:
    return load_certs_pem(path.read_bytes())


def evaluate(store: TrustStore, path: Path, at: datetime | None = None) -> object:
    leaf, *chain = chain_of(path)
    return store.evaluate(leaf, chain, at=at)


def rejection(store: TrustStore, path: Path, at: datetime | None = None, *, present_chain: bool = True) -> Rejected:
    leaf, *chain = chain_of(path)
    with pytest.raises(Rejected) as caught:
        store.evaluate(leaf, chain if present_chain else (), at=at)
    return caught.value


@pytest.mark.parametrize("identity", ["VN-NSW", "VN-MOIT", "VN-MARD-PPD", "VN-CUSTOMS", TRADER, "VN-MOH", "TH-NSW"])
def test_every_party_certificate_is_trusted(pki: DevPki, store: TrustStore, identity: str) -> None:
    leaf, *chain = chain_of(pki.parties[identity].cert)
    decision = store.evaluate(leaf, chain)
    assert decision.fingerprint == fingerprint(leaf)
    assert f"CN={identity}" in decision.subject
    assert decision.not_after == leaf.not_valid_after_utc
    assert decision.chain[0] == leaf
    anchor = chain_of(pki.peer_roots.get(identity, pki.root))[0]
    assert decision.chain[-1] == anchor
    assert (
        "TH NSW Dev Root" in decision.issuer if identity == "TH-NSW" else "VN NSW Dev Intermediate" in decision.issuer
    )


def test_the_intermediate_is_found_in_the_store_when_not_presented(pki: DevPki, store: TrustStore) -> None:
    leaf = chain_of(pki.parties["VN-MOIT"].cert)[0]
    assert len(store.evaluate(leaf).chain) == 3


def test_rollover_certificate_is_trusted(pki: DevPki, store: TrustStore) -> None:
    evaluate(store, pki.rollover.cert)


def test_expired_certificate(pki: DevPki, store: TrustStore) -> None:
    exc = rejection(store, pki.expired.cert)
    assert exc.code is ErrorCode.CERT_EXPIRED
    expired_on = (NOW - timedelta(days=10)).strftime("%Y-%m-%d")
    assert f"expired on {expired_on}" in exc.detail
    assert TRADER in exc.detail


def test_not_yet_valid_certificate(pki: DevPki, store: TrustStore) -> None:
    exc = rejection(store, pki.rollover.cert, at=NOW - timedelta(hours=1))
    assert exc.code is ErrorCode.CERT_EXPIRED
    assert "not valid before" in exc.detail


def test_revoked_certificate(pki: DevPki, store: TrustStore) -> None:
    exc = rejection(store, pki.revoked.cert)
    assert exc.code is ErrorCode.CERT_REVOKED
    assert f"0x{pki.revoked_serial:x}" in exc.detail
    assert (NOW - timedelta(hours=1)).strftime("%Y-%m-%d") in exc.detail


def test_rogue_root_is_untrusted_even_when_presented(pki: DevPki, store: TrustStore) -> None:
    exc = rejection(store, pki.untrusted.cert)
    assert exc.code is ErrorCode.CERT_UNTRUSTED
    assert "Rogue Root" in exc.detail
    assert "not a trust anchor" in exc.detail


def test_rogue_leaf_alone_names_its_unknown_issuer(pki: DevPki, store: TrustStore) -> None:
    exc = rejection(store, pki.untrusted.cert, present_chain=False)
    assert exc.code is ErrorCode.CERT_UNTRUSTED
    assert "issuer" in exc.detail
    assert "Rogue Root" in exc.detail


def test_missing_intermediate_is_untrusted_unless_presented(pki: DevPki, trust_copy: Path) -> None:
    for pem in (trust_copy / "intermediates").iterdir():
        pem.unlink()
    store = TrustStore.load(trust_copy)
    exc = rejection(store, pki.parties["VN-MOIT"].cert, present_chain=False)
    assert exc.code is ErrorCode.CERT_UNTRUSTED
    assert "VN NSW Dev Intermediate" in exc.detail
    evaluate(store, pki.parties["VN-MOIT"].cert)  # presented in KeyInfo: fine


def test_a_ca_certificate_cannot_be_a_signer(pki: DevPki, store: TrustStore) -> None:
    exc = rejection(store, pki.intermediate)
    assert exc.code is ErrorCode.CERT_UNTRUSTED


def test_a_leaf_without_digital_signature_usage_is_untrusted(pki: DevPki, store: TrustStore) -> None:
    inter = load_issued(pki.intermediate_ca)
    good = issue_leaf(
        inter,
        TRADER,
        "An Phat",
        "VN",
        kind="ec",
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=30),
    )
    no_signing = x509.KeyUsage(False, False, True, False, False, False, False, False, False)
    builder = x509.CertificateBuilder(
        issuer_name=good.cert.issuer,
        subject_name=good.cert.subject,
        public_key=good.cert.public_key(),
        serial_number=x509.random_serial_number(),
        not_valid_before=good.cert.not_valid_before_utc,
        not_valid_after=good.cert.not_valid_after_utc,
        extensions=[
            e if not isinstance(e.value, x509.KeyUsage) else x509.Extension(e.oid, True, no_signing)
            for e in good.cert.extensions
        ],
    )
    cert = builder.sign(inter.key, hashes.SHA256())
    with pytest.raises(Rejected) as caught:
        store.evaluate(cert)
    assert caught.value.code is ErrorCode.CERT_UNTRUSTED
    assert "digitalSignature" in caught.value.detail


def test_a_chain_through_an_expired_ca_is_expired(pki: DevPki, trust_copy: Path) -> None:
    root = load_issued(pki.root_ca)
    old_ca = make_ca(
        "VN NSW Old Intermediate",
        "VN",
        issuer=root,
        not_before=NOW - timedelta(days=300),
        not_after=NOW - timedelta(days=5),
        path_length=0,
    )
    leaf = issue_leaf(
        old_ca,
        "VN-MOIT",
        "MOIT",
        "VN",
        kind="ec",
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=30),
    )
    store = TrustStore.load(trust_copy)
    with pytest.raises(Rejected) as caught:
        store.evaluate(leaf.cert, [old_ca.cert])
    assert caught.value.code is ErrorCode.CERT_EXPIRED
    assert "CA certificate" in caught.value.detail
    assert "VN NSW Old Intermediate" in caught.value.detail


def test_peer_root_is_a_separate_anchor(pki: DevPki, trust_copy: Path) -> None:
    (trust_copy / "anchors" / "th-nsw-dev-root.pem").unlink()
    store = TrustStore.load(trust_copy)
    exc = rejection(store, pki.parties["TH-NSW"].cert)
    assert exc.code is ErrorCode.CERT_UNTRUSTED
    assert "TH NSW Dev Root" in exc.detail


def test_expired_crl_makes_revocation_status_unknown(pki: DevPki, store: TrustStore) -> None:
    exc = rejection(store, pki.parties["VN-MOIT"].cert, at=NOW + timedelta(days=8))
    assert exc.code is ErrorCode.CERT_UNTRUSTED
    assert "revocation status unknown" in exc.detail
    assert "VN NSW Dev Intermediate" in exc.detail
    assert "expired at " + (NOW + timedelta(days=7)).strftime("%Y-%m-%d") in exc.detail
    # the peer's root publishes no CRL: nothing is unknown there
    evaluate(store, pki.parties["TH-NSW"].cert, at=NOW + timedelta(days=8))


def write_crl(trust: Path, crl: x509.CertificateRevocationList, name: str = "vn-nsw-dev-intermediate.crl.pem") -> None:
    (trust / "crl" / name).write_bytes(crl.public_bytes(Encoding.PEM))


def test_a_stale_crl_on_disk_fails_closed_now(pki: DevPki, trust_copy: Path) -> None:
    inter = load_issued(pki.intermediate_ca)
    write_crl(trust_copy, make_crl(inter, {}, this_update=NOW - timedelta(days=9), next_update=NOW - timedelta(days=2)))
    exc = rejection(TrustStore.load(trust_copy), pki.parties["VN-CUSTOMS"].cert)
    assert exc.code is ErrorCode.CERT_UNTRUSTED
    assert "revocation status unknown" in exc.detail


def test_forged_crl_is_not_believed(pki: DevPki, trust_copy: Path) -> None:
    inter = load_issued(pki.intermediate_ca)
    moit = chain_of(pki.parties["VN-MOIT"].cert)[0]
    # Same issuer name, signed by another key: would revoke MOIT if it were believed.
    forged = make_crl(
        inter,
        {moit.serial_number: NOW},
        this_update=NOW - timedelta(minutes=5),
        next_update=NOW + timedelta(days=30),
        number=99,
        signing_key=new_key("rsa"),
    )
    write_crl(trust_copy, forged, "forged.crl.pem")
    store = TrustStore.load(trust_copy)
    evaluate(store, pki.parties["VN-MOIT"].cert)  # the genuine CRL decides
    assert rejection(store, pki.revoked.cert).code is ErrorCode.CERT_REVOKED

    (trust_copy / "crl" / "vn-nsw-dev-intermediate.crl.pem").unlink()  # only the forgery is left
    exc = rejection(TrustStore.load(trust_copy), pki.parties["VN-MOIT"].cert)
    assert exc.code is ErrorCode.CERT_UNTRUSTED
    assert "revocation status unknown" in exc.detail
    assert "not signed" in exc.detail


def test_no_crl_for_an_issuer_means_not_revoked(pki: DevPki, trust_copy: Path) -> None:
    (trust_copy / "crl" / "vn-nsw-dev-intermediate.crl.pem").unlink()
    evaluate(TrustStore.load(trust_copy), pki.revoked.cert)


def test_cache_returns_the_same_decision_and_reload_drops_it(pki: DevPki, trust_copy: Path) -> None:
    store = TrustStore.load(trust_copy)
    first = evaluate(store, pki.parties["VN-MOIT"].cert)
    assert evaluate(store, pki.parties["VN-MOIT"].cert) is first
    # revoke MOIT on disk: the cached decision stands until reload() ...
    inter = load_issued(pki.intermediate_ca)
    moit = chain_of(pki.parties["VN-MOIT"].cert)[0]
    write_crl(
        trust_copy,
        make_crl(
            inter,
            {moit.serial_number: NOW},
            this_update=NOW - timedelta(minutes=1),
            next_update=NOW + timedelta(days=7),
            number=2,
        ),
    )
    assert evaluate(store, pki.parties["VN-MOIT"].cert) is first
    store.reload()
    assert rejection(store, pki.parties["VN-MOIT"].cert).code is ErrorCode.CERT_REVOKED


def test_reload_of_an_unchanged_folder_recomputes_an_equal_decision(pki: DevPki, store: TrustStore) -> None:
    first = evaluate(store, pki.parties["VN-MOH"].cert)
    store.reload()
    again = evaluate(store, pki.parties["VN-MOH"].cert)
    assert again is not first
    assert again == first


def test_a_cached_decision_is_not_reused_outside_its_window(pki: DevPki, store: TrustStore) -> None:
    evaluate(store, pki.parties["VN-MOIT"].cert)
    exc = rejection(store, pki.parties["VN-MOIT"].cert, at=NOW + timedelta(days=800))
    assert exc.code is ErrorCode.CERT_EXPIRED


def test_repeated_rejections_are_the_same_rejection(pki: DevPki, store: TrustStore) -> None:
    first = rejection(store, pki.untrusted.cert)
    second = rejection(store, pki.untrusted.cert)
    assert second is not first
    assert (second.code, second.detail) == (first.code, first.detail)


def test_naive_times_are_utc(pki: DevPki, store: TrustStore) -> None:
    naive = (NOW + timedelta(days=8)).replace(tzinfo=None)
    assert rejection(store, pki.parties["VN-MOIT"].cert, at=naive).code is ErrorCode.CERT_UNTRUSTED


def test_fingerprint_is_sha256_of_der(pki: DevPki) -> None:
    leaf = chain_of(pki.gateway.cert)[0]
    assert fingerprint(leaf) == hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
    assert load_certs_pem(b"no certificates here") == []
    assert len(load_certs_pem(pki.gateway.cert.read_bytes())) == 2


def test_load_errors_name_the_problem(pki: DevPki, trust_copy: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        TrustStore.load(trust_copy / "missing")
    (trust_copy / "crl" / "junk.crl").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"junk\.crl"):
        TrustStore.load(trust_copy)
    (trust_copy / "crl" / "junk.crl").unlink()
    for pem in (trust_copy / "anchors").iterdir():
        pem.unlink()
    with pytest.raises(ConfigError, match="no trust anchors"):
        TrustStore.load(trust_copy)


def test_der_files_are_read(pki: DevPki, trust_copy: Path) -> None:
    crl_pem = trust_copy / "crl" / "vn-nsw-dev-intermediate.crl.pem"
    crl = x509.load_pem_x509_crl(crl_pem.read_bytes())
    crl_pem.unlink()
    (trust_copy / "crl" / "intermediate.crl").write_bytes(crl.public_bytes(Encoding.DER))
    assert rejection(TrustStore.load(trust_copy), pki.revoked.cert).code is ErrorCode.CERT_REVOKED
