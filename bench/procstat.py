"""What a rank process measures about itself: peak anonymous memory, storage reads, CPU.

Peak RSS (``ru_maxrss``) counts the checkpoint pages safetensors maps, so the rank also
samples ``RssAnon`` (its own allocations) on a thread: the figure that shows a prefetch
holding buffers proportional to the checkpoint.
"""

from __future__ import annotations

import contextlib
import resource
import threading
from collections.abc import Sequence

__all__ = ["AnonSampler", "cpu_seconds", "io_read_bytes"]


def _status_kib(keys: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii", errors="replace") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


class AnonSampler:
    """Samples RssAnon every `interval` seconds on a daemon thread; keeps the peak."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.peak_kib = max(self.peak_kib, _status_kib(("RssAnon",)).get("RssAnon", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> AnonSampler:
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sampling; return the peak RssAnon in bytes."""
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._sample()
        return self.peak_kib * 1024


def io_read_bytes() -> int | None:
    """Bytes this process made the storage read so far (``/proc/self/io``), or None."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds() -> float:
    """User and system CPU seconds of this process (all its threads) so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime
