"""The load generator: a separate process from everything it measures.

``python -m bench.loadgen --urls U1,U2 --messages FILE --concurrency C [--rate R] --duration S --out JSON``

Posts each pre-signed message at most once (bounded in count) until ``--duration`` (bounded in
time); closed loop at ``--concurrency`` when no ``--rate``, else open loop at ``--rate`` per second
(still at most ``--concurrency`` in flight). Writes counts, wall time and latency percentiles
(from writing a request to having read its whole answer).

Its HTTP/1.1 client is written here on ``asyncio.Protocol`` rather than being aiohttp's, which stays the
HTTP implementation of the product: the load generator shares the bench machine's cores with the gateway,
so it must cost them as little as possible. Measured CPU per 5 KB request: ~36 µs at saturation, ~150 µs
at 500/s offered, mostly the two wake-ups each request then costs (the aiohttp client: ~113 / ~320 µs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.messages import load

TIMEOUT = 120.0  # seconds a request may wait for its whole answer
MAX_HEAD = 64 * 1024
CHUNK = 256 * 1024  # a larger body is written in slices of this size: the transport never copies all of it


class ProtocolError(Exception):
    """An answer this client does not read: not HTTP/1.x, or not framed by Content-Length (e.g. chunked)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    message_id: str  # X-NSW-Message-Id, "" when absent
    latency: float  # seconds from writing the request to having read the whole answer


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time (no pipelining)."""

    def __init__(self) -> None:
        self.open = False
        self.sent_at = 0.0
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[Answer] | None = None
        self._buffer = bytearray()
        self._remaining = -1  # body bytes still to read; -1 while reading a head
        self._status = 0
        self._message_id = ""
        self._keep_alive = True
        self._unsent: memoryview | None = None  # the rest of a large body, written as the socket drains
        self._paused = False

    @property
    def busy(self) -> bool:
        return self._answer is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.open = True

    def eof_received(self) -> bool | None:
        self.open = False  # before connection_lost runs: the next request must not be written here
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        error = ConnectionError("the server closed the connection before answering")
        error.__cause__ = exc
        self._fail(error)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._write_unsent()

    def request(self, head: bytes, body: bytes) -> asyncio.Future[Answer]:
        assert self._transport is not None
        assert self._answer is None
        self._answer = self._loop.create_future()
        self.sent_at = time.perf_counter()
        if len(body) <= CHUNK:
            self._transport.write(head + body)
        else:
            self._transport.write(head)
            self._unsent = memoryview(body)
            self._write_unsent()
        return self._answer

    def _write_unsent(self) -> None:
        assert self._transport is not None
        while self._unsent is not None and not self._paused:
            chunk = self._unsent[:CHUNK]
            self._unsent = self._unsent[CHUNK:] or None
            self._transport.write(chunk)

    def expire(self, after: float) -> None:
        self._fail(TimeoutError(f"no whole answer within {after} s"))
        self.close()

    def close(self) -> None:
        self.open = False
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._read()
        except ProtocolError as exc:
            self._fail(exc)
            self.close()
            return
        if self._buffer and self._answer is None:  # the server spoke out of turn: nothing here can be trusted
            self.close()

    def _read(self) -> None:
        while self._answer is not None:
            if self._remaining < 0:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD:
                        raise ProtocolError(f"no end of head in {MAX_HEAD} bytes")
                    return
                self._remaining = self._read_head(bytes(self._buffer[:end]))
                del self._buffer[: end + 4]
                if self._status < 200:  # 1xx: an interim answer, the real one follows
                    self._remaining = -1
                    continue
            if len(self._buffer) < self._remaining:  # the body is not needed: count it off as it comes
                self._remaining -= len(self._buffer)
                self._buffer.clear()
                return
            del self._buffer[: self._remaining]
            self._remaining = -1
            self._complete()

    def _read_head(self, head: bytes) -> int:
        """Keeps the status, X-NSW-Message-Id and keep-alive; returns the body's length."""
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        length: int | None = None
        self._keep_alive = version == b"HTTP/1.1"
        self._message_id = ""
        try:
            self._status = int(rest[:3])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"x-nsw-message-id":
                    self._message_id = value.strip().decode("latin-1")
                elif name == b"connection":
                    tokens = value.lower()
                    self._keep_alive = b"close" not in tokens and (self._keep_alive or b"keep-alive" in tokens)
                elif name == b"transfer-encoding":
                    raise ProtocolError(f"Transfer-Encoding {value.strip()!r}: this client reads Content-Length only")
        except ValueError as exc:
            raise ProtocolError(f"malformed head: {head[:200]!r}") from exc
        if self._status < 200 or self._status in (204, 304):
            return 0
        if length is None or length < 0:
            raise ProtocolError(f"an answer without Content-Length: {head[:200]!r}")
        return length

    def _complete(self) -> None:
        answer, self._answer = self._answer, None
        assert answer is not None
        if self._unsent is not None:  # answered before the whole body was sent: the stream is out of step
            self._unsent = None
            self._keep_alive = False
        if not self._keep_alive:
            self.open = False
            if self._transport is not None:
                self._transport.close()
        if not answer.done():
            answer.set_result(Answer(self._status, self._message_id, time.perf_counter() - self.sent_at))

    def _fail(self, exc: BaseException) -> None:
        answer, self._answer = self._answer, None
        self._unsent = None
        if answer is not None and not answer.done():
            answer.set_exception(exc)


