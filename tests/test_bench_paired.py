"""The bench's alternating measurement of the issue's ratio (bench/paired.py): the naive pipeline and
`nswgw run` (or `serve`) on the real RabbitMQ take turns, the phases come out in the right order and
number, every gateway phase is compared with the naive phases on both sides of it, and the queues that
nothing consumes are emptied between phases (the naive one deleted afterwards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.exceptions import ChannelNotFoundEntity

from bench import floors, http_floors, paired, report
from bench import messages as msgs
from bench.gateway_runs import AMQP_URL, Deployment
from tests.conftest import require_service


async def test_only_run_and_serve_take_turns_with_the_naive_pipeline(pki_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="command must be run or serve, not 'worker'"):
        await paired.paired(pki_dir, tmp_path, [], [], [], processes=2, duration=0.5, command="worker")


def test_each_gateway_phase_is_divided_by_the_mean_of_the_naive_phases_around_it() -> None:
    assert paired.bracketed_ratios([1_000.0, 1_400.0, 600.0], [600.0, 500.0]) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="2 gateway phases need 3 naive phases"):
        paired.bracketed_ratios([1_000.0, 1_400.0], [600.0, 500.0])


def test_the_report_prints_the_median_ratio_and_every_phase_in_order() -> None:
    result = {
        "command": "run",
        "duration_s": 5.0,
        "naive_per_s": [1_000.0, 1_400.0, 600.0, 1_000.0],
        "gateway_per_s": [600.0, 500.0, 640.0],
        "ratios": [0.5, 0.5, 0.8],
        "median_ratio": 0.5,
        "all_delivered": True,
        "other_answers": [{}] * 7,
    }
    first, phases = report.paired_lines(result, 2, "{:<44} {:>12} {:>12} {:>8}  {}")
    assert first.split()[-12:] == [
        "`run`",
        "vs",
        "naive",
        "x2,",
        "alternating",
        "600",
        "1,000",
        "0.50",
        "median",
        "of",
        "3",
        "ratios",
    ]
    assert "naive 1,000 | gateway 600 | naive 1,400 | gateway 500 | naive 600 | gateway 640 | naive 1,000" in phases
    assert phases.endswith("ratios 0.50, 0.50, 0.80")


@pytest.mark.rabbitmq
@pytest.mark.parametrize("command", ["run", "serve"])
async def test_the_naive_pipeline_and_the_gateway_take_turns_on_the_real_broker(
    command: str, pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    order: list[str] = []
    purged: list[str] = []
    real_saturate, real_purge, real_drive = http_floors.saturate, floors.purge_queue, Deployment.drive

    async def saturate(url: str, bodies: list[bytes], work: Path, duration: float, name: str) -> dict[str, Any]:
        order.append("naive")
        return await real_saturate(url, bodies, work, duration, name)

    async def drive(self: Deployment, bodies: list[bytes], **options: Any) -> dict[str, Any]:
        assert self.command == command
        assert options["deliver"] is (command == "run")  # `serve`: nothing consumes, nothing to wait for
        order.append("gateway" if options["concurrency"] == 64 else "warm-up")
        return await real_drive(self, bodies, **options)

    async def purge(url: str, queue: str) -> None:
        purged.append(queue)
        await real_purge(url, queue)

    monkeypatch.setattr(paired, "saturate", saturate)
    monkeypatch.setattr(floors, "purge_queue", purge)
    monkeypatch.setattr(Deployment, "drive", drive)
    bodies = msgs.signed_messages(pki_dir, 5_000, 20 + 2 * 300)

    result = await paired.paired(
        pki_dir,
        tmp_path,
        bodies[20:320],
        [bodies[20:320], bodies[320:]],
        bodies[:20],
        processes=2,
        duration=0.5,
        command=command,
    )

    assert order == ["warm-up", "naive", "gateway", "naive", "gateway", "naive"]
    assert len(result["naive_per_s"]) == 3
    assert len(result["gateway_per_s"]) == 2
    assert all(rate > 0 for rate in result["naive_per_s"] + result["gateway_per_s"])
    assert result["ratios"] == pytest.approx(paired.bracketed_ratios(result["naive_per_s"], result["gateway_per_s"]))
    assert result["command"] == command
    # `run`: each gateway phase drained before the next naive one; `serve` delivers nothing
    assert result["all_delivered"] is (True if command == "run" else None)
    assert result["other_answers"] == [{}] * 5
    naive_queue = purged[0]
    assert purged.count(naive_queue) == 3  # after each naive phase
    gateway_queues = [queue for queue in purged if queue != naive_queue]
    # `serve`: its agency queue, which nothing consumes, after each of its phases
    assert len(gateway_queues) == (0 if command == "run" else 2)
    assert len(set(gateway_queues)) <= 1
    connection = await aio_pika.connect(AMQP_URL)
    try:
        with pytest.raises(ChannelNotFoundEntity):  # the naive queue is gone with its servers
            await (await connection.channel()).declare_queue(naive_queue, passive=True)
    finally:
        await connection.close()
