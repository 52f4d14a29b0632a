"""``python -m bench.paired [--duration S] [--rounds K] [--processes N] [--command serve]``: the ratio alone.

The issue's ratio measured in alternation: naive x N, gateway, naive x N, gateway, ... naive x N.

This VM's speed drifts by up to half between minutes, and in the main table the naive floor and the
gateway's saturation phase are minutes apart: the same code gave 0.50x and 0.72x on one day. Here the
naive pipeline (N processes sharing a port) and `nswgw run --processes N` on RabbitMQ are both up at
once, each idle while the other is measured, and take turns at saturation; each gateway phase waits
until everything it accepted is delivered, so no delivery runs into the next naive phase. Each gateway
phase is divided by the mean of the naive phases just before and just after it, and the median of
those ratios is the figure: a drift slower than one round cancels out, and one disturbed phase cannot
move the median. The same alternation with `nswgw serve` in place of `run` gives the ingress's ratio
alone. ``python -m bench`` runs both on the 5 KB messages; run alone (about a minute) it is
the measurement for comparing two versions of the gateway as a whole.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import floors
from bench import messages as msgs
from bench.gateway_runs import AMQP_URL, DESTINATION, Deployment
from bench.http_floors import floor_servers, saturate
from gateway.brokers.names import work_queue

ROUNDS = 3
CAP_PER_S = 1500  # signed messages per second of a gateway phase: more than it accepts on this machine


def bracketed_ratios(naive: Sequence[float], gateway: Sequence[float]) -> list[float]:
    """``gateway[i] / mean(naive[i], naive[i + 1])``: phases ran naive[0], gateway[0], naive[1], ..."""
    if len(naive) != len(gateway) + 1:
        raise ValueError(f"{len(gateway)} gateway phases need {len(gateway) + 1} naive phases, not {len(naive)}")
    return [g / ((before + after) / 2) for g, before, after in zip(gateway, naive, naive[1:], strict=False)]


async def paired(
    pki_dir: Path,
    work: Path,
    naive_bodies: list[bytes],
    gateway_phases: Sequence[list[bytes]],
    warm_up: list[bytes],
    *,
    processes: int,
    duration: float,
    command: str = "run",
) -> dict[str, Any]:
    """``len(gateway_phases)`` rounds of ``duration`` seconds; every gateway phase sends messages of its own
    (the naive pipeline keeps no state: ``naive_bodies`` are sent again in every naive phase).

    ``command``: "run" (ingress and delivery, each phase drained before the next), or "serve", the
    ingress alone, like for like with the naive pipeline, which delivers nothing either (what it accepts
    is purged from the agency's queue after each phase, as the naive queue is)."""
    if command not in ("run", "serve"):
        raise ValueError(f"command must be run or serve, not {command!r}")
    deliver = command == "run"
    naive_runs: list[dict[str, Any]] = []
    gateway_runs: list[dict[str, Any]] = []
    async with floor_servers("naive", pki_dir, work, copies=processes) as naive:

        async def naive_phase() -> None:
            naive_runs.append(await saturate(naive.url, naive_bodies, work, duration, "paired-naive"))
            await floors.purge_queue(AMQP_URL, naive.queue)  # the broker holds no more between phases

        size = 64 * 1024 * 1024
        deployment = await Deployment(pki_dir, work, "rabbitmq", processes, size, command=command).start()
        try:
            await deployment.drive(warm_up, concurrency=4, duration=30, deliver=deliver)
            await naive_phase()
            for bodies in gateway_phases:
                phase = await deployment.drive(bodies, concurrency=64, duration=duration, deliver=deliver)
                phase.pop("keys", None)
                gateway_runs.append(phase)
                if not deliver:  # as for the naive queue: a queue growing phase after phase slows the broker
                    await floors.purge_queue(AMQP_URL, work_queue(DESTINATION, deployment.prefix))
                await naive_phase()
        finally:
            await deployment.stop()
    naive_rates = [run["accepted_per_s"] for run in naive_runs]
    gateway_rates = [run["accepted_per_s"] for run in gateway_runs]
    ratios = bracketed_ratios(naive_rates, gateway_rates)
    return {
        "command": command,
        "duration_s": duration,
        "naive_per_s": naive_rates,
        "gateway_per_s": gateway_rates,
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "all_delivered": all(run["all_delivered"] for run in gateway_runs) if deliver else None,
        "other_answers": [_not_202(run) for run in naive_runs + gateway_runs],
    }


def _not_202(run: dict[str, Any]) -> dict[str, int]:
    return {status: count for status, count in run["statuses"].items() if status != "202"}


async def _alone(work: Path, duration: float, rounds: int, processes: int, command: str) -> dict[str, Any]:
    from gateway.security.pki import init_dev_pki  # noqa: PLC0415 -- only for the command line

    certs = work / "certs"
    init_dev_pki(certs)
    per_phase = int(CAP_PER_S * duration)
    bodies = msgs.signed_messages(certs, 5_000, 20 + per_phase * rounds)
    phases = [bodies[20 + i * per_phase : 20 + (i + 1) * per_phase] for i in range(rounds)]
    naive = phases[0]  # the naive pipeline keeps no state: any signed messages will do
    return await paired(
        certs, work, naive, phases, bodies[:20], processes=processes, duration=duration, command=command
    )


def main() -> None:
    from bench.report import paired_lines  # noqa: PLC0415 -- the report imports nothing from here either

    parser = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="gateway phases (one naive phase more)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--command", choices=["run", "serve"], default="run", help="serve: the ingress alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nsw-paired-") as folder:
        result = asyncio.run(_alone(Path(folder), args.duration, args.rounds, args.processes, args.command))
    print("\n".join(paired_lines(result, args.processes, "{:<44} {:>12} {:>12} {:>8}  {}")))


if __name__ == "__main__":
    main()
