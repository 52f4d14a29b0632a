"""The hash chain: its documented form, its verifier, and tampering done directly in the database."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import random
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog
from structlog.testing import capture_logs

from gateway.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditRecord,
    ChainHead,
    chain,
    emit,
    hashed_fields,
    iso_utc,
    record_hash,
    verify_chain,
)
from gateway.errors import BrokerUnavailable, ErrorCode
from gateway.events import Event
from gateway.logs import configure_logging
from gateway.model import State
from gateway.stores.base import Ledger
from gateway.stores.sqlite import SqliteLedger

if TYPE_CHECKING:
    from tests.stores.conftest import Backend

REPO = Path(__file__).resolve().parents[2]


def entries(n: int) -> list[AuditEntry]:
    return [
        AuditEntry(f"2026-11-24T10:00:{i:02d}.000001Z", "QUEUED", f"m-{i}", "VN-MOIT", "licence", f"d{i}", "ab" * 32)
        for i in range(1, n + 1)
    ]


def events(n: int, prefix: str = "m") -> list[Event]:
    return [
        Event(State.DELIVERING, f"{prefix}-{i}", "moit", party="VN-MOIT", attempt=1, detail="détail ✓")
        for i in range(1, n + 1)
    ]


# -- the chain as documented ------------------------------------------------------------------------


def test_the_hash_is_sha256_of_prev_hash_and_sorted_compact_utf8_json() -> None:
    first, second = chain(entries(2))
    assert (first.seq, first.prev_hash, second.seq, second.prev_hash) == (1, GENESIS_HASH, 2, first.hash)
    body = {k: v for k, v in dataclasses.asdict(first).items() if k not in ("prev_hash", "hash")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert first.hash == hashlib.sha256((GENESIS_HASH + canonical).encode("utf-8")).hexdigest()
    assert canonical.startswith('{"at":"2026-11-24T10:00:01.000001Z","attempt":null,"code":null,')


def test_a_chain_continues_from_a_head() -> None:
    whole = chain(entries(5))
    head = ChainHead(whole[2].seq, whole[2].hash)
    assert chain(entries(5)[3:], head) == whole[3:]


AWKWARD_TEXT = [
    "",
    "détail ✓",
    'quote " backslash \\ slash /',
    "ctl \x00\x01\x1f\x7f",
    "\u2028\u2029 emoji 🚢",
    "ö" * 300,
]


@pytest.mark.parametrize("text", AWKWARD_TEXT)
def test_every_field_value_hashes_as_the_documented_json(text: str) -> None:
    # chain() writes the canonical JSON field by field; it must be byte for byte json.dumps's.
    rows = [
        AuditEntry(f"2026-11-24T10:00:00.{i:06d}Z", "QUEUED", text, text or None, None, text, text, attempt, text, text)
        for i, attempt in enumerate([None, 0, 7, 2**40])
    ]
    # Types that json writes its own way (a bool, enums): the general path.
    rows.append(AuditEntry("t", State.DEAD, "m", attempt=True, code=ErrorCode.NO_ROUTE))
    prev = GENESIS_HASH
    for record in chain(rows, ChainHead(2**33, GENESIS_HASH)):
        canonical = json.dumps(
            hashed_fields(record.seq, record), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        assert record.prev_hash == prev
        assert record.hash == hashlib.sha256((prev + canonical).encode("utf-8")).hexdigest()
        prev = record.hash


def _datetime_iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def test_iso_utc_is_datetimes_rendering_including_rounding_and_carry() -> None:
    rng = random.Random(7)
    stamps = [rng.uniform(0, 4e9) for _ in range(20_000)]
    stamps += [rng.randrange(1_700_000_000, 1_800_000_000) + rng.randrange(10**6) / 1e6 for _ in range(20_000)]
    stamps += [s + h for s in (0, 1_764_000_000, 1_764_000_001) for h in (0.0000005, 0.0000015, 0.9999995, 0.99999999)]
    stamps += [0, 1, 1_764_000_000, 1_764_000_000.5, -0.0000005, -1.25, 253402300799.5]
    for at in stamps + stamps[::-1]:  # both orders: the cached second must never leak into another
        assert iso_utc(at) == _datetime_iso(at), at
    for bad in (float("nan"), float("inf"), 253402300800.0, 1e300):
        with pytest.raises((ValueError, OverflowError)) as expected:
            _datetime_iso(bad)
        with pytest.raises(expected.type):
            iso_utc(bad)


def test_an_intact_chain_verifies() -> None:
    records = chain(entries(4))
    report = verify_chain(records, ChainHead(4, records[-1].hash))
    assert (report.ok, report.count, report.first_bad_seq, report.last_hash) == (True, 4, None, records[-1].hash)
    assert verify_chain([]).ok


def forged(record: AuditRecord, prev_hash: str, **changes: object) -> AuditRecord:
    """A record changed by someone who knows the hash rule: its own hash is recomputed."""
    changed = dataclasses.replace(record, prev_hash=prev_hash, **changes)  # type: ignore[arg-type]
    return dataclasses.replace(changed, hash=record_hash(prev_hash, hashed_fields(changed.seq, changed)))


def test_verifier_names_the_first_bad_record() -> None:
    r = chain(entries(6))
    edited = [*r[:2], dataclasses.replace(r[2], detail="paid"), *r[3:]]
    assert verify_chain(edited).first_bad_seq == 3
    rehashed = [*r[:2], forged(r[2], r[1].hash, detail="paid"), *r[3:]]
    assert verify_chain(rehashed).first_bad_seq == 4
    assert verify_chain([*r[:2], *r[3:]]).first_bad_seq == 3
    assert verify_chain([r[0], r[2], r[1], *r[3:]]).first_bad_seq == 2
    assert verify_chain(r[1:]).first_bad_seq == 1
    head = ChainHead(6, r[-1].hash)
    assert verify_chain(r[:5], head).first_bad_seq == 6  # truncated tail
    extra = forged(dataclasses.replace(r[5], seq=7), r[5].hash)
    assert verify_chain([*r, extra], head).first_bad_seq == 7  # appended behind the ledger's back
    assert verify_chain([*r[:5], forged(r[5], r[4].hash, detail="x")], head).first_bad_seq == 6


# -- tampering in the database ----------------------------------------------------------------------

N = 6


async def filled(ledger: Ledger) -> list[AuditRecord]:
    for e in events(N):
        await ledger.record([e])
    records = await ledger.audit_tail()
    assert [r.seq for r in records] == list(range(1, N + 1))
    assert (await ledger.verify_audit()).ok
    return records


def sql_text(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def insert_sql(r: AuditRecord) -> str:
    values = ", ".join(sql_text(getattr(r, f.name)) for f in dataclasses.fields(r))
    return f"INSERT INTO audit VALUES ({values})"  # noqa: S608 -- test data we made


async def test_editing_a_field_is_caught_at_that_record(backend: Backend, ledger: Ledger) -> None:
    await filled(ledger)
    await backend.sql("UPDATE audit SET detail = 'delivered on time' WHERE seq = 3")
    report = await ledger.verify_audit()
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert "edited" in report.reason


async def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(backend: Backend, ledger: Ledger) -> None:
    r = await filled(ledger)
    fake = forged(r[2], r[1].hash, code="OK")
    await backend.sql(f"UPDATE audit SET code = 'OK', hash = '{fake.hash}' WHERE seq = 3")  # noqa: S608 -- our hex
    assert (await ledger.verify_audit()).first_bad_seq == 4


async def test_deleting_a_record_is_caught_where_it_was(backend: Backend, ledger: Ledger) -> None:
    await filled(ledger)
    await backend.sql("DELETE FROM audit WHERE seq = 4")
    report = await ledger.verify_audit()
    assert (report.ok, report.first_bad_seq) == (False, 4)


async def test_deleting_the_last_record_is_caught_by_the_head(backend: Backend, ledger: Ledger) -> None:
    await filled(ledger)
    await backend.sql(f"DELETE FROM audit WHERE seq = {N}")  # noqa: S608 -- a constant
    report = await ledger.verify_audit()
    assert (report.ok, report.first_bad_seq) == (False, N)
    assert "truncated" in report.reason


async def test_a_forged_record_inserted_in_the_middle_is_caught(backend: Backend, ledger: Ledger) -> None:
    # The forger renumbers the later records, links the forgery to record 2 and fixes up the head:
    # record 3 (the forgery) is self-consistent, so the chain breaks at the next one.
    r = await filled(ledger)
    fake = forged(dataclasses.replace(r[2], message_id="m-forged"), r[1].hash)
    renumber = "UPDATE audit SET seq = seq + 1000 WHERE seq >= 3; UPDATE audit SET seq = seq - 999 WHERE seq > 1000"
    await backend.sql(f"{renumber}; {insert_sql(fake)}; UPDATE audit_head SET seq = {N + 1} WHERE id = 1")  # noqa: S608
    report = await ledger.verify_audit()
    assert (report.ok, report.first_bad_seq) == (False, 4)


async def test_a_forged_record_appended_at_the_end_is_caught(backend: Backend, ledger: Ledger) -> None:
    r = await filled(ledger)
    fake = forged(dataclasses.replace(r[-1], seq=N + 1, message_id="m-forged"), r[-1].hash)
    await backend.sql(insert_sql(fake))
    report = await ledger.verify_audit()
    assert (report.ok, report.first_bad_seq) == (False, N + 1)


async def test_swapping_two_records_is_caught(backend: Backend, ledger: Ledger) -> None:
    await filled(ledger)
    await backend.sql(
        "UPDATE audit SET seq = 1000 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 4; "
        "UPDATE audit SET seq = 4 WHERE seq = 1000"
    )
    report = await ledger.verify_audit()
    assert (report.ok, report.first_bad_seq) == (False, 3)


async def test_two_ledgers_appending_at_once_make_one_valid_chain(backend: Backend, ledger: Ledger) -> None:
    other = backend.make()
    await other.open()
    try:
        writes = [(ledger if i % 2 else other).record(events(3, prefix=f"w{i}")) for i in range(60)]
        await asyncio.gather(*writes)
    finally:
        await other.close()
    report = await ledger.verify_audit()
    assert (report.ok, report.count) == (True, 180)


async def test_another_process_appending_at_once_keeps_the_chain_valid(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from gateway.events import Event\n"
        "from gateway.model import State\n"
        "from gateway.stores.sqlite import SqliteLedger\n"
        "async def main():\n"
        "    ledger = SqliteLedger(Path(sys.argv[1]))\n"
        "    await ledger.open()\n"
        "    print('open', flush=True)\n"
        "    sys.stdin.readline()\n"
        "    await asyncio.gather(*(ledger.record([Event(State.QUEUED, f'p-{i}', 'x')]) for i in range(300)))\n"
        "    await ledger.close()\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(path), stdin=-1, stdout=-1, env=env
        )
        assert child.stdin is not None
        assert child.stdout is not None
        assert await child.stdout.readline() == b"open\n"
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        await asyncio.gather(*(ledger.record([Event(State.QUEUED, f"t-{i}", "x")]) for i in range(300)))
        assert await child.wait() == 0
        report = await ledger.verify_audit()
    finally:
        await ledger.close()
    assert (report.ok, report.count) == (True, 600)


async def test_each_committed_record_is_logged_as_a_json_ready_audit_line(backend: Backend) -> None:
    ledger = backend.make()
    with capture_logs() as logs:
        await ledger.open()
        await ledger.record(events(2))
        await ledger.close()  # waits for the log lines of committed batches
    lines = [line for line in logs if line["event"] == "audit"]
    stored = await _records(backend)
    assert len(lines) == 2
    for line, record in zip(lines, stored, strict=True):
        expected = dataclasses.asdict(record)
        expected["audit_event"] = expected.pop("event")
        assert {k: line[k] for k in expected} == expected


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The gateway's own JSON logging into a buffer; structlog's configuration restored afterwards."""
    saved = structlog.get_config()
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    try:
        yield out
    finally:
        structlog.configure(**saved)


