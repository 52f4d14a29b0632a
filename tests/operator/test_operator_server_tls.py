"""The ingress's TLS certificate renewed in place: new handshakes present it, without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from structlog.testing import capture_logs

from gateway.server_tls import ServerTls
from tests.conftest import free_port
from tests.e2e.conftest import child_env
from tests.support.agency import WAIT
from tests.support.mtls import Pki, make_pki


def client_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


async def served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate a new TLS connection to ``port`` is shown."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_pem_x509_certificate(ssl.DER_cert_to_PEM_cert(der).encode()).serial_number
    finally:
        writer.close()
        await writer.wait_closed()


def serial_of(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


async def get_ok(port: int, context: ssl.SSLContext) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"https://127.0.0.1:{port}/", ssl=context) as answer:
        return answer.status


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
async def served(pki: Pki) -> AsyncIterator[tuple[ServerTls, int]]:
    """A loopback HTTPS server on the ServerTls context, requiring client certificates from the CA."""
    tls = ServerTls(pki.ca.parent / "server.pem", pki.ca.parent / "server.key", pki.ca)

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context)
    await site.start()
    try:
        yield tls, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_a_renewed_certificate_is_presented_to_new_connections(
    served: tuple[ServerTls, int], pki: Pki, tmp_path: Path
) -> None:
    tls, port = served
    client = client_context(pki)
    first = serial_of(tls.cert)
    assert await served_serial(port, client) == first
    assert tls.renew_if_changed() is False  # nothing changed

    (tmp_path / "renewed").mkdir()
    cert, key = pki.issue_pair(tmp_path / "renewed", "server", "127.0.0.1", server=True)
    os.replace(cert, tls.cert)  # the new certificate, the old key: a renewal caught half-way
    with capture_logs() as logs:
        assert tls.renew_if_changed() is False
        assert tls.renew_if_changed() is False  # the same files are not tried again
    assert [e["event"] for e in logs] == ["tls.renewal_rejected"]
    assert logs[0]["files"] == [str(tls.cert)]
    assert "KEY_VALUES_MISMATCH" in logs[0]["error"]
    assert await served_serial(port, client) == first  # the live context is untouched
    assert await get_ok(port, client) == 200

    shutil.copyfile(key, tls.key)  # rewritten in place: the same inode
    with capture_logs() as logs:
        assert tls.renew_if_changed() is True
    assert [e["event"] for e in logs] == ["tls.renewed"]
    assert await served_serial(port, client) == serial_of(tls.cert) != first
    assert await get_ok(port, client) == 200  # the live context has the matching key


async def test_a_client_ca_added_to_the_bundle_is_trusted_after_renewal(
    served: tuple[ServerTls, int], pki: Pki, tmp_path: Path
) -> None:
    tls, port = served
    (tmp_path / "other-ca").mkdir()
    other = make_pki(tmp_path / "other-ca", "another CA")
    from_other = client_context(other)
    from_other.load_verify_locations(pki.ca)  # trusts our server; presents a certificate from the other CA
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await get_ok(port, from_other)

    pki.ca.write_bytes(pki.ca.read_bytes() + other.ca.read_bytes())
    assert tls.renew_if_changed() is True
    assert await get_ok(port, from_other) == 200


async def until_serial(port: int, context: ssl.SSLContext, serial: int) -> None:
    """Poll new connections until they are shown certificate ``serial`` (a starting server refuses them)."""
    async with asyncio.timeout(WAIT):
        while True:
            with contextlib.suppress(OSError):
                if await served_serial(port, context) == serial:
                    return
            await asyncio.sleep(0.1)


async def test_nswgw_serve_presents_a_renewed_certificate_after_sighup(pki_dir: Path, pki: Pki, tmp_path: Path) -> None:
    """The wiring: `nswgw serve` over TLS, its certificate files replaced, SIGHUP; the same process
    presents the new certificate to the next connection."""
    port = free_port()
    cert, key = pki.ca.parent / "server.pem", pki.ca.parent / "server.key"
    log = tmp_path / "serve.log"
    args = ["serve", "--certs", pki_dir, "--data", tmp_path / "var", "--port", port]
    with log.open("wb") as out:
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            *map(str, args),
            env=child_env(NSW_TLS_CERT=str(cert), NSW_TLS_KEY=str(key)),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    verify_only = ssl.create_default_context(cafile=pki.ca)  # no client CA is set: no client certificate
    try:
        await until_serial(port, verify_only, serial_of(cert))
        (tmp_path / "renewed").mkdir()
        new_cert, new_key = pki.issue_pair(tmp_path / "renewed", "server", "127.0.0.1", server=True)
        shutil.copyfile(new_key, key)
        shutil.copyfile(new_cert, cert)
        server.send_signal(signal.SIGHUP)
        await until_serial(port, verify_only, serial_of(new_cert))
        assert server.returncode is None  # the same process: nothing restarted
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), WAIT)
    assert "tls.renewed" in log.read_text()
