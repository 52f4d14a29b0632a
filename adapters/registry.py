"""Adapter kinds by name, as the routing config's destinations refer to them (``adapter: http``).

A new kind (the ASW peer adapter, ...) registers itself with ``register_adapter_kind``; nothing here
changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adapters.base import Adapter
from adapters.file import FileAdapter
from adapters.http import HttpAdapter
from gateway.errors import ConfigError

# (destination name, options from the routing config, directory relative paths are resolved against)
AdapterFactory = Callable[[str, Mapping[str, Any], Path], Adapter]

ADAPTER_KINDS: dict[str, AdapterFactory] = {
    "http": HttpAdapter.from_options,
    "file": FileAdapter.from_options,
}


def register_adapter_kind(kind: str, factory: AdapterFactory) -> None:
    if kind in ADAPTER_KINDS and ADAPTER_KINDS[kind] is not factory:
        raise ValueError(f"adapter kind {kind!r} is already registered")
    ADAPTER_KINDS[kind] = factory


def build_adapter(name: str, kind: str, options: Mapping[str, Any], *, base_dir: Path) -> Adapter:
    """Build destination ``name``'s adapter; every configuration fault is a ``ConfigError`` naming it."""
    factory = ADAPTER_KINDS.get(kind)
    if factory is None:
        known = ", ".join(sorted(ADAPTER_KINDS))
        raise ConfigError(f"destination {name!r}: unknown adapter kind {kind!r} (known: {known})")
    try:
        return factory(name, options, base_dir)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"destination {name!r}: bad {kind} adapter options: {exc}") from exc
