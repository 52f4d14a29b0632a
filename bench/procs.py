"""Subprocesses for the bench: spawn, wait until they answer, peak RSS (VmHWM), kill. Never left running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
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
