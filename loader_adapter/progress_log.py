"""Progress a serving user can read: one INFO line about every 10 s during a long load.

A load of several minutes otherwise shows one line when it starts and one when it ends.
`ProgressLog` runs a small daemon thread beside the load that, every `INTERVAL_S`, takes
the prefetch's frozen `engine.Progress` snapshot and logs one line (`progress_line`): the
bytes warmed of the planned share and the share's percentage, the warming rate over the
last interval, the time left at that rate, and the bytes found already cached. Only local
rank 0 logs, so a node writes one line per interval; the ranks' byte-balanced shares
advance together, so rank 0's share stands for the node's. A load that ends within the
first interval logs no progress line at all.

Example:
    >>> with ProgressLog(lambda: None, label="local rank 0 of 1"):  # doctest: +SKIP
    ...     load()
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping

from engine import Progress
from engine.units import format_bytes

__all__ = ["INTERVAL_ENV", "INTERVAL_S", "ProgressLog", "interval_from_env", "progress_line"]

log = logging.getLogger(__name__)

#: Seconds between two progress lines.
INTERVAL_S = 10.0
#: Environment variable that sets them (0 turns the lines off).
INTERVAL_ENV = "CKPT_PREFETCH_PROGRESS_S"


def interval_from_env(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between progress lines: ``$CKPT_PREFETCH_PROGRESS_S``, else `INTERVAL_S`.

    Args:
        environ: the environment to read; None for ``os.environ``.

    Returns:
        The interval; 0 when the lines are off.

    Raises:
        ValueError: the variable is not a number >= 0.

    Example:
        >>> interval_from_env({}), interval_from_env({"CKPT_PREFETCH_PROGRESS_S": "30"})
        (10.0, 30.0)
    """
    raw = (os.environ if environ is None else environ).get(INTERVAL_ENV, "").strip()
    if not raw:
        return INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(
            f"ckpt-prefetch: ${INTERVAL_ENV} must be a number of seconds >= 0 (0: no progress "
            f"lines), got {raw!r}"
        )
    return value


def _duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 120:
        return f"{whole} s"
    return f"{whole // 60} min {whole % 60:02d} s"


def progress_line(before: Progress | None, now: Progress, interval_s: float, label: str) -> str:
    """One progress line (pure: snapshots in, text out).

    Args:
        before: the snapshot of the previous line (None for the first line).
        now: the snapshot now.
        interval_s: seconds between the two snapshots (since the start for the first).
        label: whose share this is (``"local rank 0 of 8"``).

    Returns:
        The line.

    Example:
        >>> now = Progress(done_bytes=3 << 30, total_bytes=12 << 30, warmed_bytes=2 << 30,
        ...                cached_bytes=1 << 30, elapsed_s=10.0)
        >>> for part in progress_line(None, now, 10.0, "local rank 0 of 4").split(", "):
        ...     print(part)
        ckpt-prefetch: local rank 0 of 4: 3.00 GiB of 12.00 GiB warmed (25%)
        0.21 GB/s over the last 10 s
        ETA 45 s; 1.00 GiB found already cached
    """
    warmed_before = before.warmed_bytes if before is not None else 0
    rate = max(0, now.warmed_bytes - warmed_before) / interval_s if interval_s > 0 else 0.0
    left = max(0, now.total_bytes - now.done_bytes)
    eta = _duration(left / rate) if rate > 0 else "unknown (no bytes warmed in this interval)"
    line = (
        f"ckpt-prefetch: {label}: {format_bytes(now.done_bytes)} of "
        f"{format_bytes(now.total_bytes)} warmed ({100 * now.fraction:.0f}%), "
        f"{rate / 1e9:.2f} GB/s over the last {_duration(interval_s)}, ETA {eta}; "
        f"{format_bytes(now.cached_bytes)} found already cached"
    )
    if now.failed_bytes:
        line += f"; {format_bytes(now.failed_bytes)} could not be read (left to the loader)"
    return line


class ProgressLog:
    """Logs `progress_line` every `interval_s` from a daemon thread until stopped.

    Args:
        snapshot: returns the prefetch's progress now (None: no prefetch, nothing logged).
        label: whose share it is, for the line.
        interval_s: seconds between lines.
        enabled: False makes this a no-op (ranks other than local rank 0).

    Example:
        >>> with ProgressLog(lambda: None, label="x", interval_s=0.01):
        ...     pass
    """

    def __init__(
        self,
        snapshot: Callable[[], Progress | None],
        *,
        label: str,
        interval_s: float = INTERVAL_S,
        enabled: bool = True,
    ) -> None:
        self._snapshot = snapshot
        self._label = label
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._enabled = enabled and interval_s > 0
        #: Lines logged so far (for tests and the end line).
        self.lines = 0

    def start(self) -> ProgressLog:
        """Start the thread (once)."""
        if self._enabled and self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="ckpt-prefetch-progress", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and wait briefly for it (idempotent)."""
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None:
            t.join(timeout=2)

    def __enter__(self) -> ProgressLog:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        before: Progress | None = None
        while not self._stop.wait(self._interval_s):
            try:
                now = self._snapshot()
            except Exception as exc:  # a progress line is never worth a failed load
                log.debug("no progress snapshot: %r", exc)
                return
            if now is None or (before is not None and before.done_bytes >= before.total_bytes):
                continue
            interval = now.elapsed_s - before.elapsed_s if before is not None else now.elapsed_s
            log.info("%s", progress_line(before, now, interval or self._interval_s, self._label))
            self.lines += 1
            before = now
