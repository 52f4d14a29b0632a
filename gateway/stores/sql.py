"""The SQL both ledgers share, in qmark style (SQLite's); ``numbered`` rewrites it for asyncpg.

Column orders match ``gateway.stores.batch``'s row conversions. The table definitions stay with
each backend: their types differ.
"""

from __future__ import annotations

import itertools
import re

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
UPSERT_MESSAGE = (
    "INSERT INTO messages (message_id, sender, digest, document_type, state, receipt, received_at, updated_at, "
    "code, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id) DO UPDATE SET "
    "sender = excluded.sender, digest = excluded.digest, document_type = excluded.document_type, "
    "state = excluded.state, receipt = excluded.receipt, received_at = excluded.received_at, "
    "updated_at = excluded.updated_at, code = excluded.code, detail = excluded.detail"
)
UPSERT_DESTINATION = (
    "INSERT INTO destinations (message_id, destination, state, attempt, generation, updated_at, code, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id, destination) DO UPDATE SET "
    "state = excluded.state, attempt = excluded.attempt, generation = excluded.generation, "
    "updated_at = excluded.updated_at, code = excluded.code, detail = excluded.detail"
)
INSERT_AUDIT = (
    "INSERT INTO audit (seq, at, event, message_id, party, document_type, destination, digest, attempt, code, "
    "detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
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
