"""Settings validation for the ledger's group-commit linger (the rest of Settings is covered by the CLI tests)."""

from __future__ import annotations

import pytest

from gateway.config import load_settings
from gateway.errors import ConfigError


def test_the_ledger_linger_defaults_to_2_ms_and_reads_the_environment() -> None:
    assert load_settings(environ={}).ledger_linger_ms == 2.0
    assert load_settings(environ={"NSW_LEDGER_LINGER_MS": "0"}).ledger_linger_ms == 0.0
    assert load_settings(environ={"NSW_LEDGER_LINGER_MS": "5.5"}).ledger_linger_ms == 5.5


@pytest.mark.parametrize("value", ["-1", "1001", "soon"])
def test_a_ledger_linger_outside_0_to_1000_ms_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigError, match="ledger_linger_ms"):
        load_settings(environ={"NSW_LEDGER_LINGER_MS": value})
