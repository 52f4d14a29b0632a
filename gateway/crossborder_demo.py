"""``nswgw demo --cross-border``: two single windows, Viet Nam and Thailand, exchange an e-C/O on loopback.

Each gateway has its own dev PKI (``init_dev_pki_pair``: each trusts the other's root and registers the
other gateway as a peer), its own routing, embedded broker and ledger, and listens with mutual TLS::

    VN-MOIT issues an e-Form D (Body signed by the ministry)
      -> VN gateway -> asw:TH  re-signed by VN-NSW; TH's signed receipt verified and kept as proof
      -> TH gateway -> TH customs, which checks the ministry's Body signature itself
    TH customs accepts it (function 23, To = VN-MOIT, preReference = the e-C/O's messageId)
      -> TH gateway -> asw:VN -> VN gateway -> VN-MOIT

The pieces -- TLS contexts, loopback agencies, routing for both sides, a running gateway node, the
documents -- are also what ``tests/crossborder/`` builds its scenarios from.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import socket
import ssl
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from gateway.config import Settings
from gateway.envelope import NSMAP, build_envelope, content_document, parse_header
from gateway.ingress import create_app
from gateway.model import Header, PartyRef, State
from gateway.partners import PartnerRegistry
from gateway.proofs import ProofStore, proof_digest
from gateway.runtime import Gateway
from gateway.samples import ECO_NS, sample_envelope
from gateway.security.parse import parse_message, parse_untrusted
from gateway.security.pki import DevPkiPair, KeyPair, init_dev_pki_pair
from gateway.security.sign import Signer, to_bytes
from gateway.security.trust import TrustStore
from gateway.security.verify import Verifier
from gateway.status import DestinationStatus
from gateway.stores.base import Ledger
from routing.config import read_yaml
from routing.engine import RoutingTable, default_rules_path

ECO: Final = "eco.atiga-form-d"
SETTLE: Final = 30.0  # a deadline for what must happen, never a measurement
# Quick retries so that a peer coming back is noticed within a second (loopback demo and tests).
FAST_POLICY: Final[Mapping[str, Any]] = {
    "retry": {
        "in_process_attempts": 1,
        "in_process_wait": 0.05,
        "tiers": [0.2, 0.4, 0.8],
        "max_attempts": 10,
        "max_age": 120,
    },
    "breaker": {"failure_threshold": 50, "reset_after": 0.5},
}
DONE: Final = frozenset({State.DELIVERED, State.DEAD})


# -- mutual TLS on loopback ------------------------------------------------------------------------


def loopback_socket() -> socket.socket:
    """Bound to a free loopback port and not listening yet: connections are refused until a server uses it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def ingress_url(sock: socket.socket) -> str:
    return f"https://127.0.0.1:{sock.getsockname()[1]}/v1/messages"


def _trusted_pems(certs: Path) -> bytes:
    trust = certs / "trust"
    return b"".join(p.read_bytes() for d in ("anchors", "intermediates") for p in sorted((trust / d).glob("*.pem")))


def server_tls(certs: Path) -> ssl.SSLContext:
    """The gateway's certificate; a client must present one that chains to this gateway's trust anchors."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=_trusted_pems(certs).decode())
    context.load_cert_chain(certs / "gateway" / "cert.pem", certs / "gateway" / "key.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls(certs: Path, party: KeyPair) -> ssl.SSLContext:
    """A local party (a ministry, customs) talking to its own gateway: trusts ``certs``' anchors, presents
    ``party``'s certificate."""
    context = ssl.create_default_context(cadata=_trusted_pems(certs).decode())
    context.load_cert_chain(party.cert, party.key)
    return context


async def post(url: str, body: bytes, tls: ssl.SSLContext) -> tuple[int, bytes, dict[str, str]]:
    connector = aiohttp.TCPConnector(ssl=tls)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url, data=body, headers={"Content-Type": "application/xml"}) as response,
    ):
        return response.status, await response.read(), dict(response.headers)


