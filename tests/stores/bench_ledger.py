"""Ledger throughput: N concurrent messages, each a claim (1 RECEIVED event) then an accept (2 events).

    python tests/stores/bench_ledger.py [--messages 1000] [--rounds 5] [--no-postgres]

Audit log lines are rendered as the gateway renders them (JSON) and written to /dev/null, so their
cost is counted. Prints messages per second (claim + accept) per backend: the median of the rounds,
each round on a fresh store.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.events import Event
from gateway.logs import configure_logging
from gateway.model import State
from gateway.stores.base import ClaimKind, Ledger
from gateway.stores.postgres import PostgresLedger
from gateway.stores.sqlite import SqliteLedger

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DIGEST = "a" * 64


async def one_message(ledger: Ledger, mid: str) -> None:
    base = {"party": "VN-MOIT", "document_type": "licence.import", "digest": DIGEST}
    claim = await ledger.claim(mid, "VN-MOIT", DIGEST, "licence.import", [Event(State.RECEIVED, mid, **base)])
    assert claim.kind is ClaimKind.NEW
    events = [Event(State.ACCEPTED, mid, **base), Event(State.QUEUED, mid, "moit-licensing", **base)]
    await ledger.accept(mid, b"<Receipt/>" * 200, ["moit-licensing"], events)


async def one_round(make: Callable[[], Ledger], messages: int) -> float:
    ledger = make()
    await ledger.open()
    try:
        await one_message(ledger, "warm-up")
        started = time.perf_counter()
        await asyncio.gather(*(one_message(ledger, f"m-{i}") for i in range(messages)))
        elapsed = time.perf_counter() - started
        report = await ledger.verify_audit()
        assert report.ok
        assert report.count == 3 * (messages + 1)
    finally:
        await ledger.close()
    return messages / elapsed


async def drop_schema(schema: str) -> None:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    with open(os.devnull, "w") as devnull:  # noqa: ASYNC230
        configure_logging("json", stream=devnull)
        with tempfile.TemporaryDirectory() as folder:
            for sync in ("FULL", "NORMAL"):
                rates = []
                for n in range(args.rounds):
                    path = Path(folder) / f"{sync}-{n}.db"
                    rates.append(await one_round(lambda p=path, s=sync: SqliteLedger(p, synchronous=s), args.messages))
                print(f"sqlite synchronous={sync}: {statistics.median(rates):,.0f} msgs/s  (rounds: {_fmt(rates)})")
        if not args.no_postgres:
            rates = []
            for _ in range(args.rounds):
                schema = f"nsw_bench_{uuid.uuid4().hex[:8]}"
                try:
                    rates.append(await one_round(lambda s=schema: PostgresLedger(PG_DSN, schema=s), args.messages))
                finally:
                    await drop_schema(schema)
            print(f"postgresql:            {statistics.median(rates):,.0f} msgs/s  (rounds: {_fmt(rates)})")


def _fmt(rates: list[float]) -> str:
    return ", ".join(f"{r:,.0f}" for r in rates)


if __name__ == "__main__":
    asyncio.run(main())
