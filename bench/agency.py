"""A loopback agency for the bench: answers 200 and counts distinct Idempotency-Keys with the time
each was first seen (bodies are read and dropped, so a 20 MB delivery costs it nothing to keep)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web


class CountingAgency:
    def __init__(self) -> None:
        self.first_seen: dict[str, float] = {}
        self.requests = 0
        self.port = 0
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/inbox"

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        self.first_seen.setdefault(request.headers.get("Idempotency-Key", ""), time.perf_counter())
        self._changed.set()
        return web.Response(status=200, text="ok")

    async def start(self) -> CountingAgency:
        app = web.Application(client_max_size=128 * 1024 * 1024)
        app.router.add_post("/inbox", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def wait_for(self, keys: set[str], within: float) -> bool:
        """True when every key has been delivered; False when ``within`` seconds passed first."""
        try:
            async with asyncio.timeout(within):
                while not keys <= self.first_seen.keys():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
