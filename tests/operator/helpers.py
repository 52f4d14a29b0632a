"""Helpers for the operator tests: rules files, metrics parsing, CRLs and renewed gateway key pairs
(agencies: tests/support/agency.py)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client.parser import text_string_to_metric_families

from gateway.security.pki import Issued, KeyPair, PrivateKey, issue_leaf, load_issued, make_crl
from gateway.security.trust import fingerprint

DEADLINE = 30.0  # how long something that must happen may take; never a measurement
FAST_RETRY = {"in_process_attempts": 1, "in_process_wait": 0.01, "tiers": [0.05], "max_attempts": 5, "max_age": 600}
CALM_BREAKER = {"failure_threshold": 100, "reset_after": 1}


def rules(
    destinations: Mapping[str, str], *, rule: str = "to-agencies", document_types: Sequence[str] = ()
) -> dict[str, Any]:
    """A rules file routing ``document_types`` (default licence.import) to every destination (name -> URL)."""
    return {
        "version": 1,
        "destinations": {
            name: {"adapter": "http", "url": url, "timeout": 5, "retry": FAST_RETRY, "breaker": CALM_BREAKER}
            for name, url in destinations.items()
        },
        "rules": [
            {
                "name": rule,
                "when": {"documentType": list(document_types or ["licence.import"])},
                "to": list(destinations),
            }
        ],
    }


def write_rules(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample as {(name, labels): value}, parsed by prometheus_client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(client: Any, headers: Mapping[str, str] | None = None) -> Samples:
    response = await client.get("/metrics", headers=dict(headers or {}))
    text = await response.text()
    assert response.status == 200, text
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse_metrics(text)


CRL_NAME = "vn-nsw-dev-intermediate.crl.pem"  # the dev intermediate's CRL, in <certs>/trust/crl/


def write_crl(
    certs: Path,
    *,
    this_update: datetime,
    lifetime: timedelta,
    revoked: Sequence[Path] = (),
    name: str = CRL_NAME,
    forged_with: PrivateKey | None = None,
) -> x509.CertificateRevocationList:
    """A CRL of the dev PKI's intermediate (a copy under ``certs``) listing the certificates in the
    ``revoked`` files, written to ``trust/crl/<name>``; ``forged_with`` signs it with another key."""
    serials = {x509.load_pem_x509_certificates(p.read_bytes())[0].serial_number: this_update for p in revoked}
    crl = make_crl(
        intermediate(certs),
        serials,
        this_update=this_update,
        next_update=this_update + lifetime,
        number=int(this_update.timestamp()),
        signing_key=forged_with,
    )
    (certs / "trust" / "crl" / name).write_bytes(crl.public_bytes(Encoding.PEM))
    return crl


GATEWAY = "VN-NSW"  # the dev PKI's gateway identity


def intermediate(certs: Path) -> Issued:
    folder = certs / "ca" / "vn-nsw-dev-intermediate"
    return load_issued(KeyPair(folder / "key.pem", folder / "cert.pem"))


def new_pair(
    certs: Path,
    name: str,
    *,
    issuer: Issued | None = None,
    lifetime: tuple[timedelta, timedelta] = (timedelta(minutes=-5), timedelta(days=365)),
) -> KeyPair:
    """A new key and certificate for the gateway in ``certs/staged/<name>``, not yet in place."""
    ca = issuer or intermediate(certs)
    now = datetime.now(UTC)
    leaf = issue_leaf(
        ca, GATEWAY, "Viet Nam National Single Window", "VN", not_before=now + lifetime[0], not_after=now + lifetime[1]
    )
    folder = certs / "staged" / name
    folder.mkdir(parents=True)
    key = folder / "key.pem"
    key.write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert = folder / "cert.pem"
    chain = [leaf.cert] if issuer is not None else [leaf.cert, ca.cert]  # leaf, then up to the anchor
    cert.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    return KeyPair(key, cert)


def register(certs: Path, pair: KeyPair, identity: str = GATEWAY) -> None:
    """Bind the pair's certificate to ``identity`` in the registry, beside the certificates it has."""
    registry = certs / "partners.yaml"
    data = yaml.safe_load(registry.read_text(encoding="utf-8"))
    data["parties"][identity]["certificates"].append({"sha256": sha256_of(pair), "note": "renewed"})
    registry.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def install(certs: Path, pair: KeyPair, *, key: bool = True, cert: bool = True) -> None:
    """Copy the pair over the gateway's files, as an operator's renewal does (either half alone)."""
    if key:
        shutil.copyfile(pair.key, certs / "gateway" / "key.pem")
    if cert:
        shutil.copyfile(pair.cert, certs / "gateway" / "cert.pem")


def sha256_of(pair: KeyPair) -> str:
    return fingerprint(x509.load_pem_x509_certificates(pair.cert.read_bytes())[0])
