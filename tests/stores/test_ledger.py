"""The ledger's behaviour, once, against SQLite and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gateway.audit import DUPLICATE_REPLAYED
from gateway.errors import BrokerUnavailable
from gateway.events import Event
from gateway.model import State
from gateway.stores.base import Claim, ClaimKind, Ledger
from gateway.stores.factory import make_ledger
from gateway.stores.postgres import PostgresLedger
from gateway.stores.sqlite import SqliteLedger

if TYPE_CHECKING:
    from tests.stores.conftest import Backend

SENDER, DIGEST, DOC = "VN-MOIT", "a" * 64, "licence.import"


def received(mid: str = "m-1", *, party: str = SENDER, digest: str = DIGEST, at: float = 100.0) -> Event:
    return Event(State.RECEIVED, mid, party=party, document_type=DOC, digest=digest, at=at)


async def claim(ledger: Ledger, mid: str = "m-1", *, sender: str = SENDER, digest: str = DIGEST) -> Claim:
    return await ledger.claim(mid, sender, digest, DOC, [received(mid, party=sender, digest=digest)])


async def accepted(ledger: Ledger, mid: str = "m-1", destinations: tuple[str, ...] = ("moit", "customs")) -> None:
    assert (await claim(ledger, mid)).kind is ClaimKind.NEW
    events = [Event(State.ACCEPTED, mid, party=SENDER)] + [Event(State.QUEUED, mid, d) for d in destinations]
    await ledger.accept(mid, f"receipt of {mid}".encode(), destinations, events)


async def events_of(ledger: Ledger, mid: str) -> list[str]:
    return [r.event for r in await ledger.trace(mid)]


# -- claims -----------------------------------------------------------------------------------------


async def test_a_first_claim_is_new_and_records_its_events(ledger: Ledger) -> None:
    assert await claim(ledger) == Claim(ClaimKind.NEW)
    status = await ledger.status("m-1")
    assert status is not None
    assert (status.state, status.sender, status.digest, status.document_type) == (State.RECEIVED, SENDER, DIGEST, DOC)
    assert (status.received_at, status.destinations) == (100.0, {})
    assert await events_of(ledger, "m-1") == ["RECEIVED"]


async def test_the_same_bytes_again_before_acceptance_are_pending(ledger: Ledger) -> None:
    await claim(ledger)
    assert await claim(ledger) == Claim(ClaimKind.PENDING)
    assert await events_of(ledger, "m-1") == ["RECEIVED", "RECEIVED"]


async def test_the_same_bytes_after_acceptance_replay_the_stored_receipt(ledger: Ledger) -> None:
    await accepted(ledger)
    assert await claim(ledger) == Claim(ClaimKind.REPLAY, receipt=b"receipt of m-1")
    trace = await ledger.trace("m-1")
    assert [r.event for r in trace] == ["RECEIVED", "ACCEPTED", "QUEUED", "QUEUED", DUPLICATE_REPLAYED]
    assert (trace[-1].party, trace[-1].digest) == (SENDER, DIGEST)


@pytest.mark.parametrize(("sender", "digest"), [(SENDER, "b" * 64), ("VN-MOH", DIGEST)])
async def test_other_bytes_or_another_sender_conflict_and_record_nothing(
    ledger: Ledger, sender: str, digest: str
) -> None:
    await accepted(ledger)
    before = await events_of(ledger, "m-1")
    assert await claim(ledger, sender=sender, digest=digest) == Claim(
        ClaimKind.CONFLICT, existing_sender=SENDER, existing_digest=DIGEST
    )
    assert await events_of(ledger, "m-1") == before
    status = await ledger.status("m-1")
    assert status is not None
    assert (status.state, status.digest) == (State.ACCEPTED, DIGEST)


async def test_a_pending_claim_conflicts_with_other_bytes_too(ledger: Ledger) -> None:
    await claim(ledger)
    assert (await claim(ledger, digest="c" * 64)).kind is ClaimKind.CONFLICT


async def test_two_tasks_claiming_one_id_get_exactly_one_new(ledger: Ledger) -> None:
    kinds = await asyncio.gather(*(claim(ledger) for _ in range(8)))
    assert sorted(k.kind for k in kinds) == [ClaimKind.NEW] + [ClaimKind.PENDING] * 7


async def test_two_ledgers_claiming_one_id_get_exactly_one_new(backend: Backend, ledger: Ledger) -> None:
    other = backend.make()
    await other.open()
    try:
        pairs = [asyncio.gather(claim(ledger, f"m-{i}"), claim(other, f"m-{i}")) for i in range(50)]
        results = await asyncio.gather(*pairs)
    finally:
        await other.close()
    assert {tuple(sorted(c.kind for c in pair)) for pair in results} == {(ClaimKind.NEW, ClaimKind.PENDING)}
    assert (await ledger.verify_audit()).ok


# -- accept and release -----------------------------------------------------------------------------


async def test_accept_stores_the_receipt_and_queues_every_destination(ledger: Ledger) -> None:
    await accepted(ledger, destinations=("moit", "customs"))
    status = await ledger.status("m-1")
    assert status is not None
    assert status.state is State.ACCEPTED
    assert {d: s.state for d, s in status.destinations.items()} == {"moit": State.QUEUED, "customs": State.QUEUED}
    assert await events_of(ledger, "m-1") == ["RECEIVED", "ACCEPTED", "QUEUED", "QUEUED"]


async def test_accepting_twice_keeps_the_first_receipt(ledger: Ledger) -> None:
    await accepted(ledger)
    await claim(ledger)
    await ledger.accept("m-1", b"a second receipt", ["moit"], [])
    assert (await claim(ledger)).receipt == b"receipt of m-1"


async def test_accept_without_a_claim_fails_alone(ledger: Ledger) -> None:
    results = await asyncio.gather(
        ledger.accept("never-claimed", b"r", ["moit"], [Event(State.ACCEPTED, "never-claimed")]),
        claim(ledger, "m-2"),
        return_exceptions=True,
    )
    assert isinstance(results[0], BrokerUnavailable)
    assert results[1] == Claim(ClaimKind.NEW)
    assert await ledger.status("never-claimed") is None
    assert await ledger.trace("never-claimed") == []


async def test_a_worker_faster_than_accept_is_not_moved_back_to_queued(ledger: Ledger) -> None:
    await claim(ledger)
    await ledger.record([Event(State.DELIVERING, "m-1", "moit", attempt=1), Event(State.DELIVERED, "m-1", "moit")])
    await ledger.accept("m-1", b"r", ["moit"], [Event(State.QUEUED, "m-1", "moit")])
    status = await ledger.status("m-1")
    assert status is not None
    assert status.destinations["moit"].state is State.DELIVERED


async def test_release_frees_the_id_for_a_fresh_attempt(ledger: Ledger) -> None:
    await claim(ledger)
    unavailable = Event(State.REJECTED, "m-1", party=SENDER, digest=DIGEST, code="UNAVAILABLE", detail="broker down")
    await ledger.release("m-1", [unavailable])
    status = await ledger.status("m-1")
    assert status is not None
    assert (status.state, status.code) == (State.REJECTED, "UNAVAILABLE")
    assert (await claim(ledger, digest="d" * 64)).kind is ClaimKind.NEW  # even other bytes
    assert await events_of(ledger, "m-1") == ["RECEIVED", "REJECTED", "RECEIVED"]
    with pytest.raises(BrokerUnavailable):
        await ledger.accept("m-2", b"r", [], [])


async def test_release_never_drops_an_accepted_message(ledger: Ledger) -> None:
    await accepted(ledger)
    await ledger.release("m-1", [])
    assert (await claim(ledger)).kind is ClaimKind.REPLAY


async def test_accept_after_a_release_fails_so_the_sender_retries(ledger: Ledger) -> None:
    await claim(ledger)
    await ledger.release("m-1", [])
    with pytest.raises(BrokerUnavailable, match="no claim"):
        await ledger.accept("m-1", b"r", ["moit"], [])


# -- record and status ------------------------------------------------------------------------------


async def test_a_verified_rejection_shows_as_status_without_holding_the_id(ledger: Ledger) -> None:
    await ledger.record([Event(State.REJECTED, "m-1", party=SENDER, digest=DIGEST, code="SCHEMA_INVALID")])
    status = await ledger.status("m-1")
    assert status is not None
    assert (status.state, status.code, status.sender) == (State.REJECTED, "SCHEMA_INVALID", SENDER)
    assert (await claim(ledger, digest="e" * 64)).kind is ClaimKind.NEW


async def test_an_unverified_rejection_is_audited_only(ledger: Ledger) -> None:
    await ledger.record([Event(State.REJECTED, "m-1", code="SIGNATURE_INVALID"), Event(State.REJECTED, "")])
    assert await ledger.status("m-1") is None
    assert await events_of(ledger, "m-1") == ["REJECTED"]


async def test_a_duplicate_rejection_does_not_touch_the_accepted_message(ledger: Ledger) -> None:
    await accepted(ledger)
    await ledger.record([Event(State.REJECTED, "m-1", party="VN-MOH", digest="f" * 64, code="DUPLICATE")])
    status = await ledger.status("m-1")
    assert status is not None
    assert (status.state, status.sender, status.code) == (State.ACCEPTED, SENDER, None)


async def test_record_advances_monotonically_and_ignores_stale_events(ledger: Ledger) -> None:
    await accepted(ledger, destinations=("moit",))
    t = time.time()
    await ledger.record([Event(State.DELIVERING, "m-1", "moit", attempt=2, at=t + 10)])
    await ledger.record(
        [Event(State.RETRY_WAIT, "m-1", "moit", attempt=1, at=t + 20), Event(State.QUEUED, "m-1", "moit")]
    )
    status = await ledger.status("m-1")
    assert status is not None
    moit = status.destinations["moit"]
    assert (moit.state, moit.attempt, moit.updated_at) == (State.DELIVERING, 2, t + 10)
    await ledger.record([Event(State.DELIVERED, "m-1", "moit", attempt=2, at=t + 30)])
    await ledger.record([Event(State.DEAD, "m-1", "moit", attempt=2, code="HTTP_400", at=t + 40)])
    status = await ledger.status("m-1")
    assert status is not None
    assert status.destinations["moit"].state is State.DELIVERED
    assert status.updated_at == t + 30  # the latest change, not the latest (stale) event
    assert (await events_of(ledger, "m-1"))[-5:] == ["DELIVERING", "RETRY_WAIT", "QUEUED", "DELIVERED", "DEAD"]


async def test_an_operator_replay_reopens_a_dead_destination(ledger: Ledger) -> None:
    await accepted(ledger, destinations=("moit",))
    await ledger.record(
        [Event(State.DELIVERING, "m-1", "moit", attempt=5), Event(State.DEAD, "m-1", "moit", attempt=5)]
    )
    await ledger.record([Event(State.REPLAYED, "m-1", "moit", detail="operator")])
    await ledger.record(
        [Event(State.DELIVERING, "m-1", "moit", attempt=1), Event(State.DELIVERED, "m-1", "moit", attempt=1)]
    )
    status = await ledger.status("m-1")
    assert status is not None
    moit = status.destinations["moit"]
    assert (moit.state, moit.attempt, moit.generation) == (State.DELIVERED, 1, 1)


async def test_dead_destinations_are_those_with_a_copy_dead_now(ledger: Ledger) -> None:
    assert await ledger.dead_destinations() == []
    await accepted(ledger, "m-1", ("moit", "customs", "asw:TH"))
    await accepted(ledger, "m-2", ("moit",))
    await ledger.record([Event(State.DEAD, "m-1", "moit", attempt=3), Event(State.DEAD, "m-2", "moit", attempt=3)])
    await ledger.record([Event(State.DEAD, "m-1", "asw:TH", attempt=9)])
    await ledger.record([Event(State.DELIVERED, "m-1", "customs", attempt=1)])
    assert await ledger.dead_destinations() == ["asw:TH", "moit"]

    await ledger.record([Event(State.REPLAYED, "m-1", "asw:TH", detail="operator")])  # no longer dead
    assert await ledger.dead_destinations() == ["moit"]


async def test_pending_destinations_count_the_copies_not_yet_delivered_or_dead(ledger: Ledger) -> None:
    assert await ledger.pending_destinations() == {}
    await accepted(ledger, "m-1", ("moit", "customs", "asw:TH"))
    await accepted(ledger, "m-2", ("moit", "customs"))
    await accepted(ledger, "m-3", ("moit",))
    assert await ledger.pending_destinations() == {"asw:TH": 1, "customs": 2, "moit": 3}

    await ledger.record([Event(State.DELIVERING, "m-1", "moit", attempt=1), Event(State.DELIVERED, "m-1", "moit")])
    await ledger.record([Event(State.RETRY_WAIT, "m-2", "moit", attempt=1, code="HTTP_503")])
    await ledger.record([Event(State.DEAD, "m-1", "customs", attempt=9), Event(State.DEAD, "m-2", "customs")])
    await ledger.record([Event(State.DELIVERING, "m-1", "asw:TH", attempt=1)])
    assert await ledger.pending_destinations() == {"asw:TH": 1, "moit": 2}  # customs: both dead

    await ledger.record([Event(State.REPLAYED, "m-2", "customs", detail="operator")])  # back in its queue
    await ledger.record([Event(State.DELIVERED, "m-1", "asw:TH", attempt=1)])
    assert await ledger.pending_destinations() == {"customs": 1, "moit": 2}


async def test_status_of_an_unknown_message_is_none(ledger: Ledger) -> None:
    assert await ledger.status("nobody") is None


async def test_trace_is_one_message_across_destinations_in_order(ledger: Ledger) -> None:
    await accepted(ledger, "m-1", ("moit", "customs"))
    await accepted(ledger, "m-2", ("moit",))
    await ledger.record([Event(State.DELIVERING, "m-1", "customs", attempt=1), Event(State.DELIVERING, "m-2", "moit")])
    await ledger.record([Event(State.DELIVERED, "m-1", "moit", attempt=1)])
    trace = await ledger.trace("m-1")
    assert [(r.event, r.destination) for r in trace] == [
        ("RECEIVED", None),
        ("ACCEPTED", None),
        ("QUEUED", "moit"),
        ("QUEUED", "customs"),
        ("DELIVERING", "customs"),
        ("DELIVERED", "moit"),
    ]
    assert [r.seq for r in trace] == sorted(r.seq for r in trace)


async def test_audit_tail_pages_in_seq_order(ledger: Ledger) -> None:
    await ledger.record([Event(State.QUEUED, f"m-{i}", "moit") for i in range(7)])
    page = await ledger.audit_tail(after_seq=2, limit=3)
    assert [(r.seq, r.message_id) for r in page] == [(3, "m-2"), (4, "m-3"), (5, "m-4")]
    assert await ledger.audit_tail(after_seq=7) == []


async def test_recording_nothing_appends_nothing(ledger: Ledger) -> None:
    await ledger.record([])
    assert await ledger.audit_tail() == []


async def test_concurrent_operations_all_commit(ledger: Ledger) -> None:
    await asyncio.gather(*(accepted(ledger, f"m-{i}", ("moit",)) for i in range(200)))
    report = await ledger.verify_audit()
    assert (report.ok, report.count) == (True, 600)
    status = await ledger.status("m-199")
    assert status is not None
    assert status.state is State.ACCEPTED


async def test_a_big_batch_stores_every_row_exactly(ledger: Ledger) -> None:
    # Hundreds of message, destination and audit rows per transaction: several multi-row statements each.
    claims = [ledger.claim(f"m-{i}", SENDER, DIGEST, DOC, [received(f"m-{i}", at=1.7e9 + i / 3)]) for i in range(150)]
    assert {c.kind for c in await asyncio.gather(*claims)} == {ClaimKind.NEW}
    texts = ["", "détail ✓", 'quote " and \\', "tab\tnewline\n\x1f", "\u2028 🚢", "ö" * 500]
    events = [
        Event(State.DELIVERING, f"m-{i % 150}", f"d-{i}", attempt=i + 1, detail=texts[i % 6], at=1.7e9 + i / 7)
        for i in range(300)
    ]
    await ledger.record(events)
    tail = await ledger.audit_tail(after_seq=150, limit=1000)
    assert [(r.seq, r.message_id, r.destination, r.attempt, r.detail) for r in tail] == [
        (151 + i, e.message_id, e.destination, e.attempt, e.detail) for i, e in enumerate(events)
    ]
    report = await ledger.verify_audit()
    assert (report.ok, report.count) == (True, 450)
    status = await ledger.status("m-149")
    assert status is not None
    assert (status.state, status.received_at) == (State.RECEIVED, 1.7e9 + 149 / 3)
    assert {d: (s.attempt, s.updated_at, s.detail) for d, s in status.destinations.items()} == {
        "d-149": (150, 1.7e9 + 149 / 7, texts[149 % 6]),
        "d-299": (300, 1.7e9 + 299 / 7, texts[299 % 6]),
    }


# -- failures ---------------------------------------------------------------------------------------


async def test_a_closed_ledger_refuses_everything(ledger: Ledger) -> None:
    assert await ledger.ready()
    await ledger.close()
    assert not await ledger.ready()
    with pytest.raises(BrokerUnavailable):
        await claim(ledger)
    with pytest.raises(BrokerUnavailable):
        await ledger.record([received()])
    with pytest.raises(BrokerUnavailable):
        await ledger.status("m-1")
    with pytest.raises(BrokerUnavailable):
        await ledger.verify_audit()


async def test_an_unreachable_store_fails_to_open(backend: Backend) -> None:
    with pytest.raises(BrokerUnavailable):
        await backend.unreachable().open()


async def test_a_store_locked_past_the_timeout_is_unavailable_and_records_nothing(backend: Backend) -> None:
    ledger = backend.make(timeout=0.2)
    await ledger.open()
    try:
        async with backend.hold_write_lock():
            with pytest.raises(BrokerUnavailable):
                await claim(ledger)
        assert await ledger.status("m-1") is None
        assert await ledger.trace("m-1") == []
        assert (await claim(ledger)).kind is ClaimKind.NEW  # works again once the lock is gone
    finally:
        await ledger.close()


# -- choosing a ledger ------------------------------------------------------------------------------


def test_the_factory_picks_sqlite_in_the_data_folder_by_default(tmp_path: Path) -> None:
    ledger = make_ledger(None, tmp_path, synchronous="NORMAL")
    assert isinstance(ledger, SqliteLedger)
    assert ledger.path == tmp_path / "ledger.sqlite3"
    explicit = make_ledger(f"sqlite:///{tmp_path}/x.db", tmp_path)
    assert isinstance(explicit, SqliteLedger)
    assert explicit.path == tmp_path / "x.db"


def test_the_factory_picks_postgres_for_a_postgres_url(tmp_path: Path) -> None:
    assert isinstance(make_ledger("postgresql://postgres@127.0.0.1/test", tmp_path), PostgresLedger)
    with pytest.raises(ValueError, match="database_url"):
        make_ledger("mysql://x", tmp_path)
    with pytest.raises(ValueError, match="synchronous"):
        SqliteLedger(tmp_path / "x.db", synchronous="OFF")


async def test_a_lingering_ledger_commits_every_wave_of_concurrent_work(backend: Backend) -> None:
    # linger (gateway/stores/group.py) reaches both backends: waves of claims, accepts and records that
    # overlap in time, each caller answered only after its own operation committed, the chain intact.
    ledger = backend.make(linger=0.003)
    await ledger.open()
    try:

        async def one(i: int) -> None:
            claim = await ledger.claim(f"w-{i}", SENDER, DIGEST, DOC, [received(f"w-{i}")])
            assert claim.kind is ClaimKind.NEW
            await ledger.accept(f"w-{i}", b"<receipt/>", ["d"], [Event(State.ACCEPTED, f"w-{i}")])
            await ledger.record([Event(State.QUEUED, f"w-{i}", "d")])

        for wave in range(3):
            await asyncio.gather(*(one(wave * 40 + i) for i in range(40)))
        report = await ledger.verify_audit()
        assert (report.ok, report.count) == (True, 360)
        status = await ledger.status("w-119")
        assert status is not None
        assert (status.state, set(status.destinations)) == (State.ACCEPTED, {"d"})
    finally:
        await ledger.close()
