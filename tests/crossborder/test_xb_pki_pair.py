"""``init_dev_pki_pair``: two dev PKIs whose gateways trust and register each other."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from gateway.partners import PartnerRegistry
from gateway.security.pki import init_dev_pki_pair, set_peer_url
from gateway.security.trust import TrustStore, fingerprint
from tests.crossborder.conftest import PairDirs


def leaf_and_chain(path: Path) -> tuple[x509.Certificate, list[x509.Certificate]]:
    certs = x509.load_pem_x509_certificates(path.read_bytes())
    return certs[0], certs[1:]


@pytest.fixture(scope="module")
def pair(pair_template: Path) -> PairDirs:
    return PairDirs(pair_template / "vn", pair_template / "th")


@pytest.mark.parametrize(("side", "other_gateway"), [("vn", "TH-NSW"), ("th", "VN-NSW")])
def test_each_gateway_trusts_and_registers_the_other_as_a_peer(pair: PairDirs, side: str, other_gateway: str) -> None:
    certs = getattr(pair, side)
    other_side = "th" if side == "vn" else "vn"
    leaf, chain = leaf_and_chain(getattr(pair, other_side) / "gateway" / "cert.pem")
    decision = TrustStore.load(certs / "trust").evaluate(leaf, chain)
    registry = PartnerRegistry.load(certs / "partners.yaml")
    peer = registry.by_fingerprint(decision.fingerprint)
    assert peer is not None
    assert (peer.identity, peer.role, peer.country) == (other_gateway, "peer", other_gateway[:2])
    assert peer.endpoint is not None
    assert peer.endpoint.url.startswith("https://127.0.0.1:")
    for path in (peer.endpoint.ca, peer.endpoint.client_cert, peer.endpoint.client_key):
        assert path is not None
        assert path.is_file()
    # The CA named for the peer's TLS server certificate is the one that issued it.
    assert peer.endpoint.ca is not None
    ca = x509.load_pem_x509_certificate(peer.endpoint.ca.read_bytes())
    assert (chain[-1] if chain else leaf).issuer == ca.subject


def test_the_peer_gateway_signs_with_the_certificate_the_home_side_binds(pair: PairDirs) -> None:
    th_gateway, _ = leaf_and_chain(pair.th / "gateway" / "cert.pem")
    assert PartnerRegistry.load(pair.vn / "partners.yaml").get("TH-NSW").fingerprints == {fingerprint(th_gateway)}
    vn_gateway, _ = leaf_and_chain(pair.vn / "gateway" / "cert.pem")
    assert PartnerRegistry.load(pair.th / "partners.yaml").get("VN-NSW").fingerprints == {fingerprint(vn_gateway)}


@pytest.mark.parametrize(("side", "country", "authority"), [("th", "VN", "VN-MOIT"), ("vn", "TH", "TH-DFT")])
def test_each_side_names_the_other_countrys_issuing_authority(
    pair: PairDirs, side: str, country: str, authority: str
) -> None:
    registry = PartnerRegistry.load(getattr(pair, side) / "partners.yaml")
    assert [p.identity for p in registry.authorities_for("eco.atiga-form-d", country)] == [authority]
    issuer = registry.get(authority)
    assert issuer is not None
    assert not issuer.may("eco.atiga-form-d", "01")  # it signs Bodies; only its own gateway sends to us
    leaf, chain = leaf_and_chain(pair.party(authority).cert)
    decision = TrustStore.load(getattr(pair, side) / "trust").evaluate(leaf, chain)
    assert registry.by_fingerprint(decision.fingerprint) is issuer


def test_the_peer_side_has_its_own_customs_and_gateway_identity(pair: PairDirs) -> None:
    registry = PartnerRegistry.load(pair.th / "partners.yaml")
    assert registry.get("TH-NSW").role == "nsw"
    assert registry.get("TH-CUSTOMS").role == "customs"
    assert registry.get("TH-CUSTOMS").may("eco.atiga-form-d", "23")


def test_set_peer_url_points_a_peer_elsewhere(dirs: PairDirs) -> None:
    set_peer_url(dirs.vn / "partners.yaml", "TH-NSW", "https://127.0.0.1:4443/v1/messages")
    endpoint = dirs.registry("vn").get("TH-NSW").endpoint
    assert endpoint is not None
    assert endpoint.url == "https://127.0.0.1:4443/v1/messages"
    with pytest.raises(KeyError, match="VN-MOIT has no endpoint"):
        set_peer_url(dirs.vn / "partners.yaml", "VN-MOIT", "https://127.0.0.1:1/")


def test_the_pair_refuses_to_overwrite_without_force(pair_template: Path) -> None:
    with pytest.raises(FileExistsError):
        init_dev_pki_pair(pair_template)
