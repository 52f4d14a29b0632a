"""The gateway itself, as ``nswgw`` subprocesses fed by the separate load generator process.

Per backend and message size: accepted/s at saturation, p50/p99 of the 202 at a fixed offered load,
delivered/s to a loopback agency, and each gateway process's peak RSS. Then one 20 MB message.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench import messages as msgs
from bench.agency import CountingAgency
from bench.procs import Child, CpuMeter, broker_pid, child_env, free_port, loadgen, vm_hwm_kb
from gateway.brokers import names
from gateway.config import Settings
from gateway.partners import PartnerRegistry, peer_destinations
from gateway.pipeline import INGRESS_STAGES

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
TIERS = (1.0, 5.0)
DESTINATION = "agency"


@dataclass
class Plan:
    duration: float  # seconds per load phase
    offered_rate: float = 500.0
    # lower offered loads, 5 KB only: up to which load the latency stays low (below saturation)
    curve_rates: tuple[float, ...] = (100.0, 250.0)
    sizes: tuple[int, ...] = (5_000, 100_000)
    large_size: int = 20_000_000
    processes: int = 2  # `nswgw run --processes N`: N copies sharing the port (one per core)
    cap_per_s: dict[int, float] = field(default_factory=lambda: {5_000: 1500.0, 100_000: 300.0})


def routing(agency: CountingAgency) -> dict[str, Any]:
    return {
        "version": 1,
        "destinations": {DESTINATION: {"adapter": "http", "url": agency.url, "timeout": 60, "max_in_flight": 64}},
        "rules": [
            {"name": "bench", "when": {"documentType": [msgs.DOCUMENT_TYPE, msgs.ATTACHMENT_TYPE]}, "to": [DESTINATION]}
        ],
    }


class Deployment:
    """One gateway deployment (processes, data folder, queues) for one measurement, torn down after."""

    def __init__(
        self, pki_dir: Path, work: Path, backend: str, processes: int, max_body: int, *, command: str = "run"
    ) -> None:
        self.pki_dir, self.backend, self.command = pki_dir, backend, command
        self.dir = work / f"{backend}-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir(parents=True)
        self.prefix = f"nswbench-{uuid.uuid4().hex[:8]}"
        self.processes = processes
        env = {"NSW_RATE_PER_PARTY": "1000000", "NSW_RATE_BURST": "1000000", "NSW_PREFETCH": "64"}
        env["NSW_MAX_BODY_BYTES"] = str(max_body)
        env |= {k: v for k, v in os.environ.items() if k.startswith("BENCHENV_")}
        if backend == "rabbitmq":
            env |= {"NSW_AMQP_URL": AMQP_URL, "NSW_QUEUE_PREFIX": self.prefix}
            env["NSW_RETRY_TIERS"] = ",".join(map(str, TIERS))
        self.env = child_env(env)
        self.gateway: Child | None = None
        self.workers: Child | None = None  # `nswgw worker`, started by ``drain`` after a `serve` deployment
        self.port = 0
        self.agency = CountingAgency()

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port}/v1/messages"]

    async def start(self) -> Deployment:
        """Start everything; if any part fails, tear down what did start (processes, queues) first."""
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> Deployment:
        await self.agency.start()
        (self.dir / "routing.yaml").write_text(yaml.safe_dump(routing(self.agency)))
        self.port = free_port()
        self.gateway = Child(self.command, self._args(self.command, "--port", str(self.port)), self.env, self.dir)
        await asyncio.to_thread(self.gateway.wait_port, self.port)
        # with a supervisor, the port answers once the first child listens: wait for all of them
        await asyncio.to_thread(self.gateway.wait_children, self.processes if self.processes > 1 else 0)
        return self

    def _args(self, command: str, *more: str) -> list[str]:
        args = ["-m", "gateway", command, "--certs", str(self.pki_dir), "--data", str(self.dir / "var")]
        return [*args, "--routing", str(self.dir / "routing.yaml"), "--processes", str(self.processes), *more]

    def peak_rss_kb(self) -> dict[str, int | None]:
        """Every gateway process: the children of a supervisor (run0, run1, ...) or the one ``run``."""
        assert self.gateway is not None
        return _peak_rss(self.gateway)

    async def stop(self) -> None:
        for child in (self.gateway, self.workers):
            if child is not None:
                child.kill()
        await self.agency.stop()
        if self.backend == "rabbitmq":
            await delete_queues(self.pki_dir, self.prefix, TIERS)

    async def drive(
        self,
        bodies: list[bytes],
        *,
        concurrency: int,
        duration: float,
        rate: float | None = None,
        drain: float = 120.0,
        deliver: bool = True,
    ) -> dict[str, Any]:
        """One load phase and its delivery: the loadgen's result plus delivered/s and drain time.

        ``deliver=False`` (a `serve` deployment: nothing consumes yet): the load phase only, its CPU
        measured to its end, and the accepted delivery keys in ``result["keys"]`` for ``drain``."""
        batch = msgs.save(bodies, self.dir / f"messages-{uuid.uuid4().hex[:6]}.pickle")
        assert self.gateway is not None
        meter = CpuMeter(
            [self.gateway.pid, *self.gateway.children()], broker_pid() if self.backend == "rabbitmq" else None
        )
        stages_before = await self.stage_histograms()
        meter.start()
        started = time.perf_counter()
        result = await loadgen(
            self.urls,
            batch,
            self.dir / f"load-{uuid.uuid4().hex[:6]}.json",
            concurrency=concurrency,
            duration=duration,
            rate=rate,
        )
        batch.unlink()
        result["stages"] = stage_summary(stages_before, await self.stage_histograms())
        keys = {f"{mid}:{DESTINATION}" for mid in result.pop("accepted_ids")}
        if not deliver:
            return result | {"keys": keys, "cpu": meter.stop(len(keys))}
        complete = await self.agency.wait_for(keys, drain)
        cpu = meter.stop(len(keys))
        seen = [self.agency.first_seen[k] for k in keys if k in self.agency.first_seen]
        last = max(seen, default=started)
        result |= {
            "delivered": len(seen),
            "all_delivered": complete,
            "delivered_per_s": len(seen) / (last - started) if seen else 0.0,
            "drain_s": max(0.0, last - started - result["elapsed_s"]),
            "cpu": cpu,  # from the start of the load to the last delivery
        }
        return result

    async def stage_histograms(self) -> dict[str, dict[str, float]]:
        """``nsw_ingress_stage_seconds`` from the gateway's /metrics: stage -> {"count", "sum", "le=<bound>"...}."""
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{self.port}/metrics") as answer:
            text = await answer.text()
        out: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "nsw_ingress_stage_seconds":
                continue
            for sample in family.samples:
                series = out.setdefault(sample.labels["stage"], {})
                kind = sample.name.rsplit("_", 1)[1]  # bucket, count, sum
                series[f"le={sample.labels['le']}" if kind == "bucket" else kind] = sample.value
        return out

    async def drain(self, keys: set[str], within: float = 300.0) -> dict[str, Any]:
        """Start `nswgw worker` on what a `serve` deployment accepted; delivered/s and CPU per delivery.

        Clock and CPU meter start at the first delivery, so the workers' start-up is not counted."""
        self.workers = Child("worker", self._args("worker"), self.env, self.dir)
        await first_delivery(self.agency, [self.workers], within)
        meter = CpuMeter(
            [self.workers.pid, *self.workers.children()], broker_pid() if self.backend == "rabbitmq" else None
        )
        meter.start()
        before = len(self.agency.first_seen)
        complete = await self.agency.wait_for(keys, within)
        seen = [self.agency.first_seen[k] for k in keys if k in self.agency.first_seen]
        counted = len(self.agency.first_seen) - before  # the meter's deliveries: those after it started
        # The rate runs from the first delivery's own time stamp: a fast drain may be over before this
        # task notices the first one.
        first, last = min(seen, default=0.0), max(seen, default=0.0)
        return {
            "delivered": len(seen),
            "all_delivered": complete,
            "delivered_per_s": (len(seen) - 1) / (last - first) if last > first else 0.0,
            "cpu": meter.stop(counted),
            "peak_rss_kb": _peak_rss(self.workers),
        }


