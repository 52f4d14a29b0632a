"""The asw adapter's two halves on their own: the forwarded envelope (a pure function), and the verdict
on the peer's answer -- only TH's signed receipt for exactly the bytes sent counts as delivered."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from lxml import etree

from adapters.asw import AswAdapter, PeerAnswer, PeerContext, PeerWithheld, build_peer_adapter, withheld_peers
from adapters.base import changed_files
from gateway.config import Settings
from gateway.crossborder_demo import (
    client_tls,
    issue_form_d,
    post,
    signer_of,
    wait_for_destination,
)
from gateway.envelope import NSMAP, format_datetime, parse_header
from gateway.errors import ConfigError, ErrorCode, PermanentFailure, Rejected, TransientFailure
from gateway.model import Delivery, PartyRef, State
from gateway.partners import PartnerRegistry
from gateway.policy import BreakerPolicy, RetryPolicy
from gateway.proofs import ProofStore
from gateway.receipts import ReceiptFactory
from gateway.retry import RetryAfterFailure
from gateway.runtime import Gateway
from gateway.security.parse import parse_message, parse_untrusted
from gateway.security.pki import KeyPair, issue_leaf, load_issued
from gateway.security.sign import Signer, to_bytes
from gateway.security.trust import TrustStore, fingerprint
from gateway.security.verify import Verifier
from routing.config import DestinationConfig
from tests.crossborder.conftest import CrossBorder, PairDirs
from tests.crossborder.peers import FakePeer

TH = PartyRef("TH-NSW", "Thailand National Single Window", "TH")
ENQUEUED = datetime(2026, 11, 24, 10, 0, 5, tzinfo=UTC)


class ScriptedTransport:
    """A peer transport whose answer a test computes from the bytes it was handed."""

    def __init__(self, answer: Callable[[bytes], PeerAnswer]) -> None:
        self.answer = answer
        self.sent: list[tuple[bytes, Mapping[str, str]]] = []

    async def exchange(self, body: bytes, headers: Mapping[str, str]) -> PeerAnswer:
        self.sent.append((body, headers))
        return self.answer(body)

    async def close(self) -> None:
        return None


def registry_with(dirs: PairDirs, **extra_th_fingerprints: str) -> PartnerRegistry:
    """VN's registry, with more certificates bound to TH-NSW (a rollover) when given."""
    data = yaml.safe_load((dirs.vn / "partners.yaml").read_text())
    for note, sha256 in extra_th_fingerprints.items():
        data["parties"]["TH-NSW"]["certificates"].append({"sha256": sha256, "note": note})
    return PartnerRegistry.from_dict(data, base_dir=dirs.vn)


def adapter(
    dirs: PairDirs, tmp_path: Path, transport: ScriptedTransport, registry: PartnerRegistry | None = None
) -> AswAdapter:
    registry = registry or dirs.registry("vn")
    context = PeerContext(
        PartyRef("VN-NSW", "Viet Nam National Single Window", "VN"),
        dirs.signer("VN-NSW"),
        Verifier(TrustStore.load(dirs.vn / "trust"), registry),
        ProofStore(tmp_path / "proofs"),
    )
    peer = registry.get("TH-NSW")
    assert peer is not None
    return AswAdapter("asw:TH", peer, context, transport)


def delivery(dirs: PairDirs, **overrides: Any) -> Delivery:
    payload = issue_form_d(dirs.signer("VN-MOIT"))
    message_id = parse_header(parse_untrusted(payload)).message_id
    fields: dict[str, Any] = {
        "message_id": message_id,
        "sender": "VN-MOIT",
        "destination": "asw:TH",
        "document_type": "eco.atiga-form-d",
        "payload": payload,
        "digest": hashlib.sha256(payload).hexdigest(),
        "first_enqueued_at": ENQUEUED.timestamp(),
    }
    return Delivery(**{**fields, **overrides})


def receipt(signer: Signer, body: bytes, *, by: PartyRef = TH, **changes: str) -> bytes:
    """TH's receipt for ``body`` as its ingress makes it; ``changes`` override the named id / digest."""
    header = parse_header(parse_untrusted(body))
    digest = changes.get("digest", hashlib.sha256(body).hexdigest())
    header = dataclasses.replace(header, message_id=changes.get("message_id", header.message_id))
    return ReceiptFactory(signer, by).receipt(header, digest, datetime.now(UTC), ["customs"])


