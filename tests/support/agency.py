"""A partner agency as a real aiohttp server on loopback, with scriptable behaviour.

``answers`` is a queue of scripted answers consumed one per request (an int status, or ``"hang"``
to hold the request until ``release()``); when it is empty the agency answers ``default``.
Every request is recorded with its Idempotency-Key, so tests count logical deliveries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Iterable

from aiohttp import web

from tests.support.mtls import peer_common_name

WAIT = 30.0  # a deadline for things that must happen, never a measurement


@dataclasses.dataclass(frozen=True)
class Request:
    key: str
    status: int
    body: bytes
    client: str | None = None  # the commonName of the TLS client certificate it came with


class Agency:
    def __init__(
        self,
        name: str = "agency",
        answers: Iterable[int | str] = (),
        default: int = 200,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.tls = tls
        self.answers: list[int | str] = list(answers)
        self.default = default
        self.requests: list[Request] = []
        self.port = 0
        self.hanging = 0
        self._release = asyncio.Event()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/inbox"

    def delivered_keys(self) -> list[str]:
        return [r.key for r in self.requests if 200 <= r.status < 300]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        answer = self.answers.pop(0) if self.answers else self.default
        if answer == "hang":
            self.hanging += 1
            self._changed.set()
            await self._release.wait()
            self.hanging -= 1
            answer = self.answers.pop(0) if self.answers else self.default
        status = int(answer)
        client = peer_common_name(request.transport)
        self.requests.append(Request(request.headers.get("Idempotency-Key", ""), status, body, client))
        self._changed.set()
        return web.Response(status=status, text=f"{self.name}: {status}")

    def release(self) -> None:
        self._release.set()

    async def wait_until(self, condition: object) -> None:
        predicate = condition if callable(condition) else (lambda: bool(condition))
        async with asyncio.timeout(WAIT):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def start(self) -> Agency:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/inbox", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
