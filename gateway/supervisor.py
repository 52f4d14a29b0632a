"""``nswgw run|serve|worker --processes N``: N copies of the service sharing one port, one per core.

A Python process uses one core at a time, so a gateway on a multi-core host runs several. Each child
is the same command with ``--child I``: its listener sets SO_REUSEPORT and the kernel spreads incoming
connections across the children; every child also consumes deliveries. Nothing is shared in memory:
the broker (RabbitMQ, or the embedded SQLite broker, which is multi-process by design) and the ledger
coordinate them.

The supervisor only starts, watches and stops. A child that dies is started again (with a growing
pause if it keeps dying); one that exits with a configuration error (exit 2) stops them all, with 2.
A SIGKILLed child loses nothing: a 202 is sent only after the broker has confirmed the copies and the
ledger has committed the acceptance, its unfinished requests fail on the sender's side (who retries
with the same messageId), and its unacknowledged deliveries go back to the queue. SIGTERM/SIGINT/SIGHUP
are passed on to every child; on SIGTERM/SIGINT the supervisor waits for the children to finish their
drain, then exits. If the supervisor itself is killed, the kernel sends each child SIGTERM
(PR_SET_PDEATHSIG), so no orphan keeps the port.

Metrics are the one thing the children share through files: a scrape reaches one child, so they count
in prometheus_client's multiprocess mode in a directory of the supervisor's (``MetricsDir``), and each
child answers for all of them (gateway/metrics.py). A dead child's counters stay in their files, so the
totals never go backwards; its live gauges are dropped (``mark_process_dead``) before it is replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import structlog
from prometheus_client.multiprocess import mark_process_dead

log = structlog.get_logger("nsw.supervisor")

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 30.0
STEADY_SECONDS = 60.0  # a child that lived this long is "healthy": its restart pause starts over
MAX_PAUSE_SECONDS = 30.0
EXIT_USAGE = 2  # what `nswgw` exits with on a configuration error (gateway/cli.py)
# prometheus_client's switch, as gateway.metrics.MULTIPROC_ENV: importing that module (aiohttp and all)
# would double the supervisor's memory
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_SUBDIR = "metrics"
LOCK_NAME = ".lock"


def child_argv(argv: Sequence[str], index: int) -> list[str]:
    """``argv`` (without the program) with ``--processes`` removed and ``--child INDEX`` added."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--processes":
            skip = True
            continue
        if arg.startswith("--processes="):
            continue
        out.append(arg)
    return [*out, "--child", str(index)]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _try_lock(path: Path) -> IO[bytes] | None:
    """``path`` opened and exclusively flock-ed, or ``None`` if another open file holds the lock."""
    handle = path.open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _removal_failed(_function: object, path: str, exc_info: tuple[type[BaseException], BaseException, object]) -> None:
    # metrics files left behind only take disk space (the next start retries): never a reason to fail
    log.warning("supervisor.metrics_file_kept", path=path, error=str(exc_info[1]))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


class MetricsDir:
    """The children's ``PROMETHEUS_MULTIPROC_DIR``: ``<data>/metrics/<pid>-<random>``, new for every run.

    One per supervisor, not per data folder: a ``serve`` and a ``worker`` supervisor may share a data
    folder (the embedded broker), even with the same pid (pid 1 of two containers), and must not add up
    or wipe each other's counts. A fresh directory starts with no files, as the multiprocess mode
    requires. The supervisor holds a flock on ``<dir>/.lock`` while it runs: the next one to start
    removes every directory whose lock nobody holds (a SIGKILLed supervisor's leftovers), under
    ``<data>/metrics/.lock`` so that no sweep meets a directory still being created.
    """

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / METRICS_SUBDIR
        self.path: Path | None = None
        self._lock: IO[bytes] | None = None

    def claim(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / LOCK_NAME):
            for old in self.root.iterdir():
                if old.is_dir() and (stale := _try_lock(old / LOCK_NAME)) is not None:
                    with stale:
                        shutil.rmtree(old, onerror=_removal_failed)
                    log.info("supervisor.stale_metrics_dir", path=str(old))
            self.path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.root))
            self._lock = _try_lock(self.path / LOCK_NAME)
        return self.path

    def process_dead(self, pid: int) -> None:
        if self.path is not None:
            mark_process_dead(pid, str(self.path))  # type: ignore[no-untyped-call]

    def release(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, onerror=_removal_failed)
            self.path = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


@dataclass
class _Slot:
    index: int
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    pause: float = 0.0
    restart_at: float = 0.0
    restarts: int = field(default=0)

    def start(self, env: Mapping[str, str]) -> None:
        command = [sys.executable, "-m", "gateway", *self.argv]
        # preexec_fn is unsafe only with threads running; the supervisor is single-threaded
        self.process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.started = time.monotonic()
        log.info("supervisor.child_started", child=self.index, pid=self.process.pid, restarts=self.restarts)


class Supervisor:
    def __init__(self, argv: Sequence[str], processes: int, *, data_dir: Path) -> None:
        if processes < 2:
            raise ValueError("a supervisor is for two processes or more")
        self.slots = [_Slot(i, child_argv(argv, i)) for i in range(processes)]
        self.metrics = MetricsDir(data_dir)
        self._env: dict[str, str] = {}
        self._stopping = False
        self._failed = 0
        self._pending: list[int] = []

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._pending.append(signum)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        self._env = {**os.environ, MULTIPROC_ENV: str(self.metrics.claim())}
        try:
            return self._supervise()
        finally:
            self.metrics.release()

    def _supervise(self) -> int:
        for slot in self.slots:
            slot.start(self._env)
        while True:
            self._forward_signals()
            if self._stopping:
                return self._stop()
            self._watch()
            if self._stopping:  # a child's configuration error: stop the others too
                self._pending.append(signal.SIGTERM)
                continue
            time.sleep(POLL_SECONDS)

    def _forward_signals(self) -> None:
        while self._pending:
            signum = self._pending.pop(0)
            for slot in self.slots:
                if slot.process is not None and slot.process.poll() is None:
                    slot.process.send_signal(signum)
            if signum != signal.SIGHUP:
                self._stopping = True

    def _watch(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None:
                if now >= slot.restart_at:
                    slot.restarts += 1
                    slot.start(self._env)
                continue
            code = slot.process.poll()
            if code is None:
                continue
            self.metrics.process_dead(slot.process.pid)
            if code == EXIT_USAGE:  # a configuration error: every restart would fail the same way
                log.error("supervisor.child_config_error", child=slot.index)
                self._failed = EXIT_USAGE
                self._stopping = True
                slot.process = None
                continue
            lived = now - slot.started
            slot.pause = 0.0 if lived >= STEADY_SECONDS else min(MAX_PAUSE_SECONDS, max(0.5, slot.pause * 2))
            slot.restart_at = now + slot.pause
            slot.process = None
            log.error(
                "supervisor.child_died", child=slot.index, exit_code=code, lived_s=round(lived, 1), pause_s=slot.pause
            )

    def _stop(self) -> int:
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        worst = 0
        for slot in self.slots:
            if slot.process is None:
                continue
            try:
                code = slot.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("supervisor.child_kill", child=slot.index, pid=slot.process.pid, grace_s=STOP_GRACE_SECONDS)
                slot.process.kill()
                code = slot.process.wait()
            worst = max(worst, abs(code))
        log.info("supervisor.stopped", children=len(self.slots))
        if self._failed:
            return self._failed
        return 0 if worst in (0, signal.SIGTERM) else 1
