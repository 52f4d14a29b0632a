"""A peer joins and leaves through the partner registry, with no restart: two real gateways on loopback.

VN-NSW starts with TH-NSW in its registry but without an endpoint (TH not live yet), and its rules file
does not name asw:TH: the registry alone makes a peer a destination. Giving TH its endpoint must make
VN route, queue and deliver e-Form Ds to TH at the next reload; taking it away must stop VN accepting
them (NO_ROUTE), and giving it back must use the lane that kept draining.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.crossborder_demo import client_tls, home_rules, issue_form_d, post, wait_for_destination
from gateway.model import State
from gateway.reload import ReloadOutcome, RoutingReloader
from gateway.security.pki import set_peer_endpoint
from gateway.trust_reload import TrustReloader
from routing.config import read_yaml
from routing.engine import default_rules_path
from tests.crossborder.conftest import CrossBorder, PairDirs
from tests.e2e.conftest import Rabbit
from tests.operator.helpers import write_rules

TH = "TH-NSW"


def set_th_endpoint(dirs: PairDirs, endpoint: dict[str, Any] | None) -> Any:
    """TH-NSW's endpoint in VN's registry; returns the one it had."""
    return set_peer_endpoint(dirs.vn / "partners.yaml", TH, endpoint)


async def send_form_d(pair: CrossBorder) -> tuple[int, str | None, str]:
    """VN-MOIT's e-Form D for TH at VN-NSW: (status, rejection code, messageId or the answer)."""
    form_d = issue_form_d(pair.dirs.signer("VN-MOIT"))
    status, answer, headers = await post(pair.vn.url, form_d, client_tls(pair.dirs.vn, pair.dirs.party("VN-MOIT")))
    return status, headers.get("X-NSW-Code"), headers.get("X-NSW-Message-Id") or answer[:600].decode()


async def reload(trust: TrustReloader, routing: RoutingReloader) -> ReloadOutcome:
    assert trust.check() is True  # the watcher's poll: trust and registry first, then the rules
    outcome = await routing.check()
    assert outcome is not None
    assert outcome.ok, outcome.error
    return outcome


async def delivered_to_th(pair: CrossBorder, message_id: str, count: int) -> None:
    received = await pair.th_agencies.wait_for("customs", count)
    assert received[count - 1].headers["Idempotency-Key"] == f"{message_id}:customs"
    to_th = await wait_for_destination(pair.vn.gateway.ledger, message_id, "asw:TH")
    assert to_th.state is State.DELIVERED, to_th.detail
    assert pair.vn.proofs.get(message_id, "asw:TH") is not None  # TH's signed receipt, kept as proof


@pytest.fixture(params=["embedded", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def vn_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """VN on either broker (on RabbitMQ, with queue names unique to the test, deleted afterwards)."""
    if request.param == "embedded":
        return {}
    handle: Rabbit = request.getfixturevalue("rabbit")
    handle.destinations.extend(["asw:TH", *read_yaml(default_rules_path())["destinations"]])
    return handle.settings()


async def test_a_peer_given_an_endpoint_is_delivered_to_without_a_restart(
    cross_border: Callable[..., Awaitable[CrossBorder]], tmp_path: Path, vn_settings: dict[str, Any]
) -> None:
    withheld: dict[str, Any] = {}

    def th_not_live_yet(dirs: PairDirs) -> None:
        withheld.update(set_th_endpoint(dirs, None))

    pair = await cross_border(vn_names_th=False, before_open=th_not_live_yet, vn_settings=vn_settings)
    vn = pair.vn.gateway
    assert "asw:TH" not in vn.adapters
    rules = write_rules(tmp_path / "vn-rules.yaml", home_rules(pair.vn_agencies.url, tmp_path / "vn-archive", peers=()))
    trust = TrustReloader(vn.trust, vn.partners, vn.settings.partners_path)
    routing = RoutingReloader(vn, rules)
    vn.reloader = routing  # closed with the gateway
    assert await routing.check() is None  # the same rules, the same peers: nothing to do

    status, code, _ = await send_form_d(pair)
    assert (status, code) == (422, "NO_ROUTE")

    # TH goes live: one registry edit, picked up by the poll
    set_th_endpoint(pair.dirs, withheld)
    outcome = await reload(trust, routing)
    assert outcome.peers_joined == ("asw:TH",)
    assert outcome.added == ()
    assert [set(w.destinations) for w in routing.workers] == [{"asw:TH"}]
    status, code, eco_id = await send_form_d(pair)
    assert (status, code) == (202, None), eco_id
    await delivered_to_th(pair, eco_id, 1)
    assert await routing.check() is None

    # TH taken away: refused at the ingress, not accepted for a peer whose receipts no longer verify
    set_th_endpoint(pair.dirs, None)
    outcome = await reload(trust, routing)
    assert outcome.peers_left == ("asw:TH",)
    status, code, _ = await send_form_d(pair)
    assert (status, code) == (422, "NO_ROUTE")

    # and back: the lane that kept draining serves it again, no second consumer
    set_th_endpoint(pair.dirs, withheld)
    outcome = await reload(trust, routing)
    assert outcome.peers_joined == ("asw:TH",)
    assert len(routing.workers) == 1
    status, code, again = await send_form_d(pair)
    assert (status, code) == (202, None), again
    await delivered_to_th(pair, again, 2)


async def test_a_peer_that_cannot_join_is_tried_again_when_what_it_lacked_appears(
    cross_border: Callable[..., Awaitable[CrossBorder]], tmp_path: Path
) -> None:
    """TH given an endpoint whose CA file is not there yet: the reload that would add it fails naming the
    file, the polls after it do not try the same again (one error, not one every few seconds), and the
    file put in place is noticed at the next poll, with no registry edit."""
    withheld: dict[str, Any] = {}

    def th_not_live_yet(dirs: PairDirs) -> None:
        withheld.update(set_th_endpoint(dirs, None))

    pair = await cross_border(vn_names_th=False, before_open=th_not_live_yet)
    vn = pair.vn.gateway
    rules = write_rules(tmp_path / "vn-rules.yaml", home_rules(pair.vn_agencies.url, tmp_path / "vn-archive", peers=()))
    trust = TrustReloader(vn.trust, vn.partners, vn.settings.partners_path)
    routing = RoutingReloader(vn, rules)
    vn.reloader = routing  # closed with the gateway

    ca = pair.dirs.vn / "peer-tls" / "th-ca.pem"
    set_th_endpoint(pair.dirs, {**withheld, "tls": {**withheld["tls"], "ca": "peer-tls/th-ca.pem"}})
    assert trust.check() is True  # the registry itself loads: the file is only opened for the adapter
    failed = await routing.check()
    assert failed is not None
    assert not failed.ok
    assert str(ca) in str(failed.error)
    assert await routing.check() is None  # nothing changed since: not tried again
    status, code, _ = await send_form_d(pair)
    assert (status, code) == (422, "NO_ROUTE")

    ca.parent.mkdir()
    shutil.copyfile(pair.dirs.vn / withheld["tls"]["ca"], ca)
    joined = await routing.check()
    assert joined is not None
    assert joined.ok, joined.error
    assert joined.peers_joined == ("asw:TH",)
    status, code, eco_id = await send_form_d(pair)
    assert (status, code) == (202, None), eco_id
    await delivered_to_th(pair, eco_id, 1)
