"""A peer joins and leaves through the partner registry, with no restart: two real gateways on loopback.

VN-NSW starts with TH-NSW in its registry but without an endpoint (TH not live yet), and its rules file
does not name asw:TH: the registry alone makes a peer a destination. Giving TH its endpoint must make
VN route, queue and deliver e-Form Ds to TH at the next reload; taking it away must stop VN accepting
them (NO_ROUTE) and stop VN sending what it had queued to the endpoint TH had (PEER_WITHHELD), and giving
it back must use the lane it had.

The registry decides for a peer the rules file names (``asw:TH: {adapter: asw, ...}``) as well: without
an endpoint it is withheld (NO_ROUTE naming why, what was queued for it held with PEER_WITHHELD, the
gateway still starts and serves every other flow), and it is routed to, with the rules file's options,
once the registry gives it one.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from adapters.asw import AswAdapter, HttpsPeerTransport
from adapters.base import held_code
from gateway.cli import build_parser
from gateway.crossborder_demo import (
    client_tls,
    home_routing,
    home_rules,
    issue_form_d,
    loopback_socket,
    open_node,
    post,
    wait_for_destination,
)
from gateway.model import State
from gateway.receipts import RECEIPT_NS
from gateway.reload import ReloadOutcome, RoutingReloader
from gateway.runtime import Gateway
from gateway.security.pki import set_peer_endpoint
from gateway.status import DestinationStatus
from gateway.trust_reload import TrustReloader
from routing.config import read_yaml
from routing.engine import default_rules_path
from tests.crossborder.conftest import CrossBorder, PairDirs
from tests.e2e.conftest import Rabbit
from tests.operator.helpers import parse_metrics, value, write_rules

TH = "TH-NSW"


def set_th_endpoint(dirs: PairDirs, endpoint: dict[str, Any] | None) -> Any:
    """TH-NSW's endpoint in VN's registry; returns the one it had."""
    return set_peer_endpoint(dirs.vn / "partners.yaml", TH, endpoint)


async def post_form_d(pair: CrossBorder) -> tuple[int, bytes, Mapping[str, str]]:
    """VN-MOIT's e-Form D for TH posted at VN-NSW: (status, answer, headers)."""
    form_d = issue_form_d(pair.dirs.signer("VN-MOIT"))
    return await post(pair.vn.url, form_d, client_tls(pair.dirs.vn, pair.dirs.party("VN-MOIT")))


async def send_form_d(pair: CrossBorder) -> tuple[int, str | None, str]:
    """VN-MOIT's e-Form D for TH at VN-NSW: (status, rejection code, messageId or the answer)."""
    status, answer, headers = await post_form_d(pair)
    return status, headers.get("X-NSW-Code"), headers.get("X-NSW-Message-Id") or answer[:600].decode()


async def reload(trust: TrustReloader, routing: RoutingReloader) -> ReloadOutcome:
    assert trust.check() is True  # the watcher's poll: trust and registry first, then the rules
    outcome = await routing.check()
    assert outcome is not None
    assert outcome.ok, outcome.error
    return outcome


async def refused_for_th(pair: CrossBorder) -> None:
    """An e-Form D for TH is refused NO_ROUTE, the signed rejection saying TH is withheld and why."""
    status, answer, headers = await post_form_d(pair)
    assert (status, headers.get("X-NSW-Code")) == (422, "NO_ROUTE")
    detail = etree.fromstring(answer).findtext(f".//{{{RECEIPT_NS}}}detail")
    assert detail == (
        "rule 'eco-issued-to-importing-country' routes to 'asw:TH' (from 'asw:{importingCountry}'), an ASW peer "
        "not routed to now: no peer NSW for TH has an endpoint in the partner registry"
    )
    assert etree.fromstring(answer).findtext(f".//{{{RECEIPT_NS}}}location") == (
        "field importingCountry = string(eco:importingCountry)"
    )


def th_options(pair: CrossBorder) -> float:
    """The timeout of the adapter VN delivers to TH with (the rules file's ``timeout`` option)."""
    transport = pair.vn.gateway.adapters["asw:TH"].transport  # type: ignore[attr-defined]
    assert isinstance(transport, HttpsPeerTransport)
    return transport.settings.timeout


