"""Message status: what the ledger shows for a message, and the monotonic rule that moves it.

Per (message, destination) a state only moves forward::

    QUEUED < DELIVERING(1) < RETRY_WAIT(1) < DELIVERING(2) < RETRY_WAIT(2) < ... < DELIVERED | DEAD

DELIVERING and RETRY_WAIT alternate, so they are ordered by attempt number first. DELIVERED is
final. DEAD is final too, except that an operator's REPLAYED reopens it: the replay starts a new
*generation* whose attempts count from 1 again, so its events are not mistaken for stale ones.
Events carry no generation, so after a replay every delivery event is taken to belong to the new
one; a worker records an attempt's events before it acks, so an old generation's events cannot
still be in flight when an operator replays the dead letter.

Message-level states (RECEIVED, ACCEPTED, REJECTED) live on the message row and are moved by the
ledger's claim/accept/release; they never create or move a destination row.

Times are epoch seconds (``Event.at``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.events import Event
from gateway.model import State

DESTINATION_STATES = frozenset(
    {State.QUEUED, State.DELIVERING, State.RETRY_WAIT, State.DELIVERED, State.DEAD, State.REPLAYED}
)
FINAL = frozenset({State.DELIVERED, State.DEAD})  # DEAD only yields to REPLAYED


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    state: State
    attempt: int = 0  # 0 until a delivery attempt is recorded
    updated_at: float = 0.0
    code: str | None = None
    detail: str = ""
    generation: int = 0  # incremented by each operator replay of a dead letter


@dataclass(frozen=True, slots=True)
class MessageStatus:
    message_id: str
    sender: str
    digest: str
    document_type: str
    state: State  # RECEIVED (claimed, not yet accepted), ACCEPTED or REJECTED
    received_at: float
    updated_at: float  # the latest change to the message or any of its destinations
    destinations: dict[str, DestinationStatus] = field(default_factory=dict)
    code: str | None = None  # the rejection code when REJECTED
    detail: str = ""


def _position(state: State, attempt: int) -> tuple[int, int, int]:
    if state is State.REPLAYED:
        return (0, 0, 0)
    if state is State.QUEUED:
        return (1, 0, 0)
    if state is State.DELIVERING:
        return (2, attempt, 0)
    if state is State.RETRY_WAIT:
        return (2, attempt, 1)
    return (3, 0, 0)  # DELIVERED, DEAD


def advance(current: DestinationStatus | None, event: Event) -> DestinationStatus | None:
    """The destination's status after ``event``, or None when the event is stale or not a destination's."""
    state = event.state
    if state not in DESTINATION_STATES or event.destination is None:
        return None
    attempt = event.attempt or 0
    generation = current.generation if current is not None else 0
    if state is State.REPLAYED:
        if current is not None and current.state is not State.DEAD:
            return None
        generation += 1
    elif current is not None and (
        current.state in FINAL or _position(state, attempt) <= _position(current.state, current.attempt)
    ):
        return None
    return DestinationStatus(state, attempt, event.at, event.code, event.detail, generation)
