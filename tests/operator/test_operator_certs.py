"""`nswgw certs check --within`: expiring party and gateway certificates, renewal overlap, and the metric."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.cli import build_parser
from gateway.security.expiry import parse_duration
from gateway.security.pki import KeyPair, issue_leaf, load_issued
from gateway.security.trust import fingerprint
from tests.operator.helpers import scrape

MOH = "VN-MOH"


@pytest.fixture
def certs(pki_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's dev PKI, free to change."""
    return Path(shutil.copytree(pki_dir, tmp_path / "certs"))


def issue(certs: Path, identity: str, lifetime: timedelta, file: Path) -> x509.Certificate:
    folder = certs / "ca" / "vn-nsw-dev-intermediate"
    intermediate = load_issued(KeyPair(folder / "key.pem", folder / "cert.pem"))
    now = datetime.now(UTC)
    issued = issue_leaf(
        intermediate, identity, identity, "VN", not_before=now - timedelta(days=1), not_after=now + lifetime
    )
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(issued.cert.public_bytes(Encoding.PEM))
    return issued.cert


def bind(certs: Path, identity: str, fingerprints: list[str]) -> None:
    path = certs / "partners.yaml"
    registry = yaml.safe_load(path.read_text())
    registry["parties"][identity]["certificates"] = [{"sha256": fp, "note": "test"} for fp in fingerprints]
    path.write_text(yaml.safe_dump(registry, sort_keys=False))


def check(certs: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    args = build_parser().parse_args(["certs", "check", "--certs", str(certs), *extra])
    code = int(args.func(args))
    return code, capsys.readouterr().out


def test_the_dev_pki_needs_nothing_renewed(pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(pki_dir, capsys, "--within", "30d")
    assert code == 0, out
    assert "EXPIRING" not in out
    # the deliberately expired test certificate is bound to the trader, who holds valid ones too
    assert "superseded VN-TRADER-0101234567" in out


def test_a_party_certificate_expiring_soon_is_listed_and_fails_the_check(
    certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    soon = issue(certs, MOH, timedelta(days=10), certs / "parties" / MOH / "2026-signing.pem")
    bind(certs, MOH, [fingerprint(soon)])

    code, out = check(certs, capsys, "--within", "30d")
    assert code == 1, out
    expiring = [line for line in out.splitlines() if line.startswith("EXPIRING")]
    assert len(expiring) == 1, out
    assert MOH in expiring[0]
    assert fingerprint(soon) in expiring[0]
    assert "in 9d" in expiring[0]

    code, out = check(certs, capsys, "--within", "7d")
    assert code == 0, out
    assert MOH not in out

    code, out = check(certs, capsys, "--within", "30d", "--json")
    assert code == 1
    findings = {f["cert"]["fingerprint"]: f for f in json.loads(out)["findings"]}
    assert findings[fingerprint(soon)]["cert"]["party"] == MOH
    assert findings[fingerprint(soon)]["superseded_by"] is None
    others = [f for fp, f in findings.items() if fp != fingerprint(soon)]
    assert [f["cert"]["party"] for f in others] == ["VN-TRADER-0101234567"]  # the expired test cert ...
    assert others[0]["superseded_by"] is not None  # ... which the trader's valid ones supersede


def test_a_renewal_that_overlaps_the_old_certificate_supersedes_it(
    certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    soon = issue(certs, MOH, timedelta(days=10), certs / "parties" / MOH / "old.pem")
    renewed = issue(certs, MOH, timedelta(days=730), certs / "parties" / MOH / "renewed.pem")
    bind(certs, MOH, [fingerprint(soon), fingerprint(renewed)])

    code, out = check(certs, capsys, "--within", "30d")
    assert code == 0, out
    line = next(line for line in out.splitlines() if MOH in line)
    assert line.startswith("superseded")
    assert f"-> by sha256 {fingerprint(renewed)}" in line


def test_the_gateway_certificate_cannot_be_superseded(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    soon = issue(certs, "VN-NSW", timedelta(days=3), certs / "gateway" / "cert.pem")
    code, out = check(certs, capsys, "--within", "30d")
    assert code == 1, out
    line = next(line for line in out.splitlines() if line.startswith("EXPIRING"))
    assert "VN-NSW" in line
    assert " gateway " in line
    assert fingerprint(soon) in line


def test_a_binding_without_a_certificate_file_is_reported_as_unknown(
    certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (certs / "parties" / MOH / "cert.pem").unlink()
    code, out = check(certs, capsys)
    assert code == 0, out
    assert any(line.startswith("unknown") and MOH in line for line in out.splitlines())


async def test_the_expiry_metric_reports_each_certificate(certs: Path, make_gateway: Callable[..., Any]) -> None:
    soon = issue(certs, MOH, timedelta(days=10), certs / "parties" / MOH / "soon.pem")
    bind(certs, MOH, [fingerprint(soon)])
    gw = await make_gateway(certs_dir=certs)
    m = await scrape(gw.client)
    moh = {
        dict(labels)["fingerprint"]: v
        for (name, labels), v in m.items()
        if name == "nsw_certificate_expiry_seconds" and dict(labels)["party"] == MOH
    }
    assert list(moh) == [fingerprint(soon)]
    assert 9.9 * 86400 < moh[fingerprint(soon)] <= 10 * 86400


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("2w", timedelta(weeks=2)), ("45", timedelta(days=45))],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


def test_a_bad_duration_is_a_usage_error(pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = check(pki_dir, capsys, "--within", "soon")
    assert code == 2
