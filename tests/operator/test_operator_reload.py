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

from gateway.reload import ReloadOutcome, RoutingReloader
from tests.conftest import RunningGateway
from tests.operator.helpers import DEADLINE, rules, scrape, value, write_rules
from tests.support.agency import Agency


async def send(gw: RunningGateway, signed: Callable[..., bytes]) -> list[str]:
    """POST one licence.import; the destinations its copies were enqueued for."""
    before = len(gw.broker.published)
    response = await gw.post(signed("licence.import", message_id=str(uuid.uuid4())))
    assert response.status == 202, await response.text()
    return [d.destination for d in gw.broker.published[before:]]


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
