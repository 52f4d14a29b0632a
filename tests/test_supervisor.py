"""`nswgw run --processes N`: N children share the port, a killed child is replaced, SIGTERM stops all;
every child's /metrics answers for all of them."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.metrics import MULTIPROC_ENV
from gateway.supervisor import METRICS_SUBDIR, MetricsDir, child_argv
from tests.conftest import free_port, free_ports_in_a_row
from tests.e2e.conftest import child_env, write_routing
from tests.operator.helpers import parse_metrics, value
from tests.support.agency import WAIT, Agency
from tests.support.http import until_ok
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
    done = _until_exit(
        ["run", "--certs", str(pki_dir), "--data", str(tmp_path), "--port", port], NSW_PROCESSES=processes
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
    args = ["run", "--certs", pki_dir, "--data", tmp_path / "var", "--routing", routing, "--port", port]
    supervisor = _spawn([*map(str, args), "--processes", "2"], tmp_path / "run.log")
    url = f"http://127.0.0.1:{port}/v1/messages"
    try:
        first = await _two_children_ready(supervisor.pid, url)

        batch = [signed("licence.import") for _ in range(20)]
        assert await _post_all(url, batch) == [202] * 20

        os.kill(first[0], signal.SIGKILL)
        await _until(
            lambda: len(kids := child_pids(supervisor.pid)) == 2 and first[0] not in kids, "the dead child replaced"
        )
        assert first[1] in child_pids(supervisor.pid)  # the other one was left alone
        await until_ok(url.replace("/v1/messages", "/readyz"))
        more = [signed("licence.import") for _ in range(20)]
        assert await _post_all(url, more) == [202] * 20
        # what the killed child held comes back when its embedded-broker lease (3 s here) expires
        await agency.wait_until(lambda: len(set(agency.delivered_keys())) == 40)

        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.wait, 60) == 0
        assert not _alive(first[1])
        # each child froze its startup heap before serving (gateway/heap.py); the replacement may not
        # have got that far before SIGTERM
        assert (tmp_path / "run.log").read_text().count('"event": "runtime.heap_settled"') >= 2
    finally:
        _kill_all(supervisor)
        await agency.stop()


def _kill_all(supervisor: subprocess.Popen[bytes]) -> None:
    """What a failed test left running; the children first, so that none is left draining."""
    if supervisor.poll() is None:
        for pid in child_pids(supervisor.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        supervisor.kill()
        supervisor.wait(10)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _until_exit(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`nswgw` with ``args``, to its exit (expected well within a minute), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_configuration_error_in_the_children_stops_the_supervisor_with_exit_2(tmp_path: Path) -> None:
    args = ["run", "--certs", str(tmp_path / "missing"), "--data", str(tmp_path), "--port", str(free_port())]
    done = _until_exit([*args, "--processes", "2"])
    assert done.returncode == 2
    # The first child to fail stops the other, which may not have got as far as saying why; a restarted
    # child would say it a third time.
    assert 1 <= done.stderr.count("trust directory not found") <= 2
    assert "supervisor.child_config_error" in done.stderr


def test_a_child_that_cannot_bind_its_metrics_port_stops_the_supervisor_with_exit_2(
    pki_dir: Path, tmp_path: Path
) -> None:
    """Child 1 serves /metrics on base + 1; with that port taken, restarting it could only fail again."""
    base = free_ports_in_a_row(2)
    args = ["run", "--certs", pki_dir, "--data", tmp_path / "var", "--port", free_port(), "--metrics-port", base]
    with socket.create_server(("127.0.0.1", base + 1)):  # somebody else's listener
        done = _until_exit([*map(str, args), "--processes", "2"])
    assert done.returncode == 2
    assert f"cannot listen for metrics on 127.0.0.1:{base + 1}" in done.stderr
    assert "address already in use" in done.stderr
    assert "supervisor.child_config_error" in done.stderr
    assert "supervisor.child_died" not in done.stderr  # stopped, not restarted


def test_a_taken_ingress_port_is_a_configuration_error(pki_dir: Path, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = _until_exit(["serve", "--certs", str(pki_dir), "--data", str(tmp_path), "--port", str(port)])
    assert done.returncode == 2
    assert f"configuration error: cannot listen for ingress on 127.0.0.1:{port}" in done.stderr


async def test_every_scrape_of_two_processes_counts_both_and_a_restart_loses_no_count(
    pki_dir: Path, tmp_path: Path, signed: Callable[..., bytes]
) -> None:
    agency = await Agency("moit").start()
    port, metrics_port = free_port(), free_ports_in_a_row(2)  # child I also serves /metrics on metrics_port + I
    routing = write_routing(tmp_path / "routing.yaml", {"moit": agency})
    data = tmp_path / "var"
    args = ["run", "--certs", pki_dir, "--data", data, "--routing", routing, "--port", port]
    supervisor = _spawn([*map(str, [*args, "--metrics-port", metrics_port]), "--processes", "2"], tmp_path / "run.log")
    url = f"http://127.0.0.1:{port}/v1/messages"
    try:
        first = await _two_children_ready(supervisor.pid, url)
        shared = _metrics_dirs(data)
        assert len(shared) == 1
        assert {_environ(pid).get(MULTIPROC_ENV) for pid in first} == {str(shared[0])}

        assert await _post_all(url, [signed("licence.import") for _ in range(12)]) == [202] * 12
        assert await _accepted_everywhere(port, metrics_port, first) == {12.0}

        killed, survivor = first
        os.kill(killed, signal.SIGKILL)
        # the survivor, before or after the replacement: never less than what was accepted
        assert await _accepted(metrics_port + _child_index(survivor)) == 12
        await _until(
            lambda: len(kids := child_pids(supervisor.pid)) == 2 and killed not in kids and all(map(_is_child, kids)),
            "replaced",
        )
        replacement = (set(child_pids(supervisor.pid)) - {survivor}).pop()
        replacement_port = metrics_port + _child_index(replacement)
        await until_ok(f"http://127.0.0.1:{replacement_port}/livez")
        assert await _accepted(replacement_port) == 12

        assert await _post_all(url, [signed("licence.import") for _ in range(8)]) == [202] * 8
        assert await _accepted_everywhere(port, metrics_port, child_pids(supervisor.pid)) == {20.0}

        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.wait, 60) == 0
        assert _metrics_dirs(data) == []  # removed with the supervisor
    finally:
        _kill_all(supervisor)
        await agency.stop()


def _metrics_dirs(data: Path) -> list[Path]:
    root = data / METRICS_SUBDIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


async def _accepted(port: int) -> float | None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200, response.text
    return value(parse_metrics(response.text), "nsw_messages_accepted_total")


async def _two_children_ready(supervisor: int, url: str) -> list[int]:
    """Both children exec'd, and the gateway answering /readyz; their pids, oldest first."""
    await _until(lambda: len(kids := child_pids(supervisor)) == 2 and all(map(_is_child, kids)), "two children started")
    await until_ok(url.replace("/v1/messages", "/readyz"))
    return child_pids(supervisor)


