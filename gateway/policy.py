"""Per-destination delivery policies: pure values, parsed from the routing config, applied by the worker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    in_process_attempts: int = 3  # quick attempts inside one delivery (tenacity), before handing back
    in_process_wait: float = 0.2  # first exponential wait between those, seconds (with jitter)
    tiers: tuple[float, ...] = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)  # broker-level delays by attempt
    max_attempts: int = 12  # broker-level deliveries before the message is dead-lettered
    max_age: float = 2 * 86400.0  # seconds since first enqueue before the message is dead-lettered

    def delay_for(self, attempt: int) -> float:
        """Delay before broker-level attempt ``attempt + 1`` (attempt counts from 1)."""
        return self.tiers[min(max(attempt, 1), len(self.tiers)) - 1]

    def exhausted(self, attempt: int, age: float) -> bool:
        return attempt >= self.max_attempts or age >= self.max_age


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_threshold: int = 5  # consecutive transient failures that open the circuit
    reset_after: float = 30.0  # seconds open before one half-open probe is let through
