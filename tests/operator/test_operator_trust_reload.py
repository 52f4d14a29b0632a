"""Trust hot reload through a running gateway: a CRL or a registry edit decides the very next message."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from adapters.asw import AswAdapter
from gateway.security.pki import TRADER, set_peer_endpoint, set_peer_url
from gateway.trust_reload import TrustReloader
from routing.config import read_yaml
from routing.engine import default_rules_path
from tests.conftest import RunningGateway
from tests.e2e.conftest import Rabbit
from tests.operator.helpers import CRL_NAME, DEADLINE
from tests.operator.helpers import write_crl as write_intermediate_crl


@pytest.fixture
def certs(pki_dir: Path, tmp_path: Path) -> Path:
    """A copy of the dev PKI this test may change."""
    return Path(shutil.copytree(pki_dir, tmp_path / "certs"))


def write_crl(certs: Path, revoked: list[Path], *, fresh: bool = True) -> None:
    """Replace the intermediate's CRL: ``revoked`` certificates listed; ``fresh`` False: past its nextUpdate."""
    now = datetime.now(UTC)
    this_update = now - timedelta(minutes=1) if fresh else now - timedelta(days=9)
    write_intermediate_crl(certs, this_update=this_update, lifetime=timedelta(days=1), revoked=revoked)


async def answer(gw: RunningGateway, body: bytes) -> tuple[int, str | None]:
    response = await gw.post(body)
    return response.status, response.headers.get("X-NSW-Code")


def reloader_of(gw: RunningGateway) -> TrustReloader:
    gw.gateway.start_reloader(interval=3600)  # check() is the poll in these tests
    reloader = gw.gateway.trust_reloader
    assert reloader is not None
    return reloader


