"""Prometheus metrics, derived from the event stream: no stage or worker knows they exist.

``MetricsLedger`` wraps the ledger. Everything the ingress and the workers report passes through it
as ``Event``s (``claim`` / ``accept`` / ``release`` / ``record``), and it counts what it sees after
the ledger has committed it. Two collectors read live state at scrape time: the circuit breakers
(``Gateway.breaker_states``) and the certificates' remaining lifetime (``gateway.security.expiry``).

Every gateway owns its own ``CollectorRegistry`` (tests run many gateways in one process). Names
follow Prometheus conventions: ``nsw_`` prefix, seconds, ``_total`` counters, and labels drawn from
bounded sets only (destinations, codes, registered parties) -- never a message id.

``--processes N`` (gateway/supervisor.py) runs N children behind one port, and a scrape reaches
whichever child the kernel picks. So there the children count in prometheus_client's multiprocess mode
(https://prometheus.github.io/client_python/multiprocess/): the supervisor gives each child
``PROMETHEUS_MULTIPROC_DIR`` before it starts, every value lives in a per-pid file in that directory,
and any child's ``/metrics`` (the shared port or its own ``--metrics-port + I``) sums every child's
files at scrape time -- including those of a child that died, so a restart never makes a counter go
backwards. Gauges: ``nsw_deliveries_in_flight`` is ``livesum`` (a dead child's attempts go back to
the queue, and out of the sum with ``mark_process_dead``); the circuit breakers are published by each
child into a ``livemax`` gauge (``keep_breakers_published``), so a state is 1 when any live child's
breaker for that destination is in it. The certificate collector reads files every child reads
alike: the answering child serves it. A single process (and every test gateway) keeps its own
registry as before.

Exported (a single process: its own counts, Prometheus sums separate ingress and worker processes;
``--processes N``: the whole gateway's counts, on every child)::

    nsw_messages_received_total                       every submission the ingress answered
    nsw_messages_accepted_total                       202 with a new receipt
    nsw_messages_rejected_total{code}                 signed rejections, by error code (as answered)
    nsw_receipts_replayed_total                       identical resubmissions answered with the first receipt
    nsw_deliveries_queued_total{destination}
    nsw_delivery_attempts_total{destination}          broker-level attempts (DELIVERING)
    nsw_messages_delivered_total{destination}
    nsw_delivery_retries_total{destination,code}      broker-level retries (RETRY_WAIT)
    nsw_dead_letters_total{destination,code}
    nsw_dead_letters_replayed_total{destination}
    nsw_deliveries_in_flight{destination}             attempts running longer than 1 s (announced), not yet settled
    nsw_delivery_duration_seconds{destination}        histogram: DELIVERING -> DELIVERED of one attempt
    nsw_ingress_stage_seconds{stage}                  histogram: time an accepted message spent in each ingress
                                                      stage (gateway/pipeline.py INGRESS_STAGES); claim and accept
                                                      include waiting for the ledger's group commit, publish the
                                                      broker's confirms
    nsw_signature_failures_total{party,code}          SIGNATURE_* / CERT_* rejections by claimed sender
    nsw_circuit_breaker_state{destination,state}      1 for the breaker's current state, else 0 (--processes N:
                                                      1 for every state some live child's breaker is in)
    nsw_certificate_expiry_seconds{party,kind,subject,fingerprint}   seconds until notAfter (< 0: expired)
    nsw_crl_expiry_seconds{ca,fingerprint}             per CA with CRLs: seconds until its revocation status stops
                                                      being known (the covering CRLs' nextUpdate); <= 0: stale,
                                                      signers under that CA are refused CERT_UNTRUSTED now
    nsw_peer_withheld{destination}                    1 for an ASW peer the rules file names and the partner registry
                                                      gives no endpoint: refused NO_ROUTE, what is queued for it
                                                      held (PEER_WITHHELD), until it has one
    nsw_routing_reloads_total{outcome}                ok | error
    nsw_trust_reloads_total{outcome}                  ok | error: trust directory and partner registry re-read
                                                      after a change (error: the old ones stay in force)
    nsw_signing_renewals_total{outcome}               ok | error: the gateway's own signing key and certificate
                                                      renewed in place (error: the pair in force keeps signing)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from adapters.base import held_code
from gateway.access import metrics_allowed
from gateway.audit import AuditRecord, AuditReport
from gateway.errors import BrokerUnavailable, ErrorCode
from gateway.events import Event
from gateway.model import State
from gateway.pipeline import INGRESS_STAGES
from gateway.retry import BreakerState
from gateway.security.trust import fingerprint
from gateway.status import MessageStatus
from gateway.stores.base import Claim, ClaimKind, Ledger

log = structlog.get_logger("nsw.metrics")

SIGNATURE_CODES: Final = frozenset(
    {
        ErrorCode.SIGNATURE_MISSING.value,
        ErrorCode.SIGNATURE_INVALID.value,
        ErrorCode.CERT_UNTRUSTED.value,
        ErrorCode.CERT_EXPIRED.value,
        ErrorCode.CERT_REVOKED.value,
    }
)
UNKNOWN_PARTY: Final = "unknown"
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# ingress stages take from ~0.1 ms (route) to tens of ms (a commit behind a busy disk)
STAGE_BUCKETS: Final = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's switch, read when it is imported
BREAKER_PUBLISH_SECONDS: Final = 1.0
BREAKER_METRIC: Final = "nsw_circuit_breaker_state"
BREAKER_HELP: Final = "Circuit breaker per destination: 1 for the current state (closed, open, half_open), else 0"


def multiprocess_dir() -> Path | None:
    """The shared directory if this process counts in prometheus_client's multiprocess mode, else ``None``.

    The mode is fixed when prometheus_client is imported, by ``PROMETHEUS_MULTIPROC_DIR`` being in the
    environment: only the supervisor's children have it (gateway/supervisor.py).
    """
    path = os.environ.get(MULTIPROC_ENV)
    if not path or values.ValueClass is values.MutexValue:
        return None
    return Path(path)


class GatewayMetrics:
    """The metric objects of one gateway, in its own registry.

    With ``multiprocess_dir`` (a child of ``--processes N``; prometheus_client must already be in
    multiprocess mode, see ``multiprocess_dir()``) the values live in that directory's per-process files
    and a scrape answers for all the processes writing there. The metric objects then stay in
    ``registry`` and the scrape reads ``exposed``, a second registry holding the ``MultiProcessCollector``
    and the custom collectors: exposing both would export every series twice.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, multiprocess_dir: Path | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.exposed = self.registry
        self._breaker_gauge: Gauge | None = None
        self._breaker_states: Callable[[], Mapping[str, str]] = dict
        r = self.registry
        self.received = Counter("nsw_messages_received", "Submissions the ingress answered", registry=r)
        self.accepted = Counter("nsw_messages_accepted", "Messages accepted with a new signed receipt", registry=r)
        self.rejected = Counter("nsw_messages_rejected", "Signed rejections, by error code", ["code"], registry=r)
        self.replayed_receipts = Counter(
            "nsw_receipts_replayed", "Identical resubmissions answered with the original receipt", registry=r
        )
        self.queued = Counter("nsw_deliveries_queued", "Copies enqueued, per destination", ["destination"], registry=r)
        self.attempts = Counter(
            "nsw_delivery_attempts", "Broker-level delivery attempts started", ["destination"], registry=r
        )
        self.delivered = Counter("nsw_messages_delivered", "Deliveries completed", ["destination"], registry=r)
        self.retries = Counter(
            "nsw_delivery_retries", "Broker-level retries scheduled", ["destination", "code"], registry=r
        )
        self.dead = Counter("nsw_dead_letters", "Deliveries dead-lettered", ["destination", "code"], registry=r)
        self.replayed_dead = Counter(
            "nsw_dead_letters_replayed", "Dead letters replayed by an operator", ["destination"], registry=r
        )
        self.in_flight = Gauge(
            "nsw_deliveries_in_flight",
            "Delivery attempts running longer than 1 s and not yet settled",
            ["destination"],
            multiprocess_mode="livesum",  # what the live children hold; a dead child's attempts are requeued
            registry=r,
        )
        self.latency = Histogram(
            "nsw_delivery_duration_seconds",
            "Time from the start of a delivery attempt to its success",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stages = Histogram(
            "nsw_ingress_stage_seconds",
            "Time an accepted message spent in each ingress stage (claim, accept: ledger commits; publish: confirms)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self._stage_series = [self.stages.labels(stage=stage) for stage in INGRESS_STAGES]
        self.signature_failures = Counter(
            "nsw_signature_failures",
            "Rejections for a missing, invalid or untrusted signature, by claimed sender (registered parties only)",
            ["party", "code"],
            registry=r,
        )
        self.reloads = Counter("nsw_routing_reloads", "Routing rule reloads", ["outcome"], registry=r)
        self.trust_reloads = Counter(
            "nsw_trust_reloads", "Trust directory and partner registry reloads", ["outcome"], registry=r
        )
        for code in ErrorCode:
            self.rejected.labels(code=code.value)  # every code is a series from the start, at 0
        self.signing_renewals = Counter(
            "nsw_signing_renewals", "The gateway's signing key and certificate renewed", ["outcome"], registry=r
        )
        for outcome in ("ok", "error"):
            self.reloads.labels(outcome=outcome)
            self.trust_reloads.labels(outcome=outcome)
            self.signing_renewals.labels(outcome=outcome)
        if multiprocess_dir is not None:
            if values.ValueClass is values.MutexValue:
                raise ValueError(f"{MULTIPROC_ENV} must be set before prometheus_client is imported")
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
            self._breaker_gauge = Gauge(
                BREAKER_METRIC, BREAKER_HELP, ["destination", "state"], multiprocess_mode="livemax", registry=r
            )

    def observe_stages(self, seconds: Sequence[float]) -> None:
        """One accepted message's time in each of ``INGRESS_STAGES`` (the pipeline's ``on_stages``)."""
        for series, value in zip(self._stage_series, seconds, strict=True):
            series.observe(value)

    @property
    def multiprocess(self) -> bool:
        return self.exposed is not self.registry

    def add_collector(self, collector: Collector) -> None:
        self.exposed.register(collector)

    def watch_breakers(self, states: Callable[[], Mapping[str, str]]) -> None:
        """Export ``nsw_circuit_breaker_state`` from ``states`` (destination -> state).

        One process: read at scrape time (``BreakerCollector``). Multiprocess: each child's breakers are
        its own, and a scrape reaches one child, so every child writes its states into a shared gauge
        (``keep_breakers_published``) whose ``livemax`` shows, per destination, 1 for every state some
        live child is in. Chosen over a per-process label (a new set of series at every restart, and
        queries that must aggregate it away) and over "the worst state" (it would hide that the other
        children still deliver): the series keep the names and labels of one process, an alert on
        ``state="open" == 1`` fires as soon as any child holds the destination back, and a mixed state
        shows as two 1s. Other children's states lag by at most ``BREAKER_PUBLISH_SECONDS``.
        """
        if self._breaker_gauge is None:
            self.add_collector(BreakerCollector(states))
        else:
            self._breaker_states = states

    def publish_breakers(self) -> None:
        """Multiprocess mode: write this process's breaker states to the shared files (else nothing)."""
        if self._breaker_gauge is None:
            return
        for destination, state, value in breaker_samples(self._breaker_states()):
            self._breaker_gauge.labels(destination=destination, state=state).set(value)

    async def keep_breakers_published(self, interval: float = BREAKER_PUBLISH_SECONDS) -> None:
        """``publish_breakers`` until cancelled: a breaker turns half_open by time alone, with no call to hook."""
        while True:
            try:
                self.publish_breakers()
            except Exception:  # metrics are optional: the next round tries again
                log.exception("metrics.breakers_unpublished")
            await asyncio.sleep(interval)

    def exposition(self) -> bytes:
        return generate_latest(self.exposed)


class EventCounter:
    """Turns committed events into metric updates.

    In flight and latency are keyed by (message, destination): a redelivered attempt replaces its own
    entry instead of counting twice, and RETRY_WAIT / DELIVERED / DEAD end it.
    """

    def __init__(self, metrics: GatewayMetrics, *, is_party: Callable[[str], bool] = lambda _: False) -> None:
        self.metrics = metrics
        self._is_party = is_party
        self._started: dict[tuple[str, str], float] = {}

    def count(self, events: Iterable[Event]) -> None:
        try:
            for event in events:
                self._count(event)
        except Exception:  # metrics are optional: never fail the caller's committed work
            log.exception("metrics.count_failed")

    def rejected(self, event: Event, code: str) -> None:
        m = self.metrics
        m.received.inc()
        m.rejected.labels(code=code).inc()
        if code in SIGNATURE_CODES:
            m.signature_failures.labels(party=self._claimed_party(event), code=code).inc()

    def _count(self, event: Event) -> None:
        m = self.metrics
        dest = event.destination or ""
        match event.state:
            case State.ACCEPTED:
                m.received.inc()
                m.accepted.inc()
            case State.QUEUED:
                m.queued.labels(destination=dest).inc()
            case State.DELIVERING:
                m.attempts.labels(destination=dest).inc()
                key = (event.message_id, dest)
                if key not in self._started:
                    m.in_flight.labels(destination=dest).inc()
                self._started[key] = event.at
            case State.RETRY_WAIT:
                self._settle(event)
                m.retries.labels(destination=dest, code=event.code or "").inc()
            case State.DELIVERED:
                started = self._settle(event)
                m.delivered.labels(destination=dest).inc()
                if started is not None:
                    m.latency.labels(destination=dest).observe(max(0.0, event.at - started))
            case State.DEAD:
                self._settle(event)
                m.dead.labels(destination=dest, code=event.code or "").inc()
            case State.REPLAYED:
                m.replayed_dead.labels(destination=dest).inc()
            case _:  # RECEIVED is counted by its outcome; REJECTED by ``rejected``
                pass

    def _settle(self, event: Event) -> float | None:
        dest = event.destination or ""
        started = self._started.pop((event.message_id, dest), None)
        if started is not None:
            self.metrics.in_flight.labels(destination=dest).dec()
        return started

    def _claimed_party(self, event: Event) -> str:
        claimed = event.party or event.claimed_party  # a failed signature leaves party unverified (None)
        # Only registered identities become label values: a forger could otherwise mint series at will.
        return claimed if claimed is not None and self._is_party(claimed) else UNKNOWN_PARTY


class MetricsLedger:
    """A ``Ledger`` that counts the events it carries. Everything else is delegated unchanged."""

    def __init__(self, inner: Ledger, counter: EventCounter) -> None:
        self.inner = inner
        self.counter = counter

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def claim(
        self, message_id: str, sender: str, digest: str, document_type: str, events: Sequence[Event]
    ) -> Claim:
        claim = await self.inner.claim(message_id, sender, digest, document_type, events)
        if claim.kind is ClaimKind.REPLAY:
            self.counter.metrics.received.inc()
            self.counter.metrics.replayed_receipts.inc()
        return claim

    async def accept(
        self, message_id: str, receipt: bytes, destinations: Sequence[str], events: Sequence[Event]
    ) -> None:
        await self.inner.accept(message_id, receipt, destinations, events)
        self.counter.count(events)

    async def release(self, message_id: str, events: Sequence[Event]) -> None:
        # The REJECTED(UNAVAILABLE) recorded here is followed by the ingress's own rejection (through
        # ``record``), which is the one answered and counted.
        await self.inner.release(message_id, events)

    async def record(self, events: Sequence[Event]) -> None:
        rejections = [e for e in events if e.state is State.REJECTED]
        try:
            await self.inner.record(events)
        except BrokerUnavailable:
            # The ingress still answers a rejection it could not audit -- as UNAVAILABLE (gateway/pipeline.py).
            for event in rejections:
                self.counter.rejected(event, ErrorCode.UNAVAILABLE.value)
            raise
        for event in rejections:
            self.counter.rejected(event, event.code or "")
        self.counter.count(e for e in events if e.state is not State.REJECTED)

    async def status(self, message_id: str) -> MessageStatus | None:
        return await self.inner.status(message_id)

    async def dead_destinations(self) -> list[str]:
        return await self.inner.dead_destinations()

    async def pending_destinations(self) -> dict[str, int]:
        return await self.inner.pending_destinations()

    async def audit_tail(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        return await self.inner.audit_tail(after_seq, limit)

    async def trace(self, message_id: str) -> list[AuditRecord]:
        return await self.inner.trace(message_id)

    async def verify_audit(self) -> AuditReport:
        return await self.inner.verify_audit()

    def __getattr__(self, name: str) -> Any:  # backend specifics (path, name, ...) stay reachable
        return getattr(self.inner, name)


def breaker_samples(states: Mapping[str, str]) -> Iterator[tuple[str, str, float]]:
    """(destination, state, 1.0 or 0.0) for every state of every destination's breaker."""
    for destination, current in sorted(states.items()):
        for state in BreakerState:
            yield destination, state.value, 1.0 if state.value == current else 0.0


class BreakerCollector(Collector):
    """``nsw_circuit_breaker_state``: read from the workers at scrape time (empty without a worker)."""

    def __init__(self, states: Callable[[], Mapping[str, str]]) -> None:
        self._states = states

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(BREAKER_METRIC, BREAKER_HELP, labels=["destination", "state"])
        for destination, state, value in breaker_samples(self._states()):
            family.add_metric([destination, state], value)
        yield family


class WithheldPeersCollector(Collector):
    """``nsw_peer_withheld``: the named ASW peers the partner registry gives no endpoint, read at scrape
    time (every child of ``--processes N`` reads the same files, so the answering child serves it)."""

    def __init__(self, withheld: Callable[[], Iterable[str]]) -> None:
        self._withheld = withheld

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "nsw_peer_withheld",
            "1 for an ASW peer the rules name and the partner registry gives no endpoint: not routed to",
            labels=["destination"],
        )
        for destination in sorted(self._withheld()):
            family.add_metric([destination], 1.0)
        yield family


class HeldLanesCollector(Collector):
    """``nsw_destination_held``: the delivery lanes whose every attempt sends nothing and holds the copy in
    RETRY_WAIT (``adapters.base.held_code``), read from the adapters in force at scrape time. An ASW peer
    the registry gives no endpoint (PEER_WITHHELD) or a destination the rules no longer configure while
    copies are queued for it (DESTINATION_REMOVED): what waits there is dead-lettered at the retry limits
    unless the configuration changes, which is worth an alert."""

    def __init__(self, adapters: Callable[[], Mapping[str, Any]]) -> None:
        self._adapters = adapters  # -> Gateway.adapters: the lanes this process runs

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "nsw_destination_held",
            "1 for a destination whose deliveries are held, not sent (code: why); they wait in RETRY_WAIT",
            labels=["destination", "code"],
        )
        for name, adapter in sorted(self._adapters().items()):
            code = held_code(adapter)
            if code is not None:
                family.add_metric([name, code], 1.0)
        yield family


class CertificateExpiryCollector(Collector):
    """``nsw_certificate_expiry_seconds``: remaining lifetime of every certificate the gateway relies on."""

    def __init__(
        self, certificates: Callable[[], Iterable[Any]], *, clock: Callable[[], datetime] | None = None
    ) -> None:
        self._certificates = certificates  # -> gateway.security.expiry.CertificateInfo
        self._clock = clock or (lambda: datetime.now(UTC))

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "nsw_certificate_expiry_seconds",
            "Seconds until the certificate's notAfter (negative once expired)",
            labels=["party", "kind", "subject", "fingerprint"],
        )
        now = self._clock()
        try:
            certificates = list(self._certificates())
        except Exception:  # a scrape must not fail because a certificate file is unreadable
            log.exception("metrics.certificates_unreadable")
            certificates = []
        for cert in certificates:
            family.add_metric(
                [cert.party, cert.kind, cert.subject, cert.fingerprint], (cert.not_after - now).total_seconds()
            )
        yield family


