"""The adapter Protocol. Adapters know nothing of the ingress or the pipeline.

``deliver`` returns normally when the receiver has taken the message, raises
``gateway.errors.TransientFailure`` when a later attempt may succeed, and
``gateway.errors.PermanentFailure`` when it never will as it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway.model import Delivery


@dataclass(frozen=True, slots=True)
class DeliveryReceipt:
    """What the receiver gave back as proof of taking the message."""

    status: int | None = None  # HTTP status, when there is one
    detail: str = ""
    proof: bytes | None = None  # e.g. the ASW peer's signed receipt, stored as proof of delivery
    extra: dict[str, Any] = field(default_factory=dict)


class Adapter(Protocol):
    name: str  # the destination name from the routing config

    async def deliver(self, delivery: Delivery) -> DeliveryReceipt: ...

    async def close(self) -> None: ...


# What a file an adapter loaded looked like: (path, st_mtime_ns, st_size, st_ino), -1s when unreadable.
FileStamp = tuple[str, int, int, int]


def stamp_files(paths: Iterable[Path | str | None]) -> tuple[FileStamp, ...]:
    """The files' stamps as they are now, for an adapter's ``loaded_files``.

    An adapter that reads files when it is built (TLS certificates, keys, CA bundles) keeps their stamps,
    taken *before* it reads them, in an attribute ``loaded_files``; a routing reload rebuilds it when
    they no longer match (a certificate replaced in place). Stamping first means a file replaced while
    it is read looks changed, so it is read again, never missed.
    """
    stamps: list[FileStamp] = []
    for path in paths:
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            stamps.append((str(path), -1, -1, -1))
        else:
            stamps.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


def changed_paths(then: Iterable[FileStamp], now: Iterable[FileStamp]) -> list[str]:
    """The paths whose stamps differ between two stampings, files that appeared or went included; sorted."""
    return sorted({stamp[0] for stamp in set(then) ^ set(now)})


def changed_files(adapter: Adapter) -> list[str]:
    """The files ``adapter`` loaded (``loaded_files``) that have changed since; [] for adapters that load none."""
    loaded: tuple[FileStamp, ...] = getattr(adapter, "loaded_files", ())
    return changed_paths(loaded, stamp_files(stamp[0] for stamp in loaded))


def held_code(adapter: Adapter) -> str | None:
    """The code every attempt on ``adapter`` fails with while it sends nothing at all (an adapter that
    holds what is queued for its lane says so with a ``held()`` method), or None while it delivers."""
    held = getattr(adapter, "held", None)
    return held() if held is not None else None
