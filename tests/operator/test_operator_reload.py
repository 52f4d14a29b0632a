"""Routing hot reload through a running gateway (ingress + worker): messages sent before and after."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from adapters.base import Adapter
from gateway.model import State
from gateway.reload import ReloadOutcome, RoutingReloader
from tests.conftest import RunningGateway
from tests.operator.helpers import DEADLINE, rules, scrape, value, write_rules
from tests.support.agency import Agency
from tests.support.mtls import make_pki


async def send(gw: RunningGateway, signed: Callable[..., bytes]) -> list[str]:
    """POST one licence.import; the destinations its copies were enqueued for."""
    return (await send_one(gw, signed))[1]


async def send_one(gw: RunningGateway, signed: Callable[..., bytes]) -> tuple[str, list[str]]:
    """POST one licence.import; its messageId and the destinations its copies were enqueued for."""
    before = len(gw.broker.published)
    message_id = str(uuid.uuid4())
    response = await gw.post(signed("licence.import", message_id=message_id))
    assert response.status == 202, await response.text()
    return message_id, [d.destination for d in gw.broker.published[before:]]


async def until_state(gw: RunningGateway, message_id: str, destination: str, state: State) -> None:
    """Poll the ledger until the message's copy for ``destination`` is in ``state``."""
    async with asyncio.timeout(DEADLINE):
        while True:
            status = await gw.gateway.ledger.status(message_id)
            entry = status.destinations.get(destination) if status is not None else None
            if entry is not None and entry.state is state:
                return
            await asyncio.sleep(0.01)


def spy_on_close(adapter: Adapter) -> asyncio.Event:
    """Set once ``adapter.close()`` has finished."""
    closed = asyncio.Event()
    close = adapter.close

    async def closing() -> None:
        await close()
        closed.set()

    adapter.close = closing  # type: ignore[method-assign]
    return closed


async def started(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], tmp_path: Path, *, interval: float = 3600
) -> tuple[RunningGateway, RoutingReloader, Path, Agency, Agency]:
    """A gateway with a worker, routing licence.import to ``first`` from a rules file that is watched."""
    first, second = await agencies(), await agencies()
    path = write_rules(tmp_path / "rules.yaml", rules({"first": first.url}))
    gw = await make_gateway(routing_file=path)
    await gw.gateway.start_worker()
    # A long interval: in these tests nothing reloads behind the test's back; check() is the poll.
    reloader = gw.gateway.start_reloader(interval=interval)
    return gw, reloader, path, first, second


async def test_a_valid_rules_file_takes_effect_without_restart(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes], tmp_path: Path
) -> None:
    gw, reloader, path, first, second = await started(make_gateway, agencies, tmp_path)
    assert await reloader.check() is None  # unchanged file: nothing to do

    assert await send(gw, signed) == ["first"]
    await first.wait_until(lambda: len(first.delivered_keys()) == 1)

    write_rules(path, rules({"second": second.url}))
    outcome = await reloader.check()
    assert outcome == ReloadOutcome(True, str(path), None, added=("second",), removed=("first",))

    assert await send(gw, signed) == ["second"]
    # The worker learnt the new destination: the copy is delivered, not left in its queue.
    await second.wait_until(lambda: len(second.delivered_keys()) == 1)
    assert len(first.requests) == 1
    assert gw.gateway.pipeline.admission.routing is gw.gateway.routing
    m = await scrape(gw.client)
    assert value(m, "nsw_routing_reloads_total", outcome="ok") == 1
    assert value(m, "nsw_circuit_breaker_state", destination="second", state="closed") == 1


async def test_an_invalid_rules_file_keeps_the_old_rules_and_names_the_rule(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes], tmp_path: Path
) -> None:
    gw, reloader, path, first, second = await started(make_gateway, agencies, tmp_path)
    old = gw.gateway.pipeline.admission.routing

    broken = rules({"second": second.url}, rule="broken-rule")
    broken["rules"][0]["to"] = ["nowhere"]  # not a configured destination
    write_rules(path, broken)
    with capture_logs() as logs:
        outcome = await reloader.check()
    assert outcome is not None
    assert not outcome.ok
    assert "broken-rule" in (outcome.error or "")
    rejected = [e for e in logs if e["event"] == "routing.reload_rejected"]
    assert len(rejected) == 1
    assert rejected[0]["log_level"] == "error"
    assert "broken-rule" in rejected[0]["error"]
    assert "nowhere" in rejected[0]["error"]

    assert gw.gateway.pipeline.admission.routing is old
    assert await send(gw, signed) == ["first"]
    await first.wait_until(lambda: len(first.delivered_keys()) == 1)
    assert await reloader.check() is None  # the same faulty file is not retried (nor logged) every poll

    # An adapter fault is caught before the swap too, when this process runs a worker.
    bad_adapter = rules({"first": first.url, "third": second.url})
    bad_adapter["destinations"]["third"]["adapter"] = "carrier-pigeon"
    write_rules(path, bad_adapter)
    outcome = await reloader.check()
    assert outcome is not None
    assert not outcome.ok
    assert "carrier-pigeon" in (outcome.error or "")
    assert gw.gateway.pipeline.admission.routing is old

    (tmp_path / "rules.yaml").write_text("version: 1\nrules: [\n", encoding="utf-8")
    outcome = await reloader.check()
    assert outcome is not None
    assert not outcome.ok
    assert "not valid YAML" in (outcome.error or "")
    assert await send(gw, signed) == ["first"]
    assert second.requests == []
    m = await scrape(gw.client)
    assert value(m, "nsw_routing_reloads_total", outcome="error") == 3
    assert value(m, "nsw_routing_reloads_total", outcome="ok") == 0


