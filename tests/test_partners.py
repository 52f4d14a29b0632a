"""The partner registry: the generated dev file, may() tables, and load-time errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.errors import ConfigError
from gateway.partners import PartnerRegistry
from gateway.security.pki import TRADER, DevPki, init_dev_pki

FP_A = "a" * 64
FP_B = "b" * 64


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(tmp_path_factory.mktemp("pki") / "dev")


@pytest.fixture(scope="module")
def registry(pki: DevPki) -> PartnerRegistry:
    return PartnerRegistry.load(pki.partners)


def party(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "Ministry of Industry and Trade",
        "role": "agency",
        "country": "VN",
        "ministry_code": "BCT",
        "certificates": [{"sha256": FP_A, "note": "2026 signing cert"}],
        "may_send": {"eco.atiga-form-d": ["01", "02", "03"], "licence.import": "*"},
        "allow_legacy_sha1": False,
        "authority_for": ["eco.atiga-form-d"],
        "endpoint": None,
    }
    entry.update(overrides)
    return entry


def load(tmp_path: Path, parties: dict[str, Any], **top: Any) -> PartnerRegistry:
    path = tmp_path / "partners.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "parties": parties, **top}))
    return PartnerRegistry.load(path)


def test_generated_registry_describes_every_party(registry: PartnerRegistry) -> None:
    moit = registry.get("VN-MOIT")
    assert moit is not None
    assert (moit.name, moit.role, moit.country, moit.ministry_code) == (
        "Ministry of Industry and Trade",
        "agency",
        "VN",
        "BCT",
    )
    roles = {p.identity: p.role for p in registry.parties()}
    assert roles == {
        "VN-NSW": "nsw",
        "VN-MOIT": "agency",
        "VN-MARD-PPD": "agency",
        "VN-CUSTOMS": "customs",
        TRADER: "trader",
        "VN-MOH": "agency",
        "TH-NSW": "peer",
    }
    legacy = {p.identity for p in registry.parties() if p.allow_legacy_sha1}
    assert legacy == {"VN-MOH"}
    assert registry.get("VN-NOBODY") is None


def test_may_tables(registry: PartnerRegistry) -> None:
    moit, trader, nsw = registry.get("VN-MOIT"), registry.get(TRADER), registry.get("VN-NSW")
    assert moit is not None
    assert trader is not None
    assert nsw is not None
    # Party-level tables; which *roles* may send which function is the document-type registry's job
    # (schemas/registry.yaml), and the ingress applies both (tests/test_ingress.py).
    assert moit.may("eco.atiga-form-d", "01")
    assert moit.may("licence.import", "27")  # "*": any function the type allows
    assert not moit.may("sps.ephyto", "01")  # type not listed at all
    assert trader.may("licence.import", "01")
    assert trader.may("eco.atiga-form-d", "02")
    assert not trader.may("eco.atiga-form-d", "27")  # listed functions only: a trader applies, never approves
    assert not trader.may("sps.ephyto", "01")
    assert nsw.may("nsw.receipt", "99")
    assert not nsw.may("licence.import", "01")


def test_authorities(registry: PartnerRegistry) -> None:
    assert [p.identity for p in registry.authorities_for("eco.atiga-form-d")] == ["VN-MOIT"]
    assert [p.identity for p in registry.authorities_for("sps.ephyto", "VN")] == ["VN-MARD-PPD"]
    assert registry.authorities_for("eco.atiga-form-d", "TH") == []
    assert registry.authorities_for("licence.import") == []


def test_peer_endpoint_paths_resolve_against_the_registry_folder(pki: DevPki, registry: PartnerRegistry) -> None:
    th = registry.get("TH-NSW")
    assert th is not None
    assert th.endpoint is not None
    assert th.endpoint.url.startswith("https://127.0.0.1:")
    assert th.endpoint.ca == pki.dir / "trust/anchors/th-nsw-dev-root.pem"
    assert th.endpoint.client_cert == pki.gateway.cert
    assert th.endpoint.client_key == pki.gateway.key
    assert th.endpoint.ca.is_file()
    moit = registry.get("VN-MOIT")
    assert moit is not None
    assert moit.endpoint is None


def test_fingerprint_lookup_tolerates_colons_and_case(tmp_path: Path) -> None:
    reg = load(tmp_path, {"VN-MOIT": party()})
    colons = ":".join(FP_A[i : i + 2] for i in range(0, 64, 2)).upper()
    found = reg.by_fingerprint(colons)
    assert found is not None
    assert found.identity == "VN-MOIT"
    assert reg.by_fingerprint(FP_B) is None


def test_a_fingerprint_bound_to_two_parties_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"VN-MOIT": party(), "VN-MOH": party(name="Ministry of Health", ministry_code="BYT")})
    assert "VN-MOIT" in str(caught.value)
    assert "VN-MOH" in str(caught.value)
    assert FP_A in str(caught.value)


def test_unknown_role_names_the_party(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"party VN-MOIT: role: unknown role 'minister'"):
        load(tmp_path, {"VN-MOIT": party(role="minister")})


@pytest.mark.parametrize(
    ("overrides", "fault"),
    [
        ({"may_send": {"licence.import": [1, 2]}}, r"may_send\.licence\.import: .*quoted"),
        ({"may_send": {"licence.import": "any"}}, r"may_send\.licence\.import"),
        ({"certificates": [{"sha256": "abc"}]}, r"certificates\[0\]\.sha256"),
        ({"certificates": [{"sha256": FP_A, "fingerprint": "x"}]}, r"certificates\[0\]: unknown"),
        ({"may-send": {}}, r"may-send: unknown field"),
        ({"country": "Viet Nam"}, r"country"),
        ({"allow_legacy_sha1": "yes please"}, r"allow_legacy_sha1"),
        ({"name": ""}, r"name"),
        ({"endpoint": {"url": "https://th.example/v1"}}, r"endpoint: only peers"),
        ({"role": "peer", "endpoint": {"url": "http://th.example/v1"}}, r"endpoint\.url: must be an https"),
        (
            {"role": "peer", "endpoint": {"url": "https://th.example/v1", "tls": {"client_cert": "c.pem"}}},
            r"endpoint\.tls: client_cert and client_key go together",
        ),
    ],
)
def test_invalid_entries_name_the_party_and_field(tmp_path: Path, overrides: dict[str, Any], fault: str) -> None:
    with pytest.raises(ConfigError, match=rf"partners\.yaml: party VN-MOIT: {fault}"):
        load(tmp_path, {"VN-MOIT": party(**overrides)})


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="version"):
        load(tmp_path, {"VN-MOIT": party()}, version=2)
    with pytest.raises(ConfigError, match="non-empty"):
        load(tmp_path, {})
    broken = tmp_path / "broken.yaml"
    broken.write_text("parties: [unclosed")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        PartnerRegistry.load(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        PartnerRegistry.load(tmp_path / "absent.yaml")


def test_minimal_entry_defaults(tmp_path: Path) -> None:
    reg = load(tmp_path, {"VN-X": {"name": "X", "role": "trader", "country": "VN"}})
    x = reg.get("VN-X")
    assert x is not None
    assert x.fingerprints == frozenset()
    assert dict(x.may_send) == {}
    assert (x.allow_legacy_sha1, x.authority_for, x.endpoint, x.ministry_code) == (False, frozenset(), None, None)
    assert not x.may("licence.import", "01")
