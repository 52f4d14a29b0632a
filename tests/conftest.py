"""Shared fixtures: a dev PKI made once per session, signers for every sample party, and a gateway
running on a real aiohttp server on loopback with the embedded broker and SQLite ledger."""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from lxml import etree

from gateway.config import Settings
from gateway.ingress import create_app
from gateway.model import Delivery
from gateway.runtime import Gateway
from gateway.samples import SAMPLE_SENDERS, sample_envelope
from gateway.security.pki import init_dev_pki
from gateway.security.sign import Signer, to_bytes

IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"


def service_reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports_in_a_row(count: int) -> int:
    """The first of ``count`` consecutive ports free on loopback, below the kernel's ephemeral range.

    For servers that listen on ``base + i``. ``free_port`` checks one port, and one from the ephemeral
    range: its neighbour may be some process's outgoing connection, and any of them may become one before
    the server binds it (seen: a child of `nswgw run` died on "address already in use" and the supervisor's
    restart pause outlasted the test)."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        start = random.randrange(10_000, max(10_001, ephemeral_low - count))
        if all(_bindable(port) for port in range(start, start + count)):
            return start
    raise RuntimeError(f"no {count} consecutive free ports found below {ephemeral_low}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def require_service(name: str, host: str, port: int) -> None:
    """Skip loudly when a real service is missing locally; fail under CI=true (never hide it there)."""
    if service_reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing real service is a failure, not a skip)")
    pytest.skip(f"{message} -- SKIPPING real-{name} tests; start it to run them")


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "certs"
    init_dev_pki(out)
    return out


@pytest.fixture(scope="session")
def signers(pki_dir: Path) -> Callable[..., Signer]:
    cache: dict[tuple[str, bool], Signer] = {}

    def signer(identity: str, *, legacy_sha1: bool = False) -> Signer:
        """``identity`` is a party identity, or ``test/<name>`` for the expired/revoked/untrusted certs."""
        key = (identity, legacy_sha1)
        if key not in cache:
            folder = pki_dir / identity if identity.startswith("test/") else pki_dir / "parties" / identity
            cache[key] = Signer.from_files(folder / "key.pem", folder / "cert.pem", legacy_sha1=legacy_sha1)
        return cache[key]

    return signer


def envelope(document_type: str, **overrides: Any) -> etree._Element:
    overrides.setdefault("message_id", str(uuid.uuid4()))
    overrides.setdefault("send_date", datetime.now(UTC))
    return sample_envelope(document_type, **overrides)


@pytest.fixture
def signed(signers: Callable[..., Signer]) -> Callable[..., bytes]:
    def make(
        document_type: str,
        *,
        signer: str | None = None,
        body_signer: str | None = None,
        legacy_sha1: bool = False,
        **overrides: Any,
    ) -> bytes:
        root = envelope(document_type, **overrides)
        sender = signer or overrides.get("sender") or SAMPLE_SENDERS[document_type][0]
        if body_signer is not None:
            root = signers(body_signer).sign_content(root)
        return to_bytes(signers(sender, legacy_sha1=legacy_sha1).sign_envelope(root))

    return make


class RecordingBroker:
    """Delegates to the real broker and remembers what was published (to assert "nothing enqueued")."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.published: list[Delivery] = []
        self.fail_with: Exception | None = None

    async def publish(self, deliveries: Sequence[Delivery]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        await self.inner.publish(deliveries)
        self.published.extend(deliveries)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclasses.dataclass
class RunningGateway:
    gateway: Any
    client: TestClient
    broker: RecordingBroker
    settings: Settings

    async def post(self, body: bytes, content_type: str = "application/xml") -> Any:
        return await self.client.post("/v1/messages", data=body, headers={"Content-Type": content_type})


def gateway_settings(pki_dir: Path, data_dir: Path, **overrides: Any) -> Settings:
    return dataclasses.replace(
        Settings(certs_dir=pki_dir, data_dir=data_dir, rate_per_party=1e6, rate_burst=1e6, lease_seconds=5.0),
        **overrides,
    )


@pytest.fixture
async def make_gateway(pki_dir: Path, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    opened: list[tuple[Any, TestClient]] = []

    async def start(**overrides: Any) -> RunningGateway:
        routing = overrides.pop("routing", None)
        data_dir = overrides.pop("data_dir", tmp_path / f"var{len(opened)}")  # the same one: a restart
        settings = gateway_settings(pki_dir, data_dir, **overrides)
        gw = await Gateway.open(settings, routing=routing)
        spy = RecordingBroker(gw.broker)
        gw.pipeline.broker = spy
        client = TestClient(TestServer(create_app(gw), host="127.0.0.1"))
        await client.start_server()
        opened.append((gw, client))
        return RunningGateway(gw, client, spy, settings)

    try:
        yield start
    finally:
        for gw, client in reversed(opened):
            await client.close()
            await gw.close()


@pytest.fixture
async def running(make_gateway: Callable[..., Any]) -> RunningGateway:
    return await make_gateway()
