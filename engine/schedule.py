"""The scheduler's decision, apart from its I/O: what to submit, skip and drop next.

`decide` is pure, like the planner: it takes the plan, where the scheduler stands in it
and where the consumer is, and returns what to do; it opens no file, starts no thread and
awaits nothing. The event loop (`engine.scheduler`) carries the decision out and calls
`decide` again whenever something changes (a read finished, the consumer moved, a drop
ended). Both sides speak in frozen dataclasses.

The rules, in the order `decide` applies them:

- **Drop**: with a trail, once the slowest local rank is a whole `TrailState.step` past
  what was dropped before, everything up to `TrailState.lag` behind it is dropped from
  the page cache (one drop at a time). Nothing is dropped while a rank's position is
  unknown (`Consumer.slowest` is None): that rank may still need everything.
- **Skip**: an extent that the consumer has already passed is not worth reading.
- **Hold**: with a window, an extent that ends more than the window (or its own length,
  if larger) ahead of the front, the slowest local rank, waits for the front to move.
- **Submit**: otherwise, in plan order, while fewer than `concurrency` are in flight.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine.plan import Extent

__all__ = ["Consumer", "Decision", "Situation", "TrailState", "Wait", "decide"]


@dataclass(frozen=True, slots=True)
class Consumer:
    """Where the loader is, on the axis of the checkpoint's files concatenated.

    Attributes:
        position: bytes this rank's loader has consumed.
        finished: the loader is done: every extent's turn has passed.
        slowest: the slowest local rank's position (this rank's own included), or None
            when some rank's position is unknown (then nothing is dropped, and the window
            follows this rank alone).
    """

    position: int = 0
    finished: bool = False
    slowest: int | None = None

    @property
    def front(self) -> int:
        """The position the window is measured from: the slowest rank's, where known."""
        return self.position if self.slowest is None else min(self.position, self.slowest)

    def passed(self, ext: Extent) -> bool:
        """Whether this rank's loader is already beyond `ext`."""
        return self.finished or ext.end <= self.position


@dataclass(frozen=True, slots=True)
class TrailState:
    """The trail: what lies more than `lag` bytes behind the slowest rank is dropped.

    Attributes:
        lag: how far behind the slowest rank the drops stay.
        step: the least that one drop covers (fewer, larger drops).
        done: drops were issued for the axis below this position.
        busy: a drop is running (the next waits for it).
    """

    lag: int
    step: int
    done: int = 0
    busy: bool = False

    def due(self, slowest: int) -> tuple[int, int] | None:
        """The axis range ``[lo, hi)`` to drop with the slowest rank at `slowest`, or None."""
        if self.busy or slowest - self.lag - self.done < self.step:
            return None
        return self.done, slowest - self.lag


class Wait(enum.Enum):
    """What the scheduler waits for after carrying out a decision."""

    EVENT = "event"  # a read or a drop wakes it (the consumer's moves need not)
    CONSUMER = "consumer"  # the window holds the next extent: the consumer's moves wake it
    POLL = "poll"  # another rank holds the window, and its moves wake nobody: look again soon
    NOTHING = "nothing"  # everything is decided and done: the prefetch is over


@dataclass(frozen=True, slots=True)
class Situation:
    """What the scheduler knows when it decides.

    Attributes:
        next: index in the plan of the first extent neither submitted nor skipped yet.
        in_flight: extents submitted and not finished.
        concurrency: the most extents in flight at once (>= 1).
        consumer: where the loader is; None when nobody reports it (nothing is skipped
            then, and a window is measured from the start).
        window: the most bytes warmed ahead of the front; None for no limit.
        trail: the trail's state; None when nothing is dropped.
    """

    next: int
    in_flight: int
    concurrency: int
    consumer: Consumer | None = None
    window: int | None = None
    trail: TrailState | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now.

    Attributes:
        submit: extents to read, in plan order.
        skip: extents the consumer has passed: counted as skipped, never read.
        drop: the axis range ``[lo, hi)`` to drop from the page cache, or None.
        next: the new index of the first undecided extent.
        trail: the trail's new state (busy while the drop runs), or None.
        wait: what to wait for before deciding again.
    """

    submit: tuple[Extent, ...]
    skip: tuple[Extent, ...]
    drop: tuple[int, int] | None
    next: int
    trail: TrailState | None
    wait: Wait


def _drop(s: Situation) -> tuple[tuple[int, int] | None, TrailState | None]:
    trail, consumer = s.trail, s.consumer
    if trail is None or consumer is None or consumer.finished or consumer.slowest is None:
        return None, trail
    due = trail.due(consumer.front)
    if due is None:
        return None, trail
    return due, replace(trail, done=due[1], busy=True)


def _beyond_window(ext: Extent, s: Situation) -> bool:
    if s.window is None:
        return False
    front = s.consumer.front if s.consumer is not None else 0
    return ext.end > front + max(s.window, ext.length)


def decide(plan: Sequence[Extent], s: Situation) -> Decision:
    """Decide what to submit, skip and drop next.

    Args:
        plan: this rank's extents in consumption order (`engine.plan.plan`).
        s: where the scheduler and the consumer stand.

    Returns:
        The `Decision`. Carried out, it keeps at most ``s.concurrency`` extents in flight,
        submits none beyond the window, skips only extents the consumer has passed, and
        drops only what lies a trail behind the slowest rank. Over a whole prefetch every
        extent of the plan is submitted or skipped exactly once.

    Example:
        >>> plan = [Extent("f", i * 10, 10, i * 10) for i in range(4)]
        >>> d = decide(plan, Situation(next=0, in_flight=0, concurrency=2,
        ...                            consumer=Consumer(position=15), window=20))
        >>> [e.offset for e in d.skip], [e.offset for e in d.submit], d.next, d.wait.value
        ([0], [10, 20], 3, 'event')
    """
    drop, trail = _drop(s)
    consumer = s.consumer
    skip: list[Extent] = []
    submit: list[Extent] = []
    i, in_flight, held, held_by_other = s.next, s.in_flight, False, False
    while i < len(plan) and in_flight < s.concurrency:
        ext = plan[i]
        if consumer is not None and consumer.passed(ext):
            skip.append(ext)
        elif _beyond_window(ext, s):
            held = True
            held_by_other = consumer is not None and consumer.front < consumer.position
            break
        else:
            submit.append(ext)
            in_flight += 1
        i += 1
    if i == len(plan) and in_flight == 0 and not (trail is not None and trail.busy):
        wait = Wait.NOTHING
    else:
        wait = Wait.POLL if held_by_other else Wait.CONSUMER if held else Wait.EVENT
    return Decision(tuple(submit), tuple(skip), drop, i, trail, wait)
