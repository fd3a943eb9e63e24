"""Process helpers for the bench's servers and clients: find, time, stop and reap them.

Everything reads ``/proc`` directly: the process trees here (sshd and its sessions, sshfs
and its ssh) are small, and a scan is cheaper and more exact than a tool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from engine.cursor import pid_alive
from engine.procstat import CLK_TCK, stat_fields

__all__ = [
    "cpu_seconds",
    "descendants",
    "pids_with_arg",
    "reap",
    "signal_all",
    "stop_processes",
    "tail",
    "wait_gone",
]

log = logging.getLogger(__name__)


def tail(path: Path, limit: int = 3000) -> str:
    """The last `limit` characters of a log file ("" when unreadable)."""
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root``, deepest first (from one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    order: list[int] = []

    def visit(pid: int) -> None:
        for child in children.get(pid, ()):
            visit(child)
            order.append(child)

    visit(root)
    return [p for p in order if pid_alive(p)]


def pids_with_arg(arg: str) -> list[int]:
    """Live processes with ``arg`` as one of their command-line arguments."""
    wanted = os.fsencode(arg)
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if wanted in args and pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime + reaped children's times of each process, in seconds."""
    ticks = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields is not None:
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs; return those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if pid_alive(p)]
    return left


def stop_processes(pids: list[int], what: str) -> list[int]:
    """SIGTERM, then SIGKILL what is left; deepest first so parents reap their children.

    Returns:
        The processes that survived SIGKILL (none, unless one sleeps uninterruptibly).
    """
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        left = [p for p in pids if pid_alive(p)]
        if not left:
            return []
        signal_all(left, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        signal_all(left, sig)
        left = wait_gone(left, grace)
        if not left:
            return []
        log.log(
            logging.INFO if sig == signal.SIGTERM else logging.WARNING,
            "%s: %s still running after %s",
            what,
            left,
            sig.name,
        )
    return left


def reap(proc: subprocess.Popen[Any] | None, timeout: float = 5.0) -> None:
    if proc is None:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
