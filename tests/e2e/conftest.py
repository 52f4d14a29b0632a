"""End-to-end fixtures: a gateway (ingress + workers) on real RabbitMQ or the embedded broker, with
loopback agencies as destinations and fast retry policies."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml

from gateway.brokers import names
from routing.engine import RoutingTable
from tests.conftest import require_service
from tests.support.agency import WAIT, Agency

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
TIERS = (0.2, 0.5, 1.0)
FAST_RETRY = {
    "in_process_attempts": 2,
    "in_process_wait": 0.01,
    "tiers": list(TIERS),
    "max_attempts": 8,
    "max_age": 600,
}
FAST_BREAKER = {"failure_threshold": 50, "reset_after": 0.5}


def routing_mapping(
    agencies: Mapping[str, Agency], document_types: Sequence[str] = ("licence.import",)
) -> dict[str, Any]:
    """Every message of ``document_types`` goes to every agency."""
    return {
        "version": 1,
        "destinations": {
            name: {
                "adapter": "http",
                "url": agency.url,
                "timeout": 5,
                "max_in_flight": 4,
                "retry": FAST_RETRY,
                "breaker": FAST_BREAKER,
            }
            for name, agency in agencies.items()
        },
        "rules": [{"name": "to-agencies", "when": {"documentType": list(document_types)}, "to": list(agencies)}],
    }


def routing_for(agencies: Mapping[str, Agency], **kwargs: Any) -> RoutingTable:
    return RoutingTable.from_mapping(routing_mapping(agencies, **kwargs), source="<test routing>")


def write_routing(path: Path, agencies: Mapping[str, Agency], **kwargs: Any) -> Path:
    path.write_text(yaml.safe_dump(routing_mapping(agencies, **kwargs)))
    return path


async def delete_queues(prefix: str, destinations: Sequence[str]) -> None:
    connection = await aio_pika.connect(RABBIT_URL)
    try:
        channel = await connection.channel()
        for destination in destinations:
            for queue, _arguments in names.queue_plan(destination, TIERS, prefix=prefix):
                await channel.queue_delete(queue)
    finally:
        await connection.close()


@dataclasses.dataclass
class Rabbit:
    prefix: str
    destinations: list[str] = dataclasses.field(default_factory=list)  # queues to delete afterwards

    def settings(self) -> dict[str, Any]:
        return {"amqp_url": RABBIT_URL, "queue_prefix": self.prefix, "retry_tiers": TIERS}

    def env(self) -> dict[str, str]:
        return {
            "NSW_AMQP_URL": RABBIT_URL,
            "NSW_QUEUE_PREFIX": self.prefix,
            "NSW_RETRY_TIERS": ",".join(map(str, TIERS)),
        }


@pytest.fixture
async def rabbit() -> AsyncIterator[Rabbit]:
    """A gateway on the real RabbitMQ, with queue names unique to the test (deleted afterwards)."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    handle = Rabbit(f"nswe2e-{uuid.uuid4().hex[:8]}")
    yield handle
    await delete_queues(handle.prefix, handle.destinations)


@pytest.fixture
async def agencies() -> AsyncIterator[Callable[..., Any]]:
    started: list[Agency] = []

    async def make(name: str = "agency", answers: Sequence[int | str] = (), default: int = 200) -> Agency:
        agency = await Agency(name, answers, default).start()
        started.append(agency)
        return agency

    yield make
    for agency in started:
        await agency.stop()


async def wait_states(ledger: Any, message_id: str, expected: Mapping[str, str]) -> Any:
    """Wait until each destination of ``message_id`` is in the expected state; return the status."""
    async with asyncio.timeout(WAIT):
        while True:
            status = await ledger.status(message_id)
            if status is not None and all(
                d in status.destinations and status.destinations[d].state == s for d, s in expected.items()
            ):
                return status
            await asyncio.sleep(0.05)


def nswgw(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "gateway", *map(str, args)]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSW_")}
    env.update(extra)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env