def test_a_batch_is_written_as_one_json_line_per_record_in_order(json_log: io.StringIO) -> None:
    records = chain(entries(3))
    emit(records)
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert json_log.getvalue().endswith("\n")
    assert [(line["event"], line["level"], line["seq"], line["hash"]) for line in lines] == [
        ("audit", "info", r.seq, r.hash) for r in records
    ]
    assert [line["audit_event"] for line in lines] == [r.event for r in records]
    assert all(line["timestamp"].endswith("Z") for line in lines)


def test_audit_lines_follow_the_configured_level(json_log: io.StringIO) -> None:
    configure_logging("json", "warning", stream=json_log)
    emit(chain(entries(2)))
    assert json_log.getvalue() == ""


async def test_nothing_is_logged_for_a_batch_that_did_not_commit(backend: Backend) -> None:
    ledger = backend.make(timeout=0.2)
    await ledger.open()
    with capture_logs() as logs:
        async with backend.hold_write_lock():
            with pytest.raises(BrokerUnavailable):
                await ledger.record(events(1))
        await ledger.close()
    assert [line for line in logs if line["event"] == "audit"] == []


async def _records(backend: Backend) -> list[AuditRecord]:
    ledger = backend.make()
    await ledger.open()
    try:
        return await ledger.audit_tail()
    finally:
        await ledger.close()