async def accepted_and_delivered_to_th(pair: CrossBorder, count: int) -> None:
    """An e-Form D for TH accepted by VN and delivered to TH's customs, the ``count``-th to arrive there."""
    status, code, eco_id = await send_form_d(pair)
    assert (status, code) == (202, None), eco_id
    await delivered_to_th(pair, eco_id, count)


def withheld_metric(pair: CrossBorder) -> float | None:
    samples = parse_metrics(pair.vn.gateway.metrics.exposition().decode())
    return value(samples, "nsw_peer_withheld", destination="asw:TH")


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
    await accepted_and_delivered_to_th(pair, 1)
    assert await routing.check() is None

    # TH taken away: refused at the ingress, not accepted for a peer whose receipts no longer verify
    set_th_endpoint(pair.dirs, None)
    outcome = await reload(trust, routing)
    assert outcome.peers_left == ("asw:TH",)
    status, code, _ = await send_form_d(pair)
    assert (status, code) == (422, "NO_ROUTE")

    # and back: the lane it had serves it again, no second consumer
    set_th_endpoint(pair.dirs, withheld)
    outcome = await reload(trust, routing)
    assert outcome.peers_joined == ("asw:TH",)
    assert len(routing.workers) == 1
    await accepted_and_delivered_to_th(pair, 2)


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
    await accepted_and_delivered_to_th(pair, 1)


def named_th_rules(pair: CrossBorder, tmp_path: Path, *, timeout: float) -> Path:
    """VN's rules file, naming asw:TH with a ``timeout`` option."""
    data = home_rules(pair.vn_agencies.url, tmp_path / "vn-archive", peers=("asw:TH",))
    data["destinations"]["asw:TH"]["timeout"] = timeout
    return write_rules(tmp_path / "vn-rules.yaml", data)


async def test_a_named_peer_without_an_endpoint_is_withheld_at_start_and_routed_to_once_it_has_one(
    cross_border: Callable[..., Awaitable[CrossBorder]], tmp_path: Path, vn_settings: dict[str, Any]
) -> None:
    """Before, VN refused to start at all (the asw adapter could not be built): one peer not live yet
    stopped every flow of the national gateway."""
    withheld: dict[str, Any] = {}

    def th_not_live_yet(dirs: PairDirs) -> None:
        withheld.update(set_th_endpoint(dirs, None))

    pair = await cross_border(before_open=th_not_live_yet, vn_settings=vn_settings)  # the rules name asw:TH
    vn = pair.vn.gateway
    assert dict(vn.pipeline.admission.withheld) == {
        "asw:TH": "no peer NSW for TH has an endpoint in the partner registry"
    }
    assert held_code(vn.adapters["asw:TH"]) == "PEER_WITHHELD"  # a lane that holds what is queued
    await refused_for_th(pair)

    rules = named_th_rules(pair, tmp_path, timeout=12.5)
    trust = TrustReloader(vn.trust, vn.partners, vn.settings.partners_path)
    routing = RoutingReloader(vn, rules)
    vn.reloader = routing  # closed with the gateway
    set_th_endpoint(pair.dirs, withheld)
    outcome = await reload(trust, routing)
    assert (outcome.peers_joined, outcome.withheld, outcome.added) == (("asw:TH",), (), ())
    assert routing.workers == []  # the lane VN started with: its adapter is now the real one
    assert isinstance(vn.adapters["asw:TH"], AswAdapter)
    assert th_options(pair) == 12.5  # built from the rules file's entry, not the defaults of an unnamed peer
    await accepted_and_delivered_to_th(pair, 1)


