"""The ledger Protocol: message status, duplicate claims and the audit log, in one durable store.

Implemented by ``SqliteLedger`` (one host, the default) and ``PostgresLedger`` (several hosts); both
pass ``tests/stores/``. A ledger is also a ``gateway.events.Recorder``.

Every method raises ``gateway.errors.BrokerUnavailable`` when the store cannot do its work (disk
full, database down, locked past the timeout, ledger closed): the caller must then treat nothing as
recorded, and the ingress answers 503.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from gateway.audit import AuditRecord, AuditReport
from gateway.events import Event
from gateway.status import MessageStatus


class ClaimKind(StrEnum):
    NEW = "NEW"  # first sight of this message id: go ahead, enqueue
    PENDING = "PENDING"  # same sender and bytes, claimed but not yet accepted: enqueue again
    REPLAY = "REPLAY"  # same sender and bytes, already accepted: answer with the stored receipt
    CONFLICT = "CONFLICT"  # the id is taken by other bytes or another sender: reject as DUPLICATE


@dataclass(frozen=True, slots=True)
class Claim:
    kind: ClaimKind
    receipt: bytes | None = None  # REPLAY: the receipt first sent
    existing_sender: str | None = None  # CONFLICT: who holds the id ...
    existing_digest: str | None = None  # ... and for which bytes


class Ledger(Protocol):
    async def open(self) -> None:
        """Connect and create the tables if missing."""
        ...

    async def close(self) -> None:
        """Finish the operations already submitted, then disconnect."""
        ...

    async def ready(self) -> bool:
        """True when the store currently answers (for /readyz)."""
        ...

    async def claim(
        self, message_id: str, sender: str, digest: str, document_type: str, events: Sequence[Event]
    ) -> Claim:
        """Atomically claim ``message_id`` for these bytes (see ``ClaimKind``).

        NEW and PENDING record ``events``; REPLAY records one DUPLICATE_REPLAYED audit record
        instead; CONFLICT records nothing (the caller records its DUPLICATE rejection). A message
        id whose only trace is a rejection is free to be claimed again.
        """
        ...

    async def accept(
        self, message_id: str, receipt: bytes, destinations: Sequence[str], events: Sequence[Event]
    ) -> None:
        """In one transaction: store the receipt, message ACCEPTED, each destination QUEUED, record events.

        Accepting an already accepted message keeps the first receipt. Raises ``BrokerUnavailable``
        when there is no claim to accept (it was released meanwhile): the sender must retry.
        """
        ...

    async def release(self, message_id: str, events: Sequence[Event]) -> None:
        """Drop a claim that was never accepted (enqueue failed), so the sender's retry starts afresh."""
        ...

    async def record(self, events: Sequence[Event]) -> None:
        """Append the events to the audit log and advance status, all in one transaction."""
        ...

    async def status(self, message_id: str) -> MessageStatus | None: ...

    async def dead_destinations(self) -> list[str]:
        """Every destination with at least one copy DEAD now, sorted (a full scan: for operator commands)."""
        ...

    async def pending_destinations(self) -> dict[str, int]:
        """Every destination holding accepted copies not yet delivered or dead-lettered, with how many
        (an index walk over that backlog: a worker asks at start-up which queues it must consume)."""
        ...

    async def audit_tail(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        """Audit records with seq > ``after_seq``, in seq order."""
        ...

    async def trace(self, message_id: str) -> list[AuditRecord]:
        """Every audit record of one message, across destinations, in seq order."""
        ...

    async def verify_audit(self) -> AuditReport:
        """Re-check the whole chain against one consistent snapshot of the log and its head."""
        ...
