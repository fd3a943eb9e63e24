"""Run-time adaptation of a prefetch: how many reads to keep in flight, and how large.

No fixed setting is right for every filesystem client. A latency-bound link (NFS over a
long round trip, a throttled object-store mount) needs many reads in flight to fill it; a
client that costs the node CPU (sshfs: encryption and FUSE round trips in user space)
loses when extra streams compete with the ranks that parse and copy tensors; a loader
that is behind the warmed frontier gains nothing from more streams at all. So the
controller measures while the prefetch runs and climbs only while climbing pays:

- it starts where the engine tells it (the engine passes its former fixed default);
- when the loader waits at the frontier (or nobody consumes yet) and the node's CPU has
  room, it tries more streams (after an interval measured at the current setting: one
  in slow start, `MIN_STEADY` for smaller steps, which need the rate's noise; judged
  against the start-up interval, any trial would pass); the trial is judged on its
  second interval (in the first, its new streams were only starting their reads) and
  kept only when the node's warming rate rises by at least the *threshold*, otherwise it
  steps back and holds that ceiling a while (twice as long after each further trial in a
  row that did not pay, up to eight times: on a full link each trial costs the CPU of
  twice the reads in flight). Trials double the streams at first (slow
  start: storage that needs 32 or 128 reads in flight is reached in a few steps) while
  the rate grows about in proportion; a doubling that gains clearly less shows the knee
  (linear up to it: near ``streams x gain``), which is taken unless it is the trial's own
  count (then the storage did not fill below it, and slow start goes on), and from then
  on trials add a quarter (at least one) and the next follows at once while they pay.
  There is no ceiling of its own: it climbs as long as climbing pays, up to the bound
  the engine derives from the node's resources (`engine.tuning.stream_limit`);
- the threshold is `GAIN`, or twice the noise of the rate measured while the setting held
  still, whichever is larger, so that a noisy rate (a shared link, a busy VM) is not
  read as a gain and the streams do not creep up on noise;
- when the node's CPU is saturated (`busy_threshold`: less than a tenth of the cores, and
  less than one core, idle) it halves its streams (the prefetch must not slow the ranks
  it serves), but as a trial too: a busy CPU says that cores are short, not that the
  prefetch's streams are what takes them (a storage client or server on the same cores
  works per byte, however many streams ask). A shed is judged against the rate *before
  the first shed* of a run of them (the anchor), not the last: when the node's warming
  rate falls below the anchor by more than `GAIN`, the streams come back and stay a
  while, so sheds cannot compound (8 → 4 → 2 → 1, each just under `GAIN`) and all of
  them together cost at most `GAIN` of the rate. A shed that cost rate also shows that the
  busy CPU is not the prefetch's doing (a client or server working per byte): from then on
  a busy CPU sheds no more and does not stop trials of more streams;
- when more streams did not pay from a setting that nothing measured justified (the
  start), it tries half as many (a *thrift*): reads in flight beyond what fills the storage
  are not free (on the real sshfs client, 16 reads in flight per node cost 0.59-0.78
  CPU-s/GB, 4 cost 0.37-0.46, at the same rate). A thrift is kept while the node's rate
  stays within `THRIFT_LOSS` of the rate before the first thrift (the anchor, so that
  thrifts cannot compound), and the next halving follows at once; one that costs more
  is undone, and that count is then the one the measurements justify;
- when the loader is far behind the frontier it returns to the cheapest setting, since
  warming further ahead buys nothing.

Reads stay large: a stripe larger than `MIN_READ_BYTES` is split among the streams
(``stripe / streams``, at least that), so more streams read neighbouring pieces of the same
stripe. Smaller pieces cost more than they keep sequential: each reader thread's
read-ahead starts over at every piece (4 MiB pieces of 16 MiB network stripes: 8086
requests for 4 GiB on the many-streams profile instead of 5136, and 35.9 s instead of
19.3 s).

This module is pure: `decide` maps a state and one interval's measurements to the next
state. The engine measures and applies; tests feed numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = [
    "BUSY_CPU",
    "GAIN",
    "MIN_READ_BYTES",
    "NOISE_FACTOR",
    "THRIFT_LOSS",
    "Controller",
    "Measurement",
    "Setting",
    "adopt",
    "busy_threshold",
    "decide",
    "read_bytes_for",
    "start",
]

#: Relative gain of the node's warming rate that keeps a trial with one more stream.
GAIN = 0.10
#: Node CPU busy fraction (of all cores) at or above which the prefetch sheds streams, on a
#: node of 10 cores or fewer: the ranks that parse and copy tensors (and a client daemon
#: such as sshfs) need the cores. On more cores, the threshold is one core idle
#: (`busy_threshold`): 90% of 128 cores leaves 12 idle.
BUSY_CPU = 0.90
#: A trial must beat the steady rate's noise (the mean relative change between intervals
#: at one setting, the largest left out) this many times over, when that is more than `GAIN`.
NOISE_FACTOR = 2.0
#: Steady intervals measured at a setting before a trial is judged against their mean.
MIN_STEADY = 3
#: Steady intervals before a doubling in slow start.
SLOW_START_STEADY = 1
#: In slow start, a trial keeps doubling when the rate grew by at least this share of the
#: streams' growth (the storage is far from full).
LINEAR = 0.75
#: The most of the node's rate that fewer streams may cost and still be kept (a thrift):
#: half of `GAIN`, so that a count kept for thrift would not pay to double either.
THRIFT_LOSS = GAIN / 2
#: The smallest read the controller issues (a network stripe, 16 MiB, is read whole).
MIN_READ_BYTES = 16 << 20
#: Intervals a stream count that did not pay stays out of reach before it is tried again;
#: doubled for each further trial in a row that did not pay, up to `MAX_BACKOFF` times.
HOLD_INTERVALS = 8
#: The most doublings of `HOLD_INTERVALS`: storage that speeds up later is still found.
MAX_BACKOFF = 3
#: The loader is "far behind" when this many rounds of stripes per stream lie warmed ahead.
AHEAD_STRIPES = 4


@dataclass(frozen=True, slots=True)
class Setting:
    """Reads in flight and their size, for one rank.

    Attributes:
        streams: reads in flight.
        read_bytes: bytes per read.
    """

    streams: int
    read_bytes: int


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one interval of a prefetch measured.

    Attributes:
        seconds: length of the interval.
        warmed_bytes: bytes read into the page cache in the interval, by the whole node
            when the ranks share a board, else by this rank.
        lag_bytes: warmed frontier minus the loader's position on the plan's axis (how
            far ahead the prefetch is); None when no loader reports a position.
        node_busy: fraction of the node's CPU time that was busy in the interval (0-1);
            None when unknown.
    """

    seconds: float
    warmed_bytes: int
    lag_bytes: int | None = None
    node_busy: float | None = None

    @property
    def rate(self) -> float:
        """Warmed bytes per second."""
        return self.warmed_bytes / self.seconds if self.seconds > 0 else 0.0


