"""Waiting for a loopback endpoint to answer."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from tests.support.agency import WAIT


async def until_ok(url: str, *, within: float = WAIT) -> None:
    """Polls ``url`` until it answers 200 (a process still starting refuses or resets the connection)."""
    async with httpx.AsyncClient() as client, asyncio.timeout(within):
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
