"""The floors that are servers of their own (``bench/servers.py``): the no-op aiohttp handler and the
naive pipeline, in one process or in N sharing the port, driven by the load generator at saturation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import floors
from bench import messages as msgs
from bench.gateway_runs import AMQP_URL
from bench.procs import Child, child_env, free_port, loadgen


@dataclass(frozen=True)
class FloorServers:
    url: str
    queue: str  # the naive pipeline's quorum queue (declared, deleted afterwards)
    servers: list[Child]

    def peak_rss_kb(self) -> list[int | None]:
        return [server.peak_rss_kb() for server in self.servers]


@asynccontextmanager
async def floor_servers(kind: str, pki_dir: Path, work: Path, *, copies: int = 1) -> AsyncIterator[FloorServers]:
    """``kind`` ("noop" or "naive") in ``copies`` processes sharing one port, listening; killed afterwards."""
    port = free_port()
    queue = f"nswbench-naive-{uuid.uuid4().hex[:8]}"
    args = ["-m", "bench.servers", kind, "--port", str(port), "--certs", str(pki_dir), "--queue", queue]
    if copies > 1:
        args.append("--reuse-port")
    if kind == "naive":
        await floors.declare_quorum(AMQP_URL, queue)
    servers = [Child(f"floor-{kind}-{n}", args, child_env(), work) for n in range(copies)]
    try:
        for server in servers:
            await asyncio.to_thread(server.wait_port, port)
        yield FloorServers(f"http://127.0.0.1:{port}/v1/messages", queue, servers)
    finally:
        for server in servers:
            server.kill()
        if kind == "naive":
            await floors.declare_quorum(AMQP_URL, queue, delete=True)


async def saturate(url: str, bodies: list[bytes], work: Path, duration: float, name: str) -> dict[str, Any]:
    """The load generator at saturation (64 in flight) against ``url`` for ``duration`` seconds."""
    stem = f"{name}-{uuid.uuid4().hex[:6]}"
    batch = msgs.save(bodies, work / f"{stem}.pickle")
    try:
        result = await loadgen([url], batch, work / f"{stem}.json", concurrency=64, duration=duration)
    finally:
        batch.unlink()
    result.pop("accepted_ids")
    return result


async def http_floor(
    kind: str, pki_dir: Path, work: Path, bodies: list[bytes], duration: float, *, copies: int = 1
) -> dict[str, Any]:
    """The no-op aiohttp server, or the naive pipeline in ``copies`` processes sharing the port, at saturation."""
    async with floor_servers(kind, pki_dir, work, copies=copies) as floor:
        result = await saturate(floor.url, bodies, work, duration, kind)
        result["peak_rss_kb"] = floor.peak_rss_kb()
        return result
