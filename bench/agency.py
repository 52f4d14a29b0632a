"""A loopback agency for the bench: answers 200 and counts distinct Idempotency-Keys with the time
each was first seen. Bodies are read and dropped chunk by chunk, so a 20 MB delivery is never held.

It is aiohttp's low-level server (``web.Server``: no application, router or middlewares), because it
shares the bench machine's cores with the gateway it measures: CPU per 5 KB delivery ~200 µs at 500/s,
~85 µs at saturation (Application + AppRunner and ``request.read()``: ~230 / ~110 µs).
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

OK = b"ok"


class CountingAgency:
    def __init__(self) -> None:
        self.first_seen: dict[str, float] = {}
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._web: web.Server | None = None
        self._waiters: list[tuple[set[str], asyncio.Future[None]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/inbox"

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        if request.method != "POST" or request.path != "/inbox":
            return web.Response(status=404)
        while await request.content.readany():
            pass
        self.requests += 1
        key = request.headers.get("Idempotency-Key", "")
        if key not in self.first_seen:
            self.first_seen[key] = time.perf_counter()
            self._seen(key)
        return web.Response(status=200, body=OK)

    def _seen(self, key: str) -> None:
        for missing, done in self._waiters:
            missing.discard(key)
            if not missing and not done.done():
                done.set_result(None)

    async def start(self) -> CountingAgency:
        self._web = web.Server(self._handle, access_log=None)
        self._server = await asyncio.get_running_loop().create_server(self._web, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def wait_for(self, keys: set[str], within: float) -> bool:
        """True when every key has been delivered; False when ``within`` seconds passed first."""
        missing = keys - self.first_seen.keys()
        if not missing:
            return True
        waiter = (missing, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(within):
                await waiter[1]
        except TimeoutError:
            return False
        finally:
            self._waiters.remove(waiter)
        return True

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._web is not None:
            await self._web.shutdown(1.0)
        if self._server is not None:
            await self._server.wait_closed()
