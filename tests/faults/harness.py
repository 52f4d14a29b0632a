"""Fault-injection harness: gateway processes as subprocesses, a sustained load from the test process,
and the bookkeeping that proves "every 202 was delivered to every routed agency, none lost".

The load is open-ended: it keeps posting freshly signed messages (each its own messageId) until told
to stop, and records only the ids that got a 202. Refusals (503) and dropped connections while a
process is dead are expected and are not accepted messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from gateway.config import Settings
from gateway.partners import PartnerRegistry, peer_destinations
from tests.e2e.conftest import child_env, nswgw
from tests.support.agency import WAIT, Agency
from tests.support.http import until_ok

LONG = os.environ.get("NSW_FAULTS_LONG") == "1"  # the long form: more load and more rounds
GATEWAY_ENV = {"NSW_RATE_PER_PARTY": "1000000", "NSW_RATE_BURST": "1000000", "NSW_LEASE_SECONDS": "2"}


def peer_queues_of(pki_dir: Path) -> list[str]:
    """The ``asw:<country>`` destinations every gateway process declares (their queues must be deleted too)."""
    return sorted(peer_destinations(PartnerRegistry.load(Settings(certs_dir=pki_dir).partners_path)))


class Process:
    """One ``nswgw`` subprocess, SIGKILLed (never left running) by ``kill``."""

    def __init__(self, args: Sequence[str | Path], env: dict[str, str], log: Path) -> None:
        self.args = nswgw(*args)
        self.env = child_env(**GATEWAY_ENV, **env)
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        self.popen = None

    def restart(self) -> None:
        self.kill()
        self.start()


async def wait_ready(port: int) -> None:
    await until_ok(f"http://127.0.0.1:{port}/readyz")


@dataclass
class Load:
    """Posts ``make()`` bodies to the ingress with ``concurrency`` senders until ``stop()``."""

    port: int
    make: Callable[[], bytes]
    concurrency: int = 4
    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    async def _sender(self, session: aiohttp.ClientSession) -> None:
        url = f"http://127.0.0.1:{self.port}/v1/messages"
        while not self._stop.is_set():
            try:
                async with session.post(url, data=self.make(), headers={"Content-Type": "application/xml"}) as r:
                    await r.read()
                    if r.status == 202:
                        self.accepted.append(r.headers["X-NSW-Message-Id"])
                        self._progress.set()
                        continue
                    assert r.status == 503, f"unexpected refusal {r.status}: {(await r.read())[:300]!r}"
                    self.refused += 1
            except (TimeoutError, aiohttp.ClientError):
                self.refused += 1  # the ingress is down: the sender backs off and retries
            await asyncio.sleep(0.05)

    async def start(self) -> Load:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._tasks = [asyncio.create_task(self._sender(self._session)) for _ in range(self.concurrency)]
        return self

    async def accepted_at_least(self, count: int) -> None:
        """Wait until ``count`` more messages than now have been accepted (the load is flowing)."""
        target = len(self.accepted) + count
        async with asyncio.timeout(WAIT):
            while len(self.accepted) < target:
                self._progress.clear()
                await self._progress.wait()

    async def stop(self) -> list[str]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()
        return list(self.accepted)


@dataclass(frozen=True)
class Tally:
    accepted: int
    delivered: int
    duplicates: int
    lost: int

    def line(self, label: str) -> str:
        return (
            f"[faults:{label}] accepted={self.accepted} delivered={self.delivered} "
            f"duplicates={self.duplicates} lost={self.lost}"
        )


def tally(accepted: Sequence[str], agencies: dict[str, Agency]) -> Tally:
    """Per (message, agency): delivered at least once, or lost; extra 2xx deliveries are duplicates."""
    expected = {f"{mid}:{name}" for mid in accepted for name in agencies}
    got = [key for agency in agencies.values() for key in agency.delivered_keys()]
    unique = set(got)
    return Tally(len(accepted), len(unique & expected), len(got) - len(unique), len(expected - unique))


async def wait_all_delivered(accepted: Sequence[str], agencies: dict[str, Agency]) -> None:
    for name, agency in agencies.items():
        keys = {f"{mid}:{name}" for mid in accepted}
        with contextlib.suppress(TimeoutError):  # what is still missing then is reported as lost
            await agency.wait_until(lambda a=agency, k=keys: k <= set(a.delivered_keys()))


def check_keys(sent: set[str], agencies: dict[str, Agency]) -> None:
    """Every request an agency saw carries ``<messageId>:<agency>`` for a message the load sent."""
    for name, agency in agencies.items():
        for request in agency.requests:
            mid, _, dest = request.key.rpartition(":")
            assert dest == name, f"{name} got another destination's Idempotency-Key {request.key!r}"
            assert mid in sent, f"{name} got an Idempotency-Key for a message never sent: {request.key!r}"
