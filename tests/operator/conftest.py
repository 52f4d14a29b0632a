"""Operator-facing fixtures (helpers live in helpers.py)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest

from tests.e2e.conftest import rabbit  # noqa: F401 - the RabbitMQ fixture, re-exported for tests/operator
from tests.support.agency import Agency


@pytest.fixture
async def agencies() -> AsyncIterator[Callable[..., Any]]:
    started: list[Agency] = []

    async def start(
        answers: Iterable[int | str] = (), default: int = 200, *, tls: ssl.SSLContext | None = None
    ) -> Agency:
        agency = await Agency("agency", answers, default, tls=tls).start()
        started.append(agency)
        return agency

    try:
        yield start
    finally:
        for agency in started:
            await agency.stop()
