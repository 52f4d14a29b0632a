"""HTTP push to an agency: POST the signed envelope, exactly as received, to the destination's URL.

Outcome by answer: 2xx delivered; timeout, connection or TLS failure, 408, 425, 429 and 5xx are
transient; any other status is permanent (the agency refused the content, or the URL is wrong).
A ``Retry-After`` on a transient answer is passed on as ``RetryAfterFailure.retry_after``.

The HTTP client is swappable (``client=`` / option ``client``): aiohttp is the default, httpx the
alternative. Both behave the same towards the agency and the worker (tests/test_adapters_http.py runs
one behaviour suite against each), including the proxy named by ``HTTP_PROXY`` / ``HTTPS_PROXY`` /
``NO_PROXY``; aiohttp's costs about a quarter of httpx's CPU per request (httpcore checks every pooled
connection's socket on each request). Either way in-flight requests per destination are bounded
(``max_in_flight``).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx

from adapters.base import DeliveryReceipt, stamp_files
from adapters.options import Options
from gateway.errors import PermanentFailure, TransientFailure
from gateway.model import Delivery
from gateway.retry import RetryAfterFailure

_KEEP_BODY = 512  # characters of the agency's answer kept for receipts and failure details
_READ_LIMIT = 64 * 1024  # bytes read from an answer; bodies up to this keep the connection reusable


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    retry_after: str | None
    body_start: str


@dataclass(frozen=True, slots=True)
class ClientSettings:
    connect_timeout: float
    read_timeout: float
    max_in_flight: int
    ssl_context: ssl.SSLContext | None  # None: the system trust store, no client certificate


class HttpClient(Protocol):
    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpAnswer:
        """Raises ``TransientFailure`` (TIMEOUT, CONNECT, TLS, NETWORK) when no answer came back."""
        ...

    async def close(self) -> None: ...


HttpClientFactory = Callable[[ClientSettings], HttpClient]


def _network_failure(code: str, url: str, exc: BaseException) -> TransientFailure:
    return TransientFailure(code, f"POST {url}: {type(exc).__name__}: {exc}")


def _caused_by_tls(exc: BaseException) -> bool:
    seen: set[int] = set()  # exception chains can be cyclic
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError | ssl.CertificateError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class HttpxClient:
    def __init__(self, settings: ClientSettings) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
            limits=httpx.Limits(
                max_connections=settings.max_in_flight, max_keepalive_connections=settings.max_in_flight
            ),
            verify=settings.ssl_context or True,
        )

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpAnswer:
        try:
            async with self._client.stream("POST", url, content=body, headers=dict(headers)) as response:
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) >= _READ_LIMIT:
                        break
                return HttpAnswer(response.status_code, response.headers.get("Retry-After"), _text(data))
        except httpx.TimeoutException as exc:
            raise _network_failure("TIMEOUT", url, exc) from exc
        except httpx.TransportError as exc:
            if _caused_by_tls(exc):
                raise _network_failure("TLS", url, exc) from exc
            code = "CONNECT" if isinstance(exc, httpx.ConnectError) else "NETWORK"
            raise _network_failure(code, url, exc) from exc

    async def close(self) -> None:
        await self._client.aclose()


def environment_proxy(url: str) -> str | None:
    """The proxy ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` name for ``url``, unless ``NO_PROXY`` exempts it."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


class AiohttpClient:
    def __init__(self, settings: ClientSettings) -> None:
        connector = aiohttp.TCPConnector(limit=settings.max_in_flight, ssl=settings.ssl_context or True)
        # Not trust_env=True: besides the proxy it looks up ~/.netrc in a thread on every request.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
            ),
        )
        self._proxies: dict[str, str | None] = {}  # read from the environment once per URL, as httpx does per client

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpAnswer:
        if url not in self._proxies:
            self._proxies[url] = environment_proxy(url)
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False, proxy=self._proxies[url]
            ) as response:
                data = bytearray()
                while len(data) < _READ_LIMIT and (chunk := await response.content.read(_READ_LIMIT - len(data))):
                    data += chunk
                return HttpAnswer(response.status, response.headers.get("Retry-After"), _text(data))
        except TimeoutError as exc:  # aiohttp's ServerTimeoutError is one
            raise _network_failure("TIMEOUT", url, exc) from exc
        except aiohttp.ClientError as exc:
            if isinstance(exc, aiohttp.ClientSSLError) or _caused_by_tls(exc):
                raise _network_failure("TLS", url, exc) from exc
            code = "CONNECT" if isinstance(exc, aiohttp.ClientConnectorError) else "NETWORK"
            raise _network_failure(code, url, exc) from exc

    async def close(self) -> None:
        await self._session.close()


HTTP_CLIENTS: dict[str, HttpClientFactory] = {"httpx": HttpxClient, "aiohttp": AiohttpClient}


def _text(data: bytes | bytearray) -> str:
    return bytes(data[: _KEEP_BODY * 4]).decode("utf-8", errors="replace")[:_KEEP_BODY]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date); None if absent or bad."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def client_ssl_context(ca: Path | None, client_cert: Path | None, client_key: Path | None) -> ssl.SSLContext | None:
    """Verification against ``ca`` (else the system store) and our client certificate for mutual TLS.

    A file that cannot be loaded raises ``OSError`` naming it: OpenSSL's own errors ("[Errno 2] No such
    file or directory", "[X509] PEM lib") do not say which of the three files is at fault."""
    if ca is None and client_cert is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    except OSError as exc:  # ssl.SSLError included
        raise OSError(f"ca {ca}: {exc}") from exc
    if client_cert is not None:
        try:
            context.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
        except OSError as exc:
            raise OSError(f"client_cert {client_cert} / client_key {client_key}: {exc}") from exc
    return context


_DELIVERY_HEADERS = frozenset(
    name.lower()
    for name in (
        "Content-Type",
        "Idempotency-Key",
        "X-NSW-Message-Id",
        "X-NSW-Attempt",
        "X-NSW-Document-Type",
        "X-NSW-Sender",
        "X-NSW-Digest",
    )
)  # what request_headers sets for every delivery


def _is_transient(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


class HttpAdapter:
    """One per destination: one reused client, at most ``max_in_flight`` requests at a time.

    ``timeout`` is the deadline for a whole request (connect, send, answer); ``connect_timeout``
    bounds the connect phase. Waiting for an in-flight slot does not count against either.
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_in_flight: int = 8,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        ca: Path | None = None,
        headers: Mapping[str, str] | None = None,
        client: HttpClientFactory = AiohttpClient,
    ) -> None:
        self.name = name
        self.url = url
        self._timeout = timeout
        self.loaded_files = stamp_files((ca, client_cert, client_key))  # before they are read: see stamp_files
        self._settings = ClientSettings(
            connect_timeout=connect_timeout,
            read_timeout=timeout,
            max_in_flight=max_in_flight,
            ssl_context=client_ssl_context(ca, client_cert, client_key),
        )
        self.client_factory = client
        self._client: HttpClient | None = None
        self._slots = asyncio.Semaphore(max_in_flight)
        # Configured headers never override ours (a forged Idempotency-Key would defeat deduplication).
        self._static_headers = {k: v for k, v in (headers or {}).items() if k.lower() not in _DELIVERY_HEADERS}

    @classmethod
    def from_options(cls, name: str, options: Mapping[str, Any], base_dir: Path) -> HttpAdapter:
        opts = Options(name, "http", options, base_dir)
        url = opts.text("url")
        if not url.startswith(("http://", "https://")):
            raise opts.error("url", f"must be an http:// or https:// URL, got {url!r}")
        client = HTTP_CLIENTS[opts.choice("client", sorted(HTTP_CLIENTS), default="aiohttp")]
        client_cert = opts.path("client_cert", must_exist=True)
        client_key = opts.path("client_key", must_exist=True)
        ca = opts.path("ca", must_exist=True)
        if (client_cert or client_key or ca) and not url.startswith("https://"):
            raise opts.error("url", "must be https:// when ca, client_cert or client_key is set")
        if client_key is not None and client_cert is None:
            raise opts.error("client_key", "needs client_cert as well")
        timeout = opts.number("timeout", 10.0)
        connect_timeout = opts.number("connect_timeout", 5.0)
        max_in_flight = opts.integer("max_in_flight", 8)
        headers = opts.string_map("headers")
        opts.finish()
        try:
            return cls(
                name,
                url,
                timeout=timeout,
                connect_timeout=connect_timeout,
                max_in_flight=max_in_flight,
                client_cert=client_cert,
                client_key=client_key,
                ca=ca,
                headers=headers,
                client=client,
            )
        except (ssl.SSLError, OSError) as exc:
            raise opts.error("ca/client_cert/client_key", f"could not be loaded for TLS: {exc}") from exc

    def request_headers(self, delivery: Delivery) -> dict[str, str]:
        return {
            **self._static_headers,
            "Content-Type": "application/xml",
            "Idempotency-Key": delivery.idempotency_key,
            "X-NSW-Message-Id": delivery.message_id,
            "X-NSW-Attempt": str(delivery.attempt),
            "X-NSW-Document-Type": delivery.document_type,
            "X-NSW-Sender": delivery.sender,
            "X-NSW-Digest": f"sha-256={delivery.digest}",
        }

    async def deliver(self, delivery: Delivery) -> DeliveryReceipt:
        if self._client is None:
            self._client = self.client_factory(self._settings)
        async with self._slots:
            try:
                async with asyncio.timeout(self._timeout):
                    answer = await self._client.post(self.url, delivery.payload, self.request_headers(delivery))
            except TimeoutError as exc:
                raise _network_failure("TIMEOUT", self.url, exc) from exc
        return self._judge(answer)

    def _judge(self, answer: HttpAnswer) -> DeliveryReceipt:
        status = answer.status
        if 200 <= status < 300:
            return DeliveryReceipt(status=status, detail=answer.body_start[:200])
        code = f"HTTP_{status}"
        detail = f"{self.name} answered {status}: {answer.body_start[:200]}"
        if not _is_transient(status):
            raise PermanentFailure(code, detail)
        retry_after = parse_retry_after(answer.retry_after)
        if retry_after is not None:
            raise RetryAfterFailure(code, f"{detail} (Retry-After {retry_after:.0f}s)", retry_after)
        raise TransientFailure(code, detail)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
