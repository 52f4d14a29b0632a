"""``python -m bench [--quick] [--skip-rabbitmq] [--processes N]``: floors, then the gateway, one table.

Writes bench/results/<UTC timestamp>.json (gitignored). Targets are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import floors
from bench.delivery_floor import naive_delivery
from bench.gateway_runs import AMQP_URL, Plan, Pools, large, measure, measure_split
from bench.http_floors import http_floor
from bench.paired import ROUNDS, paired
from bench.report import table
from gateway.security.pki import init_dev_pki

RESULTS = Path(__file__).resolve().parent / "results"
PAIRED_PHASE_S = 5.0  # the alternating measurement's phases (bench/paired.py), at most
DELIVERIES_PER_S = 3000  # the delivery floor's queue holds this many per second of a phase (it drains ~3,000/s)


def rabbit_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


def _phases(pools: Pools, rounds: int) -> list[list[bytes]]:
    """Every signed message of ``pools`` in ``rounds`` equal parts, for a deployment of its own."""
    every = [*pools.saturation, *pools.fixed_rate, *(m for bodies in pools.curve.values() for m in bodies)]
    part = len(every) // rounds
    return [every[i * part : (i + 1) * part] for i in range(rounds)]


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    plan = Plan(duration=1.5 if args.quick else 10.0, processes=args.processes)
    with_rabbit = not args.skip_rabbitmq and rabbit_up()
    backends = ["rabbitmq", "embedded"] if with_rabbit else ["embedded"]
    pki_dir = work / "certs"
    init_dev_pki(pki_dir)
    out: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "plan": {"duration_s": plan.duration, "offered_rate": plan.offered_rate, "processes": args.processes},
        "backends": backends,
        "floors": {},
        "gateway": {},
        "split": {},  # 5 KB: `serve` alone at saturation, then `worker` alone draining it
        "paired": {},  # 5 KB, RabbitMQ: naive x N and `run`, then `serve`, in alternation (bench/paired.py)
        "large": {},
    }
    for size in plan.sizes:
        pools = Pools.sign(pki_dir, size, plan)
        sample = pools.saturation[: 300 if args.quick else 1000]
        floor: dict[str, Any] = floors.verify_and_validate(pki_dir, sample)
        # the floor servers keep no state, so the same signed bodies can be sent again and again
        http_bodies = sample * (1 + int(plan.duration * (30000 if size < 50_000 else 5000)) // len(sample))
        floor["noop_http"] = await http_floor("noop", pki_dir, work, http_bodies, plan.duration)
        if with_rabbit:
            floor |= await floors.publish_rates(AMQP_URL, sample[0], 1000 if args.quick else 5000)
            naive_bodies = http_bodies[: int(plan.duration * plan.cap_per_s[size])]
            floor["naive_pipeline"] = await http_floor("naive", pki_dir, work, naive_bodies, plan.duration)
            if plan.processes > 1:
                floor["naive_pipeline_n"] = await http_floor(
                    "naive", pki_dir, work, naive_bodies, plan.duration, copies=plan.processes
                )
            if size == min(plan.sizes):  # the delivery floor, for `nswgw worker` and for `run`
                count = int(plan.duration * DELIVERIES_PER_S)
                floor["naive_delivery_n"] = await naive_delivery(
                    AMQP_URL, work, sample[0], count, copies=plan.processes
                )
        out["floors"][str(size)] = floor
        for backend in backends:
            out["gateway"][f"{backend}/{size}"] = await measure(pki_dir, work, backend, pools, plan)
            if size == min(plan.sizes):
                out["split"][f"{backend}/{size}"] = await measure_split(pki_dir, work, backend, pools, plan)
        if with_rabbit and plan.processes > 1:
            # Again after the gateway's phases, so that the ratio's floor brackets them: this VM's speed
            # drifts by a third between minutes, and a floor measured once may be from a faster one.
            floor["naive_pipeline_n_after"] = await http_floor(
                "naive", pki_dir, work, naive_bodies, plan.duration, copies=plan.processes
            )
            if size == min(plan.sizes):
                out["paired"][f"rabbitmq/{size}"] = [
                    await paired(
                        pki_dir,
                        work,
                        naive_bodies,
                        _phases(pools, ROUNDS),
                        pools.warm_up,
                        processes=plan.processes,
                        duration=min(plan.duration, PAIRED_PHASE_S),
                        command=command,
                    )
                    for command in ("run", "serve")
                ]
    if not args.skip_large:
        for backend in backends[:1] if args.quick else backends:  # quick: the first backend only
            for kind in ("lines", "attachment"):
                out["large"][f"{backend}/{kind}"] = await large(
                    pki_dir, work, backend, plan.large_size, processes=plan.processes, kind=kind
                )
    out["bench_peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1.5 s phases (the whole run in a few minutes)")
    parser.add_argument("--skip-rabbitmq", action="store_true", help="embedded backend only")
    parser.add_argument("--skip-large", action="store_true", help="leave out the 20 MB message")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) instead of deleting it")
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="`nswgw run --processes N` (default: one per CPU); the naive floor is also measured with N copies",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nswbench-"))
    try:
        result = asyncio.run(run(args, work))
    finally:
        if args.keep:
            print(f"kept {work} (process logs, data folders)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
