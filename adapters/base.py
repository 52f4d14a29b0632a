"""The adapter Protocol. Adapters know nothing of the ingress or the pipeline.

``deliver`` returns normally when the receiver has taken the message, raises
``gateway.errors.TransientFailure`` when a later attempt may succeed, and
``gateway.errors.PermanentFailure`` when it never will as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
