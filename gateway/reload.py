"""Routing hot reload: on SIGHUP or when the rules file changes, load -> check -> swap, or keep the old rules.

The watcher polls the file's (mtime, size, inode) every ``interval`` seconds -- no extra dependency --
and SIGHUP (``request``) forces a reload even when the file looks unchanged. It polls the files the
running adapters loaded as well (TLS certificates, keys, CA bundles: ``adapters.base.stamp_files``), so a
certificate replaced in place is picked up without touching the rules file; an ASW peer whose
endpoint the partner registry changed counts as such a change too (the registry itself is reloaded by
``gateway.trust_reload``, which ``also_poll`` runs first in the same poll). A reload:

1. loads and checks the file (``RoutingTable.load``: every fault is a ``ConfigError`` naming the rule);
2. when this process runs a worker, builds the adapters of destinations the file adds, and new adapters
   for existing destinations whose adapter or options changed or whose loaded files changed since they
   were built (a bad adapter option, or a certificate that does not match its key, is refused here too);
3. declares the new destinations' queues on the broker;
4. swaps the table in one assignment (``admission.routing``): a message being admitted sees either
   the old table or the new one, never a mix; in the same step, with no await in between, every
   changed destination's lane takes its new adapter, retry and breaker policies (``Worker.reconfigure``):
   attempts that start from then on use them, attempts already talking to the old adapter finish
   with it, and it is closed when the last of them ends. A new adapter or breaker policy starts with a
   closed breaker: the old one counted another endpoint's failures;
5. starts consuming the new destinations (a second ``Worker`` for just those lanes).

ASW peers follow the partner registry the same way. A peer given an ``endpoint`` there (a new member
state going live) becomes the destination ``asw:<country>`` at the next reload: its queue is declared,
its adapter built and consumed with the default options (``_unnamed_peer``) before routing may name it,
all in the swap above. A peer whose endpoint was taken away is no longer routed to: messages for it are
refused ``NO_ROUTE`` at the ingress instead of being accepted for a peer whose receipts can no longer
verify. Nothing is sent to the endpoint it had either: its lane's adapter checks the registry at every
attempt (``adapters.asw.PeerWithheld``), so what was already queued waits in RETRY_WAIT with code
PEER_WITHHELD and goes out when the peer is given an endpoint again (or is dead-lettered at
``max_age``). A registry change of peers alone triggers the reload, like a changed rules file. A peer
the rules file names is live on the same terms (``adapters.asw.withheld_peers``): while the registry
gives it no endpoint it is withheld (NO_ROUTE, no new lane, no adapter rebuilt: none could be), and when
it gets one it joins with the file's options, on the lane it had if it had one (whose adapter is rebuilt
for the rules and endpoint in force).

Any failure in 1-3 keeps the old rules and logs ``routing.reload_rejected`` with the error text; a
file that failed is not retried until it changes again (or SIGHUP). What a reload does NOT do: stop
consuming a removed destination (its queue keeps draining with its last settings, which is what one
wants for messages already accepted; ``routing.reload_needs_restart`` lists them). Restart the
workers to stop those: after the restart what is still queued for them is held, not sent
(``adapters.held``), until a reload configures them again. A certificate rotated half-way (the new
certificate, the old key) is refused like any bad option and tried again when the files change again:
the old adapter keeps delivering meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from adapters.asw import ASW_KIND, HELD_NOTE, AswAdapter, withheld_peers
from adapters.base import Adapter, FileStamp, changed_files, stamp_files
from gateway.errors import BrokerUnavailable, ConfigError
from gateway.partners import peer_destinations
from gateway.policy import BreakerPolicy, RetryPolicy
from gateway.worker import Worker
from routing.config import DestinationConfig
from routing.engine import RoutingTable

if TYPE_CHECKING:
    from gateway.runtime import Gateway

log = structlog.get_logger("nsw.reload")

DEFAULT_INTERVAL = 3.0
Signature = tuple[int, int, int]  # st_mtime_ns, st_size, st_ino


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    ok: bool
    source: str
    error: str | None = None
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()  # existing destinations whose settings differ: applied to new attempts
    rotated: tuple[str, ...] = ()  # adapters rebuilt because files they loaded (or a peer's endpoint) changed
    peers_joined: tuple[str, ...] = ()  # asw:<country> destinations the partner registry added
    peers_left: tuple[str, ...] = ()  # asw:<country> destinations it took away: no longer routed to
    withheld: tuple[str, ...] = ()  # ASW destinations of the rules whose peer has no endpoint: not routed to


class RoutingReloader:
    def __init__(
        self,
        gateway: Gateway,
        path: Path,
        *,
        interval: float = DEFAULT_INTERVAL,
        on_outcome: Callable[[ReloadOutcome], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.path = path
        self.interval = interval
        self._on_outcome = on_outcome
        self._seen = self._signature()
        self._files_seen: tuple[FileStamp, ...] = ()  # changed adapter files a reload last tried
        self._peers_seen = self._peer_state()  # the peers a reload last tried
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[ReloadOutcome]] = []
        self._lock = asyncio.Lock()
        self.workers: list[Worker] = []  # consumers started for destinations added by a reload
        self._also: list[Callable[[], object]] = []

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="nsw-routing-reload")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        workers, self.workers = self.workers, []
        for worker in workers:
            await worker.stop()

    def also_poll(self, check: Callable[[], object]) -> None:
        """Call ``check`` on every poll and SIGHUP too, before the rules (the ingress's certificate:
        ``gateway.server_tls``; trust and the partner registry: ``gateway.trust_reload``). It must not
        block; what it raises is logged and the watcher goes on."""
        self._also.append(check)

    def request(self) -> None:
        """Reload at once, changed or not (the SIGHUP handler)."""
        self._poke.set()

    def next_outcome(self) -> asyncio.Future[ReloadOutcome]:
        """Resolved by the next reload attempt's outcome (lets tests and tools await a reload)."""
        future: asyncio.Future[ReloadOutcome] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    async def check(self, *, force: bool = False) -> ReloadOutcome | None:
        """Reload if the file changed (or ``force``); None when there was nothing to do."""
        async with self._lock:
            signature = self._signature()
            if signature is None:
                if force or self._seen is not None:
                    log.warning("routing.rules_file_missing", file=str(self.path), kept=self.gateway.routing.source)
                self._seen = None
                return None
            files = stamp_files(sorted({path for paths in self._rotated().values() for path in paths}))
            peers = self._peer_state()
            if not force and signature == self._seen and files == self._files_seen and peers == self._peers_seen:
                return None
            # A faulty file (rules, an adapter's certificate, a peer's endpoint) is not retried until it
            # changes again.
            self._seen, self._files_seen, self._peers_seen = signature, files, peers
            outcome = await self._reload()
            if outcome.ok:
                self._files_seen = ()
        self.gateway.metrics.reloads.labels(outcome="ok" if outcome.ok else "error").inc()
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(outcome)
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        return outcome

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._poke.wait()
            forced = self._poke.is_set()
            self._poke.clear()
            for check in self._also:
                try:
                    check()
                except Exception:
                    log.exception("reload.poll_failed", check=repr(check))
            try:
                await self.check(force=forced)
            except Exception:  # the watcher must outlive any one reload; the old rules stay in force
                log.exception("routing.reload_crashed", file=str(self.path))

    def _signature(self) -> Signature | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def _reload(self) -> ReloadOutcome:
        gw = self.gateway
        old = gw.pipeline.admission.routing
        source = str(self.path)
        try:
            new = RoutingTable.load(self.path)
        except ConfigError as exc:
            return self._rejected(source, str(exc), old)
        added = tuple(sorted(set(new.destinations) - set(old.destinations)))
        removed = tuple(sorted(set(old.destinations) - set(new.destinations)))
        kept = set(new.destinations) & set(old.destinations)
        changed = tuple(sorted(n for n in kept if new.destinations[n] != old.destinations[n]))
        admission = gw.pipeline.admission
        was_withheld = admission.withheld
        peers, withheld, joined, left = self._peer_change(new, added, removed)
        workers = self._workers()
        rotated = {n: f for n, f in self._rotated().items() if n not in withheld} if workers else {}
        lanes = {name for w in workers for name in w.destinations}
        # A destination some worker here already has a lane for (changed, rotated, a peer delivered to
        # with default options until the file named it, or a peer that left and came back: its lane stayed,
        # holding what it had) is reconfigured there; the others get new lanes. A withheld peer gets no adapter: none
        # can be built without an endpoint, and its lane, if it has one, keeps the one it has.
        retuned = {name: w for name in (*changed, *added, *rotated, *joined) for w in workers if name in w.destinations}
        rebuild = {*rotated, *joined}  # a peer back with its lane gets an adapter for the rules and endpoint in force
        fresh: dict[str, Adapter] = {}  # for new lanes
        replacing: dict[str, Adapter] = {}  # for existing lanes whose adapter settings or files changed
        try:
            if workers:
                new_lanes = [n for n in (*added, *joined) if n not in lanes and n not in withheld]
                renewed = [n for n in retuned if n not in withheld]
                fresh, replacing = await self._new_adapters(new, old, new_lanes, renewed, rebuild)
            await gw.broker.declare([*added, *joined])
        except (ConfigError, BrokerUnavailable) as exc:
            await _close_all([*fresh.values(), *replacing.values()])
            return self._rejected(source, str(exc), old)

        # The swap: one assignment for the rules, and no await until every lane has its new settings.
        admission.routing = new
        admission.extra_destinations = peers
        admission.withheld = withheld
        gw.routing = new
        for name, worker in retuned.items():
            dest = new.destinations.get(name)  # None: a removed destination or an unnamed peer, rotated
            if dest is None:
                worker.reconfigure(name, replacing.get(name))  # its policies stay as they are
            else:
                worker.reconfigure(name, replacing.get(name), dest.retry, dest.breaker)
        gw.adapters.update(replacing)
        for name in sorted(replacing):
            await self._release_waiting(name)
        if fresh:
            try:
                await self._consume(new, fresh)
            except BrokerUnavailable as exc:
                # The rules are in force and the queues exist, so nothing is lost: the copies wait there.
                log.error(  # noqa: TRY400 -- the error text says it all; no traceback wanted
                    "routing.consume_failed", destinations=list(fresh), error=str(exc)
                )
        log.info(
            "routing.reloaded",
            file=source,
            rules=len(new.rule_names),
            destinations=sorted(new.destinations),
            added=list(added),
            removed=list(removed),
            changed=list(changed),
            rotated=sorted(rotated),
            peers_joined=list(joined),
            peers_left=list(left),
            peers_withheld=sorted(withheld),
        )
        _log_peers_gone(left, withheld, was_withheld)
        for name in sorted(retuned):
            dest = new.destinations.get(name)
            log.info(
                "routing.destination_reconfigured",
                destination=name,
                settings=_changed_settings(dest, old.destinations.get(name)) if dest else [],
                files=rotated.get(name, []),
                new_adapter=name in replacing,
            )
        if removed and workers:
            log.warning(
                "routing.reload_needs_restart",
                removed=list(removed),
                detail="running workers keep draining the queues of removed destinations, with their last "
                "settings, until they restart; after a restart what is still queued for them is held "
                "(DESTINATION_REMOVED) until they are configured again",
            )
        return ReloadOutcome(
            True, source, None, added, removed, changed, tuple(sorted(rotated)), joined, left, tuple(sorted(withheld))
        )

    def _peer_change(
        self, new: RoutingTable, added: Iterable[str], removed: Iterable[str]
    ) -> tuple[frozenset[str], dict[str, str], tuple[str, ...], tuple[str, ...]]:
        """The partner registry's peers, the ``new`` rules' withheld peers, and which ASW destinations
        become routed to (joined) or stop being routed to (left) compared with the rules and peers in
        force; a destination the rules file itself adds or removes is reported as such instead."""
        admission = self.gateway.pipeline.admission
        peers = peer_destinations(self.gateway.partners)
        withheld = withheld_peers(new.destinations, self.gateway.partners)
        live = _live_peers(new, peers, withheld)
        was_live = _live_peers(admission.routing, admission.extra_destinations, admission.withheld)
        joined, left = live - was_live - set(added), was_live - live - set(removed)
        return peers, withheld, tuple(sorted(joined)), tuple(sorted(left))

    async def _new_adapters(
        self,
        new: RoutingTable,
        old: RoutingTable,
        lanes: list[str],
        retuned: Iterable[str],
        rebuild: Collection[str],
    ) -> tuple[dict[str, Adapter], dict[str, Adapter]]:
        """Adapters for the new ``lanes``, and replacements for the ``retuned`` destinations whose adapter
        settings changed or which are to be rebuilt anyway (``rebuild``: loaded files changed, a peer
        back); a bad option raises ``ConfigError`` and leaves none of them open."""
        fresh: dict[str, Adapter] = {}
        replacing: dict[str, Adapter] = {}
        try:
            for name in lanes:
                fresh[name] = self.gateway.adapter_for(new.destinations.get(name) or _unnamed_peer(name))
            for name in retuned:
                dest = new.destinations.get(name) or old.destinations.get(name) or _unnamed_peer(name)
                if name in rebuild or _adapter_settings_differ(dest, old.destinations.get(name)):
                    replacing[name] = self.gateway.adapter_for(dest)
        except ConfigError:
            await _close_all([*fresh.values(), *replacing.values()])
            raise
        return fresh, replacing

    async def _release_waiting(self, destination: str) -> None:
        """A lane with a new adapter (a peer back, a destination configured again, a new URL or certificate):
        its copies waiting for a retry go now rather than at their scheduled time (up to the last retry
        tier, an hour by default), since what they waited for may be there now."""
        try:
            released = await self.gateway.broker.release_waiting(destination)
        except BrokerUnavailable as exc:  # they go at their scheduled time instead: nothing is lost
            log.warning("routing.release_failed", destination=destination, error=str(exc))
            return
        if released:
            log.info("routing.retries_released", destination=destination, released=released)

    def _peer_state(self) -> tuple[object, ...]:
        """What the peers' lanes are built from: the ``asw:`` destinations, the endpoints and the stamps of
        the TLS files those name. A peer that failed to join (a missing CA file) has no adapter whose
        files could be watched: it is tried again when its entry or one of those files changes."""
        partners = self.gateway.partners
        endpoints = [
            (p.identity, p.endpoint) for p in partners.parties() if p.role == "peer" and p.endpoint is not None
        ]
        tls = [path for _, e in endpoints for path in (e.ca, e.client_cert, e.client_key)]
        return peer_destinations(partners), tuple(endpoints), stamp_files(tls)

    def _rotated(self) -> dict[str, list[str]]:
        """Destinations whose running adapter loaded files that have changed since, with those files; an
        ASW peer whose endpoint the partner registry changed names the registry file."""
        rotated: dict[str, list[str]] = {}
        for name, adapter in self.gateway.adapters.items():
            files = changed_files(adapter)
            if isinstance(adapter, AswAdapter) and adapter.endpoint_moved():
                files.append(str(self.gateway.settings.partners_path))
            if files:
                rotated[name] = files
        return rotated

    def _workers(self) -> list[Worker]:
        main = self.gateway.worker
        return ([main] if main is not None else []) + self.workers

    async def _consume(self, table: RoutingTable, adapters: dict[str, Adapter]) -> None:
        gw = self.gateway
        configs = {name: table.destinations.get(name) or _unnamed_peer(name) for name in adapters}
        policies = {name: (config.retry, config.breaker) for name, config in configs.items()}
        worker = Worker(gw.broker, adapters, policies, gw.ledger, prefetch=gw.settings.prefetch)
        await worker.start()
        gw.adapters.update(adapters)
        self.workers.append(worker)

    def _rejected(self, source: str, error: str, kept: RoutingTable) -> ReloadOutcome:
        log.error("routing.reload_rejected", file=source, error=error, kept=kept.source)
        return ReloadOutcome(False, source, error)