async def test_a_named_peer_whose_endpoint_is_taken_away_is_withheld_then_served_by_its_lane_again(
    cross_border: Callable[..., Awaitable[CrossBorder]], tmp_path: Path
) -> None:
    pair = await cross_border()  # the rules name asw:TH; TH is live
    vn = pair.vn.gateway
    rules = named_th_rules(pair, tmp_path, timeout=30)
    trust = TrustReloader(vn.trust, vn.partners, vn.settings.partners_path)
    routing = RoutingReloader(vn, rules)
    vn.reloader = routing
    assert (await routing.check(force=True)) is not None  # the rules file (timeout 30) in force
    await accepted_and_delivered_to_th(pair, 1)

    # Before, VN went on routing e-Form Ds to TH through the adapter built for the endpoint it had.
    taken = set_th_endpoint(pair.dirs, None)
    outcome = await reload(trust, routing)
    assert (outcome.peers_left, outcome.withheld) == (("asw:TH",), ("asw:TH",))
    assert withheld_metric(pair) == 1.0
    await refused_for_th(pair)

    # The rules file edited meanwhile: before, the reload was refused (the adapter could not be built).
    write_rules(rules, read_yaml(named_th_rules(pair, tmp_path, timeout=7.5)))
    outcome = await routing.check()
    assert outcome is not None
    assert outcome.ok, outcome.error
    assert (outcome.changed, outcome.withheld) == (("asw:TH",), ("asw:TH",))
    await refused_for_th(pair)

    lane_adapter = vn.adapters["asw:TH"]
    set_th_endpoint(pair.dirs, taken)
    outcome = await reload(trust, routing)
    assert (outcome.peers_joined, outcome.withheld) == (("asw:TH",), ())
    assert routing.workers == []  # the lane VN started with serves it: no second consumer
    assert vn.adapters["asw:TH"] is not lane_adapter
    assert th_options(pair) == 7.5  # the options edited while TH was withheld
    assert withheld_metric(pair) is None
    await accepted_and_delivered_to_th(pair, 2)


