"""A loopback agency for the bench: answers 200 and counts distinct Idempotency-Keys with the time
each was first seen. Bodies are counted off and dropped as they arrive, so a 20 MB delivery is never held.

It shares the bench machine's cores with the gateway it measures, so it speaks HTTP/1.1 itself
(``bench.http1`` on ``asyncio.Protocol``; aiohttp stays the HTTP implementation of the product and is the
client that talks to it). Measured CPU per 5 KB delivery: ~100 µs at 500/s, ~38 µs at saturation (aiohttp's
Application + AppRunner: ~230 / ~110 µs; its low-level ``web.Server``: ~200 / ~85 µs).
"""

from __future__ import annotations

import asyncio
import time

from bench.http1 import Headers, MessageStream, ProtocolError, body_length, keep_alive


def _answer(status: bytes, text: bytes, *, close: bool) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\n%sContent-Length: %d\r\n\r\n%s" % (
        status,
        connection,
        len(text),
        text,
    )


OK = {close: _answer(b"200 OK", b"ok", close=close) for close in (False, True)}
NOT_FOUND = {close: _answer(b"404 Not Found", b"not found", close=close) for close in (False, True)}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Inbox(MessageStream):
    """One connection from the gateway: each POST /inbox is counted once its body has been read."""

    def __init__(self, agency: CountingAgency) -> None:
        super().__init__()
        self._agency = agency
        self._key = ""
        self._inbox = False
        self._keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._agency._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._agency._connections.discard(self)

    def head_received(self, first_line: list[bytes], headers: Headers) -> int:
        if len(first_line) != 3 or not first_line[2].startswith(b"HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x request line: {b' '.join(first_line)[:80]!r}")
        self._inbox = first_line[0] == b"POST" and first_line[1] == b"/inbox"
        self._key = headers.get(b"idempotency-key", b"").decode("utf-8", "surrogateescape")
        self._keep_alive = keep_alive(first_line[2], headers)
        length = body_length(headers) or 0
        if headers.get(b"expect", b"").lower() == b"100-continue":
            self._write(CONTINUE)
        return length

    def message_received(self) -> None:
        if self._inbox:
            self._agency._received(self._key)
        self._write((OK if self._inbox else NOT_FOUND)[not self._keep_alive])
        if not self._keep_alive:
            self.close()

    def protocol_error(self, error: ProtocolError) -> None:
        self._write(_answer(b"501 Not Implemented", str(error).encode(), close=True))
        self.close()

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class CountingAgency:
    def __init__(self) -> None:
        self.first_seen: dict[str, float] = {}
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[_Inbox] = set()
        self._waiters: list[tuple[set[str], asyncio.Future[None]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/inbox"

    def _received(self, key: str) -> None:
        self.requests += 1
        if key in self.first_seen:
            return
        self.first_seen[key] = time.perf_counter()
        for missing, done in self._waiters:
            missing.discard(key)
            if not missing and not done.done():
                done.set_result(None)

    async def start(self) -> CountingAgency:
        self._server = await asyncio.get_running_loop().create_server(lambda: _Inbox(self), "127.0.0.1", 0)
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
            for connection in list(self._connections):
                connection.close()
            await self._server.wait_closed()
