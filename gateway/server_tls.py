"""The ingress's TLS: its server certificate, and the CA its clients' certificates must chain to.

A certificate renewed in place (the same paths, new files) is loaded into the *running* context, so
handshakes from then on present it; connections already open keep theirs; nothing restarts and no
port closes. OpenSSL copies a context's certificate into each connection when the connection is made,
which is what makes swapping it under a live listener safe.

The files are read once, and the new pair is first loaded from those bytes into a scratch context: a
half-done renewal (the new certificate with the old key, a truncated file) is refused with
``tls.renewal_rejected``, the old pair keeps serving, and the same files are not tried again until
they change again. Only the bytes that passed are loaded into the live context: a live context that
took a new certificate and then failed on its key would be left with no usable key at all.

A client CA bundle that changed is added to the trust store; a CA *removed* from it stays trusted
until the process restarts (OpenSSL cannot drop one from a live store), which ``tls.renewed`` says.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

from adapters.base import FileStamp, changed_paths, stamp_files
from gateway.config import Settings

log = structlog.get_logger("nsw.tls")


@dataclass(frozen=True, slots=True)
class _Files:
    """The certificate chain, key and client CA bundle as read at one moment."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    def load_into(self, context: ssl.SSLContext) -> None:
        with _private_copies(self.cert, self.key) as (cert, key):  # load_cert_chain reads only paths
            context.load_cert_chain(cert, key)
        if self.client_ca is not None:
            context.load_verify_locations(cadata=self.client_ca.decode("ascii", "replace"))
            context.verify_mode = ssl.CERT_REQUIRED


class ServerTls:
    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamps = self._stamp()  # before reading: a file replaced while it is read is read again
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._read().load_into(self.context)

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerTls | None:
        """None when the ingress serves plain HTTP (no ``tls_cert`` / ``tls_key``)."""
        if settings.tls_cert is None or settings.tls_key is None:
            return None
        return cls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)

    def renew_if_changed(self) -> bool:
        """Load the files into the running context if they changed since last read; True if it did."""
        stamps = self._stamp()
        if stamps == self._stamps:
            return False
        changed = changed_paths(self._stamps, stamps)
        self._stamps = stamps  # a refused renewal is not retried until the files change again
        try:
            files = self._read()
            files.load_into(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
        except (ssl.SSLError, OSError, UnicodeError) as exc:
            log.error(  # noqa: TRY400 -- the error text says it all; no traceback wanted
                "tls.renewal_rejected", files=changed, error=str(exc), detail="the old certificate keeps serving"
            )
            return False
        files.load_into(self.context)
        log.info(
            "tls.renewed",
            files=changed,
            detail="new handshakes present the new certificate"
            + ("; a CA removed from the client CA bundle stays trusted until restart" if self.client_ca else ""),
        )
        return True

    def _stamp(self) -> tuple[FileStamp, ...]:
        return stamp_files((self.cert, self.key, self.client_ca))

    def _read(self) -> _Files:
        return _Files(
            self.cert.read_bytes(),
            self.key.read_bytes(),
            self.client_ca.read_bytes() if self.client_ca is not None else None,
        )


@contextmanager
def _private_copies(cert: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    """The pair as files only this process's user can read, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="nsw-tls-") as folder:  # created 0700
        paths = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        for path, data in zip(paths, (cert, key), strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        yield paths
