"""Per-party rate limiting (token buckets) and the sendDate freshness window."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.errors import ErrorCode, Rejected
from gateway.model import Header


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """A token bucket per party: ``rate`` messages/s sustained, ``burst`` at once."""

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, party: str) -> None:
        now = self._clock()
        bucket = self._buckets.get(party)
        if bucket is None:
            bucket = self._buckets[party] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            raise Rejected(
                ErrorCode.RATE_LIMITED,
                f"party {party} is over its rate of {self.rate:g} messages/s; retry later",
                "/Envelope/Header/From/identity",
            )
        bucket.tokens -= 1.0


def check_freshness(header: Header, now: datetime, *, past: float, future: float) -> None:
    """Refuse a sendDate outside ``[now - past, now + future]`` (replays of old captures, broken clocks)."""
    if header.send_date < now - timedelta(seconds=past):
        raise Rejected(
            ErrorCode.STALE,
            f"sendDate {header.send_date.isoformat()} is older than the {past:g} s freshness window",
            "/Envelope/Header/Subject/sendDate",
        )
    if header.send_date > now + timedelta(seconds=future):
        raise Rejected(
            ErrorCode.STALE,
            f"sendDate {header.send_date.isoformat()} is more than {future:g} s in the future",
            "/Envelope/Header/Subject/sendDate",
        )
