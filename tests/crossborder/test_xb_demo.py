"""``nswgw demo --cross-border`` runs the round trip on two fresh gateways and says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.crossborder_demo import run_cross_border_demo


async def test_the_cross_border_demo_completes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cross_border_demo(tmp_path) == 0
    out = capsys.readouterr().out
    assert "cross-border demo completed" in out
    assert "audit chains: intact" in out
    assert len(list((tmp_path / "vn-var" / "proofs").glob("*.asw%3ATH.xml"))) == 1
    assert len(list((tmp_path / "th-var" / "proofs").glob("*.asw%3AVN.xml"))) == 1