def rejection(signer: Signer, body: bytes, code: ErrorCode, message_id: str | None = None) -> bytes:
    named = message_id or parse_header(parse_untrusted(body)).message_id
    error = Rejected(code, f"{code.value} at the peer", "/Envelope/Body")
    return ReceiptFactory(signer, TH).rejection(error, digest=hashlib.sha256(body).hexdigest(), message_id=named)


# -- the forward -----------------------------------------------------------------------------------


def test_the_forward_is_a_pure_function_of_payload_peer_key_and_first_enqueue(dirs: PairDirs, tmp_path: Path) -> None:
    peer = adapter(dirs, tmp_path, ScriptedTransport(lambda _: PeerAnswer(500, b"")))
    one = delivery(dirs)
    first, again = peer.forward(one), peer.forward(dataclasses.replace(one, attempt=7))
    assert first.body == again.body
    assert first.digest == hashlib.sha256(first.body).hexdigest()
    later = peer.forward(dataclasses.replace(one, first_enqueued_at=one.first_enqueued_at + 60))
    assert later.body != first.body


def test_the_forward_readdresses_and_re_signs_but_keeps_id_subject_and_body(dirs: PairDirs, tmp_path: Path) -> None:
    one = delivery(dirs)
    forward = adapter(dirs, tmp_path, ScriptedTransport(lambda _: PeerAnswer(500, b""))).forward(one)
    original = parse_header(parse_untrusted(one.payload))
    at_th = Verifier(TrustStore.load(dirs.th / "trust"), dirs.registry("th")).verify(parse_message(forward.body))
    header = at_th.header
    assert at_th.party == "VN-NSW"
    assert (header.sender.identity, header.sender.country_code) == ("VN-NSW", "VN")
    assert (header.recipient.identity, header.recipient.country_code) == ("TH-NSW", "TH")
    assert header == dataclasses.replace(original, sender=header.sender, recipient=header.recipient, send_date=ENQUEUED)
    assert format_datetime(header.send_date) == "2026-11-24T10:00:05Z"
    assert (at_th.body_signature.valid, at_th.body_signature.authority) == (True, "VN-MOIT")

    def body(envelope: bytes) -> bytes:
        return etree.tostring(parse_untrusted(envelope).find("e:Body", NSMAP), method="c14n", exclusive=True)

    assert body(forward.body) == body(one.payload)


def test_without_a_first_enqueue_time_the_original_send_date_is_kept(dirs: PairDirs, tmp_path: Path) -> None:
    one = delivery(dirs, first_enqueued_at=0.0)
    forward = adapter(dirs, tmp_path, ScriptedTransport(lambda _: PeerAnswer(500, b""))).forward(one)
    assert forward.header.send_date == parse_header(parse_untrusted(one.payload)).send_date


async def test_a_payload_that_is_no_envelope_is_dead_on_arrival(dirs: PairDirs, tmp_path: Path) -> None:
    peer = adapter(dirs, tmp_path, ScriptedTransport(lambda _: PeerAnswer(500, b"")))
    with pytest.raises(PermanentFailure) as raised:
        await peer.deliver(delivery(dirs, payload=b"<not-an-envelope/>"))
    assert raised.value.code == "FORWARD_FAILED"


# -- the verdict on the peer's answer --------------------------------------------------------------


async def test_the_peers_receipt_for_the_bytes_sent_is_delivery_and_is_kept_as_proof(
    dirs: PairDirs, tmp_path: Path
) -> None:
    th = dirs.signer("TH-NSW")
    answers: list[bytes] = []

    def answer(body: bytes) -> PeerAnswer:
        answers.append(receipt(th, body))
        return PeerAnswer(202, answers[-1])

    transport = ScriptedTransport(answer)
    peer = adapter(dirs, tmp_path, transport)
    one = delivery(dirs)
    result = await peer.deliver(one)
    ((sent, headers),) = transport.sent
    assert headers["Idempotency-Key"] == f"{one.message_id}:asw:TH"
    assert headers["X-NSW-Digest"] == f"sha-256={hashlib.sha256(sent).hexdigest()}"
    assert result.proof == answers[0]
    assert peer.context.proofs.get(one.message_id, "asw:TH") == answers[0]
    assert f"proof sha256 {hashlib.sha256(answers[0]).hexdigest()}" in result.detail
    assert f"for sha256 {hashlib.sha256(sent).hexdigest()}" in result.detail


