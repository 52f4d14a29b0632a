"""State-change events: the one way stages and workers report what happened to a message.

The ingress and the worker emit ``Event``s to a ``Recorder``; the gateway's recorder writes them to
the status store and the audit log (and logs and metrics). Keeping this a Protocol lets the worker
and adapters be tested with a list-collecting recorder and keeps them ignorant of storage.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.model import State


@dataclass(frozen=True, slots=True)
class Event:
    state: State
    message_id: str
    destination: str | None = None  # None for message-level events (RECEIVED, REJECTED, ACCEPTED)
    party: str | None = None
    document_type: str | None = None
    digest: str | None = None  # SHA-256 hex of the exact received bytes
    attempt: int | None = None
    code: str | None = None  # rejection code, failure code, dead-letter code
    detail: str = ""
    at: float = field(default_factory=time.time)
    claimed_party: str | None = None  # REJECTED before verification: what <From> claimed (unverified)


class Recorder(Protocol):
    async def record(self, events: Sequence[Event]) -> None:
        """Durably record events (all or none). Raises ``BrokerUnavailable`` if the store is down."""
        ...


class ListRecorder:
    """Keeps events in memory; for tests and the offline ``verify`` command."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def record(self, events: Sequence[Event]) -> None:
        self.events.extend(events)