def test_the_command_line_says_a_named_peer_is_withheld_and_why(
    dirs: PairDirs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``nswgw routes explain`` and ``nswgw verify`` answer as the ingress would: NO_ROUTE, naming why."""
    rules = write_rules(tmp_path / "rules.yaml", home_rules("http://127.0.0.1:9", tmp_path / "archive"))
    form_d = tmp_path / "form-d.xml"
    form_d.write_bytes(issue_form_d(dirs.signer("VN-MOIT")))
    common = ["--certs", str(dirs.vn), "--data", str(tmp_path / "var"), "--routing", str(rules)]
    why = "an ASW peer not routed to now: no peer NSW for TH has an endpoint in the partner registry"

    def main(argv: list[str]) -> int:  # the command, without the logging set-up of gateway.cli.main
        args = build_parser().parse_args(argv)
        return int(args.func(args))

    assert main(["routes", "explain", *common, str(form_d)]) == 0
    assert "  asw:TH   <- rule eco-issued-to-importing-country" in capsys.readouterr().out
    set_th_endpoint(dirs, None)
    assert main(["routes", "explain", *common, str(form_d)]) == 0
    assert why in capsys.readouterr().out
    assert main(["verify", *common, str(form_d)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["code"], report["location"]) == ("NO_ROUTE", "field importingCountry = string(eco:importingCountry)")
    assert why in report["detail"]


async def test_nothing_queued_is_sent_to_the_endpoint_a_peer_had_once_the_registry_takes_it_away(
    cross_border: Callable[..., Awaitable[CrossBorder]], tmp_path: Path
) -> None:
    """Before, VN's lane went on forwarding what it had queued for TH to the endpoint TH had, after the
    registry took it away. Now each attempt is held (PEER_WITHHELD) until TH has an endpoint again."""
    pair = await cross_border(th_serving=False)  # TH registered, named and routed to; its port not answering
    vn = pair.vn.gateway
    rules = write_rules(tmp_path / "vn-rules.yaml", home_rules(pair.vn_agencies.url, tmp_path / "vn-archive"))
    trust = TrustReloader(vn.trust, vn.partners, vn.settings.partners_path)
    routing = RoutingReloader(vn, rules)
    vn.reloader = routing
    status, code, eco_id = await send_form_d(pair)
    assert (status, code) == (202, None), eco_id
    await wait_for_destination(vn.ledger, eco_id, "asw:TH", states=frozenset({State.RETRY_WAIT}))

    taken = set_th_endpoint(pair.dirs, None)
    assert (await reload(trust, routing)).withheld == ("asw:TH",)
    await pair.th.serve()  # TH answers again, at the endpoint VN's lane was built for
    held = await destination_code(vn, eco_id, "PEER_WITHHELD")
    assert held.state is State.RETRY_WAIT
    assert held.detail.startswith("peer TH-NSW has no endpoint in the partner registry: not sent;")
    assert await pair.th.gateway.ledger.status(eco_id) is None  # TH never got it
    assert held_metric(vn) == 1.0  # the built adapter holds now (AswAdapter.held)

    set_th_endpoint(pair.dirs, taken)
    assert (await reload(trust, routing)).peers_joined == ("asw:TH",)
    await delivered_to_th(pair, eco_id, 1)
    assert held_metric(vn) is None


async def destination_code(gateway: Gateway, message_id: str, code: str, within: float = 15.0) -> DestinationStatus:
    """The message's status at ``gateway`` for asw:TH once its last recorded code is ``code``."""
    async with asyncio.timeout(within):
        while True:
            status = await gateway.ledger.status(message_id)
            current = status.destinations.get("asw:TH") if status else None
            if current is not None and current.code == code:
                return current
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
async def test_what_was_queued_for_a_peer_withheld_across_a_restart_is_held_then_delivered(
    cross_border: Callable[..., Awaitable[CrossBorder]], tmp_path: Path, named: bool
) -> None:
    """VN restarted while the registry gives TH no endpoint: the lane it starts with for asw:TH holds what
    was queued (PEER_WITHHELD, in the status and ``nsw_destination_held``) instead of leaving it unconsumed
    and unexplained, and the registry giving TH its endpoint back gets it delivered, with no second
    restart. Unnamed (the registry alone made TH a destination), the lane comes from the ledger's record
    of what is still queued: nothing else at start-up says asw:TH exists."""
    peers = ["asw:TH"] if named else []
    pair = await cross_border(th_serving=False, vn_names_th=named)
    status, code, eco_id = await send_form_d(pair)
    assert (status, code) == (202, None), eco_id
    await wait_for_destination(pair.vn.gateway.ledger, eco_id, "asw:TH", states=frozenset({State.RETRY_WAIT}))
    await pair.vn.close()

    taken = set_th_endpoint(pair.dirs, None)
    routing_table = home_routing(pair.vn_agencies.url, tmp_path / "vn-archive", peers=peers)
    vn = await open_node(
        pair.dirs.vn, tmp_path / "vn-var", identity="VN-NSW", routing=routing_table, sock=loopback_socket()
    )
    try:
        await pair.th.serve()
        held = await destination_code(vn.gateway, eco_id, "PEER_WITHHELD")
        assert held.detail.startswith("no peer NSW for TH has an endpoint in the partner registry: not sent;")
        assert await pair.th.gateway.ledger.status(eco_id) is None
        assert held_metric(vn.gateway) == 1.0

        rules = write_rules(
            tmp_path / "vn-rules.yaml", home_rules(pair.vn_agencies.url, tmp_path / "vn-archive", peers=peers)
        )
        trust = TrustReloader(vn.gateway.trust, vn.gateway.partners, vn.gateway.settings.partners_path)
        routing = RoutingReloader(vn.gateway, rules)
        vn.gateway.reloader = routing
        set_th_endpoint(pair.dirs, taken)
        assert (await reload(trust, routing)).peers_joined == ("asw:TH",)
        assert isinstance(vn.gateway.adapters["asw:TH"], AswAdapter)  # the real adapter, on the lane it had
        assert held_metric(vn.gateway) is None
        # Unnamed, its lane has the default policy: the held copy's next attempt was 30 s away. The reload
        # released it (Broker.release_waiting) when it gave the lane its new adapter.
        delivered = await wait_for_destination(vn.gateway.ledger, eco_id, "asw:TH", within=10.0)
        assert delivered.state is State.DELIVERED, delivered.detail
        received = await pair.th_agencies.wait_for("customs", 1)
        assert received[0].headers["Idempotency-Key"] == f"{eco_id}:customs"
    finally:
        await vn.close()


def held_metric(gateway: Gateway) -> float | None:
    samples = parse_metrics(gateway.metrics.exposition().decode())
    return value(samples, "nsw_destination_held", destination="asw:TH", code="PEER_WITHHELD")