class CrlExpiryCollector(Collector):
    """``nsw_crl_expiry_seconds``: per CA with CRLs, how long its revocation status stays known, from the
    trust store in force (so a reloaded CRL shows at the next scrape). CAs whose CRLs carry no nextUpdate
    never go stale and are left out; a CA with no genuine CRL covering now is at 0 or below."""

    def __init__(
        self, coverage: Callable[[datetime], Iterable[Any]], *, clock: Callable[[], datetime] | None = None
    ) -> None:
        self._coverage = coverage  # -> gateway.security.trust.CrlCoverage, e.g. TrustStore.revocation_coverage
        self._clock = clock or (lambda: datetime.now(UTC))

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "nsw_crl_expiry_seconds",
            "Seconds until the CA's revocation status stops being known (<= 0: stale, its signers are refused)",
            labels=["ca", "fingerprint"],
        )
        now = self._clock()
        for c in self._coverage(now):
            if c.known_until is None and c.problem is None:
                continue
            # a stale CA's known_until lies in the past; a forged or not yet valid CRL has none: 0
            remaining = 0.0 if c.known_until is None else (c.known_until - now).total_seconds()
            family.add_metric([c.subject, fingerprint(c.ca)], remaining)
        yield family


def metrics_response(metrics: GatewayMetrics) -> web.Response:
    response = web.Response(body=metrics.exposition())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def metrics_app(metrics: GatewayMetrics, operator_token: str | None) -> web.Application:
    """A bare app serving ``/metrics`` (and ``/livez``), for processes without the ingress (``nswgw worker``).

    Like the ingress's ``/metrics``: open when no operator token is configured, else operators only.
    """
    token = operator_token.encode() if operator_token else None

    async def scrape(request: web.Request) -> web.Response:
        if not metrics_allowed(request, token):
            return web.json_response({"error": "operator token required"}, status=401)
        return metrics_response(metrics)

    async def livez(_request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/livez", livez)
    return app


async def start_metrics_server(
    metrics: GatewayMetrics, operator_token: str | None, host: str, port: int
) -> web.AppRunner:
    """Serve ``metrics_app`` on ``host:port``; the caller cleans the runner up."""
    runner = web.AppRunner(metrics_app(metrics, operator_token), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