class Target:
    """One URL: where to connect, and the request head for a body of a given length."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"not an http:// URL: {url}")
        self.host = parts.hostname
        self.port = parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._prefix = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/xml\r\nContent-Length: "
        ).encode("latin-1")

    def head(self, length: int) -> bytes:
        return self._prefix + b"%d\r\n\r\n" % length


class Load:
    """One run: the messages not yet sent, the pacing, the connections and the counts."""

    def __init__(
        self, messages: list[bytes], concurrency: int, rate: float | None, duration: float, timeout: float
    ) -> None:
        self.messages = messages
        self.rate = rate
        self.duration = duration
        self.timeout = timeout
        self.statuses: dict[str, int] = {}
        self.latencies: list[float] = []
        self.accepted_ids: list[str] = []
        self.connections: list[Connection | None] = [None] * concurrency
        self.started = self.deadline = 0.0
        self._next = 0

    async def run(self, targets: list[Target]) -> float:
        """Sends until the messages or the time run out; returns the elapsed seconds."""
        self.started = time.perf_counter()
        self.deadline = self.started + self.duration
        expiry = asyncio.create_task(self._expire())
        try:
            workers = [self._worker(slot, targets[slot % len(targets)]) for slot in range(len(self.connections))]
            await asyncio.gather(*workers)
            return time.perf_counter() - self.started
        finally:
            expiry.cancel()
            for connection in self.connections:
                if connection is not None:
                    connection.close()

    async def _take(self) -> bytes | None:
        """The next message when it is due, or None when none is left or the time is up."""
        index = self._next
        if index >= len(self.messages):
            return None
        self._next += 1
        if self.rate is not None:  # open loop: the schedule does not wait for slow answers
            delay = self.started + index / self.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        if time.perf_counter() >= self.deadline:
            self._next = len(self.messages)
            return None
        return self.messages[index]

    async def _worker(self, slot: int, target: Target) -> None:
        connection: Connection | None = None
        while (body := await self._take()) is not None:
            try:
                if connection is None or not connection.open:
                    connection = await self._connect(target)
                    self.connections[slot] = connection
                answer = await connection.request(target.head(len(body)), body)
            except (OSError, TimeoutError, ProtocolError) as exc:  # counted; a fresh connection for the next one
                self._count(type(exc).__name__)
                if connection is not None:
                    connection.close()
                connection = None
                continue
            self._count(str(answer.status))
            if answer.status == 202:
                self.latencies.append(answer.latency)
                self.accepted_ids.append(answer.message_id)

    async def _connect(self, target: Target) -> Connection:
        async with asyncio.timeout(self.timeout):
            _, connection = await asyncio.get_running_loop().create_connection(Connection, target.host, target.port)
        return connection

    async def _expire(self) -> None:
        """One timer for the whole run, not one per request: fails requests older than the timeout."""
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 4))
            now = time.perf_counter()
            for connection in self.connections:
                if connection is not None and connection.busy and now - connection.sent_at > self.timeout:
                    connection.expire(self.timeout)

    def _count(self, key: str) -> None:
        self.statuses[key] = self.statuses.get(key, 0) + 1


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run(
    urls: list[str],
    messages: list[bytes],
    concurrency: int,
    rate: float | None,
    duration: float,
    *,
    answer_within: float = TIMEOUT,
) -> dict[str, Any]:
    load_ = Load(messages, concurrency, rate, duration, answer_within)
    elapsed = await load_.run([Target(url) for url in urls])
    accepted = load_.statuses.get("202", 0)
    return {
        "sent": sum(load_.statuses.values()),
        "statuses": load_.statuses,
        "accepted": accepted,
        "elapsed_s": elapsed,
        "accepted_per_s": accepted / elapsed if elapsed else 0.0,
        "p50_ms": _ms(percentile(load_.latencies, 50)),
        "p99_ms": _ms(percentile(load_.latencies, 99)),
        "accepted_ids": load_.accepted_ids,
        "loadgen_peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--urls", required=True, help="comma-separated loopback URLs (round robin)")
    parser.add_argument("--messages", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    urls = args.urls.split(",")
    if not all(u.startswith(("http://127.0.0.1:", "http://localhost:")) for u in urls):
        parser.error("loopback URLs only")
    result = asyncio.run(run(urls, load(args.messages), args.concurrency, args.rate, args.duration))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