async def test_a_receipt_from_the_peers_rollover_certificate_counts(dirs: PairDirs, tmp_path: Path) -> None:
    root = load_issued(
        KeyPair(dirs.vn / "ca" / "th-nsw-dev-root" / "key.pem", dirs.vn / "ca" / "th-nsw-dev-root" / "cert.pem")
    )
    now = datetime.now(UTC)
    new = issue_leaf(
        root,
        "TH-NSW",
        "Thailand National Single Window",
        "TH",
        kind="ec",
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=30),
    )
    rolled = Signer(new.key, (new.cert,))
    transport = ScriptedTransport(lambda body: PeerAnswer(202, receipt(rolled, body)))
    registry = registry_with(dirs, rollover=fingerprint(new.cert))
    result = await adapter(dirs, tmp_path, transport, registry).deliver(delivery(dirs))
    assert result.proof is not None
    with pytest.raises(TransientFailure) as raised:  # not yet bound: not TH's
        await adapter(dirs, tmp_path, transport).deliver(delivery(dirs))
    assert raised.value.code == "PEER_ANSWER_INVALID"


def _impostor(dirs: PairDirs) -> Signer:
    """TH-NSW's certificate with another key: the signature cannot verify."""
    return Signer(dirs.signer("VN-MOIT").key, dirs.signer("TH-NSW").chain)


FORGERIES: list[tuple[str, Callable[[PairDirs, bytes], PeerAnswer], str]] = [
    ("signed with the wrong key", lambda d, b: PeerAnswer(202, receipt(_impostor(d), b)), "PEER_ANSWER_INVALID"),
    (
        "signed by a certificate of no trusted root",
        lambda d, b: PeerAnswer(
            202, receipt(signer_of(KeyPair(d.vn / "test/untrusted/key.pem", d.vn / "test/untrusted/cert.pem")), b)
        ),
        "PEER_ANSWER_INVALID",
    ),
    (
        "signed by another registered party as itself",
        lambda d, b: PeerAnswer(202, receipt(d.signer("VN-MOIT"), b, by=PartyRef("VN-MOIT", "MOIT", "VN"))),
        "PEER_ANSWER_WRONG_SIGNER",
    ),
    (
        "signed by another registered party claiming to be TH",
        lambda d, b: PeerAnswer(202, receipt(d.signer("VN-MOIT"), b)),
        "PEER_ANSWER_INVALID",
    ),
    (
        "naming another digest",
        lambda d, b: PeerAnswer(202, receipt(d.signer("TH-NSW"), b, digest="0" * 64)),
        "PEER_RECEIPT_MISMATCH",
    ),
    (
        "naming another message",
        lambda d, b: PeerAnswer(202, receipt(d.signer("TH-NSW"), b, message_id="another-message")),
        "PEER_RECEIPT_MISMATCH",
    ),
    (
        "a valid receipt with a failure status",
        lambda d, b: PeerAnswer(500, receipt(d.signer("TH-NSW"), b)),
        "PEER_ANSWER_INVALID",
    ),
    (
        "an unsigned receipt",
        lambda d, b: PeerAnswer(202, to_bytes(parse_untrusted(receipt(d.signer("TH-NSW"), b)).find("e:Body", NSMAP))),
        "PEER_ANSWER_INVALID",
    ),
    ("no XML at all", lambda d, b: PeerAnswer(200, b"OK"), "PEER_ANSWER_INVALID"),
    (
        "a rejection of another message",
        lambda d, b: PeerAnswer(422, rejection(d.signer("TH-NSW"), b, ErrorCode.SCHEMA_INVALID, "another-message")),
        "PEER_RECEIPT_MISMATCH",
    ),
]


@pytest.mark.parametrize(("case", "answer", "code"), FORGERIES, ids=[f[0] for f in FORGERIES])
async def test_anything_but_the_peers_receipt_for_these_bytes_is_not_delivery(
    dirs: PairDirs, tmp_path: Path, case: str, answer: Callable[[PairDirs, bytes], PeerAnswer], code: str
) -> None:
    peer = adapter(dirs, tmp_path, ScriptedTransport(lambda body: answer(dirs, body)))
    one = delivery(dirs)
    with pytest.raises(TransientFailure) as raised:
        await peer.deliver(one)
    assert raised.value.code == code, raised.value.detail
    assert not isinstance(raised.value, PermanentFailure)
    assert peer.context.proofs.get(one.message_id, "asw:TH") is None