def busy_threshold(cores: int) -> float:
    """The node CPU busy fraction at which streams are shed, for a node of `cores` cores.

    `BUSY_CPU` on small nodes; on large ones, one core left idle.

    Example:
        >>> busy_threshold(2), busy_threshold(10), busy_threshold(128)
        (0.9, 0.9, 0.9921875)
    """
    return max(BUSY_CPU, 1.0 - 1.0 / max(1, cores))


@dataclass(frozen=True, slots=True)
class Controller:
    """The controller's state between intervals (immutable; `decide` returns the next).

    Attributes:
        setting: what to run in the next interval.
        max_streams: the most streams this rank may use.
        stripe_bytes: the plan's stripe size (reads never exceed it).
        span_bytes: the axis one round of the node's stripes covers (stripe x local ranks):
            the loader is "far behind" when several such spans lie warmed ahead of it.
        base_rate: the rate measured at the last accepted setting (0: none yet).
        trial_from: the setting a trial started from (None: not trying).
        ceiling: stream counts at or above this are not tried (a trial that did not pay).
        shed_from: the setting a shed (fewer streams on a busy CPU) started from (None:
            not shedding).
        floor: stream counts below this are not shed to (a shed that cost rate).
        hold: intervals left before the ceiling and the floor lift.
        reason: why the current setting was chosen, in words.
        busy_cpu: the node CPU busy fraction that sheds (`busy_threshold`).
        steady: intervals measured at the current setting (its rate is their mean).
        changes: (sum, count, largest) of the relative changes of the rate between
            consecutive steady intervals over the whole prefetch (a link's noise lasts).
        last_rate: the rate of the previous steady interval (0: none).
        anchor_rate: the rate before the first shed of a run of sheds (0: none).
        storage_bound: a shed cost rate: the busy CPU is not the prefetch's doing (a
            client or server working per byte), so a busy CPU no longer sheds, and more
            streams are still tried (judged, as always, by the rate).
        doubling: trials double the streams (slow start) until one gains clearly less than
            in proportion, fails or a shed comes; then they add a quarter.
        warming: a trial's first interval, in which its new streams start their first
            reads: not judged.
        earned: a measurement justified the current stream count (a trial paid, a knee, a
            thrift or shed undone); False at the start, where a failed trial leads to a thrift.
        thrifting: the shed in progress (`shed_from`) is a thrift, not a busy CPU's.
        failed: trials in a row that did not pay: each doubles the hold of the next (on a
            full link every trial costs the CPU of twice the reads in flight, again and
            again on a long load).
    """

    setting: Setting
    max_streams: int
    stripe_bytes: int
    span_bytes: int
    base_rate: float = 0.0
    trial_from: Setting | None = None
    ceiling: int | None = None
    shed_from: Setting | None = None
    floor: int | None = None
    hold: int = 0
    reason: str = "start"
    busy_cpu: float = BUSY_CPU
    steady: int = 0
    changes: tuple[float, int, float] = (0.0, 0, 0.0)
    last_rate: float = 0.0
    anchor_rate: float = 0.0
    storage_bound: bool = False
    doubling: bool = True
    warming: bool = False
    earned: bool = False
    thrifting: bool = False
    failed: int = 0

    @property
    def threshold(self) -> float:
        """The relative gain a trial must show: `GAIN`, or more on a noisy rate."""
        return max(GAIN, NOISE_FACTOR * self.noise)

    @property
    def noise(self) -> float:
        """The rate's noise: the mean relative change between steady intervals, leaving
        out the largest one (0: unknown), so that one jump (the ramp of the first reads) is
        not taken for noise."""
        total, n, largest = self.changes
        if n == 0:
            return 0.0
        return (total - largest) / (n - 1) if n >= 2 else total


