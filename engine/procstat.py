"""The kernel's figures for a process and for the node (``/proc``), read in one place.

The engine reads them to judge the node's CPU (`engine.pace`), a reader process's CPU
(`engine.reader_process`) and whether a rank is alive (`engine.cursor`); the bench reads
them for its CPU columns and process trees. Each returns None (or 0.0) where the figure
cannot be read: a process that is gone, or a ``/proc`` that is not there.

Example:
    >>> stat_fields(os.getpid())[0] in ("R", "S")
    True
    >>> process_cpu_s(os.getpid()) >= 0.0
    True
"""

from __future__ import annotations

import os

__all__ = ["CLK_TCK", "cpu_times", "process_cpu_s", "process_state", "stat_fields"]

#: Clock ticks per second of the CPU times in ``/proc``.
CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (the state is [0], utime
    [11], stime [12]); None when the process is gone.

    The command name is skipped by its last ``)``: it may hold spaces and parentheses.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    end = raw.rfind(b")")
    return raw[end + 2 :].decode("ascii", "replace").split() if end >= 0 else None


def process_state(pid: int) -> str | None:
    """The process's state letter (``R``, ``S``, ``T``, ``Z``, ...), or None when gone."""
    fields = stat_fields(pid)
    return fields[0] if fields else None


def process_cpu_s(pid: int) -> float:
    """CPU seconds the process (all its threads) has used; 0.0 when it is gone."""
    fields = stat_fields(pid)
    if fields is None or len(fields) < 13:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole node since boot, or None when unreadable.

    Example:
        >>> t = cpu_times()
        >>> t is None or 0 <= t[0] <= t[1]
        True
    """
    try:
        with open("/proc/stat", "rb") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    total = sum(fields)
    idle = fields[3] + fields[4]  # idle + iowait
    return total - idle, total
