"""The measuring half of run-time adaptation: what `engine.adapt.decide` is fed, and when.

Every `INTERVAL_S` the scheduler hands its counters to `Pace.tick`, which measures the
node's warming rate (the sum over the local ranks' slots of the `RankBoard`, so that all
ranks judge a trial by the same figure and take the same step; this rank's own bytes when
it has no board), how far this rank's loader is behind the warmed frontier, and how busy
the node's CPU was (``/proc/stat``), and lets the pure controller choose the next setting.
"""

from __future__ import annotations

import logging
import os
import time

from engine import adapt
from engine.cursor import RankBoard
from engine.procstat import cpu_times

__all__ = ["INTERVAL_S", "Pace", "interval_for"]

log = logging.getLogger(__name__)

#: Seconds between two decisions at least: long enough for a few large reads to complete.
INTERVAL_S = 0.5
#: ... at most, however slow each read is.
MAX_INTERVAL_S = 3.0
#: Reads of each stream an interval should see complete: with fewer, the rate it measures
#: jumps by whole reads (noise), and a stream added for a trial has not finished its
#: first read when the trial is judged.
READS_PER_INTERVAL = 3


def interval_for(streams: int, read_bytes: int, rate: float) -> float:
    """Seconds the next interval lasts: `READS_PER_INTERVAL` reads of each stream.

    Measured, not tuned: a read takes ``streams x read_bytes / rate`` at the node's rate.

    Example:
        >>> interval_for(8, 4 << 20, 1e9), round(interval_for(8, 4 << 20, 67e6), 2)
        (0.5, 1.5)
    """
    if rate <= 0:
        return INTERVAL_S
    per_read = streams * read_bytes / rate
    return min(MAX_INTERVAL_S, max(INTERVAL_S, READS_PER_INTERVAL * per_read))


class Pace:
    """Reads in flight and read size of one rank's prefetch, adapted while it runs.

    Args:
        max_streams: the most reads in flight it may choose.
        streams: reads in flight to start with.
        stripe_bytes: the plan's stripe size (reads never exceed it).
        world: local ranks (the node's frontier spans a stripe per rank).
        board: the local ranks' board, for the node's rate; None: this rank's own rate.
    """

    def __init__(
        self,
        max_streams: int,
        stripe_bytes: int,
        world: int,
        board: RankBoard | None,
        *,
        streams: int = 1,
    ) -> None:
        self.state = adapt.start(
            max_streams, stripe_bytes, streams=streams, span_bytes=stripe_bytes * world,
            busy_cpu=adapt.busy_threshold(os.cpu_count() or 1),
        )  # fmt: skip
        self._board = board
        self._world = world
        self._last_t = time.monotonic()
        self.interval_s = INTERVAL_S  # follows the time one read takes (`interval_for`)
        self._last_cpu = cpu_times()
        self._last_slots: tuple[int, ...] = board.warmed() if board is not None else ()
        self._last_own = 0
        self.history: list[tuple[float, int, int, str]] = []  # (t, streams, read, reason)
        self._t0 = self._last_t

    @property
    def setting(self) -> adapt.Setting:
        """What to run now."""
        return self.state.setting

    def due(self) -> bool:
        """Whether an interval has passed since the last decision."""
        return time.monotonic() - self._last_t >= self.interval_s

    def _node_warmed(self, own_warmed: int) -> int:
        if self._board is None:
            delta, self._last_own = own_warmed - self._last_own, own_warmed
            return delta
        self._board.publish_warmed(own_warmed)
        slots = self._board.warmed()
        last = self._last_slots or (0,) * len(slots)
        self._last_slots = slots
        return sum(max(0, new - old) for new, old in zip(slots, last, strict=False))

    def _node_busy(self) -> float | None:
        now, last = cpu_times(), self._last_cpu
        self._last_cpu = now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return (now[0] - last[0]) / (now[1] - last[1])

    def tick(self, own_warmed: int, lag_bytes: int | None) -> bool:
        """Measure the interval that just ended and decide; True when the setting changed.

        Args:
            own_warmed: bytes this rank has warmed since the prefetch started.
            lag_bytes: this rank's warmed frontier minus its loader's position (None: no
                loader reports a position).
        """
        now = time.monotonic()
        m = adapt.Measurement(
            seconds=now - self._last_t,
            warmed_bytes=self._node_warmed(own_warmed),
            lag_bytes=lag_bytes,
            node_busy=self._node_busy(),
        )
        self._last_t = now
        before = self.state.setting
        self.state = adapt.decide(self.state, m)
        after = self.state.setting
        # The rate is the node's when the ranks share a board: so are the streams.
        streams = before.streams * (self._world if self._board is not None else 1)
        self.interval_s = interval_for(streams, before.read_bytes, m.rate)
        if after != before:
            self.history.append(
                (now - self._t0, after.streams, after.read_bytes, self.state.reason)
            )
            log.debug(
                "adapt: %d streams x %d MiB (%s)", after.streams, after.read_bytes >> 20,
                self.state.reason,
            )  # fmt: skip
        return after != before

    def publish(self, own_warmed: int) -> None:
        """Put this rank's warmed bytes on the board between decisions."""
        if self._board is not None:
            self._board.publish_warmed(own_warmed)

    def summary(self) -> str:
        """The setting it converged to, how often it changed, and the last reason."""
        s = self.state.setting
        return (
            f"adaptive: {s.streams} stream{'s' if s.streams > 1 else ''} x "
            f"{s.read_bytes >> 20} MiB reads after {len(self.history)} change"
            f"{'s' if len(self.history) != 1 else ''} ({self.state.reason})"
        )
