"""``nswgw demo``: the whole path on loopback with the embedded default — nothing to install.

It makes a throw-away dev PKI, starts loopback mock agencies (one is down for its first attempts,
one refuses permanently), the ingress and the workers in this process, signs and sends one message
of every shipped type (plus a forged one), and prints receipts, rejections, deliveries, retries and
the dead letter, then replays that dead letter to the fixed agency and checks the audit chain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

from gateway.config import Settings
from gateway.crossborder_demo import (
    FAST_POLICY,
    Agencies,
    Node,
    home_routing,
    ingress_url,
    loopback_socket,
    open_node,
    peer_routing,
    run_cross_border_demo,
    server_tls,
)
from gateway.dlq import replay_dead_letters
from gateway.envelope import NSMAP
from gateway.ingress import create_app
from gateway.logs import configure_logging
from gateway.model import State
from gateway.runtime import Gateway
from gateway.samples import SAMPLE_SENDERS, sample_envelope
from gateway.security.parse import parse_untrusted
from gateway.security.pki import init_dev_pki_pair
from gateway.security.sign import Signer, to_bytes

FLAKY = "customs"  # answers 503 to its first attempts
REFUSING = "trader-portal"  # answers 400 until "fixed"
FLAKY_FAILURES = 3
RECEIPT = "{urn:nsw:receipt:1}"


@dataclasses.dataclass
class MockAgencies:
    """One loopback HTTP server; each destination is a path. Records every request it answers."""

    failures_left: dict[str, int] = dataclasses.field(default_factory=lambda: {FLAKY: FLAKY_FAILURES})
    refusing: set[str] = dataclasses.field(default_factory=lambda: {REFUSING})
    received: dict[str, list[str]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    runner: web.AppRunner | None = None
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        agency = request.match_info["agency"]
        key = request.headers.get("Idempotency-Key", "")
        await request.read()
        if self.failures_left.get(agency, 0) > 0:
            self.failures_left[agency] -= 1
            return web.Response(status=503, text="agency system under maintenance")
        if agency in self.refusing:
            return web.Response(status=400, text="unknown licensee reference (agency-side validation)")
        self.received[agency].append(key)
        return web.Response(status=200, text=f"{agency} took {key}")

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{agency}/inbox", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _say(text: str = "") -> None:
    print(text, flush=True)


def _message(pki: Path, document_type: str) -> bytes:
    sender, _recipient, _function = SAMPLE_SENDERS[document_type]
    root = sample_envelope(document_type, message_id=str(uuid.uuid4()), send_date=datetime.now(UTC))
    party = pki / "parties" / sender
    signer = Signer.from_files(party / "key.pem", party / "cert.pem")
    if document_type == "eco.atiga-form-d":  # the issuing ministry signs the certificate itself
        root = signer.sign_content(root)
    return to_bytes(signer.sign_envelope(root))


def _answer_summary(body: bytes) -> str:
    root = parse_untrusted(body)
    content = root.find("e:Body/e:Content/*", NSMAP)
    if content is None:
        return "?"
    if content.tag == f"{RECEIPT}Receipt":
        dests = [d.text or "" for d in content.iterfind(f"{RECEIPT}destinations/{RECEIPT}destination")]
        return f"receipt (function 99, signed by VN-NSW) -> {', '.join(dests)}"
    code = content.findtext(f"{RECEIPT}code")
    return f"rejection {code}: {content.findtext(f'{RECEIPT}detail')}"


async def _wait_settled(gw: Gateway, message_ids: list[str], within: float) -> dict[str, Any]:
    """Statuses once every destination is DELIVERED or DEAD, or as they are after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        statuses = {mid: await gw.ledger.status(mid) for mid in message_ids}
        pending = [
            mid
            for mid, st in statuses.items()
            if st is None or any(d.state not in (State.DELIVERED, State.DEAD) for d in st.destinations.values())
        ]
        if not pending or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.2)


async def run_demo(workdir: Path | None = None, cross_border: bool = False) -> int:
    if cross_border:
        return await run_cross_border_demo(workdir)
    if workdir is not None:
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        return await _demo(workdir)
    with tempfile.TemporaryDirectory(prefix="nswgw-demo-") as tmp:
        return await _demo(Path(tmp))


