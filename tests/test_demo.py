"""The README's first quick-start command must keep working: `nswgw demo` shows the whole path and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import child_env


def test_demo_runs_the_whole_path_and_exits_0(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--workdir", str(tmp_path / "demo")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "demo completed" in out
    assert "HTTP 401  rejection SIGNATURE_INVALID" in out  # the tampered licence
    assert "RETRY_WAIT" in out  # the flaky agency
    assert "asw:TH         DELIVERED" in out  # across the border, with TH-NSW's signed receipt
    assert "HTTP_400" in out  # the refusing agency's dead letter ...
    assert "replayed 2" in out  # ... replayed by the operator
    assert "audit chain: intact" in out
    assert (tmp_path / "demo" / "gateway.log").stat().st_size > 0
