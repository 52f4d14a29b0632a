"""One group-commit batch, decided in memory: the ledger's rules, written once for every backend.

A backend takes its write lock (SQLite ``BEGIN IMMEDIATE``, PostgreSQL the audit head row ``FOR
UPDATE``), loads the rows the batch touches and the chain head, lets a ``Unit`` apply the operations
in order, then writes ``Unit.changes()`` and commits. Holding the lock while deciding makes every
claim and every chain append atomic across processes. An operation that is refused (accepting a
claim that is gone) is refused *before* anything is written, so it fails alone, without a savepoint,
and the rest of the batch commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from gateway.audit import DUPLICATE_REPLAYED, AuditRecord, ChainHead, EntryValues, chain_rows, entry_values, iso_utc
from gateway.errors import BrokerUnavailable
from gateway.events import Event
from gateway.model import State
from gateway.status import DestinationStatus, MessageStatus, advance
from gateway.stores.base import Claim, ClaimKind

# Row tuples below follow the column orders of gateway.stores.sql's statements.


class MessageRow(NamedTuple):
    message_id: str
    sender: str
    digest: str
    document_type: str
    state: State  # RECEIVED = claimed but not accepted; ACCEPTED; REJECTED
    receipt: bytes | None
    received_at: float
    updated_at: float
    code: str | None = None
    detail: str = ""

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> MessageRow:
        receipt = None if row[5] is None else bytes(row[5])
        return cls(row[0], row[1], row[2], row[3], State(row[4]), receipt, row[6], row[7], row[8], row[9])

    def to_row(self) -> tuple[Any, ...]:
        return (
            self.message_id, self.sender, self.digest, self.document_type, self.state.value, self.receipt,
            self.received_at, self.updated_at, self.code, self.detail,
        )  # fmt: skip


REPLAYED_DETAIL = "same sender and bytes as an accepted message: its original receipt was returned"

DestinationKey = tuple[str, str]  # (message_id, destination)


def destination_from_row(row: Sequence[Any]) -> tuple[DestinationKey, DestinationStatus]:
    return (row[0], row[1]), DestinationStatus(State(row[2]), row[3], row[5], row[6], row[7], row[4])


def destination_to_row(key: DestinationKey, s: DestinationStatus) -> tuple[Any, ...]:
    return (key[0], key[1], s.state.value, s.attempt, s.generation, s.updated_at, s.code, s.detail)


def audit_from_row(row: Sequence[Any]) -> AuditRecord:
    return AuditRecord(*row)


def audit_to_row(r: AuditRecord) -> tuple[Any, ...]:
    return (
        r.seq, r.at, r.event, r.message_id, r.party, r.document_type, r.destination, r.digest, r.attempt,
        r.code, r.detail, r.prev_hash, r.hash,
    )  # fmt: skip


def message_status(row: Sequence[Any], destination_rows: Iterable[Sequence[Any]]) -> MessageStatus:
    m = MessageRow.from_row(row)
    destinations = {key[1]: s for key, s in map(destination_from_row, destination_rows)}
    updated = max([m.updated_at, *(s.updated_at for s in destinations.values())])
    return MessageStatus(
        m.message_id,
        m.sender,
        m.digest,
        m.document_type,
        m.state,
        m.received_at,
        updated,
        destinations,
        m.code,
        m.detail,
    )


# -- operations -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimOp:
    message_id: str
    sender: str
    digest: str
    document_type: str
    events: tuple[Event, ...]
    at: float


@dataclass(frozen=True, slots=True)
class AcceptOp:
    message_id: str
    receipt: bytes
    destinations: tuple[str, ...]
    events: tuple[Event, ...]
    at: float


@dataclass(frozen=True, slots=True)
class ReleaseOp:
    message_id: str
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class RecordOp:
    events: tuple[Event, ...]


Op = ClaimOp | AcceptOp | ReleaseOp | RecordOp
Result = Claim | BrokerUnavailable | None  # an exception here is raised to that operation's caller only


def touched(ops: Iterable[Op]) -> tuple[list[str], list[str]]:
    """Message ids whose message rows, and whose destination rows, the batch must load."""
    messages: set[str] = set()
    destinations: set[str] = set()
    for op in ops:
        if not isinstance(op, RecordOp):
            messages.add(op.message_id)
        if isinstance(op, AcceptOp):
            destinations.add(op.message_id)
        for e in op.events:
            if e.destination is None:  # a destination's event moves only its destination row
                messages.add(e.message_id)
            else:
                destinations.add(e.message_id)
    return sorted(messages), sorted(destinations)


@dataclass(frozen=True, slots=True)
class Changes:
    upserts: list[tuple[Any, ...]]  # message rows, ready for the messages upsert
    deletes: list[str]
    destinations: list[tuple[Any, ...]]  # destination rows, ready for the destinations upsert
    audit: list[tuple[Any, ...]]  # audit rows, ready for the audit insert (AuditRecord field order)
    records: list[AuditRecord]  # the same, as records
    head: ChainHead


NEW = Claim(ClaimKind.NEW)  # frozen: one instance serves every caller
PENDING = Claim(ClaimKind.PENDING)


class Unit:
    """The rows a batch touches, changed in memory by each operation in turn."""

    def __init__(
        self,
        messages: Iterable[MessageRow],
        destinations: Iterable[tuple[DestinationKey, DestinationStatus]],
        head: ChainHead,
    ) -> None:
        self._messages: dict[str, MessageRow | None] = {m.message_id: m for m in messages}
        self._destinations = dict(destinations)
        self._head = head
        self._entries: list[EntryValues] = []
        self._changed_messages: set[str] = set()
        self._changed_destinations: set[DestinationKey] = set()

    def apply(self, op: Op) -> Result:
        if isinstance(op, ClaimOp):
            return self._claim(op)
        if isinstance(op, AcceptOp):
            return self._accept(op)
        if isinstance(op, ReleaseOp):
            row = self._messages.get(op.message_id)
            if row is not None and row.state is State.RECEIVED:
                self._put(op.message_id, None)
        self._record(op.events)
        return None

    def changes(self) -> Changes:
        upserts, deletes = [], []
        for mid in sorted(self._changed_messages):
            row = self._messages[mid]
            if row is None:
                deletes.append(mid)
            else:
                upserts.append(row.to_row())
        destinations = [destination_to_row(k, self._destinations[k]) for k in sorted(self._changed_destinations)]
        audit = chain_rows(self._entries, self._head)
        head = ChainHead(audit[-1][0], audit[-1][-1]) if audit else self._head
        return Changes(upserts, deletes, destinations, audit, [AuditRecord(*row) for row in audit], head)

    def _claim(self, op: ClaimOp) -> Claim:
        row = self._messages.get(op.message_id)
        if row is None or row.state is State.REJECTED:
            received_at = min((e.at for e in op.events if e.state is State.RECEIVED), default=op.at)
            new = MessageRow(
                op.message_id, op.sender, op.digest, op.document_type, State.RECEIVED, None, received_at, op.at
            )
            self._put(op.message_id, new)
            self._record(op.events)
            return NEW
        if row.sender != op.sender or row.digest != op.digest:
            return Claim(ClaimKind.CONFLICT, existing_sender=row.sender, existing_digest=row.digest)
        if row.state is State.ACCEPTED:
            self._entries.append(
                (iso_utc(op.at), DUPLICATE_REPLAYED, op.message_id, op.sender, op.document_type, None, op.digest,
                 None, None, REPLAYED_DETAIL)
            )  # fmt: skip
            return Claim(ClaimKind.REPLAY, receipt=row.receipt)
        self._record(op.events)
        return PENDING

    def _accept(self, op: AcceptOp) -> Result:
        row = self._messages.get(op.message_id)
        if row is None or row.state not in (State.RECEIVED, State.ACCEPTED):
            return BrokerUnavailable(f"message {op.message_id} has no claim to accept (released meanwhile?)")
        if row.state is State.RECEIVED:
            accepted = MessageRow(
                row.message_id,
                row.sender,
                row.digest,
                row.document_type,
                State.ACCEPTED,
                op.receipt,
                row.received_at,
                op.at,
            )
            self._put(op.message_id, accepted)
        for destination in op.destinations:
            key = (op.message_id, destination)
            if key in self._destinations:
                self._advance(Event(State.QUEUED, op.message_id, destination, at=op.at))
            else:  # what advance(None, that QUEUED event) gives, without building the event
                self._destinations[key] = DestinationStatus(State.QUEUED, 0, op.at)
                self._changed_destinations.add(key)
        self._record(op.events)
        return None

    def _record(self, events: Iterable[Event]) -> None:
        for e in events:
            self._entries.append(entry_values(e))
            if e.destination is not None:
                self._advance(e)
            elif e.state is State.REJECTED:
                self._reject(e)

    def _reject(self, e: Event) -> None:
        # Only a verified sender's rejection is shown as the message's status, and never over a
        # message that is claimed or accepted: a DUPLICATE rejection names the id it collided with.
        if not e.message_id or not e.party:
            return
        row = self._messages.get(e.message_id)
        if row is None or row.state is State.REJECTED:
            rejected = MessageRow(
                e.message_id,
                e.party,
                e.digest or "",
                e.document_type or "",
                State.REJECTED,
                None,
                e.at,
                e.at,
                e.code,
                e.detail,
            )
            self._put(e.message_id, rejected)

    def _advance(self, e: Event) -> None:
        key = (e.message_id, e.destination or "")
        moved = advance(self._destinations.get(key), e)
        if moved is not None:
            self._destinations[key] = moved
            self._changed_destinations.add(key)

    def _put(self, message_id: str, row: MessageRow | None) -> None:
        self._messages[message_id] = row
        self._changed_messages.add(message_id)


def decide(
    messages: Iterable[MessageRow],
    destinations: Iterable[tuple[DestinationKey, DestinationStatus]],
    head: ChainHead,
    ops: Iterable[Op],
) -> tuple[list[Result], Changes]:
    """Apply ``ops`` in order to the loaded rows: each operation's result, and what to write."""
    unit = Unit(messages, destinations, head)
    results = [unit.apply(op) for op in ops]
    return results, unit.changes()
