"""Pick the ledger from the settings: PostgreSQL when a database URL is set, else SQLite in the data folder."""

from __future__ import annotations

from pathlib import Path

from gateway.stores.base import Ledger
from gateway.stores.sqlite import SqliteLedger

SQLITE_FILE = "ledger.sqlite3"


def make_ledger(database_url: str | None, data_dir: Path, *, synchronous: str = "FULL", linger: float = 0.0) -> Ledger:
    """``database_url``: ``postgresql://...`` (or ``postgres://``), ``sqlite:///path/file``, or None for
    ``data_dir/ledger.sqlite3``. ``synchronous`` applies to SQLite only; ``linger`` (seconds) is the
    group commit's wait for company (``gateway/stores/group.py``)."""
    if database_url is None:
        return SqliteLedger(data_dir / SQLITE_FILE, synchronous=synchronous, linger=linger)
    if database_url.startswith("sqlite:///"):
        return SqliteLedger(Path(database_url.removeprefix("sqlite:///")), synchronous=synchronous, linger=linger)
    if database_url.startswith(("postgresql://", "postgres://")):
        from gateway.stores.postgres import PostgresLedger  # noqa: PLC0415 -- asyncpg is an optional dependency

        return PostgresLedger(database_url, linger=linger)
    raise ValueError(
        f"database_url must start with postgresql://, postgres:// or sqlite:///, not {database_url[:20]!r}"
    )
