"""Stand-ins on the wire between two gateways, each presenting TH-NSW's TLS certificate and requiring a
client certificate from a root TH trusts (so VN's asw adapter talks to them exactly as to TH):

* ``Relay`` forwards to the real TH ingress (with VN's client certificate), and can tamper with the
  envelope on the way or lose TH's answer on the way back;
* ``FakePeer`` answers whatever a test scripts: forged, misdirected or valid receipts.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from adapters.http import client_ssl_context
from gateway.crossborder_demo import SETTLE, ingress_url, loopback_socket, server_tls


@dataclasses.dataclass(frozen=True)
class Seen:
    idempotency_key: str
    body: bytes  # what the sender posted
    status: int  # what the stand-in (or, through a relay, TH) answered
    answer: bytes
    lost: bool = False  # a relay dropped this answer: the sender got a bare 502 instead
    replayed: bool = False  # TH said X-NSW-Replayed: the original receipt of an identical submission


class _Server:
    def __init__(self, th_certs: Path) -> None:
        self.seen: list[Seen] = []
        self._tls = server_tls(th_certs)
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    def record(self, seen: Seen) -> None:
        self.seen.append(seen)
        self._changed.set()

    async def wait_for(self, count: int) -> list[Seen]:
        async with asyncio.timeout(SETTLE):
            while len(self.seen) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.seen

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = loopback_socket()
        await web.SockSite(self._runner, sock, ssl_context=self._tls).start()
        self.url = ingress_url(sock)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class Relay(_Server):
    """``tamper`` rewrites each envelope before TH sees it; the first ``lose`` answers never reach VN."""

    def __init__(
        self, th_certs: Path, vn_certs: Path, *, tamper: Callable[[bytes], bytes] | None = None, lose: int = 0
    ) -> None:
        super().__init__(th_certs)
        self.upstream = ""
        self._tamper = tamper
        self._lose = lose
        self._client_tls = client_ssl_context(
            th_certs / "trust" / "anchors" / "th-nsw-dev-root.pem",
            vn_certs / "gateway" / "cert.pem",
            vn_certs / "gateway" / "key.pem",
        )

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        sent = self._tamper(body) if self._tamper else body
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._client_tls)) as session,
            session.post(self.upstream, data=sent, headers=headers) as upstream,
        ):
            answer, status = await upstream.read(), upstream.status
            replayed = upstream.headers.get("X-NSW-Replayed") == "true"
        lost = self._lose > 0
        self._lose -= int(lost)
        self.record(Seen(request.headers.get("Idempotency-Key", ""), body, status, answer, lost, replayed))
        if lost:
            return web.Response(status=502, text="bad gateway: the upstream answer was lost")
        return web.Response(status=status, body=answer, content_type="application/xml")


class FakePeer(_Server):
    """Answers each request with ``script(body) -> (status, answer)``."""

    def __init__(self, th_certs: Path, script: Callable[[bytes], tuple[int, bytes]]) -> None:
        super().__init__(th_certs)
        self.script = script

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status, answer = self.script(body)
        self.record(Seen(request.headers.get("Idempotency-Key", ""), body, status, answer))
        return web.Response(status=status, body=answer, content_type="application/xml")
