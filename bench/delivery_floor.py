"""The delivery floor: ``bench.servers deliver`` processes draining a pre-filled quorum queue into the
loopback agency. It is to `nswgw worker` what the naive pipeline is to `nswgw serve`: the same broker,
queue type, prefetch, HTTP client and agency, without the ledger, audit, metrics and retry policy.

The queue is filled (confirmed, before the clock starts) with ``count`` copies of one signed message,
each with its own messageId, which the floor sends as the Idempotency-Key. Clock and CPU meter start at
the first delivery, as for `nswgw worker` (``Deployment.drain``), so start-up is not counted.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import aio_pika

from bench.agency import CountingAgency
from bench.floors import declare_quorum, publish_confirmed
from bench.gateway_runs import first_delivery
from bench.procs import Child, CpuMeter, broker_pid, child_env

WINDOW = 256  # publishes in flight while filling the queue


async def naive_delivery(
    amqp_url: str, work: Path, body: bytes, count: int, *, copies: int, within: float = 300.0
) -> dict[str, Any]:
    """Delivered/s and CPU per delivery of ``copies`` floor processes draining ``count`` messages."""
    queue = f"nswbench-deliver-{uuid.uuid4().hex[:8]}"
    keys = [f"floor-{uuid.uuid4().hex}" for _ in range(count)]
    agency = await CountingAgency().start()
    consumers: list[Child] = []
    await declare_quorum(amqp_url, queue)
    try:
        connection = await aio_pika.connect(amqp_url)
        try:
            exchange = (await connection.channel(publisher_confirms=True)).default_exchange
            await publish_confirmed(exchange, queue, body, keys, WINDOW)
        finally:
            await connection.close()
        args = ["-m", "bench.servers", "deliver", "--amqp-url", amqp_url, "--queue", queue, "--agency", agency.url]
        consumers = [Child(f"floor-deliver-{n}", args, child_env(), work) for n in range(copies)]
        await first_delivery(agency, consumers, within)
        meter = CpuMeter([c.pid for c in consumers], broker_pid())
        meter.start()
        before = len(agency.first_seen)
        complete = await agency.wait_for(set(keys), within)
        seen = sorted(agency.first_seen.values())
        return {
            "delivered": len(seen),
            "all_delivered": complete,
            "delivered_per_s": (len(seen) - 1) / (seen[-1] - seen[0]) if len(seen) > 1 else 0.0,
            "cpu": meter.stop(len(seen) - before),
            "peak_rss_kb": [c.peak_rss_kb() for c in consumers],
        }
    finally:
        for consumer in consumers:
            consumer.kill()
        await agency.stop()
        await declare_quorum(amqp_url, queue, delete=True)
