"""Helpers for the operator tests: loopback agencies with scripted answers, rules files, metrics parsing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

DEADLINE = 30.0  # how long something that must happen may take; never a measurement
FAST_RETRY = {"in_process_attempts": 1, "in_process_wait": 0.01, "tiers": [0.05], "max_attempts": 5, "max_age": 600}
CALM_BREAKER = {"failure_threshold": 100, "reset_after": 1}


class Agency:
    """A partner agency: a real aiohttp server on loopback. ``answers`` are consumed one per request,
    then ``default``; each request is kept (Idempotency-Key, status)."""

    def __init__(self, answers: Iterable[int] = (), default: int = 200) -> None:
        self.answers = list(answers)
        self.default = default
        self.requests: list[tuple[str, int]] = []
        self.port = 0
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/inbox"

    def succeeded(self) -> list[str]:
        return [key for key, status in self.requests if 200 <= status < 300]

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        status = self.answers.pop(0) if self.answers else self.default
        self.requests.append((request.headers.get("Idempotency-Key", ""), status))
        self._changed.set()
        return web.Response(status=status, text=f"agency answered {status}")

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def start(self) -> Agency:
        app = web.Application()
        app.router.add_post("/inbox", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def rules(
    destinations: Mapping[str, str], *, rule: str = "to-agencies", document_types: Sequence[str] = ()
) -> dict[str, Any]:
    """A rules file routing ``document_types`` (default licence.import) to every destination (name -> URL)."""
    return {
        "version": 1,
        "destinations": {
            name: {"adapter": "http", "url": url, "timeout": 5, "retry": FAST_RETRY, "breaker": CALM_BREAKER}
            for name, url in destinations.items()
        },
        "rules": [
            {
                "name": rule,
                "when": {"documentType": list(document_types or ["licence.import"])},
                "to": list(destinations),
            }
        ],
    }


def write_rules(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample as {(name, labels): value}, parsed by prometheus_client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(client: Any, headers: Mapping[str, str] | None = None) -> Samples:
    response = await client.get("/metrics", headers=dict(headers or {}))
    text = await response.text()
    assert response.status == 200, text
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse_metrics(text)
