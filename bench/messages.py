"""Pre-signed benchmark messages: ``licence.import`` envelopes signed with the trader's dev key, each
with its own messageId, grown to a target size by repeating goods lines (the licence schema has no
attachment element; ``items/item`` is unbounded, so a big licence is still schema-valid)."""

from __future__ import annotations

import copy
import os
import pickle
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from lxml import etree

from gateway.samples import LICENCE_NS, SAMPLE_SENDERS, attach_to_ephyto, sample_envelope
from gateway.security.sign import Signer, to_bytes

DOCUMENT_TYPE = "licence.import"

BASE_SIZE = 5300  # bytes of one signed sample licence, roughly


def sender_cert(pki_dir: Path) -> tuple[x509.Certificate, str]:
    """The bench sender's certificate and party identity."""
    identity = SAMPLE_SENDERS[DOCUMENT_TYPE][0]
    return _signer(str(pki_dir)).chain[0], identity


@lru_cache(maxsize=4)
def _signer(pki_dir: str) -> Signer:
    folder = Path(pki_dir) / "parties" / SAMPLE_SENDERS[DOCUMENT_TYPE][0]
    return Signer.from_files(folder / "key.pem", folder / "cert.pem")


def _grow(root: etree._Element, target: int) -> None:
    items = root.find(f".//{{{LICENCE_NS}}}items")
    if items is None:
        raise RuntimeError("the sample licence has no items element")
    line = items[0]
    one = len(etree.tostring(line)) - len(f' xmlns="{LICENCE_NS}"')
    for number in range(2, 2 + max(0, (target - BASE_SIZE) // one)):
        extra = copy.deepcopy(line)
        extra.find(f"{{{LICENCE_NS}}}lineNumber").text = str(number)
        items.append(extra)


def signed_message(pki_dir: str, size: int) -> bytes:
    """One fresh signed licence of about ``size`` bytes (its own messageId, sendDate = now)."""
    root = sample_envelope(DOCUMENT_TYPE, message_id=str(uuid.uuid4()), send_date=datetime.now(UTC))
    if size > BASE_SIZE:
        _grow(root, size)
    return to_bytes(_signer(pki_dir).sign_envelope(root))


ATTACHMENT_TYPE = "sps.ephyto"


def signed_certificate_with_attachment(pki_dir: Path, size: int) -> bytes:
    """A signed ePhyto of about ``size`` bytes, almost all of it one attachment (random bytes standing for
    a scanned PDF, base64 in one AttachmentBinaryObject): the issue's "certificate with attachments"."""
    root = sample_envelope(ATTACHMENT_TYPE, message_id=str(uuid.uuid4()), send_date=datetime.now(UTC))
    attach_to_ephyto(root, os.urandom(size * 3 // 4), "scan.pdf", reference_id="BENCH-ATTACHMENT")
    folder = Path(pki_dir) / "parties" / SAMPLE_SENDERS[ATTACHMENT_TYPE][0]
    return to_bytes(Signer.from_files(folder / "key.pem", folder / "cert.pem").sign_envelope(root, copy=False))


def _batch(args: tuple[str, int, int]) -> list[bytes]:
    pki_dir, size, count = args
    return [signed_message(pki_dir, size) for _ in range(count)]


def signed_messages(pki_dir: Path, size: int, count: int, workers: int = 2) -> list[bytes]:
    """``count`` distinct signed messages, signed in ``workers`` processes (before any clock starts)."""
    if count <= 8 or workers <= 1:
        return _batch((str(pki_dir), size, count))
    share = [count // workers + (i < count % workers) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        return [m for batch in pool.map(_batch, [(str(pki_dir), size, n) for n in share]) for m in batch]


def save(messages: list[bytes], path: Path) -> Path:
    path.write_bytes(pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def load(path: Path) -> list[bytes]:
    messages: list[bytes] = pickle.loads(path.read_bytes())  # noqa: S301 - our own file, written just before
    return messages
