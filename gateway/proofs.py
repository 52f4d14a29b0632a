"""Proofs of delivery: the signed receipts peer gateways returned, kept as files.

``<data_dir>/proofs/<messageId>.<destination>.xml``, each part percent-encoded as the file drop
names its files, written atomically (temp file, fsync, rename, directory fsync). The delivery's
audit record names the proof's SHA-256, so the hash-chained audit log vouches for the file: a proof
altered or swapped afterwards no longer matches its record.

Files rather than a ledger table so that neither ledger backend changes; a shared deployment puts
``data_dir`` on storage every worker host can reach.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from adapters.file import _write_atomically, safe_name_part

PROOFS_DIRNAME = "proofs"


class ProofStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def under(cls, data_dir: Path) -> ProofStore:
        return cls(data_dir / PROOFS_DIRNAME)

    def path(self, message_id: str, destination: str) -> Path:
        return self.directory / f"{safe_name_part(message_id)}.{safe_name_part(destination)}.xml"

    async def put(self, message_id: str, destination: str, proof: bytes) -> Path:
        """Store ``proof`` durably (replacing an earlier one for the same delivery); return its path."""
        target = self.path(message_id, destination)
        await asyncio.to_thread(self._write, target, proof)
        return target

    def get(self, message_id: str, destination: str) -> bytes | None:
        target = self.path(message_id, destination)
        return target.read_bytes() if target.is_file() else None

    def _write(self, target: Path, proof: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, proof)


def proof_digest(proof: bytes) -> str:
    return hashlib.sha256(proof).hexdigest()