async def first_delivery(agency: CountingAgency, consumers: Sequence[Child], within: float) -> None:
    """Until the agency has seen a delivery; fails at once if a consumer process exits meanwhile."""
    async with asyncio.timeout(within):
        while not agency.first_seen:
            for consumer in consumers:
                if consumer.popen.poll() is not None:
                    raise RuntimeError(f"{consumer.name} exited with {consumer.popen.returncode} (see its log)")
            await asyncio.sleep(0.005)


async def delete_queues(pki_dir: Path, prefix: str, tiers: tuple[float, ...]) -> None:
    """Every queue a deployment with ``prefix`` declared: the agency's and the ``asw:<peer>`` ones."""
    partners = PartnerRegistry.load(Settings(certs_dir=pki_dir).partners_path)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for destination in [DESTINATION, *sorted(peer_destinations(partners))]:
            for queue, _arguments in names.queue_plan(destination, tiers, prefix=prefix):
                await channel.queue_delete(queue)
    finally:
        await connection.close()


def stage_summary(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float | None]]:
    """Per ingress stage over one phase: mean ms, and the histogram bucket bound that 99% stayed under."""
    out: dict[str, dict[str, float | None]] = {}
    for stage in INGRESS_STAGES:
        now, then = after.get(stage, {}), before.get(stage, {})
        count = now.get("count", 0.0) - then.get("count", 0.0)
        if count <= 0:
            continue
        bounds = sorted((float(key[3:]), now[key] - then.get(key, 0.0)) for key in now if key.startswith("le="))
        p99 = next((bound for bound, seen in bounds if seen >= 0.99 * count), None)
        mean = (now.get("sum", 0.0) - then.get("sum", 0.0)) / count
        out[stage] = {"mean_ms": 1000 * mean, "p99_under_ms": None if p99 is None else 1000 * p99}
    return out