async def test_a_signed_rejection_of_this_message_is_permanent_with_the_peers_code(
    dirs: PairDirs, tmp_path: Path
) -> None:
    th = dirs.signer("TH-NSW")
    peer = adapter(
        dirs, tmp_path, ScriptedTransport(lambda b: PeerAnswer(422, rejection(th, b, ErrorCode.SCHEMA_INVALID)))
    )
    with pytest.raises(PermanentFailure) as raised:
        await peer.deliver(delivery(dirs))
    assert raised.value.code == "SCHEMA_INVALID"
    assert "rejected by TH-NSW" in raised.value.detail


async def test_the_peers_own_outage_is_retried_when_it_says(dirs: PairDirs, tmp_path: Path) -> None:
    th = dirs.signer("TH-NSW")
    answer = lambda b: PeerAnswer(503, rejection(th, b, ErrorCode.UNAVAILABLE), retry_after="7")  # noqa: E731
    with pytest.raises(RetryAfterFailure) as raised:
        await adapter(dirs, tmp_path, ScriptedTransport(answer)).deliver(delivery(dirs))
    assert (raised.value.code, raised.value.retry_after) == ("UNAVAILABLE", 7.0)


# -- building one ----------------------------------------------------------------------------------


def _context(dirs: PairDirs, tmp_path: Path) -> PeerContext:
    return PeerContext(
        TH,
        dirs.signer("VN-NSW"),
        Verifier(TrustStore.load(dirs.vn / "trust"), dirs.registry("vn")),
        ProofStore(tmp_path),
    )


def test_a_peer_destination_finds_its_peer_in_the_registry(dirs: PairDirs, tmp_path: Path) -> None:
    built = build_peer_adapter("asw:TH", {"timeout": 5}, _context(dirs, tmp_path))
    assert built.peer.identity == "TH-NSW"
    named = build_peer_adapter("thailand", {"peer": "TH-NSW"}, _context(dirs, tmp_path))
    assert named.peer.identity == "TH-NSW"


def test_a_peer_adapter_notices_its_tls_files_changing(dirs: PairDirs, tmp_path: Path) -> None:
    """What a routing reload relies on to rebuild a peer's adapter after a certificate rotation in place."""
    built = build_peer_adapter("asw:TH", {}, _context(dirs, tmp_path))
    endpoint = built.peer.endpoint
    assert endpoint is not None
    assert endpoint.client_cert is not None
    assert [stamp[0] for stamp in built.loaded_files] == [
        str(p) for p in (endpoint.ca, endpoint.client_cert, endpoint.client_key) if p is not None
    ]
    assert changed_files(built) == []
    st = endpoint.client_cert.stat()
    os.utime(endpoint.client_cert, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as if rewritten
    assert changed_files(built) == [str(endpoint.client_cert)]


@pytest.mark.parametrize(
    ("name", "options", "why"),
    [
        ("asw:TH", {}, None),  # TH-NSW has an endpoint
        ("asw:TH", {"peer": "TH-NSW"}, None),
        ("asw:KH", {}, "no peer NSW for KH has an endpoint in the partner registry"),
        ("asw:TH", {"peer": "TH-NSW2"}, "peer TH-NSW2 is not in the partner registry"),
        ("asw:MY", {"peer": "VN-NSW"}, "peer VN-NSW has no endpoint in the partner registry"),  # made a peer below
        ("asw:TH", {"peer": "VN-MOIT"}, None),  # not a peer at all: a fault of the rules file, not withholding
        ("thailand", {}, None),  # no country in the name and no peer option: the same
    ],
)
def test_withheld_peers_are_the_named_asw_destinations_whose_peer_has_no_endpoint(
    dirs: PairDirs, name: str, options: dict[str, Any], why: str | None
) -> None:
    path = dirs.vn / "partners.yaml"
    data = yaml.safe_load(path.read_text())
    data["parties"]["VN-NSW"]["role"] = "peer"  # a registered peer without an endpoint
    path.write_text(yaml.safe_dump(data))
    policies = (RetryPolicy(), BreakerPolicy())
    destinations = {
        name: DestinationConfig(name, "asw", options, *policies),
        "customs": DestinationConfig("customs", "http", {"url": "http://127.0.0.1:9/in"}, *policies),
    }
    expected = {} if why is None else {name: why}
    assert withheld_peers(destinations, dirs.registry("vn")) == expected


@pytest.mark.parametrize(
    ("name", "options", "fault"),
    [
        ("asw:KH", {}, "0 peers with an endpoint are registered for KH"),
        ("asw:TH", {"peer": "VN-MOIT"}, "option 'peer' must be one of"),
        ("asw:TH", {"retries": 3}, "unknown option(s) 'retries'"),
        ("asw:TH", {"transport": "as4"}, "option 'transport' must be one of"),
    ],
)
def test_a_misconfigured_peer_destination_is_a_config_error_naming_it(
    dirs: PairDirs, tmp_path: Path, name: str, options: dict[str, Any], fault: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        build_peer_adapter(name, options, _context(dirs, tmp_path))
    assert name in str(raised.value)
    assert fault in str(raised.value)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("endpoint", "peer TH-NSW has no endpoint in the partner registry"),
        ("party", "peer TH-NSW is not in the partner registry"),
    ],
)
async def test_a_peer_the_reloaded_registry_withholds_is_sent_nothing(
    dirs: PairDirs, tmp_path: Path, change: str, why: str
) -> None:
    registry = dirs.registry("vn")
    transport = ScriptedTransport(lambda _: PeerAnswer(500, b""))
    built = adapter(dirs, tmp_path, transport, registry)
    data = yaml.safe_load((dirs.vn / "partners.yaml").read_text())
    if change == "endpoint":
        data["parties"]["TH-NSW"]["endpoint"] = None
    else:
        del data["parties"]["TH-NSW"]
    registry.adopt(PartnerRegistry.from_dict(data, base_dir=dirs.vn))  # as gateway.trust_reload does
    assert built.withheld() == why
    with pytest.raises(PeerWithheld) as raised:
        await built.deliver(delivery(dirs))
    assert (raised.value.code, raised.value.retry_after) == ("PEER_WITHHELD", 0.0)  # 0.0: not retried in process
    assert raised.value.detail.startswith(f"{why}: not sent;")
    assert transport.sent == []


