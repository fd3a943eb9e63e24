"""The measuring half of run-time adaptation: what `engine.adapt.decide` is fed, and when.

Every `INTERVAL_S` the scheduler hands its counters to `Pace.tick`, which measures the
node's warming rate (the sum over the local ranks' slots of the `RankBoard`; this rank's
own bytes when it has no board), how far this rank's loader is behind the warmed
frontier, and how busy the node's CPU was (``/proc/stat``), and lets the pure controller
choose the next setting.

One rank decides for the node: the lowest local rank whose prefetch still runs (the
leader, `RankBoard.pace_leader`); the others take its setting as soon as it is on the
board. Ranks that each decided on the node's rate, on their own clocks, judged their
trials by rates that other ranks' trials moved: on the many-streams profile two ranks
doubled at 4 s and read the node's rate as a loss, while the other two doubled at 7.7 s.
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
#: Seconds without a completed read after which an interval is measured as it is (a stall).
STALL_S = 2 * MAX_INTERVAL_S
#: Reads of each stream an interval should see complete: with fewer, the rate it measures
#: jumps by whole reads (noise), and a stream added for a trial has not finished its
#: first read when the trial is judged.
READS_PER_INTERVAL = 2


def interval_for(streams: int, read_bytes: int, rate: float) -> float:
    """Seconds the next interval lasts: `READS_PER_INTERVAL` reads of each stream.

    Measured, not tuned: a read takes ``streams x read_bytes / rate`` at the node's rate.

    Example:
        >>> interval_for(8, 4 << 20, 1e9), round(interval_for(8, 4 << 20, 67e6), 2)
        (0.5, 1.0)
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
        board: the local ranks' board, for the node's rate and the leader's setting;
            None: this rank's own rate, and it decides alone.
        rank: this rank's local rank (on the board).
    """

    def __init__(
        self,
        max_streams: int,
        stripe_bytes: int,
        world: int,
        board: RankBoard | None,
        *,
        streams: int = 1,
        rank: int = 0,
    ) -> None:
        self.state = adapt.start(
            max_streams, stripe_bytes, streams=streams, span_bytes=stripe_bytes * world,
            busy_cpu=adapt.busy_threshold(os.cpu_count() or 1),
        )  # fmt: skip
        self._board = board
        self._world = world
        self._last_t = time.monotonic()
        self.interval_s = INTERVAL_S  # follows the time one read takes (`interval_for`)
        self._trial_cap = 0.0  # the interval of the setting a trial started from
        self._last_cpu = cpu_times()
        # What the last measurement counted: each rank's warmed bytes, and when the latest
        # read it counted completed (an interval runs from completion to completion).
        self._last_slots: tuple[int, ...] = board.warmed() if board is not None else ()
        self._mark_ns = time.monotonic_ns()
        self._own = 0  # this rank's warmed bytes, and when they last grew
        self._own_ns = self._mark_ns
        self.history: list[tuple[float, int, int, str]] = []  # (t, streams, read, reason)
        self._t0 = self._last_t
        self._rank = rank
        self.leader = rank  # the rank whose decisions this one runs (itself: it decides)
        if board is not None:
            board.publish_streams(self.state.setting.streams)

    @property
    def setting(self) -> adapt.Setting:
        """What to run now."""
        return self.state.setting

    def due(self) -> bool:
        """Whether an interval has passed since the last decision."""
        return time.monotonic() - self._last_t >= self.interval_s

    def _note(self, own_warmed: int) -> None:
        """Record this rank's warmed bytes (called as reads complete) and put them on the
        board with the time they last grew."""
        if own_warmed != self._own:
            self._own, self._own_ns = own_warmed, time.monotonic_ns()
        if self._board is not None:
            self._board.publish_warmed(self._own, self._own_ns)

    def _node_progress(self) -> tuple[int, int, tuple[int, ...]]:
        """(bytes the node warmed since the last measurement, when the latest of them
        completed in ns (the last measurement's end when none did), each rank's bytes)."""
        board = self._board
        done = [(self._own, self._own_ns)] if board is None else list(board.warmed_at())
        last = self._last_slots or (0,) * len(done)
        grew = [(new - old, at) for (new, at), old in zip(done, last, strict=False) if new > old]
        end = max([at for _, at in grew], default=self._mark_ns)
        return sum(d for d, _ in grew), max(end, self._mark_ns), tuple(b for b, _ in done)

    def _node_busy(self) -> float | None:
        now, last = cpu_times(), self._last_cpu
        self._last_cpu = now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return (now[0] - last[0]) / (now[1] - last[1])

    def tick(self, own_warmed: int, lag_bytes: int | None) -> bool:
        """Measure the interval that just ended and decide; True when the setting changed
        (False too while the leader waits for the interval's reads to complete).

        Args:
            own_warmed: bytes this rank has warmed since the prefetch started.
            lag_bytes: this rank's warmed frontier minus its loader's position (None: no
                loader reports a position).
        """
        now = time.monotonic()
        self._note(own_warmed)
        leads = not self._follow()
        stalled = now - self._last_t >= STALL_S
        warmed, end, slots = self._node_progress()
        # The rate is measured from the completion that ended the last interval to the
        # latest one: reads that start together complete in waves, and the reads completed
        # up to an arbitrary moment swung by whole waves (-40% measured on a trial that,
        # held fixed, loads twice as fast). So the interval waits for its reads to complete
        # (`due` stays true: this runs again as they do), unless none has for long.
        if leads and not stalled and (end - self._mark_ns) / 1e9 < self.interval_s / 2:
            return False
        start_ns = self._mark_ns
        self._last_slots, self._mark_ns = slots, end
        # A stall is measured over the whole wait.
        seconds = (time.monotonic_ns() - start_ns) / 1e9 if stalled else (end - start_ns) / 1e9
        m = adapt.Measurement(
            seconds=seconds, warmed_bytes=warmed, lag_bytes=lag_bytes,
            node_busy=self._node_busy(),
        )  # fmt: skip
        self._last_t = now
        before = self.state.setting
        if leads:
            self.state = adapt.decide(self.state, m)
            self._changed(before)
            if self._board is not None:
                self._board.publish_streams(self.state.setting.streams)
        # The rate is the node's when the ranks share a board: so are the streams.
        streams = before.streams * (self._world if self._board is not None else 1)
        self.interval_s = interval_for(streams, before.read_bytes, m.rate)
        if self.state.warming:  # a trial's warm-up lasts until its new streams' first reads
            self._trial_cap = self.interval_s
            self.interval_s = max(INTERVAL_S, self.interval_s / READS_PER_INTERVAL)
        elif self.state.trial_from is not None and self._trial_cap:
            # A trial is judged over its base setting's interval at most. Where the storage
            # is full, more streams make each read slower, and an interval of two reads of
            # each stream grew with them: on sshfs a doubling that did not pay ran 4 s at 16
            # reads per node, which cost twice the CPU per byte of 4. A trial that pays keeps
            # the reads' time, and so the interval.
            self.interval_s = min(self.interval_s, self._trial_cap)
        return self.state.setting != before

    def publish(self, own_warmed: int) -> None:
        """Put this rank's warmed bytes on the board between decisions, and take the
        leader's setting as soon as it changes."""
        self._note(own_warmed)
        if self._board is not None:
            self._follow()

    def stop(self) -> None:
        """This rank's prefetch has ended: the next local rank decides for the node."""
        if self._board is not None:
            self._board.stop_pacing()

    def _follow(self) -> bool:
        """Take the leader's setting when another rank leads; True when one does."""
        if self._board is None:
            return False
        found = self._board.pace_leader()
        self.leader = self._rank if found is None else found[0]
        if self.leader == self._rank:
            return False
        assert found is not None
        before = self.state.setting
        if found[1] != before.streams:
            self.state = adapt.adopt(self.state, found[1], f"rank {self.leader}'s setting")
            self._changed(before)
            # on the board as this rank's own: where it starts if it comes to decide
            self._board.publish_streams(self.state.setting.streams)
        return True

    def _changed(self, before: adapt.Setting) -> None:
        after = self.state.setting
        if after == before:
            return
        self.history.append(
            (time.monotonic() - self._t0, after.streams, after.read_bytes, self.state.reason)
        )
        log.debug(
            "adapt: %d streams x %d MiB (%s)", after.streams, after.read_bytes >> 20,
            self.state.reason,
        )  # fmt: skip

    def summary(self) -> str:
        """The setting it converged to, how often it changed, and the last reason."""
        s = self.state.setting
        return (
            f"adaptive: {s.streams} stream{'s' if s.streams > 1 else ''} x "
            f"{s.read_bytes >> 20} MiB reads after {len(self.history)} change"
            f"{'s' if len(self.history) != 1 else ''} ({self.state.reason})"
        )
