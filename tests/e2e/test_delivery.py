"""Delivery end to end: ingress -> real RabbitMQ (or the embedded broker) -> worker -> loopback agencies.

Each test sends real signed messages through the HTTP ingress and waits for the states the ledger
records; assertions are about what the agencies received and what the audit trail says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningGateway, free_port
from tests.e2e.conftest import (
    Rabbit,
    child_env,
    nswgw,
    routing_for,
    wait_states,
    write_routing,
)
from tests.support.agency import WAIT, Agency
from tests.support.tcpproxy import TcpProxy


async def start(
    make_gateway: Callable[..., Any],
    rabbit: Rabbit | None,
    agencies: dict[str, Agency],
    *,
    worker: bool = True,
    **overrides: Any,
) -> RunningGateway:
    if rabbit is not None:
        overrides = {**rabbit.settings(), **overrides}
    gw: RunningGateway = await make_gateway(routing=routing_for(agencies), **overrides)
    if rabbit is not None:  # every queue the gateway declared (agencies and peers) is deleted afterwards
        rabbit.destinations.extend([*agencies, *gw.gateway.pipeline.admission.extra_destinations])
    if worker:
        await gw.gateway.start_worker()
    return gw


def cli_paths(pki_dir: Path, gw: RunningGateway, routing_file: Path) -> list[Any]:
    """The options that point `nswgw` at a test gateway's certificates, data and rules file."""
    return ["--certs", pki_dir, "--data", gw.settings.data_dir, "--routing", routing_file]