async def _close_all(adapters: list[Adapter]) -> None:
    for adapter in adapters:
        try:
            await adapter.close()
        except Exception:  # a reload that is already being refused must still report why
            log.exception("routing.adapter_close_failed", adapter=repr(adapter))


def _log_peers_gone(left: Iterable[str], withheld: Mapping[str, str], was_withheld: Mapping[str, str]) -> None:
    for name in sorted(set(withheld) - set(was_withheld)):
        log.warning("routing.peer_withheld", destination=name, detail=f"not routed to: {withheld[name]}; {HELD_NOTE}")
    for name in sorted(set(left) - set(withheld)):
        log.warning("routing.peer_left", destination=name, detail=f"not routed to: no endpoint; {HELD_NOTE}")


def _live_peers(table: RoutingTable, peers: Collection[str], withheld: Collection[str]) -> set[str]:
    """The ASW destinations routed to under ``table``: the peers it names and the registry does not
    withhold, and the registry's ``peers`` it does not name."""
    named = {name for name, d in table.destinations.items() if d.adapter == ASW_KIND and name not in withheld}
    return named | {name for name in peers if name not in table.destinations}


def _unnamed_peer(name: str) -> DestinationConfig:
    """An ASW peer the rules file does not name: delivered to with the default options (``build_adapters``)."""
    return DestinationConfig(name, ASW_KIND, {}, RetryPolicy(), BreakerPolicy())


def _adapter_settings_differ(new: DestinationConfig, old: DestinationConfig | None) -> bool:
    return old is None or (new.adapter, new.options) != (old.adapter, old.options)


def _changed_settings(new: DestinationConfig, old: DestinationConfig | None) -> list[str]:
    """What a reload changed for a destination, by name only: option values may be credentials."""
    if old is None:
        return ["adapter"]  # was delivered to with the defaults (a peer the file did not name)
    names = ["adapter"] if new.adapter != old.adapter else []
    names += sorted(k for k in new.options.keys() | old.options.keys() if new.options.get(k) != old.options.get(k))
    names += [part for part in ("retry", "breaker") if getattr(new, part) != getattr(old, part)]
    return names
