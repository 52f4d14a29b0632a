"""Reading one destination's adapter options from the routing config, with errors that name it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError


class Options:
    """Typed access to an ``options`` mapping; ``finish()`` rejects keys nobody asked for (typos)."""

    def __init__(self, destination: str, kind: str, options: Mapping[str, Any], base_dir: Path) -> None:
        if not isinstance(options, Mapping):
            raise ConfigError(f"destination {destination!r}: {kind} adapter options must be a mapping")
        self._where = f"destination {destination!r} ({kind} adapter)"
        self._options = options
        self._base_dir = base_dir
        self._seen: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self._where}: option {key!r} {problem}")

    def _get(self, key: str) -> Any:
        self._seen.add(key)
        return self._options.get(key)

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str) or not value:
            raise self.error(key, "is required and must be a non-empty string")
        return value

    def choice(self, key: str, choices: list[str], *, default: str) -> str:
        value = self._get(key)
        if value is None:
            return default
        if value not in choices:
            raise self.error(key, f"must be one of {choices}, got {value!r}")
        return str(value)

    def number(self, key: str, default: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.error(key, f"must be a positive number, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(key, f"must be a whole number of at least 1, got {value!r}")
        return value

    def path(self, key: str, *, must_exist: bool) -> Path | None:
        """A path, relative to the config's base directory unless absolute."""
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, str | Path) or not str(value):
            raise self.error(key, f"must be a path, got {value!r}")
        path = self._base_dir / Path(value)
        if must_exist and not path.is_file():
            raise self.error(key, f"names {path}, which is not a readable file")
        return path

    def string_map(self, key: str) -> dict[str, str]:
        value = self._get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.error(key, "must map names to string values")
        return dict(value)

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self._options if k not in self._seen)
        if unknown:
            raise ConfigError(f"{self._where}: unknown option(s) {', '.join(map(repr, unknown))}")
