"""`nswgw run --processes N`: N children share the port, a killed child is replaced, SIGTERM stops all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.supervisor import child_argv
from tests.conftest import free_port
from tests.e2e.conftest import child_env, write_routing
from tests.support.agency import WAIT, Agency
from tests.support.procs import child_pids


def test_children_get_the_same_arguments_without_processes_and_with_their_index() -> None:
    argv = ["run", "--processes", "3", "--port", "8080", "--processes=4", "--certs", "c"]
    assert child_argv(argv, 2) == ["run", "--port", "8080", "--certs", "c", "--child", "2"]


@pytest.mark.parametrize(
    ("processes", "port", "error"),
    [("2", "0", "--processes > 1 shares one listening port"), ("0", "8080", "processes must be 1 or more, not 0")],
)
def test_bad_process_settings_are_configuration_errors(
    pki_dir: Path, tmp_path: Path, processes: str, port: str, error: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--certs", str(pki_dir), "--data", str(tmp_path), "--port", port],
        env=child_env(NSW_PROCESSES=processes),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert error in done.stderr


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll: a process table has no event to await."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while loop.time() < deadline:
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {WAIT}s: {what}")


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        env=child_env(NSW_RATE_PER_PARTY="1000000", NSW_RATE_BURST="1000000", NSW_LEASE_SECONDS="3"),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


async def _post_all(url: str, bodies: list[bytes]) -> list[int]:
    async with httpx.AsyncClient(timeout=30) as client:
        answers = await asyncio.gather(
            *(client.post(url, content=b, headers={"Content-Type": "application/xml"}) for b in bodies)
        )
    return [a.status_code for a in answers]


async def test_two_processes_share_the_port_and_a_killed_one_is_replaced(
    pki_dir: Path, tmp_path: Path, signed: Callable[..., bytes]
) -> None:
    agency = await Agency("moit").start()
    port = free_port()
    routing = write_routing(tmp_path / "routing.yaml", {"moit": agency})
    metrics_port = free_port()  # child I serves its metrics on metrics_port + I
    args = ["run", "--certs", pki_dir, "--data", tmp_path / "var", "--routing", routing, "--port", port]
    args += ["--metrics-port", metrics_port]
    supervisor = _spawn([*map(str, args), "--processes", "2"], tmp_path / "run.log")
    url = f"http://127.0.0.1:{port}/v1/messages"
    try:
        await _until(lambda: len(child_pids(supervisor.pid)) == 2, "two children started")
        first = child_pids(supervisor.pid)
        await _wait_listening(url)

        batch = [signed("licence.import") for _ in range(20)]
        assert await _post_all(url, batch) == [202] * 20
        accepted = 0.0
        async with httpx.AsyncClient() as client:
            for child in (0, 1):
                text = (await client.get(f"http://127.0.0.1:{metrics_port + child}/metrics")).text
                accepted += sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("nsw_messages_accepted_total")
                )
        assert accepted == 20  # the two children's own counters add up to what was sent

        os.kill(first[0], signal.SIGKILL)
        await _until(
            lambda: len(kids := child_pids(supervisor.pid)) == 2 and first[0] not in kids, "the dead child replaced"
        )
        assert first[1] in child_pids(supervisor.pid)  # the other one was left alone
        await _wait_listening(url)
        more = [signed("licence.import") for _ in range(20)]
        assert await _post_all(url, more) == [202] * 20
        # what the killed child held comes back when its embedded-broker lease (3 s here) expires
        await agency.wait_until(lambda: len(set(agency.delivered_keys())) == 40)

        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.wait, 60) == 0
        assert not _alive(first[1])
    finally:
        if supervisor.poll() is None:
            for pid in child_pids(supervisor.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            supervisor.kill()
            supervisor.wait(10)
        await agency.stop()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def _wait_listening(url: str) -> None:
    ready = url.replace("/v1/messages", "/readyz")
    async with httpx.AsyncClient() as client, asyncio.timeout(WAIT):
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(ready)).status_code == 200:
                    return
            await asyncio.sleep(0.2)


def test_a_configuration_error_in_the_children_stops_the_supervisor_with_exit_2(tmp_path: Path) -> None:
    args = ["run", "--certs", str(tmp_path / "missing"), "--data", str(tmp_path), "--port", str(free_port())]
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--processes", "2"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("trust directory not found") == 2  # each child said why; none was restarted
    assert "supervisor.child_config_error" in done.stderr
