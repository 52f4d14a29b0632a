"""Process-table helpers for tests that watch a supervisor's children."""

from __future__ import annotations

import contextlib
from pathlib import Path


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc), oldest first; [] once it is gone."""
    with contextlib.suppress(OSError):
        return sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    return []
