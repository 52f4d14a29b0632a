"""CRLs going stale: `nswgw certs check --crl-within`, `nsw_crl_expiry_seconds` and `nsw_trust_reloads_total`.

A CA's CRL past its nextUpdate makes every signer under that CA CERT_UNTRUSTED, so an operator must
hear of it before, not from the traders.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.cli import build_parser
from gateway.security.pki import TRADER
from gateway.security.trust import TrustStore
from tests.operator.helpers import CRL_NAME, Samples, scrape, value, write_crl

INTERMEDIATE = "C=VN,O=VN NSW Dev Intermediate - test keys only,CN=VN NSW Dev Intermediate"


@pytest.fixture
def certs(pki_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's dev PKI, free to change."""
    return Path(shutil.copytree(pki_dir, tmp_path / "certs"))


def check(certs: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, list[str]]:
    args = build_parser().parse_args(["certs", "check", "--certs", str(certs), *extra])
    code = int(args.func(args))
    return code, capsys.readouterr().out.splitlines()


def crl_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("CRL ENDING", "STALE", "TRUST"))]


def crl_left(samples: Samples) -> float:
    """The intermediate's ``nsw_crl_expiry_seconds``, the only CA of the dev PKI with a CRL."""
    [(labels, left)] = [(dict(k[1]), v) for k, v in samples.items() if k[0] == "nsw_crl_expiry_seconds"]
    assert labels["ca"] == INTERMEDIATE
    return left


def ago(**kw: float) -> datetime:
    return datetime.now(UTC) - timedelta(**kw)


def test_a_crl_running_out_within_the_window_fails_the_check(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_crl(certs, this_update=ago(days=6), lifetime=timedelta(days=6, hours=10))  # 10 h left

    code, lines = check(certs, capsys)
    assert code == 1, lines
    [line] = crl_lines(lines)
    assert line.startswith("CRL ENDING revocation status known until"), line
    assert "(in 9h 5" in line, line
    assert f"CA {INTERMEDIATE}" in line, line
    assert "1 CAs with CRLs checked; revocation status unknown or running out within 24 hours: 1" in lines

    code, lines = check(certs, capsys, "--crl-within", "6h")
    assert code == 0, lines
    assert crl_lines(lines) == []

    code, lines = check(certs, capsys, "--json")
    report = json.loads("\n".join(lines))
    assert report["failing"] is True
    [finding] = report["crl_findings"]
    assert finding["ca_subject"] == INTERMEDIATE
    assert finding["problem"] is None
    assert 9.9 * 3600 < finding["remaining"] <= 10 * 3600


def test_the_dev_pki_crl_passes_the_default_window(pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = check(pki_dir, capsys)
    assert code == 0, lines
    assert "1 CAs with CRLs checked; revocation status unknown or running out within 24 hours: 0" in lines
    # a week-long CRL falls inside an eight-day window: the window applies
    code, lines = check(pki_dir, capsys, "--crl-within", "8d")
    assert code == 1, lines
    assert len(crl_lines(lines)) == 1


def test_a_stale_crl_is_reported_as_refusing_signers(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_crl(certs, this_update=ago(days=9), lifetime=timedelta(days=7))

    code, lines = check(certs, capsys)
    assert code == 1, lines
    [line] = crl_lines(lines)
    assert line.startswith("STALE      revocation status unknown, CRL expired at"), line
    assert "signers under this CA are refused" in line
    # the same fault the trust store gives a signer
    store = TrustStore.load(certs / "trust")
    [coverage] = store.revocation_coverage()
    assert coverage.problem is not None
    assert coverage.known_until is not None
    assert coverage.known_until < datetime.now(UTC)


def test_a_crl_published_ahead_carries_the_coverage_on(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the CA publishes the next CRL before the current one runs out: no gap, nothing to do
    write_crl(certs, this_update=ago(days=6), lifetime=timedelta(days=6, hours=10))
    write_crl(certs, this_update=ago(hours=-5), lifetime=timedelta(days=7), name="next.crl.pem")

    code, lines = check(certs, capsys)
    assert code == 0, lines
    assert crl_lines(lines) == []
    [coverage] = TrustStore.load(certs / "trust").revocation_coverage()
    assert coverage.crls == 2
    assert coverage.known_until is not None
    assert coverage.known_until > datetime.now(UTC) + timedelta(days=7)

    # with a gap between them, the first one's end is what matters
    write_crl(certs, this_update=ago(hours=-11), lifetime=timedelta(days=7), name="next.crl.pem")
    code, lines = check(certs, capsys)
    assert code == 1, lines
    assert crl_lines(lines)[0].startswith("CRL ENDING"), lines


def test_a_forged_crl_counts_for_nothing(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    forger = ec.generate_private_key(ec.SECP256R1())
    write_crl(certs, this_update=ago(minutes=1), lifetime=timedelta(days=30), forged_with=forger)

    code, lines = check(certs, capsys)
    assert code == 1, lines
    [line] = crl_lines(lines)
    assert line.startswith("STALE      revocation status unknown, CRL not signed by that CA's key"), line


def test_a_trust_directory_that_does_not_load_fails_the_check(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (certs / "trust" / "crl" / CRL_NAME).write_text("-----BEGIN X509 CRL-----\ntruncated\n")

    code, lines = check(certs, capsys)
    assert code == 1, lines
    [line] = crl_lines(lines)
    assert line.startswith("TRUST      the trust directory does not load"), line
    assert CRL_NAME in line


async def test_the_crl_metric_follows_the_trust_in_force(certs: Path, make_gateway: Callable[..., Any]) -> None:
    write_crl(certs, this_update=ago(days=6), lifetime=timedelta(days=6, hours=10))
    gw = await make_gateway(certs_dir=certs)
    gw.gateway.start_reloader(interval=3600)  # check() is the poll here
    reloader = gw.gateway.trust_reloader
    assert reloader is not None

    m = await scrape(gw.client)
    left = crl_left(m)
    assert 9.9 * 3600 < left <= 10 * 3600
    assert value(m, "nsw_trust_reloads_total", outcome="ok") == 0
    assert value(m, "nsw_trust_reloads_total", outcome="error") == 0

    # a half-copied CRL is refused: the one in force, and its figure, stay
    (certs / "trust" / "crl" / CRL_NAME).write_text("-----BEGIN X509 CRL-----\ntruncated\n")
    assert reloader.check() is False
    m = await scrape(gw.client)
    assert value(m, "nsw_trust_reloads_total", outcome="error") == 1
    left = crl_left(m)
    assert left > 9.9 * 3600

    write_crl(certs, this_update=ago(minutes=1), lifetime=timedelta(days=7))
    assert reloader.check() is True
    m = await scrape(gw.client)
    assert value(m, "nsw_trust_reloads_total", outcome="ok") == 1
    left = crl_left(m)
    assert 6.9 * 86400 < left <= 7 * 86400


async def test_a_stale_crl_shows_below_zero_while_signers_are_refused(
    certs: Path, make_gateway: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    write_crl(certs, this_update=ago(days=9), lifetime=timedelta(days=7))
    gw = await make_gateway(certs_dir=certs)

    response = await gw.post(signed("licence.import", sender=TRADER))
    assert (response.status, response.headers.get("X-NSW-Code")) == (401, "CERT_UNTRUSTED")
    left = crl_left(await scrape(gw.client))
    assert -2.1 * 86400 < left < -1.9 * 86400
