"""The HTTP push adapter: one behaviour suite run against both HTTP clients (aiohttp, the default,
and httpx) on real loopback agencies; respx for the httpx client's transport-error mapping; mutual
TLS; the environment's proxy. Also the adapter options and registry."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from aiohttp import web
from aiohttp.test_utils import TestServer

from adapters.base import Adapter, DeliveryReceipt
from adapters.file import FileAdapter
from adapters.http import HTTP_CLIENTS, AiohttpClient, HttpAdapter, HttpxClient, parse_retry_after
from adapters.registry import ADAPTER_KINDS, build_adapter, register_adapter_kind
from gateway.errors import ConfigError, PermanentFailure, TransientFailure
from gateway.model import Delivery
from gateway.retry import RetryAfterFailure, retry_after_of
from tests.support.mtls import Pki, make_pki, peer_common_name

URL = "https://agency.test/inbox"
PAYLOAD = b'<?xml version="1.0"?>\n<Envelope xmlns="urn:nsw:envelope:1"><Header/></Envelope>'


def delivery(**changes: Any) -> Delivery:
    fields: dict[str, Any] = {
        "message_id": "7f1c0000-0000-4000-8000-000000000001",
        "sender": "VN-MOIT",
        "destination": "moit-licensing",
        "document_type": "licence.import",
        "payload": PAYLOAD,
        "digest": hashlib.sha256(PAYLOAD).hexdigest(),
        "attempt": 2,
    }
    return Delivery(**(fields | changes))


# -- the httpx client under respx: its exceptions map onto the failure codes ------------------------


@pytest.fixture
async def adapter() -> AsyncIterator[HttpAdapter]:
    a = HttpAdapter(
        "moit-licensing", URL, headers={"Authorization": "Bearer t", "Idempotency-Key": "forged"}, client=HttpxClient
    )
    yield a
    await a.close()


@pytest.fixture
def agency() -> respx.MockRouter:
    with respx.mock(assert_all_called=False) as router:
        yield router


async def test_posts_the_exact_bytes_with_delivery_headers(adapter: HttpAdapter, agency: respx.MockRouter) -> None:
    route = agency.post(URL).mock(return_value=httpx.Response(202, text="accepted as AG-42"))
    d = delivery()
    receipt = await adapter.deliver(d)
    assert receipt == DeliveryReceipt(status=202, detail="accepted as AG-42")
    sent = route.calls.last.request
    assert sent.content == PAYLOAD
    assert sent.headers["Content-Type"] == "application/xml"
    assert sent.headers["Idempotency-Key"] == "7f1c0000-0000-4000-8000-000000000001:moit-licensing"
    assert sent.headers["X-NSW-Message-Id"] == d.message_id
    assert sent.headers["X-NSW-Attempt"] == "2"
    assert sent.headers["X-NSW-Document-Type"] == "licence.import"
    assert sent.headers["X-NSW-Sender"] == "VN-MOIT"
    assert sent.headers["X-NSW-Digest"] == f"sha-256={hashlib.sha256(PAYLOAD).hexdigest()}"
    assert sent.headers["Authorization"] == "Bearer t"  # configured static headers go along
    assert sent.headers.get_list("Idempotency-Key") == [d.idempotency_key]  # but never override ours


async def test_receipt_detail_is_the_start_of_the_answer(adapter: HttpAdapter, agency: respx.MockRouter) -> None:
    agency.post(URL).mock(return_value=httpx.Response(200, text="x" * 5000))
    receipt = await adapter.deliver(delivery())
    assert receipt.detail == "x" * 200


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
async def test_retryable_statuses_are_transient(adapter: HttpAdapter, agency: respx.MockRouter, status: int) -> None:
    agency.post(URL).mock(return_value=httpx.Response(status, text="try later"))
    with pytest.raises(TransientFailure) as caught:
        await adapter.deliver(delivery())
    assert caught.value.code == f"HTTP_{status}"
    assert "try later" in caught.value.detail
    assert retry_after_of(caught.value) is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 301])
async def test_other_statuses_are_permanent(adapter: HttpAdapter, agency: respx.MockRouter, status: int) -> None:
    agency.post(URL).mock(return_value=httpx.Response(status, text="<error>field X missing</error>"))
    with pytest.raises(PermanentFailure) as caught:
        await adapter.deliver(delivery())
    assert caught.value.code == f"HTTP_{status}"
    assert "<error>field X missing</error>" in caught.value.detail


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_are_passed_on(adapter: HttpAdapter, agency: respx.MockRouter, status: int) -> None:
    agency.post(URL).mock(return_value=httpx.Response(status, headers={"Retry-After": "120"}))
    with pytest.raises(RetryAfterFailure) as caught:
        await adapter.deliver(delivery())
    assert caught.value.code == f"HTTP_{status}"
    assert caught.value.retry_after == 120.0


async def test_unreadable_retry_after_is_ignored(adapter: HttpAdapter, agency: respx.MockRouter) -> None:
    agency.post(URL).mock(return_value=httpx.Response(503, headers={"Retry-After": "soon-ish"}))
    with pytest.raises(TransientFailure) as caught:
        await adapter.deliver(delivery())
    assert retry_after_of(caught.value) is None


def test_parse_retry_after_forms() -> None:
    now = dt.datetime(2026, 11, 24, 10, 0, 0, tzinfo=dt.UTC).timestamp()
    assert parse_retry_after("30", now=now) == 30.0
    assert parse_retry_after(" 0 ", now=now) == 0.0
    assert parse_retry_after("Tue, 24 Nov 2026 10:01:30 GMT", now=now) == 90.0
    assert parse_retry_after("Tue, 24 Nov 2026 09:00:00 GMT", now=now) == 0.0  # in the past: now
    assert parse_retry_after("-5", now=now) == 0.0
    assert parse_retry_after("nan", now=now) is None
    assert parse_retry_after("whenever", now=now) is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (httpx.ReadTimeout("read timed out"), "TIMEOUT"),
        (httpx.ConnectTimeout("connect timed out"), "TIMEOUT"),
        (httpx.ConnectError("[Errno 111] Connection refused"), "CONNECT"),
        (httpx.RemoteProtocolError("peer closed connection"), "NETWORK"),
    ],
)
async def test_transport_errors_are_transient(
    adapter: HttpAdapter, agency: respx.MockRouter, error: Exception, code: str
) -> None:
    agency.post(URL).mock(side_effect=error)
    with pytest.raises(TransientFailure) as caught:
        await adapter.deliver(delivery())
    assert caught.value.code == code


async def test_a_hanging_answer_hits_the_request_deadline(agency: respx.MockRouter) -> None:
    never = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        await never.wait()
        return httpx.Response(200)

    agency.post(URL).mock(side_effect=hang)
    slow = HttpAdapter("slow", URL, timeout=0.05, client=HttpxClient)
    try:
        with pytest.raises(TransientFailure) as caught:
            await slow.deliver(delivery())
    finally:
        await slow.close()
    assert caught.value.code == "TIMEOUT"


# -- real loopback servers, each client: refused connections, the shared behaviour suite, mutual TLS ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("client", sorted(HTTP_CLIENTS))
async def test_connection_refused_is_transient(client: str) -> None:
    refused = HttpAdapter("down", f"http://127.0.0.1:{free_port()}/inbox", client=HTTP_CLIENTS[client])
    try:
        with pytest.raises(TransientFailure) as caught:
            await refused.deliver(delivery())
    finally:
        await refused.close()
    assert caught.value.code == "CONNECT"


ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def serve() -> AsyncIterator[ServerFactory]:
    servers: list[TestServer] = []

    async def start(
        handler: Callable[[web.Request], Awaitable[web.Response]], ssl_context: ssl.SSLContext | None = None
    ) -> TestServer:
        app = web.Application()
        app.router.add_post("/inbox", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(ssl=ssl_context)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


# -- both clients against a real loopback agency: the same behaviour, whichever is configured --------


@dataclass
class Seen:
    body: bytes
    headers: dict[str, str]
    peer_port: int


class Agency:
    """A loopback agency whose answers the test chooses; records what it was sent, and from which port."""

    def __init__(self, answer: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        self.answer = answer
        self.seen: list[Seen] = []
        self.url = ""

    async def inbox(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(Seen(await request.read(), dict(request.headers), peer[1] if peer else 0))
        return await self.answer(request)


@pytest.fixture(params=sorted(HTTP_CLIENTS))
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def loopback(
    serve: ServerFactory, client: str
) -> AsyncIterator[Callable[..., Awaitable[tuple[Agency, HttpAdapter]]]]:
    adapters: list[HttpAdapter] = []

    async def start(
        answer: Callable[[web.Request], Awaitable[web.StreamResponse]], **options: Any
    ) -> tuple[Agency, HttpAdapter]:
        agency = Agency(answer)
        server = await serve(agency.inbox)
        agency.url = str(server.make_url("/inbox"))
        a = build_adapter("moit-licensing", "http", {"url": agency.url, "client": client, **options}, base_dir=Path())
        assert isinstance(a, HttpAdapter)
        adapters.append(a)
        return agency, a

    yield start
    for a in adapters:
        await a.close()


def answering(status: int = 200, text: str = "", headers: dict[str, str] | None = None) -> Any:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, text=text, headers=headers)

    return answer


async def test_default_client_is_aiohttp(tmp_path: Path) -> None:
    default = build_adapter("moit", "http", {"url": URL}, base_dir=tmp_path)
    chosen = build_adapter("moit", "http", {"url": URL, "client": "httpx"}, base_dir=tmp_path)
    assert isinstance(default, HttpAdapter)
    assert isinstance(chosen, HttpAdapter)
    assert (default.client_factory, chosen.client_factory) == (AiohttpClient, HttpxClient)
    assert HttpAdapter("moit", URL).client_factory is AiohttpClient


async def test_loopback_posts_the_exact_bytes_with_delivery_headers(loopback: Any) -> None:
    agency, a = await loopback(answering(202, "accepted as AG-42"), headers={"Authorization": "Bearer t"})
    d = delivery()
    assert await a.deliver(d) == DeliveryReceipt(status=202, detail="accepted as AG-42")
    [seen] = agency.seen
    assert seen.body == PAYLOAD
    assert seen.headers["Content-Type"] == "application/xml"
    assert seen.headers["Idempotency-Key"] == d.idempotency_key
    assert seen.headers["X-NSW-Message-Id"] == d.message_id
    assert seen.headers["X-NSW-Attempt"] == "2"
    assert seen.headers["X-NSW-Sender"] == "VN-MOIT"
    assert seen.headers["X-NSW-Digest"] == f"sha-256={d.digest}"
    assert seen.headers["Authorization"] == "Bearer t"


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_loopback_retryable_statuses_are_transient(loopback: Any, status: int) -> None:
    _, a = await loopback(answering(status, "try later"))
    with pytest.raises(TransientFailure) as caught:
        await a.deliver(delivery())
    assert (caught.value.code, retry_after_of(caught.value)) == (f"HTTP_{status}", None)
    assert "try later" in caught.value.detail


@pytest.mark.parametrize("status", [400, 404, 409, 301])
async def test_loopback_other_statuses_are_permanent(loopback: Any, status: int) -> None:
    _, a = await loopback(answering(status, "<error>field X missing</error>", {"Location": "/elsewhere"}))
    with pytest.raises(PermanentFailure) as caught:
        await a.deliver(delivery())
    assert caught.value.code == f"HTTP_{status}"
    assert "<error>field X missing</error>" in caught.value.detail


@pytest.mark.parametrize(("status", "value"), [(429, "120"), (503, "Fri, 01 Jan 2100 00:00:00 GMT")])
async def test_loopback_retry_after_is_passed_on(loopback: Any, status: int, value: str) -> None:
    _, a = await loopback(answering(status, headers={"Retry-After": value}))
    with pytest.raises(RetryAfterFailure) as caught:
        await a.deliver(delivery())
    expected = parse_retry_after(value)
    assert caught.value.code == f"HTTP_{status}"
    assert expected is not None
    assert caught.value.retry_after == pytest.approx(expected, abs=60)


async def test_loopback_a_hanging_agency_times_out(loopback: Any) -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    _, a = await loopback(hang, timeout=0.2)
    with pytest.raises(TransientFailure) as caught:
        await a.deliver(delivery())
    assert caught.value.code == "TIMEOUT"


async def test_loopback_connections_are_reused(loopback: Any) -> None:
    agency, a = await loopback(answering(200, "ok" * 20_000))  # a long answer, under the read limit
    receipts = [await a.deliver(delivery(message_id=f"m{i}")) for i in range(5)]
    assert [r.detail for r in receipts] == ["ok" * 100] * 5
    assert len({seen.peer_port for seen in agency.seen}) == 1


async def test_loopback_in_flight_requests_are_bounded(loopback: Any) -> None:
    bound, in_flight, peak = 3, 0, 0
    full, release = asyncio.Event(), asyncio.Event()

    async def count(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight == bound:
            full.set()
        await release.wait()
        in_flight -= 1
        return web.Response()

    _, a = await loopback(count, max_in_flight=bound)
    tasks = [asyncio.create_task(a.deliver(delivery(message_id=f"m{i}"))) for i in range(10)]
    await full.wait()
    release.set()
    receipts = await asyncio.gather(*tasks)
    assert peak == bound
    assert [r.status for r in receipts] == [200] * 10


async def test_the_environment_proxy_is_used_unless_exempted(
    serve: ServerFactory, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxied: list[str] = []

    async def proxy(request: web.Request) -> web.Response:  # a forward proxy sees the absolute URL
        proxied.append(f"{request.host} {request.path}")
        return web.Response(text="via proxy")

    server = await serve(proxy)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    via = HttpAdapter("moit", "http://agency.invalid/inbox", client=HTTP_CLIENTS[client])
    try:
        assert (await via.deliver(delivery())).detail == "via proxy"
    finally:
        await via.close()
    assert proxied == ["agency.invalid /inbox"]

    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens: must not be used
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = HttpAdapter("moit", f"http://127.0.0.1:{server.port}/inbox", client=HTTP_CLIENTS[client])
    try:
        assert (await direct.deliver(delivery())).detail == "via proxy"
    finally:
        await direct.close()
    assert proxied[-1] == f"127.0.0.1:{server.port} /inbox"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("mtls"))


@pytest.mark.parametrize("client", sorted(HTTP_CLIENTS))
async def test_mutual_tls(serve: ServerFactory, pki: Pki, client: str, tmp_path: Path) -> None:
    peers: list[str] = []

    async def inbox(request: web.Request) -> web.Response:
        peers.append(str(peer_common_name(request.transport)))
        return web.Response(text="ok")

    server = await serve(inbox, pki.server_context)
    url = f"https://127.0.0.1:{server.port}/inbox"
    good = build_adapter(
        "secure",
        "http",
        {
            "url": url,
            "ca": pki.ca.name,
            "client_cert": pki.client_cert.name,
            "client_key": pki.client_key.name,
            "client": client,
        },
        base_dir=pki.ca.parent,
    )
    stranger = HttpAdapter(
        "secure",
        url,
        ca=pki.ca,
        client_cert=pki.stranger_cert,
        client_key=pki.stranger_key,
        client=HTTP_CLIENTS[client],
    )
    no_ca = HttpAdapter(
        "secure", url, client_cert=pki.client_cert, client_key=pki.client_key, client=HTTP_CLIENTS[client]
    )
    try:
        assert (await good.deliver(delivery())).status == 200
        with pytest.raises(TransientFailure) as refused:  # the agency rejects a certificate it does not trust
            await stranger.deliver(delivery())
        with pytest.raises(TransientFailure) as untrusted:  # and we reject an agency we cannot verify
            await no_ca.deliver(delivery())
    finally:
        for a in (good, stranger, no_ca):
            await a.close()
    assert peers == ["nsw"]
    assert refused.value.code in {"TLS", "NETWORK", "CONNECT"}  # TLS 1.3 reports the refusal after the handshake
    assert untrusted.value.code == "TLS"


# -- options and the registry -------------------------------------------------------------------


def test_from_options_reads_every_option(tmp_path: Path) -> None:
    a = build_adapter(
        "moit",
        "http",
        {"url": URL, "timeout": 3, "connect_timeout": 1.5, "max_in_flight": 4, "headers": {"X-Api-Key": "k"}},
        base_dir=tmp_path,
    )
    assert isinstance(a, HttpAdapter)
    assert a.name == "moit"
    assert a.url == URL
    assert a.request_headers(delivery())["X-Api-Key"] == "k"


def test_configured_headers_never_replace_the_delivery_headers() -> None:
    ours = HttpAdapter("moit", URL).request_headers(delivery())
    forged = {name.upper(): "forged" for name in ours}
    sent = HttpAdapter("moit", URL, headers={**forged, "X-Api-Key": "k"}).request_headers(delivery())
    assert sent == {**ours, "X-Api-Key": "k"}


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({}, "'url' is required"),
        ({"url": "ftp://x"}, "http:// or https://"),
        ({"url": URL, "timeout": -1}, "'timeout' must be a positive number"),
        ({"url": URL, "max_in_flight": 2.5}, "'max_in_flight' must be a whole number"),
        ({"url": URL, "max_in_flight": True}, "'max_in_flight' must be a whole number"),
        ({"url": URL, "headers": {"X": 1}}, "'headers' must map names to string values"),
        ({"url": URL, "ca": "missing.pem"}, "'ca' names"),
        ({"url": URL, "client": "urllib"}, "'client' must be one of"),
        ({"url": URL, "timout": 3}, "unknown option(s) 'timout'"),
        ({"url": "http://agency.test/", "client_cert": "cert.pem"}, "must be https://"),
        ({"url": URL, "client_key": "cert.pem"}, "needs client_cert"),
        ({"url": URL, "client_cert": "cert.pem"}, "could not be loaded for TLS"),
        ("url=x", "must be a mapping"),
    ],
)
def test_bad_http_options_name_the_destination(tmp_path: Path, options: Any, fragment: str) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(ConfigError) as caught:
        build_adapter("moit", "http", options, base_dir=tmp_path)
    assert "'moit'" in str(caught.value)
    assert fragment in str(caught.value)


def test_unknown_kind_names_the_destination_and_the_known_kinds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"destination 'customs': unknown adapter kind 'smtp' \(known: .*file.*http"):
        build_adapter("customs", "smtp", {}, base_dir=tmp_path)


def test_builds_file_adapters_relative_to_base_dir(tmp_path: Path) -> None:
    a = build_adapter("drop", "file", {"directory": "out/drop"}, base_dir=tmp_path)
    assert isinstance(a, FileAdapter)
    assert a.directory == tmp_path / "out" / "drop"


def test_registered_kinds_plug_in(tmp_path: Path) -> None:
    built: list[tuple[str, Any, Path]] = []

    def factory(name: str, options: Any, base_dir: Path) -> Adapter:
        built.append((name, options, base_dir))
        if "broken" in options:
            raise ValueError("peer certificate missing")
        return FileAdapter(name, base_dir)

    register_adapter_kind("test-peer", factory)
    try:
        assert build_adapter("asw:TH", "test-peer", {"peer": "TH"}, base_dir=tmp_path).name == "asw:TH"
        with pytest.raises(ConfigError, match="destination 'asw:TH': bad test-peer adapter options: peer certificate"):
            build_adapter("asw:TH", "test-peer", {"broken": True}, base_dir=tmp_path)
        with pytest.raises(ValueError, match="already registered"):
            register_adapter_kind("test-peer", lambda n, o, b: FileAdapter(n, b))
    finally:
        del ADAPTER_KINDS["test-peer"]
    assert built[0] == ("asw:TH", {"peer": "TH"}, tmp_path)