async def test_a_crl_revoking_a_party_stops_its_next_message(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    gw = await make_gateway(certs_dir=certs)
    reloader = reloader_of(gw)
    assert await answer(gw, signed("licence.import", sender=TRADER)) == (202, None)  # and the decision is cached
    assert reloader.check() is False  # nothing changed

    write_crl(certs, [certs / "parties" / TRADER / "cert.pem"])
    with capture_logs() as logs:
        assert reloader.check() is True
    assert [e["event"] for e in logs] == ["trust.reloaded"]
    assert logs[0]["files"] == [str(certs / "trust" / "crl" / CRL_NAME)]
    assert await answer(gw, signed("licence.import", sender=TRADER)) == (401, "CERT_REVOKED")
    # the trader's other certificate is not on the list
    assert await answer(gw, signed("licence.import", signer="test/trader-rollover")) == (202, None)


async def test_a_fresh_crl_ends_revocation_status_unknown(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    """A CRL past its nextUpdate fails closed (CERT_UNTRUSTED) until a fresh one is read, without a restart."""
    write_crl(certs, [], fresh=False)
    gw = await make_gateway(certs_dir=certs)
    reloader = reloader_of(gw)
    assert await answer(gw, signed("licence.import", sender=TRADER)) == (401, "CERT_UNTRUSTED")

    write_crl(certs, [])
    assert reloader.check() is True
    assert await answer(gw, signed("licence.import", sender=TRADER)) == (202, None)


async def test_a_certificate_unbound_in_the_registry_stops_its_next_message(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    gw = await make_gateway(certs_dir=certs)
    reloader = reloader_of(gw)
    assert await answer(gw, signed("licence.import", signer="test/trader-rollover")) == (202, None)

    registry = certs / "partners.yaml"
    data = yaml.safe_load(registry.read_text(encoding="utf-8"))
    bound = data["parties"][TRADER]["certificates"]
    kept = [c for c in bound if "rollover" not in c["note"]]
    assert len(kept) == len(bound) - 1  # exactly the rollover binding goes
    data["parties"][TRADER]["certificates"] = kept
    registry.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    assert reloader.check() is True
    assert await answer(gw, signed("licence.import", signer="test/trader-rollover")) == (403, "SENDER_MISMATCH")
    assert await answer(gw, signed("licence.import", sender=TRADER)) == (202, None)  # its main certificate


async def test_a_broken_crl_keeps_the_old_trust_until_it_is_fixed(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    gw = await make_gateway(certs_dir=certs)
    reloader = reloader_of(gw)
    junk = certs / "trust" / "crl" / "half-copied.crl"
    junk.write_bytes(b"-----BEGIN X509 CRL-----\nMIIB")
    with capture_logs() as logs:
        assert reloader.check() is False
        assert reloader.check() is False  # the same files are not tried again
    assert [e["event"] for e in logs] == ["trust.reload_rejected"]
    assert "half-copied.crl" in logs[0]["error"]
    assert await answer(gw, signed("licence.import", sender=TRADER)) == (202, None)  # the old trust stands

    junk.unlink()
    write_crl(certs, [certs / "parties" / TRADER / "cert.pem"])
    assert reloader.check() is True
    assert await answer(gw, signed("licence.import", sender=TRADER)) == (401, "CERT_REVOKED")


async def test_sighup_reloads_trust_through_the_watcher(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path
) -> None:
    """The wiring: ``reloader.request()`` is what SIGHUP calls; the trust check runs in that poll."""
    gw = await make_gateway(certs_dir=certs)
    reloader = gw.gateway.start_reloader(interval=3600)
    assert await answer(gw, signed("licence.import", sender=TRADER)) == (202, None)
    write_crl(certs, [certs / "parties" / TRADER / "cert.pem"])
    outcome = reloader.next_outcome()
    reloader.request()
    await asyncio.wait_for(outcome, DEADLINE)  # the trust check runs before the rules in the same poll
    assert await answer(gw, signed("licence.import", sender=TRADER)) == (401, "CERT_REVOKED")


async def test_a_peer_endpoint_moved_in_the_registry_rebuilds_its_adapter(
    make_gateway: Callable[..., Any], certs: Path
) -> None:
    gw = await make_gateway(certs_dir=certs)
    await gw.gateway.start_worker()
    trust = reloader_of(gw)
    routing = gw.gateway.start_reloader()
    old = gw.gateway.adapters["asw:TH"]
    assert isinstance(old, AswAdapter)

    moved = "https://127.0.0.1:9/v1/messages"
    set_peer_url(certs / "partners.yaml", "TH-NSW", moved)
    assert trust.check() is True  # the poll runs this first, then the routing check
    outcome = await routing.check()
    assert outcome is not None
    assert outcome.ok, outcome.error
    assert outcome.rotated == ("asw:TH",)
    rebuilt = gw.gateway.adapters["asw:TH"]
    assert isinstance(rebuilt, AswAdapter)
    assert rebuilt is not old
    assert rebuilt.peer.endpoint is not None
    assert rebuilt.peer.endpoint.url == moved
    assert await routing.check() is None  # built from the registry as it is: nothing left to do

    registry = certs / "partners.yaml"  # an edit that does not touch the peer rebuilds nothing
    registry.write_text(registry.read_text(encoding="utf-8") + "\n# reviewed\n", encoding="utf-8")
    assert trust.check() is True
    assert await routing.check() is None
    assert gw.gateway.adapters["asw:TH"] is rebuilt


@pytest.mark.rabbitmq
async def test_an_ingress_only_gateway_routes_to_a_peer_that_went_live(
    make_gateway: Callable[..., Any], signed: Callable[..., bytes], certs: Path, rabbit: Rabbit
) -> None:
    """`nswgw serve` on RabbitMQ (no worker, so no lane to build): an e-Form D for TH is refused while TH
    has no endpoint in the registry, and queued for asw:TH once it has one. Delivery after a peer went
    live: tests/crossborder/test_xb_peer_joins.py."""
    endpoint = set_peer_endpoint(certs / "partners.yaml", "TH-NSW", None)
    rabbit.destinations.extend(["asw:TH", *read_yaml(default_rules_path())["destinations"]])
    gw = await make_gateway(certs_dir=certs, **rabbit.settings())
    routing = gw.gateway.start_reloader(interval=3600)
    trust = reloader_of(gw)
    form_d = signed("eco.atiga-form-d", body_signer="VN-MOIT")  # importingCountry TH
    assert await answer(gw, form_d) == (422, "NO_ROUTE")

    set_peer_endpoint(certs / "partners.yaml", "TH-NSW", endpoint)
    assert trust.check() is True
    outcome = await routing.check()
    assert outcome is not None
    assert outcome.peers_joined == ("asw:TH",)
    assert await answer(gw, signed("eco.atiga-form-d", body_signer="VN-MOIT")) == (202, None)
    assert "asw:TH" in [d.destination for d in gw.broker.published]
