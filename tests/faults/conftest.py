"""Fault-injection fixtures: the e2e ones (unique RabbitMQ queue prefix deleted afterwards, loopback
agencies), and the long form switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import agencies, rabbit  # noqa: F401 - fixtures re-exported for tests/faults
from tests.faults.harness import LONG


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long form runs only on demand: ``-m slow`` or ``NSW_FAULTS_LONG=1``."""
    if LONG or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long fault form: run with -m slow or NSW_FAULTS_LONG=1")
    here = Path(__file__).parent
    for item in items:  # this hook sees the whole session: touch only the tests of this folder
        if "slow" in item.keywords and here in item.path.parents:
            item.add_marker(skip)
