"""Run as a separate process by test_embedded_crash.py: claim one delivery and hang in its handler.

Prints ``claimed <message_id>`` once the handler holds the delivery, then waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from gateway.brokers.base import Outcome
from gateway.brokers.embedded import EmbeddedBroker
from gateway.model import Delivery


async def main(path: str, destination: str, lease_seconds: float) -> None:
    broker = EmbeddedBroker(Path(path), lease_seconds=lease_seconds, poll_interval=0.02)

    async def hang(delivery: Delivery) -> Outcome:
        print(f"claimed {delivery.message_id}", flush=True)
        await asyncio.Event().wait()  # never set: the parent SIGKILLs us here
        raise AssertionError("unreachable")

    await broker.consume(destination, hang, prefetch=1)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
