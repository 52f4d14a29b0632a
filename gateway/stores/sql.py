"""The SQL both ledgers share, in qmark style (SQLite's); ``numbered`` rewrites it for asyncpg.

Column orders match ``gateway.stores.batch``'s row conversions. The table definitions stay with
each backend: their types differ.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

INSERT_GENESIS = "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, ?) ON CONFLICT DO NOTHING"
SELECT_HEAD = "SELECT seq, hash FROM audit_head WHERE id = 1"
UPDATE_HEAD = "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1"
# Each backend completes these three with its own way of matching a list of ids.
MESSAGES_WHERE_ID = (
    "SELECT message_id, sender, digest, document_type, state, receipt, received_at, updated_at, code, detail "
    "FROM messages WHERE message_id"
)
DESTINATIONS_WHERE_ID = (
    "SELECT message_id, destination, state, attempt, generation, updated_at, code, detail "
    "FROM destinations WHERE message_id"
)
DELETE_MESSAGES_WHERE_ID = "DELETE FROM messages WHERE message_id"
# A scan of the whole table, for operator commands (the pending index below leaves dead copies out, so
# that it stays as small as the backlog).
DEAD_DESTINATIONS = "SELECT DISTINCT destination FROM destinations WHERE state = 'DEAD' ORDER BY destination"
# Copies not yet delivered or dead-lettered. A partial index keeps the start-up question "which destinations
# still hold accepted copies?" a walk over the backlog, not over every copy ever delivered: each copy enters
# it once (accepted) and leaves it once (delivered or dead), two small index writes in commits already made.
# (The two WHERE clauses must stay the same for the query to use the index.)
PENDING_INDEX = (
    "CREATE INDEX IF NOT EXISTS destinations_pending ON destinations (destination) "
    "WHERE state NOT IN ('DELIVERED', 'DEAD')"
)
PENDING_DESTINATIONS = (
    "SELECT destination, count(*) FROM destinations WHERE state NOT IN ('DELIVERED', 'DEAD') "
    "GROUP BY destination ORDER BY destination"
)


@dataclass(frozen=True)
class RowsInsert:
    """An INSERT (an upsert when ``key`` is set) of many rows in one statement.

    One statement per batch rather than one ``executemany`` step per row: each step is a round
    trip through the driver (for SQLite, a release and retake of the GIL).
    """

    table: str
    columns: tuple[str, ...]
    key: tuple[str, ...] = ()  # the conflict target: on a clash every other column is replaced

    @property
    def head(self) -> str:
        return f"INSERT INTO {self.table} ({', '.join(self.columns)}) "

    @property
    def tail(self) -> str:
        if not self.key:
            return ""
        replaced = ", ".join(f"{c} = excluded.{c}" for c in self.columns if c not in self.key)
        return f" ON CONFLICT ({', '.join(self.key)}) DO UPDATE SET {replaced}"

    @functools.cache  # noqa: B019 -- a few module-level instances, each with a handful of row counts
    def values(self, rows: int) -> str:
        """The statement for ``rows`` rows, qmark style."""
        row = "(" + ", ".join("?" * len(self.columns)) + ")"
        return f"{self.head}VALUES {', '.join([row] * rows)}{self.tail}"


UPSERT_MESSAGES = RowsInsert(
    "messages",
    ("message_id", "sender", "digest", "document_type", "state", "receipt", "received_at", "updated_at", "code",
     "detail"),
    key=("message_id",),
)  # fmt: skip
UPSERT_DESTINATIONS = RowsInsert(
    "destinations",
    ("message_id", "destination", "state", "attempt", "generation", "updated_at", "code", "detail"),
    key=("message_id", "destination"),
)
INSERT_AUDIT = RowsInsert(
    "audit",
    ("seq", "at", "event", "message_id", "party", "document_type", "destination", "digest", "attempt", "code",
     "detail", "prev_hash", "hash"),
)  # fmt: skip
SELECT_AUDIT = (
    "SELECT seq, at, event, message_id, party, document_type, destination, digest, attempt, code, detail, "
    "prev_hash, hash FROM audit"
)
AUDIT_AFTER = SELECT_AUDIT + " WHERE seq > ? ORDER BY seq LIMIT ?"
AUDIT_OF_MESSAGE = SELECT_AUDIT + " WHERE message_id = ? ORDER BY seq"
AUDIT_ALL = SELECT_AUDIT + " ORDER BY seq"


def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (our statements hold no literal ``?``)."""
    counter = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)