# -- loopback agencies -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    headers: Mapping[str, str]
    body: bytes


class Agencies:
    """Agency systems on one loopback HTTP server, a path each (``/<destination>/inbox``). Every delivery
    is recorded; ``wait_for`` returns when a destination has had so many."""

    def __init__(self) -> None:
        self.received: dict[str, list[Delivered]] = defaultdict(list)
        self.url = ""
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def _take(self, request: web.Request) -> web.Response:
        self.received[request.match_info["name"]].append(Delivered(dict(request.headers), await request.read()))
        self._changed.set()
        return web.Response(status=200, text="taken")

    async def wait_for(self, name: str, count: int = 1, *, within: float = SETTLE) -> list[Delivered]:
        async with asyncio.timeout(within):
            while len(self.received[name]) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.received[name]

    async def start(self) -> Agencies:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{name}/inbox", self._take)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = loopback_socket()
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# -- routing for both sides ------------------------------------------------------------------------


def _pointed(
    data: dict[str, Any], agencies: str, archive: Path, peers: Iterable[str], policy: Mapping[str, Any]
) -> dict[str, Any]:
    """Every http destination at ``agencies/<name>/inbox``, the file drop in ``archive`` (made here), ``peers``
    as asw destinations, all with ``policy`` (retry, breaker)."""
    archive.mkdir(parents=True, exist_ok=True)
    for name, destination in data["destinations"].items():
        if destination["adapter"] == "http":
            destination["url"] = f"{agencies}/{name}/inbox"
        elif destination["adapter"] == "file":
            destination["directory"] = str(archive)
        destination.update(copy.deepcopy(dict(policy)))
    for peer in peers:
        data["destinations"][peer] = {"adapter": "asw", **copy.deepcopy(dict(policy))}
    return data


def home_rules(
    agencies: str, archive: Path, *, peers: Iterable[str] = ("asw:TH",), policy: Mapping[str, Any] = FAST_POLICY
) -> dict[str, Any]:
    """The shipped rules (routing/default.yaml), pointed at loopback agencies, as a rules file's mapping."""
    return _pointed(dict(read_yaml(default_rules_path())), agencies, archive, peers, policy)


def home_routing(
    agencies: str, archive: Path, *, peers: Iterable[str] = ("asw:TH",), policy: Mapping[str, Any] = FAST_POLICY
) -> RoutingTable:
    """``home_rules`` loaded."""
    data = home_rules(agencies, archive, peers=peers, policy=policy)
    return RoutingTable.from_mapping(data, source=f"{default_rules_path()} (loopback)")


def peer_country_rules(country: str, issuer: str) -> dict[str, Any]:
    """A peer country's gateway rules for the e-C/O flows: what arrives from abroad goes to its customs,
    its own issuer's certificates and its answers go abroad by ``asw:{...}``, answers to its issuer home."""
    answers = ["22", "23"]
    return {
        "version": 1,
        "namespaces": {"eco": ECO_NS},
        "fields": {ECO: {"importingCountry": "string(eco:importingCountry)"}},
        "destinations": {
            "customs": {"adapter": "http", "url": "http://127.0.0.1:9/customs/inbox"},
            "issuer": {"adapter": "http", "url": "http://127.0.0.1:9/issuer/inbox"},
            "archive": {"adapter": "file", "directory": "var/archive"},
        },
        "rules": [
            {
                "name": "eco-from-asw-peer-to-customs",
                "when": {"documentType": ECO, "function": ["01", "02", "03"], "fromCountry": {"not_in": [country]}},
                "to": ["customs", "archive"],
            },
            {
                "name": "ephyto-from-asw-peer-to-customs",
                "when": {
                    "documentType": "sps.ephyto",
                    "function": ["01", "02", "03", "04"],
                    "fromCountry": {"not_in": [country]},
                },
                "to": ["customs", "archive"],
            },
            {
                "name": "eco-issued-to-importing-country",
                "when": {
                    "documentType": ECO,
                    "function": ["01", "02", "03"],
                    "from": issuer,
                    "field": {"importingCountry": {"not_in": [country]}},
                },
                "to": ["asw:{importingCountry}", "archive"],
            },
            {
                "name": "eco-answers-abroad",
                "when": {"documentType": ECO, "function": answers, "toCountry": {"not_in": [country]}},
                "to": ["asw:{toCountry}"],
            },
            {
                "name": "eco-answers-to-issuer",
                "when": {"documentType": ECO, "function": answers, "toCountry": country, "from": {"not_in": [issuer]}},
                "to": ["issuer"],
            },
            {
                "name": "gateway-answers-to-archive",
                "when": {"documentType": ["nsw.receipt", "nsw.rejection"]},
                "to": ["archive"],
            },
        ],
    }


