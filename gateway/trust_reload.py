"""Trust hot reload: a new CRL, anchor, intermediate or partner registry takes effect without a restart.

Revoking a party's certificate is a CRL dropped into ``<certs>/trust/crl/``; taking one away from a
party is an edit of ``partners.yaml``. Both must stop that certificate at once, not at the next
restart, and a CRL past its nextUpdate makes every signer under that CA ``CERT_UNTRUSTED`` until a
fresh one is read. So the routing watcher (``RoutingReloader.also_poll``) runs ``TrustReloader.check``
on every poll and on SIGHUP. It compares the stamps (path, mtime, size, inode) of every file in
``trust/anchors``, ``trust/intermediates``, ``trust/crl`` and of the registry with those last read;
when any differs, or a file appeared or went, it reads all of them again:

1. the registry (``PartnerRegistry.load``), then the trust directory (``TrustStore.reload``): either
   fault -- a file that is not a CRL, a certificate bound to two parties -- is a ``ConfigError``;
   the old trust and registry both stay in force (``trust.reload_rejected`` with the error), and the
   same files are not tried again until they change again;
2. otherwise the trust store has already swapped its state (and dropped every cached decision, so a
   certificate trusted a second ago is evaluated against the new CRL), and the registry is adopted.

Peer adapters are not rebuilt here: their peer's signing certificates are looked up in the shared
registry on every receipt, and their TLS files are the routing reload's (``adapters.base.stamp_files``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

from adapters.base import FileStamp, changed_paths, stamp_files
from gateway.errors import ConfigError
from gateway.partners import PartnerRegistry
from gateway.security.trust import TrustStore

log = structlog.get_logger("nsw.trust")


class TrustReloader:
    def __init__(
        self,
        trust: TrustStore,
        partners: PartnerRegistry,
        registry_path: Path,
        *,
        on_reload: Callable[[str], None] | None = None,
    ) -> None:
        """``on_reload`` is told the outcome of every reload tried: "ok" or "error" (for a metric)."""
        if trust.source is None:
            raise ValueError("the trust store was not loaded from a directory: nothing to reload")
        self.trust = trust
        self.partners = partners
        self.registry_path = registry_path
        self._on_reload = on_reload or (lambda _outcome: None)
        # Stamped now, after the gateway read them at start-up: a file replaced in between is read
        # again at the first poll, which costs one needless reload and misses nothing.
        self._seen = self._stamp()

    def check(self) -> bool:
        """Read trust and registry again if any of their files changed; True when the new ones are in force."""
        stamps = self._stamp()
        if stamps == self._seen:
            return False
        changed = changed_paths(self._seen, stamps)
        self._seen = stamps  # a faulty set of files is not retried until it changes again
        try:
            registry = PartnerRegistry.load(self.registry_path)
            self.trust.reload()
        except ConfigError as exc:
            log.error(  # noqa: TRY400 -- the error text says it all; no traceback wanted
                "trust.reload_rejected", files=changed, error=str(exc), detail="the old trust and registry stay"
            )
            self._on_reload("error")
            return False
        self.partners.adopt(registry)
        self._on_reload("ok")
        log.info(
            "trust.reloaded",
            files=changed,
            anchors=len(self.trust.anchors),
            parties=sum(1 for _ in registry.parties()),
        )
        return True

    def _stamp(self) -> tuple[FileStamp, ...]:
        # A file that appeared or went changes the set of stamps, so it is noticed like an edit.
        return stamp_files([self.registry_path, *self.trust.source_files()])
