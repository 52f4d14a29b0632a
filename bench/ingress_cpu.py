"""``python -m bench.ingress_cpu [--backend rabbitmq|embedded] [--messages N]``: the ingress alone, in process.

``Pipeline.submit`` on N pre-signed 5 KB messages at concurrency 64 against a real backend and a real
SQLite ledger, with no HTTP, no delivery and no other gateway process: CPU (user, sys) per accepted
message and the context switches of each thread of this process. It isolates the ingress code from
everything else on the machine, which makes it the measurement for comparing two versions of that code
(run them alternately: this VM's speed drifts by a third between minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
import yaml

from bench import messages as msgs
from bench.gateway_runs import AMQP_URL, DESTINATION, delete_queues
from gateway.config import Settings
from gateway.logs import configure_logging
from gateway.runtime import Gateway
from gateway.security.pki import init_dev_pki

CONCURRENCY = 64


def thread_switches() -> dict[str, tuple[int, int]]:
    """Voluntary and involuntary context switches so far, per thread of this process (by Python name)."""
    named = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for task in Path("/proc/self/task").iterdir():
        lines = (task / "status").read_text().splitlines()
        counts = [int(line.split()[1]) for line in lines if "ctxt_switches" in line]
        out[named.get(int(task.name), f"thread {task.name}")] = (counts[0], counts[1])
    return out


def submitter(gateway: Gateway) -> Callable[[bytes], Awaitable[None]]:
    """``Pipeline.submit`` with at most ``CONCURRENCY`` in flight; anything but a 202 is an error."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def submit(body: bytes) -> None:
        async with gate:
            result = await gateway.pipeline.submit(body)
        if result.status != 202:
            raise RuntimeError(f"not accepted: {result.status} {result.code}")

    return submit


class Meter:
    """This process's CPU and each thread's context switches from ``start`` to ``stop``, per item."""

    def start(self) -> None:
        self._switches, self._usage = thread_switches(), resource.getrusage(resource.RUSAGE_SELF)
        self._started = time.perf_counter()

    def stop(self, items: int) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._started
        usage, switched = resource.getrusage(resource.RUSAGE_SELF), thread_switches()
        before = self._switches
        return {
            "per_s": items / elapsed,
            "user_ms": 1000 * (usage.ru_utime - self._usage.ru_utime) / items,
            "sys_ms": 1000 * (usage.ru_stime - self._usage.ru_stime) / items,
            "switches": {
                name: ((v - before.get(name, (0, 0))[0]) / items, (i - before.get(name, (0, 0))[1]) / items)
                for name, (v, i) in switched.items()
            },
        }


async def measure(settings: Settings, bodies: list[bytes]) -> dict[str, Any]:
    gateway = await Gateway.open(settings)
    try:
        submit = submitter(gateway)
        warm, timed = bodies[:50], bodies[50:]
        await asyncio.gather(*map(submit, warm))
        meter = Meter()
        meter.start()
        await asyncio.gather(*map(submit, timed))
        return meter.stop(len(timed))
    finally:
        await gateway.close()


def in_process_settings(backend: str, work: Path, agency_url: str = "http://127.0.0.1:9/unused") -> Settings:
    """A dev PKI, and one destination (an http adapter to ``agency_url``) for every bench message."""
    init_dev_pki(work / "certs")
    routing = {
        "version": 1,
        "destinations": {DESTINATION: {"adapter": "http", "url": agency_url, "timeout": 60, "max_in_flight": 64}},
        "rules": [{"name": "bench", "when": {"documentType": [msgs.DOCUMENT_TYPE]}, "to": [DESTINATION]}],
    }
    (work / "routing.yaml").write_text(yaml.safe_dump(routing))
    settings = Settings(
        certs_dir=work / "certs",
        data_dir=work / "var",
        routing_file=work / "routing.yaml",
        rate_per_party=1e9,
        rate_burst=1e9,
        prefetch=CONCURRENCY,
    )
    if backend == "rabbitmq":
        settings = replace(
            settings, amqp_url=AMQP_URL, queue_prefix=f"nswbench-{uuid.uuid4().hex[:8]}", retry_tiers=(1.0,)
        )
    return settings


@asynccontextmanager
async def in_process_run(settings: Settings, work: Path) -> AsyncIterator[None]:
    """The surroundings of one in-process measurement: logs as `nswgw run` writes them by default (JSON,
    info) into a file; afterwards the logging configuration is restored and the RabbitMQ queues deleted."""
    logging_before = structlog.get_config()
    with (work / "gateway.log").open("a") as log:
        configure_logging("json", "info", stream=log)
        try:
            yield
        finally:
            structlog.configure(**logging_before)  # the file closes here: no logger may keep it
            if settings.amqp_url:
                await delete_queues(settings.certs_dir, settings.queue_prefix, settings.retry_tiers)


async def run(backend: str, count: int, work: Path) -> dict[str, Any]:
    settings = in_process_settings(backend, work)
    bodies = msgs.signed_messages(work / "certs", 5_000, count + 50)
    async with in_process_run(settings, work):
        return await measure(settings, bodies)


def command(
    prog: str, doc: str | None, run: Callable[[str, int, Path], Coroutine[Any, Any, dict[str, Any]]], done: str
) -> None:
    """The command line of an in-process meter (``--backend``, ``--messages``): prints the rate, named by
    ``done`` ("accepted", "delivered"), the CPU per message and each thread's context switches."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--backend", choices=["rabbitmq", "embedded"], default="rabbitmq")
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nsw-cpu-") as folder:
        result = asyncio.run(run(args.backend, args.messages, Path(folder)))
    print(
        f"{args.backend}: {result['per_s']:,.0f} {done}/s in process; CPU per message "
        f"user {result['user_ms']:.2f} ms + sys {result['sys_ms']:.2f} ms"
    )
    for name, (voluntary, involuntary) in sorted(result["switches"].items()):
        print(f"  {name}: {voluntary:.2f} voluntary, {involuntary:.2f} involuntary context switches per message")


def main() -> None:
    command("python -m bench.ingress_cpu", __doc__, run, "accepted")


if __name__ == "__main__":
    main()
