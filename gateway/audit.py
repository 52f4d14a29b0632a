"""The append-only, hash-chained audit log: record shape, chaining and verification (pure functions).

Each record's ``hash`` covers its predecessor's hash and every other field of the record::

    hash = sha256_hex( prev_hash + canonical_json(record without prev_hash and hash) )

where ``prev_hash`` is the predecessor's 64-character lowercase hex hash (64 zeros for record 1),
``+`` is string concatenation, and the canonical JSON is ``json.dumps(fields, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`` encoded as UTF-8: keys sorted, no spaces, absent values
as ``null``. ``seq`` is part of the hashed fields, so a record cannot be moved without its hash
changing. An external verifier needs nothing but this paragraph.

The stores keep a one-row *head* (last seq and hash) updated in the same transaction as every
append; comparing it with the log's end also catches a truncated tail or a record appended by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring as _quote  # the json module's own string writer (ensure_ascii=False)
from math import isfinite, modf
from typing import Any

import structlog

from gateway.events import Event

GENESIS_HASH = "0" * 64
DUPLICATE_REPLAYED = "DUPLICATE_REPLAYED"  # audit-only event kind: a repeated message got its original receipt


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What happened, before it has a place in the chain."""

    at: str  # UTC ISO-8601 with microseconds, e.g. 2026-11-24T10:00:00.123456Z
    event: str  # a State name, or another event kind such as DUPLICATE_REPLAYED
    message_id: str
    party: str | None = None
    document_type: str | None = None
    destination: str | None = None
    digest: str | None = None  # SHA-256 hex of the exact received bytes
    attempt: int | None = None
    code: str | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int  # 1..n, gapless
    at: str
    event: str
    message_id: str
    party: str | None
    document_type: str | None
    destination: str | None
    digest: str | None
    attempt: int | None
    code: str | None
    detail: str
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class ChainHead:
    seq: int = 0
    hash: str = GENESIS_HASH


@dataclass(frozen=True, slots=True)
class AuditReport:
    ok: bool
    count: int  # records examined (all of them when ok)
    first_bad_seq: int | None = None  # the first position where the log differs from an intact chain
    reason: str = ""
    last_hash: str = GENESIS_HASH  # hash of the last good record: note it down to anchor the log


def _iso_utc(at: float) -> str:
    # isoformat is several times faster than strftime; "+00:00" -> "Z"
    return datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="microseconds")[:-6] + "Z"


_second: tuple[int, str] = (0, _iso_utc(0)[:-8])  # the last whole second formatted, "YYYY-MM-DDTHH:MM:SS"


def iso_utc(at: float) -> str:
    """``at`` (epoch seconds) as UTC ISO-8601 with microseconds and ``Z``, exactly as ``datetime`` renders it.

    Events come in bursts within one second, so that second's text is kept and only the microseconds
    are formatted. They are split off as ``datetime.fromtimestamp`` does (CPython's
    ``_PyTime_DoubleToDenominator``: ``modf``, scale, round half to even, carry into the seconds).
    """
    global _second  # noqa: PLW0603 -- a one-entry cache, replaced whole (atomic under the GIL)
    if not isfinite(at):
        return _iso_utc(at)  # raises as datetime does
    fraction, whole = modf(at)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1.0
    elif micros < 0:
        micros += 1_000_000
        whole -= 1.0
    second = int(whole)
    cached = _second
    if cached[0] != second:
        cached = _second = (second, _iso_utc(second)[:-8])
    return f"{cached[1]}.{micros:06d}Z"


EntryValues = tuple[str, str, str, str | None, str | None, str | None, str | None, int | None, str | None, str]
"""An ``AuditEntry``'s fields as a plain tuple, in ``ENTRY_FIELDS`` order (cheaper to build than the dataclass)."""


def entry_values(event: Event) -> EntryValues:
    return (
        iso_utc(event.at), event.state.value, event.message_id, event.party, event.document_type,
        event.destination, event.digest, event.attempt, event.code, event.detail,
    )  # fmt: skip


def entry_from_event(event: Event) -> AuditEntry:
    return AuditEntry(*entry_values(event))


ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(AuditEntry))
_AUDIT_FIELDS = tuple(f.name for f in dataclasses.fields(AuditRecord))


def hashed_fields(seq: int, entry: AuditEntry | AuditRecord) -> dict[str, Any]:
    """What a record's hash covers: every field but ``prev_hash`` and ``hash``."""
    return {"seq": seq, **{name: getattr(entry, name) for name in ENTRY_FIELDS}}


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(fields: dict[str, Any]) -> bytes:
    return _CANONICAL.encode(fields).encode("utf-8")


def record_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_json(fields)).hexdigest()


GENESIS = ChainHead()


def chain(entries: Iterable[AuditEntry], head: ChainHead = GENESIS) -> list[AuditRecord]:
    """Give ``entries`` the next seqs after ``head`` and link each to its predecessor."""
    values = ((e.at, e.event, e.message_id, e.party, e.document_type, e.destination, e.digest, e.attempt, e.code,
               e.detail) for e in entries)  # fmt: skip
    return [AuditRecord(*row) for row in chain_rows(values, head)]


def chain_rows(entries: Iterable[EntryValues], head: ChainHead = GENESIS) -> list[tuple[Any, ...]]:
    """``chain`` for entries given as tuples: each record as a tuple in ``AuditRecord`` field order."""
    rows: list[tuple[Any, ...]] = []
    seq, prev = head.seq, head.hash
    for entry in entries:
        seq += 1
        text = _canonical_text(seq, entry)
        digest = hashlib.sha256(prev.encode("ascii") + text.encode("utf-8")).hexdigest()
        rows.append((seq, *entry, prev, digest))
        prev = digest
    return rows


