"""``python -m bench.worker_cpu [--backend rabbitmq|embedded] [--messages N]``: the delivery worker alone, in process.

N pre-signed 5 KB messages are accepted first (``Pipeline.submit``, not measured); then the gateway's
``Worker`` (prefetch 64) delivers them through the http adapter to an agency in a process of its own
(``bench.servers noop``, which answers 202), against a real backend and a real SQLite ledger. The CPU
(user, sys) of this process per delivery, and the context switches of each of its threads, are measured
from the 50th delivery to the last. Like ``bench.ingress_cpu`` for the ingress, it isolates the worker
from the rest of the machine, which makes it the measurement for comparing two versions of the worker
code (run them alternately: this VM's speed drifts between minutes). The naive delivery floor in the
table of ``python -m bench`` is the same work without the ledger, audit and metrics.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bench import messages as msgs
from bench.gateway_runs import DESTINATION
from bench.ingress_cpu import Meter, command, in_process_run, in_process_settings, submitter
from bench.procs import Child, child_env, free_port
from gateway.config import Settings
from gateway.runtime import Gateway

WARM = 50  # deliveries before the meter starts
DELIVERED = "nsw_messages_delivered_total"


def delivered(gateway: Gateway) -> int:
    """The gateway's delivered counter for the bench destination. Read from that one metric: polled
    every 5 ms inside the measured process, the registry-wide ``get_sample_value`` (which collects every
    metric) took ~3% of the samples of a profile, CPU the meter counted as the worker's."""
    for metric in gateway.metrics.delivered.collect():
        for sample in metric.samples:
            if sample.name == DELIVERED and sample.labels.get("destination") == DESTINATION:
                return int(sample.value)
    return 0


async def until_delivered(gateway: Gateway, count: int, within: float = 300.0) -> None:
    async with asyncio.timeout(within):
        while delivered(gateway) < count:  # noqa: ASYNC110 -- a registry value: nothing to wait on
            await asyncio.sleep(0.005)


async def measure(settings: Settings, bodies: list[bytes]) -> dict[str, Any]:
    gateway = await Gateway.open(settings)
    try:
        await asyncio.gather(*map(submitter(gateway), bodies))
        await gateway.start_worker([DESTINATION])
        await until_delivered(gateway, WARM)
        first = delivered(gateway)
        meter = Meter()
        meter.start()
        await until_delivered(gateway, len(bodies))
        return meter.stop(len(bodies) - first)
    finally:
        await gateway.close()


async def run(backend: str, count: int, work: Path) -> dict[str, Any]:
    port = free_port()
    agency = Child("agency", ["-m", "bench.servers", "noop", "--port", str(port)], child_env(), work)
    try:
        await asyncio.to_thread(agency.wait_port, port)
        settings = in_process_settings(backend, work, f"http://127.0.0.1:{port}/v1/messages")
        bodies = msgs.signed_messages(work / "certs", 5_000, count + WARM)
        async with in_process_run(settings, work):
            return await measure(settings, bodies)
    finally:
        agency.kill()


def main() -> None:
    command("python -m bench.worker_cpu", __doc__, run, "delivered")


if __name__ == "__main__":
    main()
