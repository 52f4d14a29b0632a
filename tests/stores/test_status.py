"""The monotonic status rule, ``gateway.status.advance``, on its own."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest

from gateway.events import Event
from gateway.model import State
from gateway.status import DestinationStatus, advance

DEST = "moit-licensing"


def ev(state: State, attempt: int | None = None, *, destination: str | None = DEST, at: float = 1.0) -> Event:
    return Event(state, "m-1", destination, attempt=attempt, at=at, code=f"{state}:{attempt}")


def fold(
    events: Iterable[Event], start: DestinationStatus | None = None
) -> tuple[DestinationStatus | None, list[Event]]:
    """Apply events in turn; return the final status and the events that moved it."""
    current, moved = start, []
    for e in events:
        nxt = advance(current, e)
        if nxt is not None:
            current = nxt
            moved.append(e)
    return current, moved


def test_first_event_for_a_destination_creates_its_status() -> None:
    status = advance(None, Event(State.DELIVERING, "m-1", DEST, attempt=2, code="x", detail="why", at=5.0))
    assert status == DestinationStatus(State.DELIVERING, 2, 5.0, "x", "why", 0)


@pytest.mark.parametrize("state", [State.RECEIVED, State.ACCEPTED, State.REJECTED])
def test_message_level_events_never_touch_a_destination(state: State) -> None:
    assert advance(None, ev(state)) is None
    assert advance(DestinationStatus(State.QUEUED), ev(state)) is None


def test_an_event_without_a_destination_is_ignored() -> None:
    assert advance(None, ev(State.DELIVERED, 1, destination=None)) is None


def test_the_happy_path_moves_at_every_step() -> None:
    path = [ev(State.QUEUED), ev(State.DELIVERING, 1), ev(State.RETRY_WAIT, 1), ev(State.DELIVERING, 2)]
    path.append(ev(State.DELIVERED, 2))
    final, moved = fold(path)
    assert moved == path
    assert final is not None
    assert (final.state, final.attempt) == (State.DELIVERED, 2)


@pytest.mark.parametrize(
    ("current", "late"),
    [
        (DestinationStatus(State.DELIVERING, 1), ev(State.QUEUED)),
        (DestinationStatus(State.DELIVERING, 2), ev(State.RETRY_WAIT, 1)),  # lower attempt is stale
        (DestinationStatus(State.RETRY_WAIT, 2), ev(State.DELIVERING, 2)),  # same attempt: DELIVERING < RETRY_WAIT
        (DestinationStatus(State.DELIVERING, 3), ev(State.DELIVERING, 3)),  # a repeat moves nothing
        (DestinationStatus(State.QUEUED), ev(State.QUEUED)),
    ],
)
def test_late_or_repeated_events_are_stale(current: DestinationStatus, late: Event) -> None:
    assert advance(current, late) is None


@pytest.mark.parametrize(
    "late",
    [ev(State.DEAD, 3), ev(State.REPLAYED), ev(State.DELIVERING, 9), ev(State.RETRY_WAIT, 9), ev(State.QUEUED)],
)
def test_delivered_is_final(late: Event) -> None:
    assert advance(DestinationStatus(State.DELIVERED, 2), late) is None


@pytest.mark.parametrize("late", [ev(State.DELIVERED, 3), ev(State.DELIVERING, 9), ev(State.QUEUED)])
def test_dead_yields_only_to_an_operator_replay(late: Event) -> None:
    dead = DestinationStatus(State.DEAD, 5)
    assert advance(dead, late) is None
    replayed = advance(dead, ev(State.REPLAYED))
    assert replayed is not None
    assert (replayed.state, replayed.generation) == (State.REPLAYED, 1)


@pytest.mark.parametrize(
    "current",
    [DestinationStatus(State.QUEUED), DestinationStatus(State.RETRY_WAIT, 2), DestinationStatus(State.REPLAYED)],
)
def test_only_a_dead_destination_can_be_replayed(current: DestinationStatus) -> None:
    assert advance(current, ev(State.REPLAYED)) is None


def test_a_replay_starts_a_new_generation_whose_attempts_restart() -> None:
    first = [ev(State.QUEUED), ev(State.DELIVERING, 1), ev(State.RETRY_WAIT, 1), ev(State.DELIVERING, 2)]
    first.append(ev(State.DEAD, 2))
    second = [ev(State.REPLAYED), ev(State.DELIVERING, 1), ev(State.RETRY_WAIT, 1), ev(State.DEAD, 1)]
    third = [ev(State.REPLAYED), ev(State.QUEUED), ev(State.DELIVERING, 1), ev(State.DELIVERED, 1)]
    final, moved = fold([*first, *second, *third])
    assert moved == [*first, *second, *third]
    assert final is not None
    assert (final.state, final.attempt, final.generation) == (State.DELIVERED, 1, 2)


def test_a_repeated_replay_event_is_stale() -> None:
    final, moved = fold([ev(State.DEAD, 4), ev(State.REPLAYED, at=2.0), ev(State.REPLAYED, at=3.0)])
    assert final is not None
    assert (final.generation, final.updated_at) == (1, 2.0)
    assert len(moved) == 2


IN_ORDER_DELIVERED = [
    ev(State.QUEUED),
    ev(State.DELIVERING, 1),
    ev(State.RETRY_WAIT, 1),
    ev(State.DELIVERING, 2),
    ev(State.RETRY_WAIT, 2),
    ev(State.DELIVERING, 3),
    ev(State.DELIVERED, 3),
]
IN_ORDER_DEAD = [ev(State.QUEUED), ev(State.DELIVERING, 1), ev(State.RETRY_WAIT, 1), ev(State.DELIVERING, 2)]
IN_ORDER_DEAD += [ev(State.RETRY_WAIT, 2), ev(State.DEAD, 2)]


@pytest.mark.parametrize("in_order", [IN_ORDER_DELIVERED, IN_ORDER_DEAD], ids=["delivered", "dead"])
def test_every_shuffle_never_moves_backwards_and_ends_where_the_true_order_ends(in_order: list[Event]) -> None:
    rank = {e: i for i, e in enumerate(in_order)}
    for shuffled in itertools.permutations(in_order):
        final, moved = fold(shuffled)
        ranks = [rank[e] for e in moved]
        assert ranks == sorted(set(ranks)), shuffled  # every move is strictly forward
        assert final is not None
        assert final.state is in_order[-1].state, shuffled
        assert final.code == in_order[-1].code, shuffled


def test_shuffles_with_repeated_events_settle_on_the_same_status() -> None:
    events = [ev(State.QUEUED), ev(State.DELIVERING, 1), ev(State.DELIVERING, 1), ev(State.RETRY_WAIT, 1)]
    events += [ev(State.RETRY_WAIT, 1), ev(State.DELIVERING, 2)]
    finals = {fold(shuffled)[0] for shuffled in itertools.permutations(events)}
    assert finals == {DestinationStatus(State.DELIVERING, 2, 1.0, "DELIVERING:2", "", 0)}
