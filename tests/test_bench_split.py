"""The bench's split measurement with real `nswgw serve` and `nswgw worker` processes (embedded backend):
while only the ingress runs nothing is delivered, and the workers started afterwards deliver every
accepted message exactly as the agency counts it."""

from __future__ import annotations

from pathlib import Path

from bench.gateway_runs import Plan, Pools, measure_split


async def test_serve_alone_accepts_then_worker_alone_delivers_all(pki_dir: Path, tmp_path: Path) -> None:
    plan = Plan(duration=1.0, sizes=(5_000,), curve_rates=(), processes=2, cap_per_s={5_000: 60.0})
    pools = Pools.sign(pki_dir, 5_000, plan)

    result = await measure_split(pki_dir, tmp_path, "embedded", pools, plan)

    ingress, delivery = result["ingress"], result["delivery"]
    assert ingress["statuses"] == {"202": ingress["accepted"]}
    assert ingress["accepted"] > 0
    assert ingress["delivered_meanwhile"] == 0  # `serve` consumes nothing: the split is real
    assert ingress["cpu"]["ms_per_message"]["gateway"] > 0
    # the warm-up's messages wait in the queue with the load's: all of them reach the agency
    assert delivery["all_delivered"] is True
    assert delivery["delivered"] == ingress["accepted"] + len(pools.warm_up)
    assert delivery["delivered_per_s"] > 0
    assert set(delivery["peak_rss_kb"]) == {"worker0", "worker1"}
