"""The load generator: a separate process from everything it measures.

``python -m bench.loadgen --urls U1,U2 --messages FILE --concurrency C [--rate R] --duration S --out JSON``

Posts each pre-signed message at most once (bounded in count) until ``--duration`` (bounded in
time); closed loop at ``--concurrency`` when no ``--rate``, else open loop at ``--rate`` per second
(still at most ``--concurrency`` in flight). Writes counts, wall time and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.messages import load


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run(
    urls: list[str], messages: list[bytes], concurrency: int, rate: float | None, duration: float
) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    accepted_ids: list[str] = []
    pending = iter(messages)
    targets = itertools.cycle(urls)
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def post(body: bytes) -> None:
            start = time.perf_counter()
            try:
                async with session.post(next(targets), data=body, headers={"Content-Type": "application/xml"}) as r:
                    await r.read()
                    key = str(r.status)
                    if r.status == 202:
                        latencies.append(time.perf_counter() - start)
                        accepted_ids.append(r.headers.get("X-NSW-Message-Id", ""))
            except (TimeoutError, aiohttp.ClientError) as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1
            limit.release()

        started = time.perf_counter()
        deadline = started + duration
        tasks: set[asyncio.Task[None]] = set()
        for sent, body in enumerate(pending):
            if rate is not None:  # open loop: the schedule does not wait for slow answers
                delay = started + sent / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if time.perf_counter() >= deadline:
                break
            await limit.acquire()
            task = asyncio.create_task(post(body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    accepted = statuses.get("202", 0)
    return {
        "sent": sum(statuses.values()),
        "statuses": statuses,
        "accepted": accepted,
        "elapsed_s": elapsed,
        "accepted_per_s": accepted / elapsed if elapsed else 0.0,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "accepted_ids": accepted_ids,
        "loadgen_peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--urls", required=True, help="comma-separated loopback URLs (round robin)")
    parser.add_argument("--messages", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    urls = args.urls.split(",")
    if not all(u.startswith(("http://127.0.0.1:", "http://localhost:")) for u in urls):
        parser.error("loopback URLs only")
    result = asyncio.run(run(urls, load(args.messages), args.concurrency, args.rate, args.duration))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