async def operator_cli(rabbit: Rabbit, *args: Any) -> subprocess.CompletedProcess[str]:
    """`nswgw ARGS` as an operator runs it, against the test's RabbitMQ, off the event loop."""
    return await asyncio.to_thread(
        subprocess.run,
        nswgw(*args),
        env=child_env(**rabbit.env()),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def send(gw: RunningGateway, body: bytes) -> str:
    response = await gw.post(body)
    assert response.status == 202, (await response.read())[:500]
    return response.headers["X-NSW-Message-Id"]


async def trail_events(gw: RunningGateway, message_id: str) -> list[tuple[str, str | None]]:
    return [(r.event, r.destination) for r in await gw.gateway.ledger.trace(message_id)]


@pytest.mark.rabbitmq
async def test_agency_down_for_the_first_attempts_then_up(
    make_gateway: Callable[..., Any], rabbit: Rabbit, agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    agency = await agencies("customs", answers=[503, 503, 503, 503])
    gw = await start(make_gateway, rabbit, {"customs": agency})
    message_id = await send(gw, signed("licence.import"))

    await wait_states(gw.gateway.ledger, message_id, {"customs": "DELIVERED"})
    keys = {r.key for r in agency.requests}
    assert keys == {f"{message_id}:customs"}, "every attempt carries the same Idempotency-Key"
    assert [r.status for r in agency.requests] == [503, 503, 503, 503, 200]
    assert agency.delivered_keys() == [f"{message_id}:customs"], "one logical delivery"
    events = [e for e, d in await trail_events(gw, message_id) if d == "customs"]
    assert "RETRY_WAIT" in events
    assert events[-1] == "DELIVERED"


@pytest.mark.rabbitmq
async def test_permanent_refusal_is_dead_lettered_at_once_then_replayed_by_an_operator(
    make_gateway: Callable[..., Any],
    rabbit: Rabbit,
    agencies: Callable[..., Any],
    signed: Callable[..., bytes],
    pki_dir: Path,
    tmp_path: Path,
) -> None:
    agency = await agencies("moit", default=400)
    gw = await start(make_gateway, rabbit, {"moit": agency})
    message_id = await send(gw, signed("licence.import"))

    await wait_states(gw.gateway.ledger, message_id, {"moit": "DEAD"})
    assert len(agency.requests) == 1, "a 400 is never retried"
    dead = await gw.gateway.broker.list_dead("moit")
    assert [(d.delivery.message_id, d.code) for d in dead] == [(message_id, "HTTP_400")]

    agency.default = 200  # the agency fixes its side; the operator replays with the CLI
    routing_file = write_routing(tmp_path / "routing.yaml", {"moit": agency})
    replay = await operator_cli(
        rabbit, "dlq", "replay", "--destination", "moit", "--id", message_id, *cli_paths(pki_dir, gw, routing_file)
    )
    assert replay.returncode == 0, replay.stderr
    await wait_states(gw.gateway.ledger, message_id, {"moit": "DELIVERED"})
    assert agency.delivered_keys() == [f"{message_id}:moit"]
    events = [e for e, d in await trail_events(gw, message_id) if d == "moit"]
    assert events.index("DEAD") < events.index("REPLAYED") < events.index("DELIVERED")


@pytest.mark.rabbitmq
async def test_dlq_list_finds_dead_letters_of_a_destination_the_routing_file_no_longer_names(
    make_gateway: Callable[..., Any],
    rabbit: Rabbit,
    agencies: Callable[..., Any],
    signed: Callable[..., bytes],
    pki_dir: Path,
    tmp_path: Path,
) -> None:
    """RabbitMQ cannot list queues. A destination dropped from the routing file (or an ASW peer it never
    named) still has its dead letters: `dlq list` finds them through the ledger's DEAD copies."""
    gone = await agencies("moit", default=400)
    kept = await agencies("customs")
    gw = await start(make_gateway, rabbit, {"moit": gone, "customs": kept})
    message_id = await send(gw, signed("licence.import"))
    await wait_states(gw.gateway.ledger, message_id, {"moit": "DEAD", "customs": "DELIVERED"})

    routing_file = write_routing(tmp_path / "routing.yaml", {"customs": kept})  # moit is gone
    paths = cli_paths(pki_dir, gw, routing_file)
    listed = await operator_cli(rabbit, "dlq", "list", *paths)
    assert listed.returncode == 0, listed.stderr
    assert [(r["message_id"], r["destination"], r["code"]) for r in map(json.loads, listed.stdout.splitlines())] == [
        (message_id, "moit", "HTTP_400")
    ]
    again = await operator_cli(rabbit, "dlq", "list", *paths)  # listing leaves the dead letter where it was
    assert again.stdout == listed.stdout

    gone.default = 200
    replayed = await operator_cli(rabbit, "dlq", "replay", "--all", *paths)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 dead letter(s)" in replayed.stdout
    await wait_states(gw.gateway.ledger, message_id, {"moit": "DELIVERED", "customs": "DELIVERED"})
    empty = await operator_cli(rabbit, "dlq", "list", *paths)
    assert (empty.returncode, empty.stdout) == (0, "")


@pytest.mark.rabbitmq
async def test_a_hanging_agency_does_not_delay_another(
    make_gateway: Callable[..., Any], rabbit: Rabbit, agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    slow = await agencies("slow", answers=["hang"] * 8)
    fast = await agencies("fast")
    gw = await start(make_gateway, rabbit, {"slow": slow, "fast": fast})
    ids = [await send(gw, signed("licence.import")) for _ in range(5)]

    await fast.wait_until(lambda: len(fast.delivered_keys()) == 5)
    assert slow.delivered_keys() == [], "the slow agency has not answered anything yet"
    assert slow.hanging >= 1
    slow.release()
    for message_id in ids:
        await wait_states(gw.gateway.ledger, message_id, {"slow": "DELIVERED", "fast": "DELIVERED"})
    assert sorted(fast.delivered_keys()) == sorted(f"{m}:fast" for m in ids)


@pytest.mark.rabbitmq
async def test_broker_connections_closed_by_the_server_mid_run(
    make_gateway: Callable[..., Any], rabbit: Rabbit, agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    agency = await agencies("customs")
    gw = await start(make_gateway, rabbit, {"customs": agency})
    accepted = [await send(gw, signed("licence.import")) for _ in range(5)]
    closed = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "close_all_connections", "test: server closed the connection"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert closed.returncode == 0, closed.stderr
    async with asyncio.timeout(WAIT):  # the ingress answers 503 until the connection is back, then 202
        while len(accepted) < 15:
            response = await gw.post(signed("licence.import"))
            if response.status == 202:
                accepted.append(response.headers["X-NSW-Message-Id"])
            else:
                assert response.status == 503
                await asyncio.sleep(0.1)
    for message_id in accepted:
        await wait_states(gw.gateway.ledger, message_id, {"customs": "DELIVERED"})
    assert set(agency.delivered_keys()) == {f"{m}:customs" for m in accepted}


@pytest.mark.rabbitmq
async def test_broker_unreachable_at_ingress_is_503_and_the_senders_retry_succeeds(
    make_gateway: Callable[..., Any], rabbit: Rabbit, agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    agency = await agencies("customs")
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?connection_timeout=2"
    gw = await start(make_gateway, rabbit, {"customs": agency}, amqp_url=url)
    try:
        await proxy.cut()
        body = signed("licence.import")
        refused = await gw.post(body)
        assert refused.status == 503
        assert refused.headers["X-NSW-Code"] == "UNAVAILABLE"
        assert gw.broker.published == []
        message_id = refused.headers["X-NSW-Message-Id"]
        assert (await gw.gateway.ledger.status(message_id)).state == "REJECTED"

        await proxy.restore()
        async with asyncio.timeout(WAIT):  # the sender retries the same bytes until the gateway is back
            while (retry := await gw.post(body)).status == 503:  # noqa: ASYNC110 - polling a remote, as a sender does
                await asyncio.sleep(0.2)
        assert retry.status == 202
        await wait_states(gw.gateway.ledger, message_id, {"customs": "DELIVERED"})
        assert agency.delivered_keys() == [f"{message_id}:customs"]
    finally:
        await proxy.cut()


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.rabbitmq
async def test_worker_killed_mid_delivery_delivers_after_restart(
    make_gateway: Callable[..., Any],
    rabbit: Rabbit,
    agencies: Callable[..., Any],
    signed: Callable[..., bytes],
    pki_dir: Path,
    tmp_path: Path,
) -> None:
    agency = await agencies("customs", answers=["hang"])
    gw = await start(make_gateway, rabbit, {"customs": agency}, worker=False)
    routing_file = write_routing(tmp_path / "routing.yaml", {"customs": agency})
    args = nswgw("worker", "--certs", pki_dir, "--data", gw.settings.data_dir, "--routing", routing_file)
    env = child_env(**rabbit.env())
    first = _spawn(args, env, tmp_path / "worker1.log")
    try:
        message_id = await send(gw, signed("licence.import"))
        await agency.wait_until(lambda: agency.hanging == 1)  # the worker is mid-delivery ...
        _kill(first)  # ... and dies without acking
        agency.release()
        second = _spawn(args, env, tmp_path / "worker2.log")
        try:
            await agency.wait_until(lambda: f"{message_id}:customs" in agency.delivered_keys())
            await wait_states(gw.gateway.ledger, message_id, {"customs": "DELIVERED"})
        finally:
            _kill(second)
    finally:
        _kill(first)
    assert {r.key for r in agency.requests} == {f"{message_id}:customs"}


async def test_embedded_process_killed_between_enqueue_and_ack_comes_back_after_the_lease(
    agencies: Callable[..., Any],
    signed: Callable[..., bytes],
    pki_dir: Path,
    tmp_path: Path,
) -> None:
    agency = await agencies("customs", answers=["hang"])
    routing_file = write_routing(tmp_path / "routing.yaml", {"customs": agency})
    data = tmp_path / "var"
    env = child_env(NSW_LEASE_SECONDS="2", NSW_RATE_PER_PARTY="100000", NSW_RATE_BURST="100000")

    def run(port: int, log: str) -> subprocess.Popen[bytes]:
        return _spawn(
            nswgw("run", "--certs", pki_dir, "--data", data, "--routing", routing_file, "--port", str(port)),
            env,
            tmp_path / log,
        )

    port = free_port()
    first = run(port, "run1.log")
    try:
        url = f"http://127.0.0.1:{port}/v1/messages"
        async with httpx.AsyncClient() as client:
            async with asyncio.timeout(WAIT):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        response = await client.post(
                            url, content=signed("licence.import"), headers={"Content-Type": "application/xml"}
                        )
                        break
                    await asyncio.sleep(0.2)
        assert response.status_code == 202, response.text[:400]
        message_id = response.headers["X-NSW-Message-Id"]
        await agency.wait_until(lambda: agency.hanging == 1)
        _kill(first)  # the whole process: ingress and worker, with the delivery leased and not acked
        agency.release()
        second = run(free_port(), "run2.log")
        try:
            await agency.wait_until(lambda: f"{message_id}:customs" in agency.delivered_keys())
        finally:
            _kill(second)
    finally:
        _kill(first)
    assert {r.key for r in agency.requests} == {f"{message_id}:customs"}