async def test_the_watcher_notices_a_changed_file(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes], tmp_path: Path
) -> None:
    gw, reloader, path, _first, second = await started(make_gateway, agencies, tmp_path, interval=0.05)
    outcome = reloader.next_outcome()
    write_rules(path, rules({"second": second.url}))
    assert (await asyncio.wait_for(outcome, DEADLINE)).ok
    assert await send(gw, signed) == ["second"]


async def test_sighup_reloads_at_once(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes], tmp_path: Path
) -> None:
    gw, reloader, path, _first, second = await started(make_gateway, agencies, tmp_path)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reloader.request)  # as `nswgw serve` does
    try:
        write_rules(path, rules({"second": second.url}))
        outcome = reloader.next_outcome()
        os.kill(os.getpid(), signal.SIGHUP)
        assert (await asyncio.wait_for(outcome, DEADLINE)).added == ("second",)
        assert await send(gw, signed) == ["second"]

        outcome = reloader.next_outcome()
        os.kill(os.getpid(), signal.SIGHUP)  # forced: reloads even an unchanged file
        assert await asyncio.wait_for(outcome, DEADLINE) == ReloadOutcome(True, str(path))
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


async def test_a_changed_destination_takes_its_new_settings_without_restart(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes], tmp_path: Path
) -> None:
    """The agency moved: the same destination name, a new URL. New attempts go to the new address at
    once; the attempt already talking to the old one finishes there, and only then is its adapter closed."""
    first = await agencies(answers=["hang"])
    second = await agencies()
    path = write_rules(tmp_path / "rules.yaml", rules({"customs": first.url}))
    gw = await make_gateway(routing_file=path)
    await gw.gateway.start_worker()
    reloader = gw.gateway.start_reloader(interval=3600)
    old_adapter = gw.gateway.adapters["customs"]
    old_closed = spy_on_close(old_adapter)

    in_flight, _ = await send_one(gw, signed)
    await first.wait_until(lambda: first.hanging == 1)

    write_rules(path, rules({"customs": second.url}))
    with capture_logs() as logs:
        outcome = await reloader.check()
    assert outcome == ReloadOutcome(True, str(path), None, changed=("customs",))
    reconfigured = [e for e in logs if e["event"] == "routing.destination_reconfigured"]
    assert [(e["destination"], e["settings"], e["new_adapter"]) for e in reconfigured] == [("customs", ["url"], True)]
    assert not [e for e in logs if e["event"] == "routing.reload_needs_restart"]
    assert gw.gateway.adapters["customs"] is not old_adapter

    moved, destinations = await send_one(gw, signed)
    assert destinations == ["customs"]
    await second.wait_until(lambda: len(second.delivered_keys()) == 1)
    assert second.delivered_keys() == [f"{moved}:customs"]
    assert not old_closed.is_set()  # its one delivery is still waiting for the old agency

    first.release()
    await first.wait_until(lambda: len(first.delivered_keys()) == 1)
    assert first.delivered_keys() == [f"{in_flight}:customs"]
    await asyncio.wait_for(old_closed.wait(), DEADLINE)
    for message_id in (in_flight, moved):
        await until_state(gw, message_id, "customs", State.DELIVERED)


async def test_a_changed_retry_policy_applies_to_the_next_attempt_and_keeps_the_adapter(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes], tmp_path: Path
) -> None:
    down = await agencies(default=503)
    path = write_rules(tmp_path / "rules.yaml", rules({"customs": down.url}))
    gw = await make_gateway(routing_file=path)
    await gw.gateway.start_worker()
    reloader = gw.gateway.start_reloader(interval=3600)
    adapter = gw.gateway.adapters["customs"]

    retried, _ = await send_one(gw, signed)  # max_attempts 5: the first 503 schedules a retry
    await until_state(gw, retried, "customs", State.RETRY_WAIT)

    strict = rules({"customs": down.url})
    strict["destinations"]["customs"]["retry"] = {**strict["destinations"]["customs"]["retry"], "max_attempts": 1}
    write_rules(path, strict)
    with capture_logs() as logs:
        outcome = await reloader.check()
    assert outcome is not None
    assert outcome.changed == ("customs",)
    reconfigured = [e for e in logs if e["event"] == "routing.destination_reconfigured"]
    assert [(e["settings"], e["new_adapter"]) for e in reconfigured] == [(["retry"], False)]
    assert gw.gateway.adapters["customs"] is adapter

    dead, _ = await send_one(gw, signed)  # one attempt allowed now: the first 503 is the last
    await until_state(gw, dead, "customs", State.DEAD)
    assert sum(r.key == f"{dead}:customs" for r in down.requests) == 1