async def test_the_gateway_builds_an_adapter_for_every_registered_peer(dirs: PairDirs, tmp_path: Path) -> None:
    gateway = await Gateway.open(Settings(certs_dir=dirs.vn, data_dir=tmp_path / "var"))  # the shipped rules
    try:
        adapters = gateway.build_adapters()
        assert "asw:TH" not in gateway.routing.destinations
        assert isinstance(adapters["asw:TH"], AswAdapter)
        assert adapters["asw:TH"].peer.identity == "TH-NSW"
        for built in adapters.values():
            await built.close()
    finally:
        await gateway.close()


# -- through a gateway: a fake TH ------------------------------------------------------------------


@pytest.fixture
async def fake_th(dirs: PairDirs) -> AsyncIterator[FakePeer]:
    fake = FakePeer(dirs.th, lambda body: (500, b""))
    await fake.start()
    yield fake
    await fake.stop()


@pytest.mark.parametrize(
    ("forge", "code"),
    [
        (lambda d, body: receipt(_impostor(d), body), "PEER_ANSWER_INVALID"),
        (
            lambda d, body: receipt(d.signer("TH-NSW"), body, digest=hashlib.sha256(b"other").hexdigest()),
            "PEER_RECEIPT_MISMATCH",
        ),
    ],
    ids=["wrong key", "another digest"],
)
async def test_vn_counts_nothing_delivered_until_th_signs_a_receipt_for_the_bytes_sent(
    cross_border: Callable[..., Awaitable[CrossBorder]],
    fake_th: FakePeer,
    forge: Callable[[PairDirs, bytes], bytes],
    code: str,
) -> None:
    pair = await cross_border(vn_sees_th_at=fake_th.url)
    dirs = pair.dirs
    fake_th.script = lambda body: (202, forge(dirs, body))
    form_d = issue_form_d(dirs.signer("VN-MOIT"))
    status, _, headers = await post(pair.vn.url, form_d, client_tls(dirs.vn, dirs.party("VN-MOIT")))
    assert status == 202
    eco_id = headers["X-NSW-Message-Id"]
    waiting = await wait_for_destination(pair.vn.gateway.ledger, eco_id, "asw:TH", states=frozenset({State.RETRY_WAIT}))
    assert waiting.code == code
    assert pair.vn.proofs.get(eco_id, "asw:TH") is None

    th = dirs.signer("TH-NSW")
    fake_th.script = lambda body: (202, receipt(th, body))  # TH answers properly from now on
    delivered = await wait_for_destination(pair.vn.gateway.ledger, eco_id, "asw:TH")
    assert delivered.state is State.DELIVERED
    bodies = {seen.body for seen in fake_th.seen}
    assert len(bodies) == 1  # every attempt sent the same bytes
    assert pair.vn.proofs.get(eco_id, "asw:TH") == fake_th.seen[-1].answer
