"""The file-drop adapter: atomic, durable, idempotent, and honest about which failures may pass."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from adapters.file import FileAdapter, safe_name_part
from gateway.errors import ConfigError, PermanentFailure, TransientFailure
from gateway.model import Delivery

PAYLOAD = b'<Envelope xmlns="urn:nsw:envelope:1"><Header/></Envelope>'


def delivery(payload: bytes = PAYLOAD, message_id: str = "7f1c-0001") -> Delivery:
    return Delivery(message_id, "VN-MOIT", "moit drop", "licence", payload, hashlib.sha256(payload).hexdigest())


@pytest.fixture
def drop(tmp_path: Path) -> FileAdapter:
    (tmp_path / "out").mkdir()
    return FileAdapter("moit drop", tmp_path / "out")


async def test_writes_the_payload_under_message_and_destination(drop: FileAdapter) -> None:
    receipt = await drop.deliver(delivery())
    target = drop.directory / "7f1c-0001.moit%20drop.xml"
    assert target.read_bytes() == PAYLOAD
    assert receipt.extra == {"path": str(target)}
    assert os.listdir(drop.directory) == [target.name]  # no temp file left behind


async def test_same_delivery_twice_overwrites_the_same_file(drop: FileAdapter) -> None:
    await drop.deliver(delivery(b"<first/>"))
    await drop.deliver(delivery(b"<second/>"))
    assert [p.read_bytes() for p in drop.directory.iterdir()] == [b"<second/>"]


async def test_file_and_directory_are_fsynced_before_the_name_is_visible(
    drop: FileAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = drop.target(delivery())
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
        synced.append(("dir" if is_dir else "file", target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    await drop.deliver(delivery())
    # The content is durable before the final name appears; the rename is durable after it.
    assert synced == [("file", False), ("dir", True)]


async def test_a_failed_write_leaves_neither_a_partial_file_nor_a_temp_file(
    drop: FileAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(TransientFailure) as caught:
        await drop.deliver(delivery())
    assert caught.value.code == "FILE_ENOSPC"
    assert os.listdir(drop.directory) == []


async def test_a_failed_rename_keeps_the_previous_version_whole(
    drop: FileAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    await drop.deliver(delivery(b"<first/>"))

    def io_error(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", io_error)
    with pytest.raises(TransientFailure, match="FILE_EIO"):
        await drop.deliver(delivery(b"<second/>"))
    assert [p.read_bytes() for p in drop.directory.iterdir()] == [b"<first/>"]


async def test_missing_directory_is_transient(tmp_path: Path) -> None:
    with pytest.raises(TransientFailure) as caught:
        await FileAdapter("d", tmp_path / "not-mounted-yet").deliver(delivery())
    assert caught.value.code == "FILE_ENOENT"


async def test_not_a_directory_is_permanent(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(PermanentFailure) as caught:
        await FileAdapter("d", tmp_path / "a-file").deliver(delivery())
    assert caught.value.code == "FILE_ENOTDIR"


async def test_permission_denied_is_permanent(drop: FileAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: these tests may run as root, which no directory mode keeps out.
    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(PermanentFailure, match="FILE_EACCES"):
        await drop.deliver(delivery())


async def test_hostile_message_ids_stay_inside_the_directory(drop: FileAdapter) -> None:
    await drop.deliver(delivery(message_id="../../etc/passwd"))
    (written,) = drop.directory.iterdir()
    assert written.name == "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd.moit%20drop.xml"


def test_name_parts_are_injective() -> None:
    ids = ["a.b", "a_b", "a/b", "a%2Fb", "a b", "ä", "a-b"]
    assert len({safe_name_part(i) for i in ids}) == len(ids)
    assert all("." not in safe_name_part(i) and "/" not in safe_name_part(i) for i in ids)


def test_from_options(tmp_path: Path) -> None:
    assert FileAdapter.from_options("d", {"directory": "/abs/drop"}, tmp_path).directory == Path("/abs/drop")
    with pytest.raises(ConfigError, match="destination 'd' \\(file adapter\\): option 'directory' is required"):
        FileAdapter.from_options("d", {}, tmp_path)
    with pytest.raises(ConfigError, match="unknown option"):
        FileAdapter.from_options("d", {"directory": "x", "mode": "0600"}, tmp_path)