def peer_routing(
    country: str,
    issuer: str,
    agencies: str,
    archive: Path,
    *,
    peers: Iterable[str] = ("asw:VN",),
    policy: Mapping[str, Any] = FAST_POLICY,
) -> RoutingTable:
    data = _pointed(peer_country_rules(country, issuer), agencies, archive, peers, policy)
    return RoutingTable.from_mapping(data, source=f"{country} peer rules (loopback)")


# -- one running gateway ---------------------------------------------------------------------------


@dataclass
class Node:
    """A gateway with its workers running; its ingress listens on ``sock`` (mutual TLS) once ``serve``d."""

    gateway: Gateway
    sock: socket.socket
    tls: ssl.SSLContext
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return ingress_url(self.sock)

    @property
    def certs(self) -> Path:
        return self.gateway.settings.certs_dir

    @property
    def proofs(self) -> ProofStore:
        return ProofStore.under(self.gateway.settings.data_dir)

    async def serve(self) -> None:
        runner = web.AppRunner(create_app(self.gateway), access_log=None)
        await runner.setup()
        await web.SockSite(runner, self.sock, ssl_context=self.tls).start()
        self.runner = runner

    async def close(self) -> None:
        try:
            if self.runner is not None:
                await self.runner.cleanup()
        finally:
            self.sock.close()
            await self.gateway.close()


async def open_node(
    certs: Path,
    data_dir: Path,
    *,
    identity: str,
    routing: RoutingTable,
    sock: socket.socket,
    serve: bool = True,
    **settings: Any,
) -> Node:
    """Open the gateway ``identity`` (its country and name from its own registry entry), start its workers
    and, unless ``serve`` is False, its ingress."""
    base = Settings(certs_dir=certs, data_dir=data_dir, gateway_identity=identity, lease_seconds=10.0)
    gateway = await Gateway.open(dataclasses.replace(base, **settings), routing=routing)
    try:
        await gateway.start_worker()
        node = Node(gateway, sock, server_tls(certs))
        if serve:
            await node.serve()
    except BaseException:
        await gateway.close()
        raise
    return node


async def wait_for_destination(
    ledger: Ledger, message_id: str, destination: str, *, states: frozenset[State] = DONE, within: float = SETTLE
) -> DestinationStatus:
    """The destination's status once it is in one of ``states`` (the ledger is polled: it is the record)."""
    async with asyncio.timeout(within):
        while True:
            status = await ledger.status(message_id)
            current = status.destinations.get(destination) if status else None
            if current is not None and current.state in states:
                return current
            await asyncio.sleep(0.05)


# -- documents -------------------------------------------------------------------------------------


def signer_of(pair: KeyPair) -> Signer:
    return Signer.from_files(pair.key, pair.cert)


def issue_form_d(issuer: Signer, *, message_id: str | None = None, **overrides: Any) -> bytes:
    """A sample e-Form D from the issuing ministry: Body signed by it, then the envelope."""
    root = sample_envelope(ECO, message_id=message_id or str(uuid.uuid4()), send_date=datetime.now(UTC), **overrides)
    return to_bytes(issuer.sign_envelope(issuer.sign_content(root)))


