"""What a ledger batch loads before deciding: only the rows its operations can change or must check.

A message row carries the stored receipt (~4 KB for a 5 KB message, so an overflow page in SQLite): a
delivery's events move only their destination's row, and loading the message row for each of them
would read that receipt back for nothing (`nswgw worker` draining 5 KB messages: the ledger writer
thread's CPU per delivery went from ~0.20 to ~0.16 ms without it).
"""

from __future__ import annotations

from gateway.events import Event
from gateway.model import State
from gateway.stores.batch import AcceptOp, ClaimOp, RecordOp, ReleaseOp, touched


def test_a_delivery_record_loads_its_destination_rows_and_no_message_row() -> None:
    record = RecordOp(
        (Event(State.DELIVERING, "m-1", destination="customs"), Event(State.DELIVERED, "m-1", destination="customs"))
    )
    assert touched([record]) == ([], ["m-1"])


def test_a_rejection_record_loads_its_message_row() -> None:
    # a verified sender's rejection becomes the message's status unless the id is claimed or accepted
    assert touched([RecordOp((Event(State.REJECTED, "m-2", party="VN-MOIT"),))]) == (["m-2"], [])


def test_claim_accept_and_release_load_their_message_and_accept_its_destinations() -> None:
    ops = [
        ClaimOp("m-3", "VN-MOIT", "d", "licence.import", (Event(State.RECEIVED, "m-3"),), 1.0),
        AcceptOp("m-4", b"<receipt/>", ("customs",), (Event(State.QUEUED, "m-4", destination="customs"),), 1.0),
        ReleaseOp("m-5", ()),
    ]
    assert touched(ops) == (["m-3", "m-4", "m-5"], ["m-4"])


def test_a_mixed_batch_loads_each_id_once_in_order() -> None:
    ops = [
        RecordOp((Event(State.DELIVERED, "b", destination="x"), Event(State.REJECTED, "c", party="p"))),
        RecordOp((Event(State.RETRY_WAIT, "a", destination="x"), Event(State.DELIVERED, "b", destination="y"))),
    ]
    assert touched(ops) == (["c"], ["a", "b"])
