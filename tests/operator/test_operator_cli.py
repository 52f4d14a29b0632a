"""Operator commands: `config show` redacts secrets; `audit verify` fails naming the first bad record.

Commands run through the real argument parser but not through ``main`` (which reconfigures logging
for the whole test process).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.events import Event
from gateway.model import State
from gateway.stores.factory import SQLITE_FILE
from gateway.stores.sqlite import SqliteLedger


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    args = build_parser().parse_args(list(argv))
    code = int(args.func(args))
    return code, capsys.readouterr().out


def test_config_show_prints_the_effective_settings_with_secrets_redacted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("NSW_OPERATOR_TOKEN", "tok-supersecret")
    monkeypatch.setenv("NSW_AMQP_URL", "amqp://nsw:hunter2@rabbitmq:5672/")
    monkeypatch.setenv("NSW_DATABASE_URL", "postgresql://nsw:pg-pass@postgres:5432/nsw")
    monkeypatch.setenv("NSW_PORT", "9090")
    code, out = run(capsys, "config", "show", "--data", str(tmp_path))
    assert code == 0
    shown = json.loads(out)
    for secret in ("tok-supersecret", "hunter2", "pg-pass"):
        assert secret not in out
    assert shown["operator_token"] == "***"
    assert shown["amqp_url"] == "amqp://nsw:***@rabbitmq:5672/"
    assert shown["database_url"] == "postgresql://nsw:***@postgres:5432/nsw"
    assert shown["port"] == 9090  # the environment is applied ...
    assert shown["data_dir"] == str(tmp_path)  # ... and so are the flags


async def _ledger_with_records(data: Path) -> str:
    ledger = SqliteLedger(data / SQLITE_FILE)
    await ledger.open()
    mid = str(uuid.uuid4())
    try:
        await ledger.record([Event(State.REJECTED, mid, code="MALFORMED_XML", detail=f"test {i}") for i in range(3)])
    finally:
        await ledger.close()
    return mid


async def test_audit_verify_exits_non_zero_naming_the_first_bad_record(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await _ledger_with_records(tmp_path)
    capsys.readouterr()  # the audit log lines written while recording
    args = build_parser().parse_args(["audit", "verify", "--data", str(tmp_path)])

    # the command calls asyncio.run: give it a thread without a running loop
    code = await asyncio.to_thread(args.func, args)
    report = json.loads(capsys.readouterr().out)
    assert (code, report["ok"], report["count"]) == (0, True, 3)

    with sqlite3.connect(tmp_path / SQLITE_FILE) as conn:
        conn.execute("UPDATE audit SET detail = 'rewritten' WHERE seq = 2")
    code = await asyncio.to_thread(args.func, args)
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["ok"] is False
    assert report["first_bad_seq"] == 2
    assert "record 2" in report["reason"]
