"""Subprocesses for the bench: spawn, wait until they answer, peak RSS (VmHWM), kill. Never left running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSW_")}
    env.update(extra or {})
    env.update({k[len("BENCHENV_") :]: v for k, v in env.items() if k.startswith("BENCHENV_")})
    env["PYTHONPATH"] = str(REPO)
    return env


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a live process has used so far, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / _TICK  # minus idle and iowait


def broker_pid() -> int | None:
    """The local RabbitMQ server (the Erlang VM, ``beam.smp``), if one runs on this machine."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
            except OSError:
                continue
    return None


class CpuMeter:
    """CPU seconds used between ``start`` and ``stop`` by each part of a measurement.

    ``gateway``: the gateway processes (live, read from /proc); ``broker``: the local RabbitMQ server;
    ``load generator``: the children this process reaped meanwhile (the loadgen is the only one);
    ``agency``: this process (the agency lives here; the bench itself mostly waits); ``machine``: every core.
    """

    def __init__(self, gateway_pids: Sequence[int], broker: int | None) -> None:
        self._pids = {"gateway": list(gateway_pids), "broker": [broker] if broker else []}
        self._start: dict[str, float] = {}
        self._wall = 0.0

    def _read(self) -> dict[str, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {name: sum(cpu_seconds(pid) or 0.0 for pid in pids) for name, pids in self._pids.items()}
        out["load generator"] = reaped.ru_utime + reaped.ru_stime
        out["agency"] = own.ru_utime + own.ru_stime
        out["machine"] = machine_busy_seconds()
        return out

    def start(self) -> None:
        self._start, self._wall = self._read(), time.perf_counter()

    def stop(self, messages: int) -> dict[str, Any]:
        """CPU ms per message for each part, and how many cores the machine kept busy meanwhile."""
        end, wall = self._read(), time.perf_counter() - self._wall
        used = {name: end[name] - self._start[name] for name in end}
        per = {name: 1000 * seconds / messages if messages else None for name, seconds in used.items()}
        return {"ms_per_message": per, "busy_cores": used["machine"] / wall if wall else None, "cpus": os.cpu_count()}


def vm_hwm_kb(pid: int) -> int | None:
    """Peak resident set size of a live process, from /proc (psutil is not installed)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Child:
    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        log = (log_dir / f"{name}.log").open("ab")
        self.popen = subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def peak_rss_kb(self) -> int | None:
        return vm_hwm_kb(self.pid)

    def wait_port(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode} (see its log)")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on {port} within {timeout}s")

    def children(self) -> list[int]:
        """Direct child processes (a supervisor's workers), oldest first."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return sorted(int(pid) for pid in text.split())

    def wait_children(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` children exist and each has opened a listening socket (lsof-free: /proc)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = self.children()
            if len(children) >= count and all(_listening(pid) for pid in children):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: {count} listening children not seen within {timeout}s")

    def kill(self) -> None:
        """SIGKILL the process and its children (a supervisor's children would only get SIGTERM)."""
        for pid in [*self.children(), self.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.popen.wait(timeout=30)


def _listening(pid: int) -> bool:
    """True once ``pid`` holds a TCP socket in LISTEN state (matched through its fd inodes)."""
    try:
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:  # the process, or one of its descriptors, went away meanwhile: not yet
        return False
    inodes = {target[len("socket:[") : -1] for target in targets if target.startswith("socket:[")}
    return any(line.split()[3] == "0A" and line.split()[9] in inodes for line in lines)


async def loadgen(
    urls: Sequence[str],
    messages: Path,
    out: Path,
    *,
    concurrency: int,
    duration: float,
    rate: float | None = None,
) -> dict[str, Any]:
    """Run the load generator as its own process and return its JSON result."""
    args = [sys.executable, "-m", "bench.loadgen", "--urls", ",".join(urls), "--messages", str(messages)]
    args += ["--concurrency", str(concurrency), "--duration", str(duration), "--out", str(out)]
    if rate is not None:
        args += ["--rate", str(rate)]
    process = await asyncio.create_subprocess_exec(*args, env=child_env(), cwd=REPO)
    try:
        async with asyncio.timeout(duration + 300):
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if code != 0:
        raise RuntimeError(f"the load generator exited with {code}")
    result: dict[str, Any] = json.loads(await asyncio.to_thread(out.read_text))
    return result