async def _demo(base: Path) -> int:
    _say(f"== NSW gateway demo (files in {base})")
    log_file = base / "gateway.log"
    configure_logging("json", "info", stream=log_file.open("a"))  # the console is for the story
    _say(f"gateway logs (JSON lines) in {log_file}")
    th_sock = loopback_socket()
    pair = init_dev_pki_pair(base / "certs", peer_url=ingress_url(th_sock), force=True)
    pki = pair.home.dir
    _say("dev PKIs made: VN root + intermediate, gateway (ECDSA P-256), parties (RSA-2048); TH's own root")
    agencies, th_agencies = MockAgencies(), await Agencies().start()
    await agencies.start()
    nodes: list[Node] = []
    runner: web.AppRunner | None = None
    try:
        # Thailand's NSW: a second real gateway, so e-C/O and ePhyto legs to asw:TH get a signed peer receipt.
        th_routing = peer_routing("TH", pair.peer_issuer, th_agencies.url, base / "th-archive", policy=FAST_POLICY)
        nodes.append(
            await open_node(
                pair.peer_dir, base / "th-var", identity=pair.peer_identity, routing=th_routing, sock=th_sock
            )
        )
        routing = home_routing(f"http://127.0.0.1:{agencies.port}", base / "archive", policy=FAST_POLICY)
        settings = Settings(certs_dir=pki, data_dir=base / "var", lease_seconds=10.0)
        gw = await Gateway.open(settings, routing=routing)
        nodes.append(Node(gw, loopback_socket(), server_tls(pki)))
        await gw.start_worker()
        runner = web.AppRunner(create_app(gw), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/messages"  # type: ignore[union-attr]
        _say(
            f"VN ingress on {url}; embedded broker and ledger in {settings.data_dir}; agencies on port {agencies.port}"
        )
        _say(f"TH-NSW peer gateway on {nodes[0].url} (mutual TLS)")
        _say(f"agency '{FLAKY}' fails its first {FLAKY_FAILURES} attempts; agency '{REFUSING}' refuses permanently")
        return await _exchange(gw, agencies, pki, url)
    finally:
        if runner is not None:
            await runner.cleanup()
        for node in reversed(nodes):
            await node.close()
        await agencies.stop()
        await th_agencies.stop()


async def _exchange(gw: Gateway, agencies: MockAgencies, pki: Path, url: str) -> int:
    accepted: list[str] = []
    _say("\n== sending one signed message of every shipped type")
    async with ClientSession() as http:
        for document_type in sorted(SAMPLE_SENDERS):
            body = _message(pki, document_type)
            async with http.post(url, data=body, headers={"Content-Type": "application/xml"}) as response:
                answer = await response.read()
                mid = response.headers.get("X-NSW-Message-Id", "")
                _say(f"  {document_type:22} HTTP {response.status}  {_answer_summary(answer)}")
                if response.status == 202:
                    accepted.append(mid)
        forged = _message(pki, "licence.import").replace(b"<hsCode>", b"<hsCode>9", 1)
        async with http.post(url, data=forged, headers={"Content-Type": "application/xml"}) as response:
            _say(f"  {'(tampered licence)':22} HTTP {response.status}  {_answer_summary(await response.read())}")

    _say("\n== delivering (watch the retries and the dead letter)")
    statuses = await _wait_settled(gw, accepted, within=60)
    outcome: Counter[str] = Counter()
    for mid in accepted:
        for event in await gw.ledger.trace(mid):
            if event.destination and event.event in {"RETRY_WAIT", "DELIVERED", "DEAD"}:
                extra = f" ({event.code}: {event.detail})" if event.code else ""
                _say(f"  {mid[:8]} -> {event.destination:14} {event.event:10} attempt {event.attempt}{extra}")
                outcome[event.event] += 1
    dead = await gw.broker.list_dead()
    _say(f"\n== dead letters: {len(dead)}")
    for record in dead:
        _say(f"  {record.delivery.message_id[:8]} -> {record.delivery.destination}: {record.code} {record.reason}")

    if dead:
        _say(f"\n== the agency '{REFUSING}' is fixed; operator runs: nswgw dlq replay --destination {REFUSING}")
        agencies.refusing.clear()
        moved = await replay_dead_letters(gw.broker, gw.ledger, destination=REFUSING)
        statuses = await _wait_settled(gw, accepted, within=30)
        _say(f"  replayed {moved}; agency now holds {len(agencies.received[REFUSING])} message(s)")

    delivered = sum(1 for st in statuses.values() if st for d in st.destinations.values() if d.state == State.DELIVERED)
    total = sum(len(st.destinations) for st in statuses.values() if st)
    keys = [k for ks in agencies.received.values() for k in ks]
    report = await gw.ledger.verify_audit()
    _say("\n== summary")
    _say(
        f"  accepted {len(accepted)} messages -> {total} deliveries; delivered {delivered}; "
        f"retries {outcome['RETRY_WAIT']}; dead letters before replay {outcome['DEAD']}"
    )
    _say(f"  agencies received {len(keys)} requests with {len(set(keys))} distinct Idempotency-Keys")
    _say(f"  audit chain: {'intact' if report.ok else 'BROKEN'} ({report.count} records)")
    ok = report.ok and delivered == total and total > 0
    _say("demo " + ("completed" if ok else "FAILED"))
    return 0 if ok else 1
