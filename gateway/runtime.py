"""Assembling the gateway from ``Settings``: the one place that knows every component.

``Gateway.open`` loads trust material, registries, schemas and routing once, connects the broker
and the ledger, and builds the pipeline; ``start_worker`` adds delivery workers (``nswgw run``
does both in one process, ``serve`` and ``worker`` one each).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from adapters.asw import (
    ASW_KIND,
    HELD_NOTE,
    PEER_PREFIX,
    PeerContext,
    build_peer_adapter,
    no_live_peer,
    withheld_peer_adapter,
    withheld_peers,
)
from adapters.base import Adapter
from adapters.held import REMOVED_NOTE, removed_destination_adapter
from adapters.registry import build_adapter
from gateway.brokers.base import Broker
from gateway.brokers.factory import make_broker
from gateway.config import Settings
from gateway.metrics import (
    CertificateExpiryCollector,
    CrlExpiryCollector,
    EventCounter,
    GatewayMetrics,
    HeldLanesCollector,
    MetricsLedger,
    WithheldPeersCollector,
)
from gateway.model import PartyRef
from gateway.partners import PartnerRegistry, peer_destinations
from gateway.pipeline import Admission, Pipeline
from gateway.proofs import ProofStore
from gateway.receipts import ReceiptFactory
from gateway.reload import DEFAULT_INTERVAL, RoutingReloader
from gateway.security.expiry import CertificateInventory
from gateway.security.trust import TrustStore
from gateway.security.verify import Verifier
from gateway.signing_renewal import RenewingSigner, verified_here
from gateway.stores.base import Ledger
from gateway.stores.factory import make_ledger
from gateway.trust_reload import TrustReloader
from gateway.validation import DocumentTypeRegistry, Validator
from gateway.worker import Worker
from routing.config import DestinationConfig
from routing.engine import RoutingTable, default_rules_path

log = structlog.get_logger("nsw.runtime")


def broker_for(settings: Settings) -> Broker:
    """The configured backend with its own options (retry tiers are queues in RabbitMQ; leases in SQLite)."""
    if settings.amqp_url:
        return make_broker(
            settings.amqp_url, settings.data_dir, retry_tiers=settings.retry_tiers, queue_prefix=settings.queue_prefix
        )
    return make_broker(
        None, settings.data_dir, lease_seconds=settings.lease_seconds, synchronous=settings.sqlite_synchronous
    )


def load_routing(settings: Settings) -> RoutingTable:
    return RoutingTable.load(settings.routing_file or default_rules_path())


@dataclass
class Gateway:
    settings: Settings
    trust: TrustStore
    partners: PartnerRegistry
    validator: Validator
    routing: RoutingTable
    broker: Broker
    ledger: Ledger
    signer: RenewingSigner
    receipts: ReceiptFactory
    pipeline: Pipeline
    worker: Worker | None = None
    adapters: dict[str, Adapter] = field(default_factory=dict)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    reloader: RoutingReloader | None = None
    trust_reloader: TrustReloader | None = None  # polled by the reloader: new CRLs, anchors, registry

    @classmethod
    async def open(
        cls, settings: Settings, *, routing: RoutingTable | None = None, metrics: GatewayMetrics | None = None
    ) -> Gateway:
        trust = TrustStore.load(settings.trust_dir)
        partners = PartnerRegistry.load(settings.partners_path)
        validator = Validator(DocumentTypeRegistry.load(settings.registry_file))
        routing = routing or load_routing(settings)
        me = partners.get(settings.gateway_identity)
        gateway_party = PartyRef(
            identity=settings.gateway_identity,
            name=me.name if me else settings.gateway_name,
            country_code=me.country if me else settings.gateway_country,
        )
        verifier = Verifier(trust, partners)
        metrics = metrics if metrics is not None else GatewayMetrics()
        signer = RenewingSigner(  # renewed in place: gateway/signing_renewal.py
            settings.gateway_key,
            settings.gateway_cert,
            probe=verified_here(verifier, gateway_party),
            also_watch=lambda: [settings.partners_path, *trust.source_files()],
            on_renewal=lambda outcome: metrics.signing_renewals.labels(outcome=outcome).inc(),
        )
        receipts = ReceiptFactory(signer, gateway_party)
        peers = peer_destinations(partners)
        withheld = withheld_peers(routing.destinations, partners)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        ledger = make_ledger(
            settings.database_url,
            settings.data_dir,
            synchronous=settings.sqlite_synchronous,
            linger=settings.ledger_linger_ms / 1000,
        )
        await ledger.open()
        # Metrics are counted from the events the ledger carries (gateway/metrics.py); one registry per gateway.
        ledger = MetricsLedger(ledger, EventCounter(metrics, is_party=lambda p: partners.get(p) is not None))
        broker = broker_for(settings)
        try:
            await broker.start()
            await broker.declare([*routing.destinations, *peers])
        except Exception:
            await ledger.close()
            raise
        admission = Admission(
            settings=settings,
            verifier=verifier,
            validator=validator,
            partners=partners,
            routing=routing,
            extra_destinations=peers,
            withheld=withheld,
        )
        pipeline = Pipeline(
            admission, broker=broker, ledger=ledger, receipts=receipts, on_stages=metrics.observe_stages
        )
        log.info(
            "gateway.opened",
            broker=getattr(broker, "name", type(broker).__name__),
            destinations=sorted(routing.destinations),
            document_types=len(list(validator.registry)),
        )
        for name, why in sorted(withheld.items()):
            log.warning("routing.peer_withheld", destination=name, detail=f"not routed to: {why}; {HELD_NOTE}")
        gateway = cls(
            settings, trust, partners, validator, routing, broker, ledger, signer, receipts, pipeline, metrics=metrics
        )
        metrics.watch_breakers(gateway.breaker_states)
        metrics.add_collector(CertificateExpiryCollector(CertificateInventory(settings, partners).current))
        metrics.add_collector(CrlExpiryCollector(trust.revocation_coverage))
        metrics.add_collector(WithheldPeersCollector(lambda: pipeline.admission.withheld))
        metrics.add_collector(HeldLanesCollector(lambda: gateway.adapters))
        return gateway

    def build_adapters(self, base_dir: Path | None = None) -> dict[str, Adapter]:
        base = base_dir or self.settings.data_dir
        # ASW peers need the gateway itself (its key, trust store, registry), not just options. A peer
        # the routing file does not list as a destination (adapter: asw) gets the default options.
        context = self._peer_context()
        withheld = self.pipeline.admission.withheld  # peers with no endpoint: their lanes hold what is queued
        adapters: dict[str, Adapter] = {
            name: withheld_peer_adapter(name, withheld[name])
            if name in withheld
            else self._build_adapter(name, dest.adapter, dest.options, context, base)
            for name, dest in self.routing.destinations.items()
        }
        for name in sorted(peer_destinations(self.partners) - adapters.keys()):
            adapters[name] = build_peer_adapter(name, {}, context)
        return adapters

    def _stranded_lanes(self, pending: Mapping[str, int], configured: Mapping[str, Adapter]) -> dict[str, Adapter]:
        """Lanes that hold the accepted copies queued for destinations nothing here can deliver to: one a
        reload removed from the rules before this restart (``DESTINATION_REMOVED``), or an ASW peer the
        rules do not name whose endpoint the registry took away (``PEER_WITHHELD``). Without them those
        queues would not be consumed at all: the copies would wait with nothing saying why, or for how
        long. A reload that configures such a destination again swaps the real adapter in on its lane."""
        lanes: dict[str, Adapter] = {}
        for name, count in sorted(pending.items()):
            if name in configured:
                continue
            if name.startswith(PEER_PREFIX):
                why = no_live_peer(name)
                lanes[name] = withheld_peer_adapter(name, why)
                log.warning("routing.peer_withheld", destination=name, pending=count, detail=f"{why}; {HELD_NOTE}")
            else:
                lanes[name] = removed_destination_adapter(name)
                log.warning("routing.destination_removed", destination=name, pending=count, detail=REMOVED_NOTE)
        return lanes

    def adapter_for(self, destination: DestinationConfig) -> Adapter:
        """One destination's adapter, as ``build_adapters`` makes it (a routing reload's new or changed one)."""
        return self._build_adapter(
            destination.name, destination.adapter, destination.options, self._peer_context(), self.settings.data_dir
        )

    def _peer_context(self) -> PeerContext:
        return PeerContext(
            self.receipts.gateway,
            self.signer,
            self.pipeline.admission.verifier,  # peer receipts are checked exactly like inbound messages
            ProofStore.under(self.settings.data_dir),
        )

    @staticmethod
    def _build_adapter(
        name: str, kind: str, options: Mapping[str, Any], context: PeerContext, base_dir: Path
    ) -> Adapter:
        if kind == ASW_KIND:
            return build_peer_adapter(name, options, context)
        return build_adapter(name, kind, options, base_dir=base_dir)

    async def start_worker(self, destinations: list[str] | None = None) -> Worker:
        adapters = self.build_adapters()
        self.adapters = adapters | self._stranded_lanes(await self.ledger.pending_destinations(), adapters)
        policies = {name: (dest.retry, dest.breaker) for name, dest in self.routing.destinations.items()}
        self.worker = Worker(self.broker, self.adapters, policies, self.ledger, prefetch=self.settings.prefetch)
        await self.worker.start(destinations)
        return self.worker

    def breaker_states(self) -> dict[str, str]:
        """Circuit breaker per destination, over the worker and any consumers a routing reload added."""
        workers = [self.worker] if self.worker is not None else []
        workers += self.reloader.workers if self.reloader is not None else []
        return {name: state for worker in workers for name, state in worker.breaker_states().items()}

    def start_reloader(self, *, interval: float = DEFAULT_INTERVAL) -> RoutingReloader:
        """Watch the routing rules file, the trust directory, the partner registry and the gateway's signing
        key and certificate (gateway/reload.py, gateway/trust_reload.py, gateway/signing_renewal.py), and
        honour ``reloader.request()``, e.g. from SIGHUP."""
        if self.reloader is None:
            self.reloader = RoutingReloader(self, self.settings.routing_file or default_rules_path(), interval=interval)
            if self.trust.source is not None:
                self.trust_reloader = TrustReloader(
                    self.trust,
                    self.partners,
                    self.settings.partners_path,
                    on_reload=lambda outcome: self.metrics.trust_reloads.labels(outcome=outcome).inc(),
                )
                self.reloader.also_poll(self.trust_reloader.check)
            # after the trust check: a new pair is probed against the trust and registry just read
            self.reloader.also_poll(self.signer.renew_if_changed)
            self.reloader.start()
        return self.reloader

    async def close(self) -> None:
        if self.reloader is not None:
            await self.reloader.stop()
        if self.worker is not None:
            await self.worker.stop()
        await self.broker.close()
        await self.ledger.close()
