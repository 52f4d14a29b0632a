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


async def measure(settings: Settings, bodies: list[bytes]) -> dict[str, Any]:
    gateway = await Gateway.open(settings)
    try:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def submit(body: bytes) -> None:
            async with gate:
                result = await gateway.pipeline.submit(body)
            if result.status != 202:
                raise RuntimeError(f"not accepted: {result.status} {result.code}")

        warm, timed = bodies[:50], bodies[50:]
        await asyncio.gather(*map(submit, warm))
        switches, before = thread_switches(), resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        await asyncio.gather(*map(submit, timed))
        elapsed = time.perf_counter() - started
        after, switched = resource.getrusage(resource.RUSAGE_SELF), thread_switches()
        n = len(timed)
        return {
            "accepted_per_s": n / elapsed,
            "user_ms": 1000 * (after.ru_utime - before.ru_utime) / n,
            "sys_ms": 1000 * (after.ru_stime - before.ru_stime) / n,
            "switches_per_message": {
                tid: ((v - switches.get(tid, (0, 0))[0]) / n, (i - switches.get(tid, (0, 0))[1]) / n)
                for tid, (v, i) in switched.items()
            },
        }
    finally:
        await gateway.close()


async def run(backend: str, count: int, work: Path) -> dict[str, Any]:
    init_dev_pki(work / "certs")
    routing = {
        "version": 1,
        "destinations": {DESTINATION: {"adapter": "http", "url": "http://127.0.0.1:9/unused"}},
        "rules": [{"name": "bench", "when": {"documentType": [msgs.DOCUMENT_TYPE]}, "to": [DESTINATION]}],
    }
    (work / "routing.yaml").write_text(yaml.safe_dump(routing))
    settings = Settings(
        certs_dir=work / "certs",
        data_dir=work / "var",
        routing_file=work / "routing.yaml",
        rate_per_party=1e9,
        rate_burst=1e9,
    )
    if backend == "rabbitmq":
        settings = replace(
            settings, amqp_url=AMQP_URL, queue_prefix=f"nswbench-{uuid.uuid4().hex[:8]}", retry_tiers=(1.0,)
        )
    bodies = msgs.signed_messages(work / "certs", 5_000, count + 50)
    logging_before = structlog.get_config()
    with (work / "gateway.log").open("a") as log:
        configure_logging("json", "info", stream=log)  # as `nswgw run` logs by default, to a file
        try:
            return await measure(settings, bodies)
        finally:
            structlog.configure(**logging_before)  # the file closes here: no logger may keep it
            if backend == "rabbitmq":
                await delete_queues(settings.certs_dir, settings.queue_prefix, settings.retry_tiers)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingress_cpu", description=__doc__)
    parser.add_argument("--backend", choices=["rabbitmq", "embedded"], default="rabbitmq")
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nsw-ingress-cpu-") as folder:
        result = asyncio.run(run(args.backend, args.messages, Path(folder)))
    print(
        f"{args.backend}: {result['accepted_per_s']:,.0f} accepted/s in process; CPU per message "
        f"user {result['user_ms']:.2f} ms + sys {result['sys_ms']:.2f} ms"
    )
    for name, (voluntary, involuntary) in sorted(result["switches_per_message"].items()):
        print(f"  {name}: {voluntary:.2f} voluntary, {involuntary:.2f} involuntary context switches per message")


if __name__ == "__main__":
    main()
