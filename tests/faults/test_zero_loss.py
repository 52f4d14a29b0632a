"""Zero loss under faults, against real ``nswgw`` subprocesses under sustained load.

Every messageId that got a 202 must reach each routed agency at least once; redeliveries carry the
same Idempotency-Key. Each test prints ``accepted / delivered / duplicates / lost`` and asserts
``lost == 0``. RabbitMQ tests run ingress (``nswgw serve``) and worker (``nswgw worker``) as separate
processes so each can be killed on its own, and ``nswgw run --processes 2`` with one child killed; the
embedded backend runs ``nswgw run`` and is killed whole.

    python -m pytest tests/faults -q -s                      # short form (part of the normal suite)
    NSW_FAULTS_LONG=1 python -m pytest tests/faults -q -s    # long form: 5 rounds of 40, and the broker restart
    python -m pytest tests/faults -q -s -m slow              # only the broker restart (stops the shared broker!)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.e2e.conftest import Rabbit, write_routing
from tests.faults.harness import LONG, Load, Process, check_keys, peer_queues_of, tally, wait_all_delivered, wait_ready
from tests.support.agency import WAIT, Agency
from tests.support.procs import child_pids

BURST = 40 if LONG else 15  # accepted messages between two faults
ROUNDS = 5 if LONG else 1


class Rig:
    """Agencies, a routing file, the gateway processes and the load, for one test."""

    def __init__(self, pki_dir: Path, tmp_path: Path, agencies: dict[str, Agency], env: dict[str, str]) -> None:
        self.pki_dir, self.tmp, self.agencies = pki_dir, tmp_path, agencies
        self.routing = write_routing(tmp_path / "routing.yaml", agencies)
        self.data = tmp_path / "var"
        self.env = env
        self.port = free_port()
        self.processes: list[Process] = []
        self.sent: set[str] = set()

    def process(self, command: str, log: str, *extra: str) -> Process:
        args: list[str | Path] = [
            command,
            "--certs",
            self.pki_dir,
            "--data",
            self.data,
            "--routing",
            self.routing,
            *extra,
        ]
        process = Process(args, self.env, self.tmp / log).start()
        self.processes.append(process)
        return process

    def ingress(self, command: str = "serve") -> Process:
        return self.process(command, f"{command}.log", "--port", str(self.port))

    def load(self, signed: Callable[..., bytes]) -> Load:
        def make() -> bytes:
            message_id = str(uuid.uuid4())
            self.sent.add(message_id)
            return signed("licence.import", message_id=message_id)

        return Load(self.port, make)

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill()


async def run_faults(rig: Rig, signed: Callable[..., bytes], label: str, fault: Callable[[], Awaitable[None]]) -> None:
    """Load, then ``ROUNDS`` x (fault while loaded), then drain and count."""
    await wait_ready(rig.port)
    load = await rig.load(signed).start()
    try:
        await load.accepted_at_least(BURST)
        for _ in range(ROUNDS):
            await fault()
            await load.accepted_at_least(BURST)  # the gateway is back and accepting
    finally:
        accepted = await load.stop()
    await wait_all_delivered(accepted, rig.agencies)
    result = tally(accepted, rig.agencies)
    print(result.line(label))
    check_keys(rig.sent, rig.agencies)
    assert set(accepted) <= rig.sent
    assert result.lost == 0, result.line(label)
    assert result.delivered == result.accepted * len(rig.agencies)


async def rabbit_rig(pki_dir: Path, tmp_path: Path, rabbit: Rabbit, agencies: Callable[..., Any]) -> Rig:
    found = {"customs": await agencies("customs"), "moit": await agencies("moit")}
    rabbit.destinations.extend([*found, *peer_queues_of(pki_dir)])
    return Rig(pki_dir, tmp_path, found, rabbit.env())


async def rabbitmqctl(*args: str) -> None:
    done = await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr


async def _close_connections() -> None:
    await rabbitmqctl("close_all_connections", "faults test: server closed the connection")


def _fault_cases(rig: Rig, worker: Process, ingress: Process) -> dict[str, Callable[[], Awaitable[None]]]:
    async def kill_worker() -> None:
        worker.restart()

    async def kill_ingress() -> None:
        ingress.restart()
        await wait_ready(rig.port)

    async def agency_down() -> None:
        customs = rig.agencies["customs"]
        customs.default = 503
        await customs.wait_until(lambda: sum(r.status == 503 for r in customs.requests) >= 3)
        customs.default = 200

    return {
        "worker-sigkill": kill_worker,
        "ingress-sigkill": kill_ingress,
        "rabbit-connections-closed": _close_connections,
        "agency-down": agency_down,
    }


@pytest.mark.rabbitmq
@pytest.mark.parametrize("case", ["worker-sigkill", "ingress-sigkill", "rabbit-connections-closed", "agency-down"])
async def test_rabbitmq_no_accepted_message_is_lost(
    case: str,
    pki_dir: Path,
    tmp_path: Path,
    rabbit: Rabbit,
    agencies: Callable[..., Any],
    signed: Callable[..., bytes],
) -> None:
    rig = await rabbit_rig(pki_dir, tmp_path, rabbit, agencies)
    try:
        ingress = rig.ingress("serve")
        worker = rig.process("worker", "worker.log")
        await run_faults(rig, signed, f"rabbitmq:{case}", _fault_cases(rig, worker, ingress)[case])
    finally:
        rig.kill_all()


@pytest.mark.rabbitmq
async def test_rabbitmq_every_fault_in_turn(
    pki_dir: Path, tmp_path: Path, rabbit: Rabbit, agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    rig = await rabbit_rig(pki_dir, tmp_path, rabbit, agencies)
    try:
        ingress = rig.ingress("serve")
        workers = [rig.process("worker", "worker1.log"), rig.process("worker", "worker2.log")]
        cases = _fault_cases(rig, workers[0], ingress)
        second_worker = _fault_cases(rig, workers[1], ingress)["worker-sigkill"]

        async def everything() -> None:
            for fault in (*cases.values(), second_worker):
                await fault()

        await run_faults(rig, signed, "rabbitmq:all", everything)
    finally:
        rig.kill_all()


@pytest.mark.rabbitmq
async def test_rabbitmq_sigkill_of_one_of_two_processes_loses_nothing(
    pki_dir: Path, tmp_path: Path, rabbit: Rabbit, agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    """``nswgw run --processes 2`` (the bench's deployment): one child SIGKILLed, the supervisor starts
    another, the other child keeps serving the shared port and the queues."""
    rig = await rabbit_rig(pki_dir, tmp_path, rabbit, agencies)
    try:
        supervisor = rig.process("run", "run.log", "--port", str(rig.port), "--processes", "2")
        assert supervisor.popen is not None
        pid = supervisor.popen.pid

        async def kill_one_child() -> None:
            async with asyncio.timeout(WAIT):
                while len(before := child_pids(pid)) < 2:  # noqa: ASYNC110 -- a process table has no event
                    await asyncio.sleep(0.1)
            os.kill(before[0], signal.SIGKILL)
            async with asyncio.timeout(WAIT):
                while before[0] in (now := child_pids(pid)) or len(now) < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)

        await run_faults(rig, signed, "rabbitmq:one-of-two-processes-sigkill", kill_one_child)
    finally:
        rig.kill_all()


async def test_embedded_whole_process_sigkill_loses_nothing(
    pki_dir: Path, tmp_path: Path, agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    found = {"customs": await agencies("customs"), "moit": await agencies("moit")}
    rig = Rig(pki_dir, tmp_path, found, {})
    try:
        process = rig.ingress("run")

        async def kill_process() -> None:
            process.restart()
            await wait_ready(rig.port)

        await run_faults(rig, signed, "embedded:process-sigkill", kill_process)
    finally:
        rig.kill_all()


@pytest.mark.slow
@pytest.mark.rabbitmq
async def test_rabbitmq_broker_restart_long_form(
    pki_dir: Path, tmp_path: Path, rabbit: Rabbit, agencies: Callable[..., Any], signed: Callable[..., bytes]
) -> None:
    """``rabbitmqctl stop_app`` / ``start_app``: disrupts every user of the broker, so on demand only."""
    rig = await rabbit_rig(pki_dir, tmp_path, rabbit, agencies)

    async def restart_broker() -> None:
        await rabbitmqctl("stop_app")
        try:
            await asyncio.sleep(2)  # the outage itself: the broker stays down for a while
        finally:
            await rabbitmqctl("start_app")
            await rabbitmqctl("await_startup")

    try:
        rig.ingress("serve")
        rig.process("worker", "worker.log")
        await run_faults(rig, signed, "rabbitmq:broker-restart", restart_broker)
    finally:
        rig.kill_all()