async def test_naming_a_peer_in_the_rules_file_reconfigures_its_lane(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], tmp_path: Path
) -> None:
    """asw:TH is delivered to with default options until the file names it (``adapter: asw``); a reload
    that names it builds the peer adapter (it used to be refused as an unknown adapter kind) and puts it
    on the lane the worker already consumes, without a second consumer of the same queue."""
    gw, reloader, path, first, _second = await started(make_gateway, agencies, tmp_path)
    assert "asw:TH" in gw.gateway.worker.destinations
    default_adapter = gw.gateway.adapters["asw:TH"]
    default_closed = spy_on_close(default_adapter)

    named = rules({"first": first.url})
    named["destinations"]["asw:TH"] = {"adapter": "asw", "timeout": 7, "max_in_flight": 2}
    write_rules(path, named)
    with capture_logs() as logs:
        outcome = await reloader.check()
    assert outcome is not None
    assert outcome.ok, outcome.error
    assert outcome.added == ("asw:TH",)
    reconfigured = [e for e in logs if e["event"] == "routing.destination_reconfigured"]
    assert [(e["destination"], e["new_adapter"]) for e in reconfigured] == [("asw:TH", True)]
    assert gw.gateway.adapters["asw:TH"] is not default_adapter
    assert reloader.workers == []  # no second consumer for asw:TH
    await asyncio.wait_for(default_closed.wait(), DEADLINE)  # nothing was using it

    broken = rules({"first": first.url})
    broken["destinations"]["asw:TH"] = {"adapter": "asw", "timeout": "soon"}
    write_rules(path, broken)
    outcome = await reloader.check()
    assert outcome is not None
    assert not outcome.ok
    assert "asw:TH" in (outcome.error or "")
    assert "timeout" in (outcome.error or "")


async def test_a_client_certificate_replaced_in_place_is_picked_up(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes], tmp_path: Path
) -> None:
    """Mutual TLS to a real loopback agency. The client certificate and key are replaced under the same
    paths, the way certificate tooling renews them; the rules file is not touched. The poll notices, and
    the next delivery presents the new certificate. A half-done rotation (the new certificate with the
    old key) is refused, keeps the old adapter delivering, and is not retried until the files change."""
    pki = make_pki(tmp_path)
    agency = await agencies(tls=pki.server_context)
    data = rules({"secure": agency.url})
    data["destinations"]["secure"].update(
        ca=str(pki.ca), client_cert=str(pki.client_cert), client_key=str(pki.client_key)
    )
    gw = await make_gateway(routing_file=write_rules(tmp_path / "rules.yaml", data))
    await gw.gateway.start_worker()
    reloader = gw.gateway.start_reloader(interval=3600)  # check() is the poll
    old = gw.gateway.adapters["secure"]
    old_closed = spy_on_close(old)

    async def delivered_with() -> str | None:
        message_id, _ = await send_one(gw, signed)
        await until_state(gw, message_id, "secure", State.DELIVERED)
        return next(r.client for r in agency.requests if r.key == f"{message_id}:secure")

    assert await delivered_with() == "nsw"
    assert await reloader.check() is None  # nothing changed: no reload

    (tmp_path / "renewed").mkdir()
    renewed_cert, renewed_key = pki.issue_pair(tmp_path / "renewed", "client", "nsw-renewed")
    os.replace(renewed_cert, pki.client_cert)  # a new inode, as an atomic rename by cert tooling makes
    outcome = await reloader.check()
    assert outcome is not None
    assert not outcome.ok
    assert "'secure'" in (outcome.error or "")
    assert "could not be loaded for TLS" in (outcome.error or "")
    assert gw.gateway.adapters["secure"] is old
    assert await reloader.check() is None  # the same half-done files are not tried again
    assert await delivered_with() == "nsw"  # the old adapter holds the old pair in memory

    pki.client_key.write_bytes(renewed_key.read_bytes())  # rewritten in place: same inode
    with capture_logs() as logs:
        outcome = await reloader.check()
    assert outcome is not None
    assert outcome.ok, outcome.error
    assert (outcome.rotated, outcome.changed) == (("secure",), ())
    [event] = [e for e in logs if e["event"] == "routing.destination_reconfigured"]
    assert (event["destination"], event["new_adapter"]) == ("secure", True)
    assert sorted(event["files"]) == sorted([str(pki.client_cert), str(pki.client_key)])
    assert gw.gateway.adapters["secure"] is not old
    await asyncio.wait_for(old_closed.wait(), DEADLINE)
    assert await delivered_with() == "nsw-renewed"
    assert await reloader.check() is None  # rebuilt from the files as they are: nothing left to do
