"""The partner and operator command line, driven as a partner would: real subprocesses, a real gateway."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port
from tests.e2e.conftest import child_env, write_routing
from tests.support.agency import Agency
from tests.support.http import until_ok


def nswgw(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _serve(args: list[str | Path], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", *map(str, args)],
        env=child_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


async def test_partner_round_trip_with_the_cli(tmp_path: Path) -> None:
    certs, samples = tmp_path / "certs", tmp_path / "samples"
    assert nswgw("certs", "init", certs).returncode == 0
    written = nswgw("samples", samples)
    assert written.returncode == 0
    assert (samples / "licence.import.xml").exists()

    trader = certs / "parties" / "VN-TRADER-0101234567"
    signed_file = tmp_path / "signed.xml"
    sign = nswgw(
        "sign",
        samples / "licence.import.xml",
        "--key",
        trader / "key.pem",
        "--cert",
        trader / "cert.pem",
        "-o",
        signed_file,
    )
    assert sign.returncode == 0, sign.stderr
    verify = nswgw("verify", "--certs", certs, signed_file)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)
    assert (report["party"], report["document_type"]) == ("VN-TRADER-0101234567", "licence.import")
    assert [d["destination"] for d in report["destinations"]] == ["moit"]

    explain = nswgw("routes", "explain", signed_file)
    assert explain.returncode == 0
    assert "licence-applications-to-moit" in explain.stdout

    tampered = tmp_path / "tampered.xml"
    tampered.write_bytes(signed_file.read_bytes().replace(b"<hsCode>", b"<hsCode>9", 1))
    refused = nswgw("verify", "--certs", certs, tampered)
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["code"] == "SIGNATURE_INVALID"

    agency = await Agency("moit").start()
    port = free_port()
    routing = write_routing(tmp_path / "routing.yaml", {"moit": agency})
    server = _serve(
        ["run", "--certs", certs, "--data", tmp_path / "var", "--routing", routing, "--port", str(port)],
        tmp_path / "run.log",
    )
    try:
        await until_ok(f"http://127.0.0.1:{port}/readyz")
        url = f"http://127.0.0.1:{port}/v1/messages"
        sent = await asyncio.to_thread(nswgw, "send", signed_file, "--url", url)
        assert sent.returncode == 0, sent.stderr
        assert "<status>ACCEPTED</status>" in sent.stdout
        rejected = await asyncio.to_thread(nswgw, "send", tampered, "--url", url)
        assert rejected.returncode == 1
        assert "SIGNATURE_INVALID" in rejected.stderr
        await agency.wait_until(lambda: len(agency.delivered_keys()) == 1)

        server.send_signal(signal.SIGTERM)  # a clean stop: in-flight work finished, exit 0
        assert await asyncio.to_thread(server.wait, 30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        await agency.stop()

    trail = nswgw("audit", "verify", "--data", tmp_path / "var")
    assert trail.returncode == 0, trail.stdout
    assert json.loads(trail.stdout)["ok"] is True
    dead = nswgw("dlq", "list", "--data", tmp_path / "var", "--routing", routing)
    assert dead.returncode == 0
    assert dead.stdout.strip() == ""
