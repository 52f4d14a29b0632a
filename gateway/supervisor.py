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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

import structlog

log = structlog.get_logger("nsw.supervisor")

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 30.0
STEADY_SECONDS = 60.0  # a child that lived this long is "healthy": its restart pause starts over
MAX_PAUSE_SECONDS = 30.0
EXIT_USAGE = 2  # what `nswgw` exits with on a configuration error (gateway/cli.py)


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


@dataclass
class _Slot:
    index: int
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    pause: float = 0.0
    restart_at: float = 0.0
    restarts: int = field(default=0)

    def start(self) -> None:
        command = [sys.executable, "-m", "gateway", *self.argv]
        # preexec_fn is unsafe only with threads running; the supervisor is single-threaded
        self.process = subprocess.Popen(command, preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.started = time.monotonic()
        log.info("supervisor.child_started", child=self.index, pid=self.process.pid, restarts=self.restarts)


class Supervisor:
    def __init__(self, argv: Sequence[str], processes: int) -> None:
        if processes < 2:
            raise ValueError("a supervisor is for two processes or more")
        self.slots = [_Slot(i, child_argv(argv, i)) for i in range(processes)]
        self._stopping = False
        self._failed = 0
        self._pending: list[int] = []

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._pending.append(signum)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        for slot in self.slots:
            slot.start()
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
                    slot.start()
                continue
            code = slot.process.poll()
            if code is None:
                continue
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