def _argv(pid: int) -> list[str]:
    with contextlib.suppress(OSError):  # it may be gone already
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return []


def _is_child(pid: int) -> bool:
    """A forked child shows the supervisor's argv until it has exec'd its own (with ``--child I``)."""
    return "--child" in _argv(pid)


def _child_index(pid: int) -> int:
    argv = _argv(pid)
    return int(argv[argv.index("--child") + 1])


async def _accepted_everywhere(port: int, metrics_port: int, children: list[int]) -> set[float | None]:
    """``nsw_messages_accepted_total`` as every child answers it: on the shared port (new connections
    until each child has answered at least once; a replacement may still be starting its listener) and
    on each child's own metrics port."""
    seen: set[float | None] = set()
    answered: set[int] = set()
    async with asyncio.timeout(WAIT):
        while answered != set(children):  # the kernel spreads new connections by their source port
            pid, accepted = await asyncio.to_thread(_scrape_shared_port, port, children)
            answered.add(pid)
            seen.add(accepted)
    for pid in children:
        seen.add(await _accepted(metrics_port + _child_index(pid)))
    return seen


def _scrape_shared_port(port: int, children: list[int]) -> tuple[int, float | None]:
    """GET /metrics on a new connection: which child answered it, and its ``nsw_messages_accepted_total``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode()
        assert response.status == 200, text
        # still open (keep-alive): the child holding the server end of this connection is the one that answered
        client_port = connection.sock.getsockname()[1]
        return _socket_owner(port, client_port, children), value(parse_metrics(text), "nsw_messages_accepted_total")
    finally:
        connection.close()


def _socket_owner(server_port: int, client_port: int, pids: list[int]) -> int:
    inode = next(
        fields[9]
        for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
        if int(fields[1].rsplit(":", 1)[1], 16) == server_port and int(fields[2].rsplit(":", 1)[1], 16) == client_port
    )
    link = f"socket:[{inode}]"
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == link:
                    return pid
    raise AssertionError(f"no child holds the connection from port {client_port}")


def test_each_supervisor_gets_a_fresh_metrics_dir_and_a_dead_ones_is_swept(tmp_path: Path) -> None:
    running = MetricsDir(tmp_path)
    held = running.claim()
    leftover = tmp_path / METRICS_SUBDIR / "4242-killed"  # a SIGKILLed supervisor's: nobody holds its lock
    leftover.mkdir()
    (leftover / "counter_4243.db").write_bytes(b"old counts")

    starting = MetricsDir(tmp_path)
    mine = starting.claim()
    assert mine != held
    assert list(mine.glob("*.db")) == []
    assert not leftover.exists()
    assert held.is_dir()  # a running supervisor's is left alone

    running.release()
    starting.release()
    assert not held.exists()
    assert not mine.exists()
