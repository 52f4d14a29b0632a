"""Settings: read once at start-up from a TOML file and ``NSW_``-prefixed environment variables.

Nothing else in the gateway reads the environment. Precedence: explicit overrides (CLI flags) >
environment > TOML file > defaults. Paths in the TOML file are relative to the file's folder.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gateway.errors import ConfigError

ENV_PREFIX = "NSW_"
SECRET_FIELDS = frozenset({"amqp_url", "database_url", "operator_token"})


@dataclass(frozen=True, slots=True)
class Settings:
    certs_dir: Path = Path("certs/dev")  # the layout written by `nswgw certs init DIR`
    data_dir: Path = Path("var")  # embedded broker and SQLite ledger
    host: str = "127.0.0.1"
    port: int = 8080
    amqp_url: str | None = None  # RabbitMQ when set, else the embedded broker
    queue_prefix: str = "nsw"  # RabbitMQ queue names: <prefix>.work.<destination>, .retry., .dead.
    database_url: str | None = None  # PostgreSQL DSN when set, else SQLite in data_dir
    routing_file: Path | None = None  # None = routing/default.yaml
    registry_file: Path | None = None  # None = schemas/registry.yaml
    partners_file: Path | None = None  # None = certs_dir/partners.yaml
    gateway_identity: str = "VN-NSW"
    gateway_name: str = "Viet Nam National Single Window"
    gateway_country: str = "VN"
    max_body_bytes: int = 32 * 1024 * 1024
    max_depth: int = 100
    freshness_past_seconds: float = 24 * 3600.0  # sendDate older than this is STALE
    freshness_future_seconds: float = 300.0  # allowed clock skew ahead
    rate_per_party: float = 500.0  # messages per second per party (token bucket)
    rate_burst: float = 1000.0
    prefetch: int = 16
    processes: int = 1  # `nswgw run|serve|worker`: this many processes sharing the port (one per core)
    retry_tiers: tuple[float, ...] = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
    lease_seconds: float = 60.0
    sqlite_synchronous: str = "FULL"
    # Ledger group commit: after a commit that carried several operations, wait this long for more
    # before the next one (0 = never wait). See gateway/stores/group.py.
    ledger_linger_ms: float = 2.0
    operator_token: str | None = None  # bearer token for operator endpoints
    tls_cert: Path | None = None  # ingress server certificate (HTTPS) ...
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # ... and client-certificate CA (mutual TLS)
    log_format: str = "json"  # json | console
    log_level: str = "info"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def trust_dir(self) -> Path:
        return self.certs_dir / "trust"

    @property
    def gateway_key(self) -> Path:
        return self.certs_dir / "gateway" / "key.pem"

    @property
    def gateway_cert(self) -> Path:
        return self.certs_dir / "gateway" / "cert.pem"

    @property
    def partners_path(self) -> Path:
        return self.partners_file or self.certs_dir / "partners.yaml"

    def redacted(self) -> dict[str, Any]:
        """The effective settings for `nswgw config show`, secrets masked."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = _redact(str(value))
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def _redact(value: str) -> str:
    parts = urlsplit(value)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return "***" if "://" not in value else value


def _coerce(name: str, raw: Any, annotation: Any, base: Path) -> Any:
    kind = str(annotation)
    try:
        if raw is None:
            return None
        if "Path" in kind:
            path = Path(str(raw)).expanduser()
            return path if path.is_absolute() else base / path
        if "tuple" in kind:
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(float(x) for x in items)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: cannot use {raw!r}: {exc}") from exc


def load_settings(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    environ = os.environ if environ is None else environ
    known = {f.name: f for f in fields(Settings) if f.name != "extra"}
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{config_file}: {exc}") from exc
        section = data.get("gateway", data)
        for key, raw in section.items():
            if key not in known:
                raise ConfigError(f"{config_file}: unknown setting {key!r}")
            values[key] = _coerce(key, raw, known[key].type, config_file.parent.resolve())
    cwd = Path.cwd()
    for key, raw in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in known:
                values[name] = _coerce(name, raw, known[name].type, cwd)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            if key not in known:
                raise ConfigError(f"unknown setting {key!r}")
            values[key] = _coerce(key, raw, known[key].type, cwd)
    settings = dataclasses.replace(Settings(), **values)
    if settings.sqlite_synchronous.upper() not in {"FULL", "NORMAL", "EXTRA"}:
        raise ConfigError(f"setting sqlite_synchronous: {settings.sqlite_synchronous!r} is not FULL, NORMAL or EXTRA")
    if not 0 <= settings.ledger_linger_ms <= 1000:
        raise ConfigError(f"setting ledger_linger_ms: {settings.ledger_linger_ms} is not between 0 and 1000")
    return settings