def _peak_rss(child: Child) -> dict[str, int | None]:
    """Every process of one command: a supervisor's children (name0, name1, ...) or the one process."""
    children = child.children()
    if not children:
        return {child.name: child.peak_rss_kb()}
    return {f"{child.name}{n}": vm_hwm_kb(pid) for n, pid in enumerate(children)}


@dataclass(frozen=True)
class Pools:
    """Signed messages for one size. Every deployment has its own ledger and queues, so the same pools
    serve both backends; within a deployment each messageId is sent once."""

    warm_up: list[bytes]
    saturation: list[bytes]
    fixed_rate: list[bytes]
    curve: dict[float, list[bytes]]  # offered rate -> its messages (the smallest size only)

    @classmethod
    def sign(cls, pki_dir: Path, size: int, plan: Plan) -> Pools:
        rates = plan.curve_rates if size == min(plan.sizes) else ()
        counts = [20, int(plan.cap_per_s[size] * plan.duration)]
        counts += [int(rate * plan.duration) for rate in (plan.offered_rate, *rates)]
        every = msgs.signed_messages(pki_dir, size, sum(counts))
        ends = list(itertools.accumulate(counts))
        warm_up, saturation, fixed_rate, *curve = (every[end - n : end] for n, end in zip(counts, ends, strict=True))
        return cls(warm_up, saturation, fixed_rate, dict(zip(rates, curve, strict=True)))


async def measure(pki_dir: Path, work: Path, backend: str, pools: Pools, plan: Plan) -> dict[str, Any]:
    deployment = await Deployment(pki_dir, work, backend, plan.processes, 64 * 1024 * 1024).start()
    try:
        await deployment.drive(pools.warm_up, concurrency=4, duration=30)
        saturation = await deployment.drive(pools.saturation, concurrency=64, duration=plan.duration)
        fixed = await deployment.drive(
            pools.fixed_rate,
            concurrency=64,  # in flight at most; a saturated gateway then sees fewer than offered (printed)
            duration=plan.duration,
            rate=plan.offered_rate,
        )
        curve = {
            str(rate): await deployment.drive(bodies, concurrency=64, duration=plan.duration, rate=rate)
            for rate, bodies in pools.curve.items()
        }
        return {
            "saturation": saturation,
            "fixed_rate": fixed,
            "curve": curve,
            "peak_rss_kb": deployment.peak_rss_kb(),
        }
    finally:
        await deployment.stop()


async def measure_split(pki_dir: Path, work: Path, backend: str, pools: Pools, plan: Plan) -> dict[str, Any]:
    """Ingress and delivery each alone on the machine: `nswgw serve` at saturation with nothing consuming,
    then `nswgw worker` draining what it accepted. ``serve`` does every ingress stage ``run`` does
    (receipt, audit, status) and is what compares like for like with the naive pipeline, which delivers
    nothing; in production the two may run on different hosts (DESIGN.md, brokers)."""
    deployment = await Deployment(pki_dir, work, backend, plan.processes, 64 * 1024 * 1024, command="serve").start()
    try:
        warm = await deployment.drive(pools.warm_up, concurrency=4, duration=30, deliver=False)
        ingress = await deployment.drive(pools.saturation, concurrency=64, duration=plan.duration, deliver=False)
        ingress |= {"peak_rss_kb": deployment.peak_rss_kb(), "delivered_meanwhile": deployment.agency.requests}
        delivery = await deployment.drain(warm.pop("keys") | ingress.pop("keys"))
        return {"ingress": ingress, "delivery": delivery}
    finally:
        await deployment.stop()


async def large(pki_dir: Path, work: Path, backend: str, size: int, *, processes: int, kind: str) -> dict[str, Any]:
    """One ~``size`` signed message: accepted, delivered, and the peak RSS growth of each process.

    ``kind``: "lines" (a licence grown with ~70,000 goods lines: the most elements, the biggest trees) or
    "attachment" (an ePhyto carrying one big base64 attachment)."""
    if kind == "attachment":
        body = msgs.signed_certificate_with_attachment(pki_dir, size)
    else:
        body = msgs.signed_messages(pki_dir, size, 1)[0]
    deployment = await Deployment(pki_dir, work, backend, processes, len(body) + 1024 * 1024).start()
    try:
        await deployment.drive(msgs.signed_messages(pki_dir, 5_000, 5), concurrency=1, duration=30)
        before = deployment.peak_rss_kb()
        result = await deployment.drive([body], concurrency=1, duration=300, drain=300)
        after = deployment.peak_rss_kb()
        growth = {k: (after[k] or 0) - (before[k] or 0) for k in after}
        return {
            "kind": kind,
            "bytes": len(body),
            "accepted": result["accepted"] == 1,
            "delivered": result["all_delivered"] and result["delivered"] == 1,
            "accept_s": result["elapsed_s"],
            "deliver_s": result["elapsed_s"] + result["drain_s"],
            "peak_rss_kb_before": before,
            "peak_rss_kb_after": after,
            "peak_rss_growth_kb": growth,
        }
    finally:
        await deployment.stop()