def answer_certificate(received: bytes, customs: Signer, customs_party: PartyRef, *, function: str = "23") -> bytes:
    """Customs' accept (23) or reject (22) of a delivered e-C/O: addressed To the issuing authority named in
    the certificate, preReference = the certificate's messageId, the certificate itself as Content."""
    root = parse_untrusted(received)
    header, document = parse_header(root), content_document(root)
    authority = document.find("eco:issuingAuthority", {"eco": ECO_NS})
    issuer = (
        PartyRef(
            identity=authority.findtext("eco:identity", namespaces={"eco": ECO_NS}) or "",
            name=authority.findtext("eco:name", namespaces={"eco": ECO_NS}) or "",
            country_code=authority.findtext("eco:country", namespaces={"eco": ECO_NS}) or "",
        )
        if authority is not None
        else header.sender
    )
    answer = Header(
        version="1",
        message_id=str(uuid.uuid4()),
        sender=customs_party,
        recipient=issuer,
        document_type=header.document_type,
        function=function,
        reference=header.reference,
        pre_reference=header.message_id,
        send_date=datetime.now(UTC),
    )
    return to_bytes(customs.sign_envelope(build_envelope(answer, document)))


def party_ref(registry: PartnerRegistry, identity: str) -> PartyRef:
    party = registry.get(identity)
    if party is None:
        raise KeyError(f"{identity} is not in {registry.source}")
    return PartyRef(
        identity=identity, name=party.name, country_code=party.country, ministry_code=party.ministry_code or ""
    )


async def trail(ledger: Ledger, message_id: str) -> list[str]:
    """A message's audit records, one line each."""
    lines = []
    for record in await ledger.trace(message_id):
        where = f" -> {record.destination}" if record.destination else ""
        code = f" [{record.code}]" if record.code else ""
        lines.append(f"{record.event}{where}{code} {record.detail}".rstrip())
    return lines


# -- the demo --------------------------------------------------------------------------------------


def _say(text: str = "") -> None:
    print(text, flush=True)


@dataclass
class _Pair:
    pki: DevPkiPair
    vn: Node
    th: Node
    vn_agencies: Agencies
    th_agencies: Agencies


async def run_cross_border_demo(workdir: Path | None) -> int:
    if workdir is not None:
        return await _demo(workdir)
    with tempfile.TemporaryDirectory(prefix="nswgw-xb-demo-") as tmp:
        return await _demo(Path(tmp))


async def _demo(base: Path) -> int:
    _say(f"== cross-border demo: two gateways, VN and TH, on loopback (files in {base})")
    vn_sock, th_sock = loopback_socket(), loopback_socket()
    pki = init_dev_pki_pair(base / "certs", home_url=ingress_url(vn_sock), peer_url=ingress_url(th_sock), force=True)
    _say(f"dev PKIs: {pki.home.dir} and {pki.peer_dir}; each trusts the other's root and registers the other gateway")
    vn_agencies, th_agencies = await Agencies().start(), await Agencies().start()
    nodes: list[Node] = []
    try:
        nodes.append(
            await open_node(
                pki.home.dir,
                base / "vn-var",
                identity=pki.home_identity,
                routing=home_routing(vn_agencies.url, base / "vn-archive"),
                sock=vn_sock,
            )
        )
        nodes.append(
            await open_node(
                pki.peer_dir,
                base / "th-var",
                identity=pki.peer_identity,
                routing=peer_routing("TH", pki.peer_issuer, th_agencies.url, base / "th-archive"),
                sock=th_sock,
            )
        )
        _say(f"VN-NSW on {nodes[0].url}, TH-NSW on {nodes[1].url} (mutual TLS, embedded broker and ledger each)")
        return await _round_trip(_Pair(pki, nodes[0], nodes[1], vn_agencies, th_agencies))
    finally:
        for node in reversed(nodes):
            await node.close()
        await th_agencies.stop()
        await vn_agencies.stop()


