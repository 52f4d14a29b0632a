"""Operator actions on dead letters, shared by ``nswgw dlq`` and the demo."""

from __future__ import annotations

from gateway.brokers.base import Broker
from gateway.events import Event, Recorder
from gateway.model import State


async def replay_dead_letters(
    broker: Broker, recorder: Recorder, *, destination: str | None = None, message_id: str | None = None
) -> int:
    """Move matching dead letters back to their work queues, keeping their messageId; returns how many.

    REPLAYED is recorded *before* the move: a worker may deliver the message at once, and its DELIVERED
    must find the status already reopened (DEAD is otherwise final).
    """
    chosen = [
        r for r in await broker.list_dead(destination) if message_id is None or r.delivery.message_id == message_id
    ]
    if not chosen:
        return 0
    await recorder.record(
        [
            Event(
                State.REPLAYED,
                r.delivery.message_id,
                r.delivery.destination,
                party=r.delivery.sender,
                document_type=r.delivery.document_type,
                digest=r.delivery.digest,
                detail=f"operator replay of dead letter ({r.code}: {r.reason})",
            )
            for r in chosen
        ]
    )
    return await broker.replay_dead(destination, message_id)
