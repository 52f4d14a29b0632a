"""Lanes that send nothing: they hold what is queued for a destination the configuration gives nowhere to go.

Two cases, both found when a worker starts (``Gateway.start_worker``) or a reload changes the registry:

* an ASW peer the partner registry gives no endpoint (``adapters.asw.PeerWithheld``, ``PEER_WITHHELD``);
* a destination no routing rule configures any more while its queue still holds accepted copies
  (``DestinationRemoved``, ``DESTINATION_REMOVED``). A reload that removes a destination leaves its
  running lane draining with its last settings; after a restart those settings are gone, and without a
  lane the copies would sit in the queue, QUEUED, with nothing saying why and nothing ever ending their
  wait. So the worker gives every such destination (``Ledger.pending_destinations``) a holding lane.

Each attempt on such a lane sends nothing and fails with the held reason: the copy waits in RETRY_WAIT
with that code (in its status and the audit trail) on the default retry schedule, until a routing reload
configures the destination again (the reload swaps the real adapter in on this lane and the copies go out
with their Idempotency-Keys at their next attempt) or the retry limits dead-letter them, where ``nswgw
dlq`` lists and replays them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Final

from adapters.base import DeliveryReceipt
from gateway.model import Delivery
from gateway.retry import DeliveryHeld

REMOVED_CODE: Final = "DESTINATION_REMOVED"
REMOVED_NOTE: Final = (
    "no routing rule in force configures it, and accepted copies are still queued for it: they are held "
    f"({REMOVED_CODE}) until a routing reload configures it again, or dead-lettered at the default retry limits"
)


class DestinationRemoved(DeliveryHeld):
    """No routing rule in force configures the destination: not sent."""

    def __init__(self, destination: str) -> None:
        super().__init__(
            REMOVED_CODE,
            f"destination {destination!r} is not in the routing rules in force: not sent; held in its queue "
            "until a routing reload configures it again, dead-lettered at the default retry limits",
        )


class HoldingAdapter:
    """Every attempt raises a fresh ``hold()``: nothing is sent (``held`` names the code, for metrics)."""

    def __init__(self, name: str, hold: Callable[[], DeliveryHeld]) -> None:
        self.name = name
        self._hold = hold
        self._code = hold().code

    def held(self) -> str:
        return self._code

    async def deliver(self, delivery: Delivery) -> DeliveryReceipt:
        raise self._hold()

    async def close(self) -> None:
        return None


def removed_destination_adapter(name: str) -> HoldingAdapter:
    return HoldingAdapter(name, partial(DestinationRemoved, name))
