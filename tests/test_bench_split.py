"""The bench's split measurement with real `nswgw serve` and `nswgw worker` processes (embedded backend):
while only the ingress runs nothing is delivered, and the workers started afterwards deliver every
accepted message exactly as the agency counts it. Also the stage readout and the in-process ingress and
worker meters."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from bench import ingress_cpu, worker_cpu
from bench.gateway_runs import Plan, Pools, measure_split, stage_summary
from gateway.pipeline import INGRESS_STAGES


async def test_serve_alone_accepts_then_worker_alone_delivers_all(pki_dir: Path, tmp_path: Path) -> None:
    plan = Plan(duration=1.0, sizes=(5_000,), curve_rates=(), processes=2, cap_per_s={5_000: 60.0})
    pools = Pools.sign(pki_dir, 5_000, plan)

    result = await measure_split(pki_dir, tmp_path, "embedded", pools, plan)

    ingress, delivery = result["ingress"], result["delivery"]
    assert ingress["statuses"] == {"202": ingress["accepted"]}
    assert ingress["accepted"] > 0
    assert ingress["delivered_meanwhile"] == 0  # `serve` consumes nothing: the split is real
    assert ingress["cpu"]["ms_per_message"]["gateway"] > 0
    # both children's stage histograms, summed by any child's /metrics (prometheus multiprocess mode)
    assert list(ingress["stages"]) == list(INGRESS_STAGES)
    assert all(stage["mean_ms"] > 0 for stage in ingress["stages"].values())
    # the warm-up's messages wait in the queue with the load's: all of them reach the agency
    assert delivery["all_delivered"] is True
    assert delivery["delivered"] == ingress["accepted"] + len(pools.warm_up)
    assert delivery["delivered_per_s"] > 0
    assert set(delivery["peak_rss_kb"]) == {"worker0", "worker1"}


def test_stage_summary_is_the_phase_delta_with_the_bucket_99_percent_stayed_under() -> None:
    before = {"verify": {"count": 100.0, "sum": 5.0, "le=0.001": 0.0, "le=0.005": 100.0, "le=+Inf": 100.0}}
    after = {
        "verify": {"count": 300.0, "sum": 5.2, "le=0.001": 197.0, "le=0.005": 300.0, "le=+Inf": 300.0},
        "claim": {"count": 0.0, "sum": 0.0, "le=+Inf": 0.0},
    }
    summary = stage_summary(before, after)
    assert list(summary) == ["verify"]  # a stage nothing passed through in the phase is left out
    assert summary["verify"]["mean_ms"] == pytest.approx(1.0)  # 0.2 s over 200 messages
    assert summary["verify"]["p99_under_ms"] == pytest.approx(5.0)  # 197 of the phase's 200 under 1 ms: 98.5%
    after["verify"]["le=0.001"] = 198.0
    assert stage_summary(before, after)["verify"]["p99_under_ms"] == pytest.approx(1.0)  # 99%


async def test_ingress_cpu_measures_the_in_process_ingress(tmp_path: Path) -> None:
    logging_before = structlog.get_config()
    result = await ingress_cpu.run("embedded", 20, tmp_path)
    assert structlog.get_config() == logging_before  # its log file is closed: nothing may still write there
    assert result["per_s"] > 0
    assert result["user_ms"] > 0
    assert {"MainThread", "nsw-ledger-writer_0"} <= set(result["switches"])


async def test_worker_cpu_measures_the_in_process_worker_delivering_everything(tmp_path: Path) -> None:
    logging_before = structlog.get_config()
    result = await worker_cpu.run("embedded", 20, tmp_path)
    assert structlog.get_config() == logging_before
    assert result["per_s"] > 0  # it returns only once every accepted message was delivered
    assert result["user_ms"] > 0
    assert {"MainThread", "nsw-ledger-writer_0"} <= set(result["switches"])
