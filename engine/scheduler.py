"""The scheduler of one prefetch: carries out the pure `engine.schedule.decide` until done.

`Preparation` (`engine.prepare`) settles a `Setup` (files, plan, tuning, window, trail,
pace); the `Prefetcher` (`engine.engine`) hands it to a `Scheduler`, which lives on the
event loop: it asks `decide`
what to submit, skip and drop, starts the reads on the `engine.warm` warmer and the drops
on the pool, counts their outcomes in the `Tally`, feeds the pace its measurements, and
waits until a read, a drop, the consumer or the clock changes something.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from engine.cursor import ConsumerCursor
from engine.errors import Failure
from engine.needs import ahead_limit
from engine.pace import INTERVAL_S, Pace
from engine.plan import Extent, ResolvedFile
from engine.pool import DaemonPool
from engine.report import Outcome, OutcomeKind, Tally
from engine.schedule import Consumer, Decision, Situation, TrailState, Wait, decide
from engine.tuning import Tuning
from engine.warm import Dropper, OpenFile, Warmer

__all__ = ["Scheduler", "Setup", "join_reads"]

#: How often a window held back by a slower rank looks at the other ranks' positions.
_BOARD_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Setup:
    """What a prefetch settled before its first read.

    Attributes:
        resolved: the checkpoint's files, in consumption order.
        extents: this rank's plan.
        files: the planned files by path, each counting its extents.
        starts: where each file starts on the checkpoint's axis.
        tuning: the stripe size and concurrency in effect.
        window: the window in bytes, or None.
        trail: the trail's first state, or None when nothing is dropped.
        pace: the run-time controller of reads in flight and read size (None: fixed
            ``tuning.concurrency`` extents in flight, each read whole).
        piece_bytes: the size the plan's stripes were cut into for `pace` (reads join
            neighbouring pieces up to the pace's read size).
        run_ends: where the runs of bytes the node needs end before the end of their
            file, per path: a read must not read ahead past the end of its run
            (`engine.needs`).
    """

    resolved: tuple[ResolvedFile, ...]
    extents: tuple[Extent, ...]
    files: dict[str, OpenFile]
    starts: dict[str, int]
    tuning: Tuning
    window: int | None
    trail: TrailState | None
    pace: Pace | None = None
    piece_bytes: int = 0
    run_ends: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


def join_reads(extents: Sequence[Extent], read_bytes: int) -> list[tuple[Extent, int]]:
    """Join neighbouring extents of one file into reads of at most `read_bytes` (0: none).

    Returns:
        ``(read, pieces)`` pairs in order: each read and how many extents it joins.

    Example:
        >>> ext = [Extent("f", i * 4, 4, i * 4) for i in range(3)] + [Extent("g", 0, 4, 12)]
        >>> [(e.path, e.offset, e.length, n) for e, n in join_reads(ext, 8)]
        [('f', 0, 8, 2), ('f', 8, 4, 1), ('g', 0, 4, 1)]
    """
    out: list[tuple[Extent, int]] = []
    for ext in extents:
        if out:
            last, n = out[-1]
            if (
                last.path == ext.path
                and last.offset + last.length == ext.offset
                and last.length + ext.length <= read_bytes
            ):
                out[-1] = (replace(last, length=last.length + ext.length), n + 1)
                continue
        out.append((ext, 1))
    return out


class Scheduler:
    """Carries out `engine.schedule.decide`'s decisions for one prefetch until all is done.

    Lives on the event loop: the decision and the bookkeeping run there, the reads and the
    drops on the pool. The cursor wakes it when the consumer moves; finished reads and
    drops wake it through their futures' callbacks.
    """

    def __init__(
        self,
        setup: Setup,
        warmer: Warmer,
        pool: DaemonPool,
        tally: Tally,
        cursor: ConsumerCursor | None,
        on_progress: Callable[[], None],
    ) -> None:
        self._setup = setup
        self._warmer = warmer
        self._pool = pool
        self._tally = tally
        self._cursor = cursor
        self._on_progress = on_progress
        self._dropper = Dropper(setup.resolved) if setup.trail is not None else None
        self._trail = setup.trail
        self._next = 0  # index of the first extent neither submitted nor skipped
        self._wake = asyncio.Event()
        self._frontier = 0  # end on the axis of the furthest extent this rank has warmed
        self._following = False  # the loader's moves wake the scheduler

    async def run(self) -> None:
        """Schedule until every extent is read or skipped and no drop runs.

        Cancelling it stops submission at once; reads already running finish on their
        daemon threads and are not waited for.
        """
        if self._cursor is not None:
            self._cursor.subscribe(self._wake, moves=False)
        try:
            await self._schedule()
        finally:
            await self._warmer.aclose()
            # A loader that finished has passed what was never submitted (the iterator
            # cancels at once when it ends, before another decision would skip it).
            passed = self._cursor is not None and self._cursor.finished
            for ext in self._setup.extents[self._next :]:  # never submitted: give back
                self._setup.files[ext.path].release()  # their references (closes fds)
                if passed:
                    self._tally.skipped += ext.length
            if self._cursor is not None:
                self._cursor.unsubscribe(self._wake)
            self._tally.notes.extend(f.note for f in self._setup.files.values() if f.note)

    async def _schedule(self) -> None:
        while True:
            self._adapt()
            decision = decide(self._setup.extents, self._situation())
            self._carry_out(decision)
            if decision.wait is Wait.NOTHING:
                return
            if self._follow_consumer(decision.wait in (Wait.CONSUMER, Wait.POLL)):
                continue  # the loader may have moved unheard since the decision: decide again
            self._wake.clear()
            timeout = _BOARD_POLL_S if decision.wait is Wait.POLL else None
            if self._setup.pace is not None:  # the next decision is due even if all is quiet
                timeout = min(timeout or INTERVAL_S, INTERVAL_S)
            if timeout is None:
                await self._wake.wait()
                continue
            # Other ranks and the clock wake nobody: a timer does. Not `asyncio.wait_for`,
            # which on Python 3.11 can swallow a cancellation that lands as it times out.
            timer = asyncio.get_running_loop().call_later(timeout, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

    def _follow_consumer(self, follow: bool) -> bool:
        """Be woken by the loader's moves only while the window waits for them: otherwise
        a read's completion comes first, and each tensor the loader took cost a wake.
        True when it has just begun to listen."""
        if self._cursor is None or follow == self._following:
            return False
        self._cursor.wake_on_moves(self._wake, follow)
        self._following = follow
        return follow

    def _adapt(self) -> None:
        """Feed the pace its measurements once an interval has passed."""
        pace = self._setup.pace
        if pace is None:
            return
        warmed = self._tally.warmed
        if not pace.due():
            pace.publish(warmed)
            return
        consumer = self._consumer()
        lag = None
        if consumer is not None and not consumer.finished:
            lag = self._frontier - consumer.position
        pace.tick(warmed, lag)

    def _concurrency(self) -> int:
        """Planned extents in flight at most: fixed, or the pace's reads in pieces."""
        pace, piece = self._setup.pace, self._setup.piece_bytes
        if pace is None:
            return self._setup.tuning.concurrency
        s = pace.setting
        return s.streams * max(1, s.read_bytes // piece) if piece else s.streams

    def _situation(self) -> Situation:
        return Situation(
            next=self._next,
            in_flight=self._tally.in_flight,
            concurrency=self._concurrency(),
            consumer=self._consumer(),
            window=self._setup.window,
            trail=self._trail,
        )

    def _consumer(self) -> Consumer | None:
        cursor = self._cursor
        if cursor is None:
            return None
        if cursor.finished:
            return Consumer(finished=True)
        starts = self._setup.starts
        # With a trail, the window and the drops follow the slowest local rank
        # (`RankBoard`), so that the bytes kept cached stay within about trail + window
        # even when the ranks drift apart.
        slowest = cursor.slowest(starts) if self._trail is not None else None
        return Consumer(cursor.position(starts), slowest=slowest)

    def _carry_out(self, decision: Decision) -> None:
        files = self._setup.files
        if decision.drop is not None:
            assert self._dropper is not None
            drop = self._pool.run(self._dropper.drop, *decision.drop)
            drop.add_done_callback(self._on_dropped)
        self._trail = decision.trail
        for ext in decision.skip:
            self._tally.skipped += ext.length
            files[ext.path].release()
        read_bytes = self._setup.pace.setting.read_bytes if self._setup.pace else 0
        ends = self._setup.run_ends
        for ext, pieces in join_reads(decision.submit, read_bytes):
            limit = ahead_limit(ends, ext.path, ext.offset + ext.length) if ends else 0
            future = self._warmer.start(files[ext.path], ext, pieces, ahead_limit=limit)
            self._tally.in_flight += pieces
            self._tally.reading += ext.length
            future.add_done_callback(functools.partial(self._on_done, ext, pieces))
        self._next = decision.next

    def _on_done(self, ext: Extent, pieces: int, future: asyncio.Future[Outcome]) -> None:
        self._tally.in_flight -= pieces
        self._frontier = max(self._frontier, ext.end)
        self._wake.set()
        if future.cancelled():  # abandoned: its bytes stay in `reading`, as unfinished
            return
        self._tally.reading -= ext.length
        exc = future.exception()
        if exc is not None:  # a bug in a backend: recorded, never raised
            message = f"{type(exc).__name__}: {exc}"
            failure = Failure(ext.path, ext.offset, ext.length, None, message)
            outcome = Outcome(OutcomeKind.FAILED, 0, failure)
        else:
            outcome = future.result()
        self._tally.add(ext, outcome)
        self._on_progress()

    def _on_dropped(self, future: asyncio.Future[int]) -> None:
        assert self._trail is not None
        self._trail = replace(self._trail, busy=False)
        if not future.cancelled() and future.exception() is None:
            self._tally.dropped += future.result()
        self._wake.set()
