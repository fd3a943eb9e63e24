"""Counting the descriptors a test's own files hold (not the platform's)."""

from __future__ import annotations

import os


def fds_under(*roots: str | os.PathLike[str], pid: int | str = "self") -> int:
    """Descriptors of this process (or `pid`) open on files under `roots` (files or
    directories).

    Counting the whole of /proc/self/fd measures the event loop's implementation (an
    io_uring ring, eventfds, pipes) and what earlier tests left open; counting the
    descriptors on the test's own files measures what the engine holds.
    """
    prefixes = [os.path.realpath(r) for r in roots]
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed since the listing
            continue
        if any(target == p or target.startswith(p.rstrip("/") + "/") for p in prefixes):
            n += 1
    return n