async def _round_trip(pair: _Pair) -> int:
    pki, vn, th = pair.pki, pair.vn, pair.th
    moit = pki.party("VN-MOIT")
    form_d = issue_form_d(signer_of(moit))
    status, answer, headers = await post(vn.url, form_d, client_tls(vn.certs, moit))
    eco_id = headers.get("X-NSW-Message-Id", "")
    _say(f"\n1. VN-MOIT issues e-Form D {eco_id}: VN-NSW answers HTTP {status} ({_kind(answer)})")

    delivered = (await pair.th_agencies.wait_for("customs"))[0]
    checked = Verifier(TrustStore.load(th.certs / "trust"), PartnerRegistry.load(th.certs / "partners.yaml"))
    verified = checked.verify(parse_message(delivered.body))
    body = verified.body_signature
    _say(
        f"2. TH customs received it from {verified.party} (Idempotency-Key {delivered.headers.get('Idempotency-Key')});"
        f" Body signature by {body.authority}: {'valid' if body.valid else 'INVALID'} ({body.detail})"
    )

    to_th = await wait_for_destination(vn.gateway.ledger, eco_id, "asw:TH")
    proof = vn.proofs.get(eco_id, "asw:TH")
    _say(f"3. VN-NSW -> asw:TH {to_th.state}: {to_th.detail}")
    _say(
        f"   proof of delivery kept: {vn.proofs.path(eco_id, 'asw:TH')} "
        f"(sha256 {proof_digest(proof) if proof else 'MISSING'})"
    )

    customs = pki.party(pki.peer_customs)
    registry = PartnerRegistry.load(th.certs / "partners.yaml")
    acceptance = answer_certificate(delivered.body, signer_of(customs), party_ref(registry, pki.peer_customs))
    status, answer, headers = await post(th.url, acceptance, client_tls(th.certs, customs))
    answer_id = headers.get("X-NSW-Message-Id", "")
    _say(f"4. TH customs accepts (23, preReference {eco_id}) as {answer_id}: TH-NSW answers HTTP {status}")

    back = (await pair.vn_agencies.wait_for("moit"))[0]
    back_header = parse_header(parse_untrusted(back.body))
    settled = [
        await wait_for_destination(node.gateway.ledger, mid, destination)
        for node, mid, destination in ((th, eco_id, "customs"), (th, answer_id, "asw:VN"), (vn, answer_id, "moit"))
    ]
    _say(
        f"5. VN-MOIT received {back_header.message_id} from {back_header.sender.identity}: function "
        f"{back_header.function}, preReference {back_header.pre_reference}"
    )

    _say("\n== the conversation in both ledgers")
    for name, node in (("VN-NSW", vn), ("TH-NSW", th)):
        for label, mid in (("e-C/O", eco_id), ("answer", answer_id)):
            _say(f"  {name} {label} {mid}:")
            for line in await trail(node.gateway.ledger, mid):
                _say(f"    {line}")
    reports = [await node.gateway.ledger.verify_audit() for node in (vn, th)]
    _say("\n== audit chains: " + ", ".join(f"{'intact' if r.ok else 'BROKEN'} ({r.count} records)" for r in reports))
    ok = (
        body.valid
        and to_th.state is State.DELIVERED
        and proof is not None
        and back_header.pre_reference == eco_id
        and all(status.state is State.DELIVERED for status in settled)
        and all(r.ok for r in reports)
    )
    _say("cross-border demo " + ("completed" if ok else "FAILED"))
    return 0 if ok else 1


def _kind(answer: bytes) -> str:
    content = parse_untrusted(answer).find("e:Body/e:Content/*", NSMAP)
    return "signed receipt" if content is not None and content.tag.endswith("Receipt") else "rejection"