_int_text = int.__repr__  # what the json module writes for an int
_STR_OR_NONE = frozenset({str, type(None)})
_INT_OR_NONE = frozenset({int, type(None)})


def _canonical_text(seq: int, e: EntryValues) -> str:
    """``canonical_json(hashed_fields(seq, entry))`` as text, written out field by field (five times faster).

    Only for the types the json module writes as plain strings and integers (``str``, ``int``,
    ``None``, checked exactly); anything else takes the general path, so the bytes are always the
    same as ``canonical_json``'s. The keys below are in sorted order ("at" sorts before "attempt").
    """
    at, event, message_id, party, document_type, destination, digest, attempt, code, detail = e
    if (
        type(seq) is not int
        or type(at) is not str
        or type(event) is not str
        or type(message_id) is not str
        or type(detail) is not str
        or type(attempt) not in _INT_OR_NONE
        or type(party) not in _STR_OR_NONE
        or type(document_type) not in _STR_OR_NONE
        or type(destination) not in _STR_OR_NONE
        or type(digest) not in _STR_OR_NONE
        or type(code) not in _STR_OR_NONE
    ):
        return _CANONICAL.encode({"seq": seq, **dict(zip(ENTRY_FIELDS, e, strict=True))})
    q = _quote
    return (
        f'{{"at":{q(at)},"attempt":{"null" if attempt is None else _int_text(attempt)},'
        f'"code":{"null" if code is None else q(code)},'
        f'"destination":{"null" if destination is None else q(destination)},"detail":{q(detail)},'
        f'"digest":{"null" if digest is None else q(digest)},'
        f'"document_type":{"null" if document_type is None else q(document_type)},"event":{q(event)},'
        f'"message_id":{q(message_id)},"party":{"null" if party is None else q(party)},"seq":{_int_text(seq)}}}'
    )


class ChainVerifier:
    """Checks records fed in seq order, one at a time, so a long log is never held in memory."""

    def __init__(self) -> None:
        self._expected = 1
        self._prev = GENESIS_HASH
        self._count = 0
        self._fault: tuple[int, str] | None = None

    def feed(self, record: AuditRecord) -> bool:
        """Check the next record; False once a fault is found (the caller may stop reading)."""
        if self._fault is not None:
            return False
        self._count += 1
        expected = self._expected
        if record.seq != expected:
            self._fault = (expected, f"expected record {expected} next but found {record.seq}: deleted or reordered")
        elif record.prev_hash != self._prev:
            self._fault = (
                expected,
                f"record {expected} does not link to record {expected - 1} (prev_hash mismatch): "
                "a record was inserted, deleted or reordered here",
            )
        elif record_hash(record.prev_hash, hashed_fields(record.seq, record)) != record.hash:
            self._fault = (expected, f"record {expected} does not match its hash: edited")
        else:
            self._expected += 1
            self._prev = record.hash
            return True
        return False

    def report(self, head: ChainHead | None = None) -> AuditReport:
        """The verdict; ``head`` is the store's own note of the last seq and hash, when it keeps one."""
        last = self._expected - 1
        fault = self._fault
        if fault is None and head is not None:
            if head.seq > last:
                fault = (last + 1, f"the log ends at record {last} but its head says {head.seq}: truncated")
            elif head.seq < last:
                fault = (head.seq + 1, f"records after {head.seq} were appended outside the ledger")
            elif head.hash != self._prev:
                fault = (last, f"record {last} does not match the head hash: edited")
        if fault is None:
            return AuditReport(True, self._count, None, f"{last} records, chain intact", self._prev)
        return AuditReport(False, self._count, fault[0], fault[1], self._prev)


def verify_chain(records: Iterable[AuditRecord], head: ChainHead | None = None) -> AuditReport:
    verifier = ChainVerifier()
    for record in records:
        if not verifier.feed(record):
            break
    return verifier.report(head)


class _Lines:
    """A structlog logger that keeps the rendered lines instead of writing them."""

    def __init__(self) -> None:
        self.lines: list[Any] = []

    def msg(self, message: Any) -> None:
        self.lines.append(message)

    info = msg


def emit(records: Iterable[AuditRecord]) -> None:
    """One log line per committed record (logger ``nsw.audit``, event ``audit``): an off-site copy.

    The record's own ``event`` field is logged as ``audit_event`` (``event`` is structlog's message key).
    The lines are rendered by the configured processors and written as one block, with one flush: a
    flush per line releases and retakes the GIL each time, and under load that back-and-forth with the
    event loop's thread cost several times the rendering itself.
    """
    config = structlog.get_config()  # per call, not per module: honours a later reconfiguration
    rendered = _Lines()
    # bind(): a real bound logger, not the lazy proxy, which would build a new one for every record.
    log = structlog.wrap_logger(rendered, processors=config["processors"], wrapper_class=config["wrapper_class"]).bind()
    for record in records:
        fields = {name: getattr(record, name) for name in _AUDIT_FIELDS}  # asdict() deep-copies: 4x slower
        fields["audit_event"] = fields.pop("event")
        log.info("audit", **fields)
    if not rendered.lines:
        return
    out = config["logger_factory"]("nsw.audit")
    if all(isinstance(line, str) for line in rendered.lines):
        out.msg("\n".join(rendered.lines))
    else:  # a renderer that does not produce text lines: hand them over one by one
        for line in rendered.lines:
            out.msg(line)