def read_bytes_for(streams: int, stripe_bytes: int) -> int:
    """The read size for `streams` reads in flight: the stripe split among them.

    Args:
        streams: reads in flight, >= 1.
        stripe_bytes: the plan's stripe size.

    Returns:
        ``stripe_bytes / streams`` rounded down to a MiB, within [MIN_READ_BYTES, stripe].

    Example:
        >>> read_bytes_for(1, 64 << 20) >> 20, read_bytes_for(4, 64 << 20) >> 20
        (64, 16)
        >>> read_bytes_for(64, 64 << 20) >> 20
        16
    """
    size = (stripe_bytes // max(1, streams)) >> 20 << 20
    return max(min(MIN_READ_BYTES, stripe_bytes), min(stripe_bytes, size))


def start(
    max_streams: int,
    stripe_bytes: int,
    *,
    streams: int = 1,
    span_bytes: int | None = None,
    busy_cpu: float = BUSY_CPU,
) -> Controller:
    """The controller's first state: `streams` reads in flight, the stripe split among them.

    Args:
        max_streams: the most reads in flight it may choose (>= 1).
        stripe_bytes: the plan's stripe size.
        streams: where to start (clipped to 1..max_streams).
        span_bytes: stripe x local ranks (None: one rank).
        busy_cpu: the node CPU busy fraction that sheds (`busy_threshold` of the cores).

    Returns:
        The initial `Controller`.

    Example:
        >>> start(8, 64 << 20).setting
        Setting(streams=1, read_bytes=67108864)
    """
    if max_streams < 1:
        raise ValueError("max_streams must be >= 1")
    span = stripe_bytes if span_bytes is None else span_bytes
    n = min(max(1, streams), max_streams)
    return Controller(
        Setting(n, read_bytes_for(n, stripe_bytes)), max_streams, stripe_bytes, span,
        reason=f"start at {n} stream{'s' if n > 1 else ''}", busy_cpu=busy_cpu, steady=-1,
    )  # fmt: skip


def _to(state: Controller, streams: int, reason: str, **changes: object) -> Controller:
    setting = Setting(streams, read_bytes_for(streams, state.stripe_bytes))
    changes.setdefault("steady", 0)
    changes.setdefault("last_rate", 0.0)
    changes.setdefault("warming", False)
    changes.setdefault("thrifting", False)
    return replace(state, setting=setting, reason=reason, **changes)  # type: ignore[arg-type]


def adopt(state: Controller, streams: int, reason: str) -> Controller:
    """The state of a rank that follows another rank's decisions for the node: that
    setting, nothing tried or shed, to be measured afresh if this rank decides later.

    Example:
        >>> adopt(start(8, 64 << 20), 4, "rank 0's setting").setting
        Setting(streams=4, read_bytes=16777216)
    """
    n = min(max(1, streams), state.max_streams)
    return _to(
        state, n, reason, trial_from=None, shed_from=None, base_rate=0.0, anchor_rate=0.0,
        earned=True,
    )  # fmt: skip


def _measured(state: Controller, rate: float) -> Controller:
    """One more steady interval at the current setting: its mean rate and the noise."""
    if state.steady < 0:  # the start-up interval: reads were only starting, not counted
        return replace(state, steady=0)
    changes = state.changes
    if state.last_rate > 0:  # a link's noise lasts: kept across settings
        change = abs(rate / state.last_rate - 1.0)
        total, n, largest = changes
        changes = (total + change, n + 1, max(largest, change))
    n = state.steady + 1
    old = state.base_rate
    base = rate if n == 1 or old <= 0 else old + (rate - old) / n
    return replace(state, steady=n, base_rate=base, changes=changes, last_rate=rate)


def _step_up(streams: int, doubling: bool) -> int:
    """The next stream count to try: twice as many in slow start, else a quarter more.

    Example:
        >>> _step_up(4, True), _step_up(4, False), _step_up(16, False)
        (8, 5, 20)
    """
    return 2 * streams if doubling else streams + max(1, streams // 4)


def _streams(n: int) -> str:
    return f"{n} stream{'s' if n > 1 else ''}"


def _pct(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.0f}%" if old > 0 else "n/a"


def decide(state: Controller, m: Measurement) -> Controller:
    """The next state after one interval's measurements.

    Args:
        state: the current state.
        m: what the interval measured at ``state.setting``.

    Returns:
        The next state; its ``setting`` is what to run next, its ``reason`` says why.

    Example:
        >>> s = start(4, 64 << 20)
        >>> s = decide(s, Measurement(1.0, 50 << 20, lag_bytes=0, node_busy=0.3))  # start-up
        >>> s.setting.streams, s.reason
        (1, 'start at 1 stream')
        >>> s = decide(s, Measurement(1.0, 100 << 20, lag_bytes=0, node_busy=0.3))
        >>> s.setting.streams, s.reason
        (2, 'loader waits at the frontier and the CPU has room: try 2 streams')
        >>> s = decide(s, Measurement(1.0, 101 << 20, lag_bytes=0, node_busy=0.3))  # warm-up
        >>> s = decide(s, Measurement(1.0, 102 << 20, lag_bytes=0, node_busy=0.3))
        >>> s.setting.streams, s.reason
        (1, '2 streams did not pay (+2%): back to 1')
    """
    streams = state.setting.streams
    hold = max(0, state.hold - 1)
    if hold == 0:
        state = replace(state, hold=0, ceiling=None, floor=None)
    else:
        state = replace(state, hold=hold)
    if m.seconds <= 0:
        return state
    if m.lag_bytes is not None and m.lag_bytes >= AHEAD_STRIPES * streams * state.span_bytes:
        if streams == 1:
            return _measured(
                replace(state, trial_from=None, shed_from=None, anchor_rate=0.0), m.rate
            )
        reason = "loader is far behind the frontier: back to 1 stream"
        return _to(
            state, 1, reason, trial_from=None, shed_from=None, base_rate=0.0, anchor_rate=0.0,
            earned=True, thrifting=False,
        )  # fmt: skip
    if state.shed_from is not None:
        return _judge_shed(state, m)
    busy = m.node_busy is not None and m.node_busy >= state.busy_cpu
    if busy and not state.storage_bound:
        return _shed(state, m)
    if state.trial_from is not None and state.warming:
        # The new streams spent this interval starting their first reads (on a slow stream
        # a read is a good part of an interval): the trial is judged by the next one.
        return replace(state, warming=False)
    if state.trial_from is not None:
        back = state.trial_from.streams
        gain = _pct(m.rate, state.base_rate)
        if m.rate < state.base_rate * (1 + state.threshold):
            hold = HOLD_INTERVALS << min(state.failed, MAX_BACKOFF)
            state = replace(state, failed=state.failed + 1)
            if not state.earned and back > 1 and not busy:
                fewer = max(1, back // 2)
                reason = f"{streams} streams did not pay ({gain}): try {_streams(fewer)}"
                return _to(
                    state, fewer, reason, trial_from=None, ceiling=streams, hold=hold,
                    doubling=False, shed_from=state.trial_from, thrifting=True,
                    anchor_rate=state.base_rate, base_rate=state.base_rate,
                )  # fmt: skip
            reason = f"{streams} streams did not pay ({gain}): back to {back}"
            return _to(
                state, back, reason, trial_from=None, ceiling=streams, hold=hold,
                doubling=False,
            )  # fmt: skip
        ratio = m.rate / state.base_rate if state.base_rate > 0 else float("inf")
        if state.doubling and ratio < 1 + LINEAR * (streams / back - 1):
            # Less than in proportion: the storage fills between `back` and `streams`.
            # Linear up to a knee puts the knee at back x ratio: the fewest streams that
            # reach the measured rate are that, rounded up (down would give some of it up).
            knee = min(streams, max(back + 1, math.ceil(back * ratio - 1e-9)))
            if knee < streams:
                reason = f"{streams} streams paid {gain}, less than in proportion: {knee}"
                return _to(
                    state, knee, reason, trial_from=None, doubling=False, anchor_rate=0.0,
                    earned=True, failed=0,
                )  # fmt: skip
            # A knee at the trial's own count is no knee (the storage did not fill below
            # it; the many-streams run stopped doubling at 4 of the 128 it needs on +74%):
            # slow start goes on from the rate measured twice.
        # It paid: the trial's interval measured the new setting; the next step is tried
        # at once, judged against it (a rate lifted by noise makes the next trial fail).
        state = replace(
            state, trial_from=None, reason=f"{streams} streams paid ({gain})", base_rate=m.rate,
            anchor_rate=0.0, steady=MIN_STEADY, last_rate=m.rate, earned=True, failed=0,
        )  # fmt: skip
    else:
        state = _measured(state, m.rate)
        # Measure at this setting before trying another: a doubling in slow start needs
        # only a rate to beat (it gains about twice as much when the storage is far from
        # full); a smaller step needs the rate's noise too.
        if state.steady < (SLOW_START_STEADY if state.doubling else MIN_STEADY):
            return state
    limit = (
        state.max_streams if state.ceiling is None else min(state.max_streams, state.ceiling - 1)
    )
    if streams < limit:
        up = min(limit, _step_up(streams, state.doubling))
        waits = "loader waits at the frontier" if m.lag_bytes is not None else "no loader yet"
        room = "the CPU is busy but fewer streams cost rate" if busy else "the CPU has room"
        reason = f"{waits} and {room}: try {up} streams"
        return _to(
            state, up, reason, trial_from=state.setting, base_rate=state.base_rate,
            steady=state.steady, last_rate=state.last_rate, warming=True,
        )  # fmt: skip
    return state


def _shed(state: Controller, m: Measurement) -> Controller:
    """The node's CPU is saturated: end a climbing trial, or try half the streams."""
    streams = state.setting.streams
    busy = f"node CPU {m.node_busy:.0%} busy"
    if state.trial_from is not None:
        back = state.trial_from.streams
        reason = f"{busy}: back to {_streams(back)}"
        return _to(
            state, back, reason, trial_from=None, base_rate=0.0, ceiling=streams,
            hold=HOLD_INTERVALS,
        )  # fmt: skip
    state = _measured(state, m.rate)
    if state.steady < 1:  # the start-up interval: measure before judging anything by it
        return state
    back = max(1, streams // 2, state.floor or 1)
    if back >= streams:
        return state
    # The rate of this busy interval, not the setting's mean: a CPU that turned busy (the
    # ranks began to parse) may have slowed warming already, and the shed must not be
    # blamed for that.
    anchor = state.anchor_rate or m.rate
    reason = f"{busy}: try {_streams(back)}"
    return _to(
        state, back, reason, shed_from=state.setting, base_rate=m.rate,
        anchor_rate=anchor, ceiling=streams, hold=HOLD_INTERVALS, doubling=False,
    )  # fmt: skip


def _judge_shed(state: Controller, m: Measurement) -> Controller:
    """Keep fewer streams unless the node's warming rate fell below the anchor by `GAIN`
    (`THRIFT_LOSS` for a thrift); a kept thrift halves again at once."""
    assert state.shed_from is not None
    streams, back = state.setting.streams, state.shed_from.streams
    anchor = state.anchor_rate or state.base_rate
    change = _pct(m.rate, anchor)
    thrift = state.thrifting
    first = "the first thrift" if thrift else "the first shed"
    if m.rate < anchor * (1 - (THRIFT_LOSS if thrift else GAIN)):
        reason = f"{_streams(streams)} cost rate ({change} since {first}): back to {back}"
        return _to(  # the anchor stays: a later shed is judged against it too
            state, back, reason, shed_from=None, base_rate=0.0, floor=back,
            ceiling=state.ceiling if thrift else None, hold=HOLD_INTERVALS,
            storage_bound=state.storage_bound or not thrift, earned=True,
        )  # fmt: skip
    if thrift and streams > 1:
        fewer = streams // 2
        reason = f"{_streams(streams)} kept ({change} since {first}): try {_streams(fewer)}"
        return _to(
            state, fewer, reason, shed_from=state.setting, thrifting=True, base_rate=m.rate,
            ceiling=streams, hold=HOLD_INTERVALS,
        )  # fmt: skip
    if thrift:
        reason = f"fewer streams hold the rate: {_streams(streams)} kept ({change})"
    else:
        reason = f"{state.reason.split(':')[0]}: {_streams(streams)} kept ({change})"
    kept = replace(
        state, shed_from=None, base_rate=0.0, steady=0, last_rate=0.0, reason=reason,
        storage_bound=False if not thrift else state.storage_bound, thrifting=False,
        earned=True,
        # a kept thrift measured that `back` streams gain nothing over these: tried again
        # only after the hold, like a trial that did not pay
        ceiling=min(state.ceiling or back, back) if thrift else state.ceiling,
    )  # fmt: skip
    return _measured(kept, m.rate)
