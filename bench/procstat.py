"""What a rank process measures about itself: peak anonymous memory, storage reads, CPU.

Peak RSS (``ru_maxrss``) counts the checkpoint pages safetensors maps, so the rank also
samples ``RssAnon`` (its own allocations) on a thread: the figure that shows a prefetch
holding buffers proportional to the checkpoint.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import resource
import threading
import time
from collections.abc import Sequence

from engine.procstat import cpu_times

__all__ = ["AnonSampler", "NodeCPU", "cpu_seconds", "io_read_bytes"]


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


class NodeCPU:
    """The whole node's busy CPU seconds over a span, sampled from ``/proc/stat``.

    A process's own CPU time is not what the node spent on it: network receive work
    (softirqs) is charged to whichever task happens to run, so on the real sshfs client a
    reader process that makes many short syscalls was charged for a good part of the
    link's TCP processing (``perf``: 5.2 of its 6.8% of samples in ``handle_softirqs``).
    The node's busy time is the same whoever is charged; between configurations that
    read the same bytes through the same client, its difference is what one of them cost.

    Example:
        >>> with NodeCPU(interval=0.01) as node:
        ...     t0 = time.monotonic(); time.sleep(0.05); t1 = time.monotonic()
        >>> node.busy_s(t0, t1) >= 0.0
        True
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._samples: list[tuple[float, int]] = []  # (monotonic, busy ticks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-cpu", daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        now = cpu_times()
        if now is not None:
            self._samples.append((time.monotonic(), now[0]))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> NodeCPU:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._sample()

    def busy_s(self, t0: float, t1: float) -> float | None:
        """Busy CPU seconds of all cores from `t0` to `t1` (monotonic), widened to the
        samples around them (one interval at most on each side); None when unknown."""
        times = [t for t, _ in self._samples]
        i = max(0, bisect.bisect_right(times, t0) - 1)
        j = bisect.bisect_left(times, t1)
        if not self._samples or j >= len(self._samples) or times[i] > t0:
            return None
        return (self._samples[j][1] - self._samples[i][1]) / self._tick
