"""Copies queued for a destination the rules file no longer has, when the worker (re)starts.

A reload that removes a destination leaves its running lane draining. A worker started afterwards has no
settings for it, and before this it did not consume that queue at all: the accepted copies sat there
QUEUED, with nothing saying why and nothing ever ending the wait. Now the worker asks the ledger which
destinations still hold accepted copies, gives each one it cannot deliver to a lane that holds them
(RETRY_WAIT, code DESTINATION_REMOVED, in the status and as ``nsw_destination_held``), and a reload that
configures the destination again delivers them on that lane, with their Idempotency-Keys.

The first gateway accepts (its worker never starts); the second opens the same data directory and broker
with the new rules and runs the worker: what ``nswgw worker`` does when restarted after a rules edit.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.model import State
from gateway.status import DestinationStatus
from gateway.stores.base import Ledger
from tests.conftest import RunningGateway
from tests.e2e.conftest import Rabbit
from tests.operator.helpers import DEADLINE, parse_metrics, rules, value, write_rules


@pytest.fixture(params=["embedded", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def broker_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "embedded":
        return {}
    handle: Rabbit = request.getfixturevalue("rabbit")
    handle.destinations.extend(["first", "second"])
    return handle.settings()


async def accept(gw: RunningGateway, signed: Callable[..., bytes]) -> str:
    message_id = str(uuid.uuid4())
    response = await gw.post(signed("licence.import", message_id=message_id))
    assert response.status == 202, await response.text()
    return message_id


async def copy_in(
    ledger: Ledger, message_id: str, destination: str, state: State, code: str | None = None
) -> DestinationStatus:
    """The message's copy for ``destination`` once it is in ``state`` with ``code``."""
    async with asyncio.timeout(DEADLINE):
        while True:
            status = await ledger.status(message_id)
            copy = status.destinations.get(destination) if status is not None else None
            if copy is not None and (copy.state, copy.code) == (state, code):
                return copy
            await asyncio.sleep(0.02)


def held(gw: RunningGateway, destination: str) -> float | None:
    samples = parse_metrics(gw.gateway.metrics.exposition().decode())
    return value(samples, "nsw_destination_held", destination=destination, code="DESTINATION_REMOVED")


async def test_copies_for_a_removed_destination_are_held_then_delivered_once_it_is_configured_again(
    make_gateway: Callable[..., Any],
    agencies: Callable[..., Any],
    signed: Callable[..., bytes],
    tmp_path: Path,
    broker_settings: dict[str, Any],
) -> None:
    first, second = await agencies(), await agencies()
    both = rules({"first": first.url, "second": second.url})
    data_dir = tmp_path / "var"
    old = write_rules(tmp_path / "old.yaml", both)
    accepting = await make_gateway(data_dir=data_dir, routing_file=old, **broker_settings)
    message_id = await accept(accepting, signed)

    path = write_rules(tmp_path / "rules.yaml", rules({"first": first.url}))  # the operator removed `second`
    gw = await make_gateway(data_dir=data_dir, routing_file=path, **broker_settings)
    with capture_logs() as logs:
        await gw.gateway.start_worker()
    (warning,) = [e for e in logs if e["event"] == "routing.destination_removed"]
    assert (warning["destination"], warning["pending"]) == ("second", 1)

    await copy_in(gw.gateway.ledger, message_id, "first", State.DELIVERED)
    copy = await copy_in(gw.gateway.ledger, message_id, "second", State.RETRY_WAIT, "DESTINATION_REMOVED")
    assert copy.detail.startswith("destination 'second' is not in the routing rules in force: not sent;")
    assert second.requests == []
    assert held(gw, "second") == 1.0
    assert held(gw, "first") is None

    write_rules(path, both)  # configured again: the reload swaps the real adapter in on the lane it has
    outcome = await gw.gateway.start_reloader(interval=3600).check(force=True)
    assert outcome is not None
    assert outcome.ok, outcome.error
    assert outcome.added == ("second",)
    await copy_in(gw.gateway.ledger, message_id, "second", State.DELIVERED)
    assert second.delivered_keys() == [f"{message_id}:second"]
    assert first.delivered_keys() == [f"{message_id}:first"]
    assert held(gw, "second") is None


async def test_a_worker_started_with_nothing_stranded_adds_no_lane(
    make_gateway: Callable[..., Any], agencies: Callable[..., Any], signed: Callable[..., bytes], tmp_path: Path
) -> None:
    first = await agencies()
    gw = await make_gateway(routing_file=write_rules(tmp_path / "rules.yaml", rules({"first": first.url})))
    message_id = await accept(gw, signed)
    with capture_logs() as logs:
        worker = await gw.gateway.start_worker()
    assert worker.destinations == set(gw.gateway.build_adapters())  # "first" and the registry's live peers
    await copy_in(gw.gateway.ledger, message_id, "first", State.DELIVERED)
    assert [e for e in logs if e["event"] == "routing.destination_removed"] == []
