"""File drop: write each delivery atomically into a directory that an agency's system picks up from.

A reader never sees a partial file: the envelope is written to a hidden temp file in the same
directory, flushed and fsynced, renamed onto ``<message id>.<destination>.xml`` and the directory
fsynced, so the name survives a crash too. Delivering the same message twice overwrites the same
name, which makes redelivery harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapters.base import DeliveryReceipt
from adapters.options import Options
from gateway.errors import PermanentFailure, TransientFailure
from gateway.model import Delivery

# Errors that mean the drop is misconfigured or the message cannot have a file name here: retrying
# as it is cannot help. Anything else (disk full, I/O error, a mount not there yet) may pass.
_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENAMETOOLONG})
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_name_part(text: str) -> str:
    """Percent-encode everything but ``[A-Za-z0-9_-]``: injective, so distinct ids never share a name,
    and free of ``/`` and ``.``, so a part can neither leave the directory nor blur the ``.`` separators."""
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), text)


class FileAdapter:
    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.directory = directory

    @classmethod
    def from_options(cls, name: str, options: Mapping[str, Any], base_dir: Path) -> FileAdapter:
        opts = Options(name, "file", options, base_dir)
        directory = opts.path("directory", must_exist=False)
        if directory is None:
            raise opts.error("directory", "is required")
        opts.finish()
        return cls(name, directory)

    def target(self, delivery: Delivery) -> Path:
        return self.directory / f"{safe_name_part(delivery.message_id)}.{safe_name_part(self.name)}.xml"

    async def deliver(self, delivery: Delivery) -> DeliveryReceipt:
        target = self.target(delivery)
        try:
            await asyncio.to_thread(_write_atomically, target, delivery.payload)
        except OSError as exc:
            code = f"FILE_{errno.errorcode.get(exc.errno or 0, 'ERROR')}"
            detail = f"writing {target}: {exc.strerror or exc}"
            if exc.errno in _PERMANENT_ERRNOS:
                raise PermanentFailure(code, detail) from exc
            raise TransientFailure(code, detail) from exc
        return DeliveryReceipt(detail=f"written {target.name}", extra={"path": str(target)})

    async def close(self) -> None:
        return None


def _write_atomically(target: Path, payload: bytes) -> None:
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
