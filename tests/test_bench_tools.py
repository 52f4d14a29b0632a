"""The bench's own apparatus against real aiohttp peers on 127.0.0.1: the load generator (its hand-written
HTTP/1.1 client) and the loopback agency (what the gateway's aiohttp client delivers to)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bench import loadgen
from bench.agency import CountingAgency
from bench.messages import save
from tests.conftest import REPO

MB = 1024 * 1024


def message_id(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


def bodies(kind: str, count: int) -> list[bytes]:
    return [f"{kind} {n} ".encode() + b"x" * 5000 for n in range(count)]


class Gateway:
    """Stands in for the gateway: records every body it reads, answers by the body's first word
    (busy: 503, drop: the connection is cut, chunked: a chunked 202, hang: no answer until released,
    verbose: a 202 with a 4 MB body)."""

    def __init__(self, *, close: bool = False) -> None:
        self.close = close
        self.received: list[bytes] = []
        self.peers: set[tuple[str, int]] = set()
        self.release = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(body)
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        kind = body.split(b" ", 1)[0]
        if kind == b"busy":
            return web.Response(status=503, text="busy")
        if kind == b"drop":
            request.transport.abort()
            raise asyncio.CancelledError
        if kind == b"chunked":
            chunked = web.StreamResponse(status=202, headers={"X-NSW-Message-Id": message_id(body)})
            chunked.enable_chunked_encoding()
            await chunked.prepare(request)
            await chunked.write(b"<receipt/>")
            await chunked.write_eof()
            return chunked
        if kind == b"hang":
            await self.release.wait()
        headers = {"x-nsw-MESSAGE-id": message_id(body)}  # header names are case-insensitive
        if self.close:
            headers["Connection"] = "close"
        receipt = b"<receipt>" + b"r" * 4 * MB + b"</receipt>" if kind == b"verbose" else b"<receipt/>"
        return web.Response(status=202, body=receipt, content_type="application/xml", headers=headers)

    async def __aenter__(self) -> Gateway:
        app = web.Application(client_max_size=64 * MB)
        app.router.add_post("/v1/messages", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1/messages"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()


async def test_loadgen_posts_each_message_once_counting_statuses_and_accepted_ids() -> None:
    accepted, refused = bodies("ok", 30), bodies("busy", 10)
    async with Gateway() as gateway:
        result = await loadgen.run([gateway.url], accepted + refused, 4, None, 60.0)
    assert Counter(gateway.received) == Counter(accepted + refused)
    assert result["statuses"] == {"202": 30, "503": 10}
    assert (result["sent"], result["accepted"]) == (40, 30)
    assert sorted(result["accepted_ids"]) == sorted(message_id(b) for b in accepted)
    assert result["p50_ms"] is not None
    assert result["p99_ms"] >= result["p50_ms"]
    assert len(gateway.peers) <= 4  # kept-alive connections, one per concurrent sender


async def test_loadgen_round_robins_over_urls() -> None:
    messages = bodies("ok", 40)
    async with Gateway() as first, Gateway() as second:
        result = await loadgen.run([first.url, second.url], messages, 4, None, 60.0)
    assert first.received
    assert second.received
    assert Counter(first.received + second.received) == Counter(messages)
    assert result["accepted"] == 40


async def test_loadgen_reconnects_after_connection_close() -> None:
    messages = bodies("ok", 20)
    async with Gateway(close=True) as gateway:
        result = await loadgen.run([gateway.url], messages, 2, None, 60.0)
    assert result["statuses"] == {"202": 20}
    assert Counter(gateway.received) == Counter(messages)
    assert len(gateway.peers) == 20  # every answer closed its connection: each request came on a new one


async def test_loadgen_counts_a_dropped_connection_and_keeps_going() -> None:
    accepted, dropped = bodies("ok", 20), bodies("drop", 5)
    messages = [m for pair in zip(accepted, [*dropped, *[None] * 15], strict=True) for m in pair if m is not None]
    async with Gateway() as gateway:
        result = await loadgen.run([gateway.url], messages, 3, None, 60.0)
    assert result["statuses"] == {"202": 20, "ConnectionError": 5}
    assert Counter(gateway.received) == Counter(messages)  # nothing posted twice, dropped ones included
    assert sorted(result["accepted_ids"]) == sorted(message_id(b) for b in accepted)


async def test_loadgen_counts_a_chunked_answer_as_a_protocol_error() -> None:
    accepted, chunked = bodies("ok", 10), bodies("chunked", 4)
    async with Gateway() as gateway:
        result = await loadgen.run([gateway.url], chunked + accepted, 2, None, 60.0)
    assert result["statuses"] == {"202": 10, "ProtocolError": 4}
    assert Counter(gateway.received) == Counter(chunked + accepted)


async def test_loadgen_counts_a_request_without_answer_as_a_timeout() -> None:
    accepted, hanging = bodies("ok", 10), bodies("hang", 2)
    async with Gateway() as gateway, asyncio.timeout(60):  # the guard only turns a hang into a failure
        result = await loadgen.run([gateway.url], hanging + accepted, 3, None, 60.0, answer_within=0.2)
    assert result["statuses"] == {"202": 10, "TimeoutError": 2}
    assert Counter(gateway.received) == Counter(hanging + accepted)


async def test_loadgen_keeps_to_the_rate_and_the_duration() -> None:
    messages = bodies("ok", 200)
    async with Gateway() as gateway:
        result = await loadgen.run([gateway.url], messages, 8, 50.0, 1.0)
        nothing = await loadgen.run([gateway.url], messages, 8, None, 0.0)
    # 50/s for 1 s: messages 0..49 fall due before the deadline, in order, and none after it
    assert 0 < result["sent"] <= 50
    assert Counter(gateway.received) == Counter(messages[: result["sent"]])
    assert nothing["sent"] == 0
    assert nothing["p50_ms"] is None


async def test_loadgen_posts_a_20_mb_body_whole() -> None:
    large = b"big " + bytes(range(256)) * (20 * MB // 256)
    messages = [large, *bodies("ok", 3)]
    async with Gateway() as gateway:
        result = await loadgen.run([gateway.url], messages, 2, None, 60.0)
    assert result["statuses"] == {"202": 4}
    assert Counter(map(message_id, gateway.received)) == Counter(map(message_id, messages))
    assert message_id(large) in result["accepted_ids"]


async def test_loadgen_reads_a_large_answer_to_its_end() -> None:
    messages = [m for pair in zip(bodies("verbose", 3), bodies("ok", 3), strict=True) for m in pair]
    async with Gateway() as gateway:
        result = await loadgen.run([gateway.url], messages, 1, None, 60.0)
    assert result["statuses"] == {"202": 6}  # one connection: each answer after a 4 MB one was read in step
    assert sorted(result["accepted_ids"]) == sorted(map(message_id, messages))
    assert len(gateway.peers) == 1


async def test_loadgen_cli_writes_the_result_keys(tmp_path: Path) -> None:
    messages = save(bodies("ok", 5) + bodies("busy", 1), tmp_path / "messages.pickle")
    out = tmp_path / "result.json"
    async with Gateway() as gateway:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.loadgen", "--urls", gateway.url, "--messages", str(messages),
            "--concurrency", "2", "--duration", "60", "--out", str(out), cwd=REPO,
        )  # fmt: skip
        assert await process.wait() == 0
    result = json.loads(out.read_text())
    assert set(result) == {
        "sent", "statuses", "accepted", "elapsed_s", "accepted_per_s",
        "p50_ms", "p99_ms", "accepted_ids", "loadgen_peak_rss_kb",
    }  # fmt: skip
    assert result["statuses"] == {"202": 5, "503": 1}
    assert len(result["accepted_ids"]) == 5


async def test_loadgen_cli_refuses_a_url_off_loopback(tmp_path: Path) -> None:
    messages = save(bodies("ok", 1), tmp_path / "messages.pickle")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen", "--urls", "http://192.0.2.1:8080/v1/messages",
        "--messages", str(messages), "--out", str(tmp_path / "result.json"), cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"loopback URLs only" in stderr
    assert not (tmp_path / "result.json").exists()


@pytest.fixture
async def agency() -> AsyncIterator[CountingAgency]:
    agency = await CountingAgency().start()
    yield agency
    await agency.stop()


async def deliver(session: aiohttp.ClientSession, url: str, key: str, body: bytes = b"<m/>") -> tuple[int, str]:
    headers = {"Content-Type": "application/xml", "Idempotency-Key": key, "X-NSW-Attempt": "1"}
    async with session.post(url, data=body, headers=headers) as response:
        return response.status, await response.text()


async def test_agency_counts_distinct_idempotency_keys(agency: CountingAgency) -> None:
    assert agency.url == f"http://127.0.0.1:{agency.port}/inbox"
    async with aiohttp.ClientSession() as session:
        assert await deliver(session, agency.url, "m1:agency") == (200, "ok")
        first = agency.first_seen["m1:agency"]
        for key in ["m2:agency", "m1:agency", "m3:agency", "m2:agency"]:
            assert (await deliver(session, agency.url, key))[0] == 200
    assert agency.requests == 5
    assert set(agency.first_seen) == {"m1:agency", "m2:agency", "m3:agency"}
    assert agency.first_seen["m1:agency"] == first  # a redelivery does not move the first sighting


async def test_agency_wait_for(agency: CountingAgency) -> None:
    async with aiohttp.ClientSession() as session:
        await deliver(session, agency.url, "m1:agency")
        assert await agency.wait_for({"m1:agency"}, 0.0)
        assert await agency.wait_for(set(), 0.0)
        assert not await agency.wait_for({"m1:agency", "never:agency"}, 0.05)
        waiting = asyncio.create_task(agency.wait_for({"m1:agency", "m2:agency", "m3:agency"}, 60.0))
        await deliver(session, agency.url, "m2:agency")
        await deliver(session, agency.url, "m3:agency")
        assert await waiting


async def test_agency_accepts_a_20_mb_body(agency: CountingAgency) -> None:
    async with aiohttp.ClientSession() as session:
        assert await deliver(session, agency.url, "big:agency", b"<m>" + b"x" * (20 * MB) + b"</m>") == (200, "ok")
        assert await deliver(session, agency.url, "small:agency") == (200, "ok")  # the same connection, still in step
    assert set(agency.first_seen) == {"big:agency", "small:agency"}
