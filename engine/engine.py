"""`prefetch_async()`: the asyncio prefetch that warms one rank's share of a checkpoint.

A `Prefetcher` runs in two steps: its `engine.prepare.Preparation` resolves the files,
tunes the stripe size and concurrency, plans, and sets up the window and the trail; its
`engine.scheduler.Scheduler` then asks the pure `engine.schedule.decide` what to submit,
skip and drop, carries that out with `engine.warm`, and waits until a read, a drop or the
consumer changes something. The event loop only decides and waits; every system call
(stat, open, residency check, read, drop) runs on a bounded pool of daemon threads
(`engine.pool`). Failures are recorded per file, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from engine.backends import Backend
from engine.cursor import ConsumerCursor
from engine.errors import Failure, InvalidOptionError
from engine.options import PrefetchOptions, takes_prefetch_options
from engine.plan import Regions, Strategy, check_rank_world
from engine.pool import DaemonPool
from engine.prepare import Preparation
from engine.reader_process import ReaderGone
from engine.report import PrefetchReport, Progress, Tally
from engine.scheduler import Scheduler, Setup
from engine.settle import Settled, is_auto
from engine.tuning import NODE_STREAMS, max_streams
from engine.warm import Warmer, warmer_for

__all__ = ["PrefetchReport", "Prefetcher", "Progress", "prefetch_async"]

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 0.1


class Prefetcher:
    """One rank's prefetch: set up (`engine.prepare`), then warm with bounded concurrency
    (`engine.scheduler`). Run it once.

    `prefetch_async` and `start_prefetch` are the public ways to use it; the handle keeps a
    reference to read progress from another thread.

    Args:
        files: the checkpoint's files.
        rank: this process's local rank.
        world: number of local ranks.
        options: validated options.
        cursor: the loader's position; None when nobody reports one.
        needs: the byte ranges this rank loads (`engine.plan.Regions`; a file not in it
            is loaded whole), gathered with the other local ranks' (`engine.needs`);
            None: everything, and nothing gathered.

    Raises:
        InvalidOptionError: rank or world out of range.
    """

    def __init__(
        self,
        files: Iterable[str | os.PathLike[str]],
        rank: int,
        world: int,
        options: PrefetchOptions,
        *,
        cursor: ConsumerCursor | None = None,
        needs: Regions | None = None,
    ) -> None:
        check_rank_world(rank, world)
        self.rank = rank
        self.world = world
        self.options = options
        self.cursor = cursor
        self.report: PrefetchReport | None = None
        self._tally = Tally()
        self._prep = Preparation(list(files), rank, world, options, self._tally, needs=needs)
        self._warmer: Warmer | None = None
        self._pool: DaemonPool | None = None
        self._progress_cb = options.progress
        self._last_progress = 0.0

    @property
    def backend(self) -> Backend:
        """The backend that reads (settled by the set-up; a fallback may replace it)."""
        return self._prep.backend

    @property
    def settled(self) -> Settled | None:
        """What the prefetch settled before its first read (None before `run` got there)."""
        return self._prep.settled

    # ----------------------------------------------------------------- progress
    def progress(self) -> Progress:
        """A snapshot of the counters (safe to call from any thread)."""
        return self._tally.snapshot()

    def _emit_progress(self, *, force: bool = False) -> None:
        cb = self._progress_cb
        if cb is None:
            return
        now = time.monotonic()
        if not force and now - self._last_progress < _PROGRESS_EVERY_S:
            return
        self._last_progress = now
        try:
            cb(self.progress())
        except Exception:
            log.exception("progress callback failed; no further progress will be reported")
            self._progress_cb = None

    # --------------------------------------------------------------------- run
    async def run(self) -> PrefetchReport:
        """Warm this rank's share; return the report (also kept in `self.report`).

        Cancelling the task stops submission at once; reads already running finish on
        their daemon threads and are not waited for. The report is stored before the
        cancellation propagates.
        """
        self._tally.start()
        concurrency = self.options.concurrency
        auto = is_auto(concurrency)
        top = max_streams(self.world) if auto else concurrency
        pool = self._pool = DaemonPool(max(top, NODE_STREAMS) if auto else top)
        loop_cpu0 = time.thread_time()
        cancelled = False
        try:
            setup = await self._prep.run(pool, cursor=self.cursor)
            self._log_setup(setup)
            await self._scheduler(setup, pool).run()
        except asyncio.CancelledError:
            cancelled = True
            raise
        except Exception as exc:  # a bug of ours: recorded and logged, never raised
            log.exception("prefetch stopped by an internal error")
            message = f"internal error: {type(exc).__name__}: {exc}"
            self._tally.failures.append(Failure("<prefetch>", 0, 0, None, message))
        finally:
            pool.shutdown()
            self._prep.release()
            self.report = self._make_report(pool, time.thread_time() - loop_cpu0, cancelled)
            if self._prep.pace is not None:
                pace = self._prep.pace.summary()
                log.info("prefetch rank %d/%d: %s", self.rank, self.world, pace)
            self._emit_progress(force=True)
        return self.report

    def join_workers(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the worker threads to end; True when they have.

        Call after `run` has returned: a worker blocked on a stalled server is abandoned.
        """
        pool = self._pool
        if pool is None:
            return True
        pool.shutdown(wait_s=timeout)
        return pool.alive() == 0

    def _log_setup(self, setup: Setup) -> None:
        """One line: what was planned and everything the prefetch settled (`Settled`)."""
        assert self.settled is not None
        log.info(
            "prefetch rank %d/%d: %d files, %d bytes planned, strategy=%s, %s",
            self.rank,
            self.world,
            len(setup.resolved),
            self._tally.total,
            Strategy(self.options.strategy).value,
            self.settled.line(),
        )

    def _scheduler(self, setup: Setup, pool: DaemonPool) -> Scheduler:
        threads = setup.tuning.max_concurrency or setup.tuning.concurrency
        try:
            warmer = warmer_for(self.backend, pool, self.options.skip_cached, threads=threads)
        except ReaderGone as exc:  # no process could be started (a pids limit, ...)
            log.warning("prefetch: %s; reading in this process instead", exc)
            self._prep.fall_back(str(exc))
            warmer = warmer_for(self.backend, pool, self.options.skip_cached)
        self._warmer = warmer
        return Scheduler(setup, warmer, pool, self._tally, self.cursor, self._emit_progress)

    def _make_report(self, pool: DaemonPool, loop_cpu_s: float, cancelled: bool) -> PrefetchReport:
        t, tuning, pace = self._tally, self._prep.tuning, self._prep.pace
        reader_cpu_s = self._warmer.cpu_s if self._warmer is not None else 0.0
        if pace is not None:
            concurrency, how = pace.setting.streams, pace.summary()
        else:
            concurrency = tuning.concurrency if tuning is not None else 0
            how = tuning.reason if tuning is not None else ""
        return PrefetchReport(
            rank=self.rank,
            world=self.world,
            strategy=Strategy(self.options.strategy).value,
            backend=self.backend.label,
            concurrency=concurrency,
            chunk_bytes=tuning.chunk_bytes if tuning is not None else 0,
            read_bytes=pace.setting.read_bytes if pace is not None else 0,
            tuning=how,
            adaptation=tuple(pace.history) if pace is not None else (),
            files=t.files,
            planned_bytes=t.total,
            failures=tuple(t.failures),
            notes=tuple(t.notes),
            elapsed_s=t.elapsed_s,
            cpu_s=pool.cpu_s + loop_cpu_s + reader_cpu_s,
            reader_cpu_s=reader_cpu_s,
            cancelled=cancelled,
            unfinished_bytes=t.reading,
            **t.byte_counts(),
        )


@takes_prefetch_options
async def prefetch_async(
    files: Sequence[str | os.PathLike[str]],
    rank: int = 0,
    world: int = 1,
    *,
    options: PrefetchOptions | None = None,
    consumer: ConsumerCursor | None = None,
    needs: Regions | None = None,
    **option_fields: Any,
) -> PrefetchReport:
    """Warm this rank's share of `files` into the page cache; return what was done.

    Every local rank calls this with the same files and its own `rank`; together they read
    each byte once. Bad files are recorded in the report's `failures`, never raised.

    Args:
        files: checkpoint files (the same list, in any order, on every rank).
        rank: this process's local rank, ``0 <= rank < world``.
        world: number of local ranks sharing the node's page cache.
        options: how to prefetch (`engine.PrefetchOptions`); None for the defaults.
        consumer: the loader's position; extents it has passed are skipped. A window
            needs one, advanced as the loader reads (or warming stops at the window).
        needs: the byte ranges ``[start, end)`` of each file that this rank loads (a file
            not in it: all of it), when the ranks load parts of the checkpoint (expert or
            pipeline parallelism). The local ranks publish theirs and plan the union,
            each run of bytes warmed by one of the ranks that need it (`engine.needs`).
            Every local rank must then pass one (``{}`` for everything). None: this rank
            loads everything and gathers nothing.
        **option_fields: fields of `engine.PrefetchOptions` (``strategy``, ``backend``,
            ``concurrency``, ``chunk_bytes``, ``skip_cached``, ``window_bytes``,
            ``order``, ``progress``), replacing those of `options`.

    Returns:
        A `PrefetchReport`. `cpu_s` counts the worker threads and this coroutine's thread
        while it ran (other work on the same thread is included).

    Raises:
        ValueError: an invalid option (before any thread starts), also a window without
            a consumer.
        TypeError: an unknown option.

    Example:
        >>> import asyncio
        >>> report = asyncio.run(prefetch_async(["/etc/hostname"]))
        >>> report.failures
        ()
    """
    opts = PrefetchOptions.from_keywords(options, **option_fields)
    prefetcher = Prefetcher(files, rank, world, opts, cursor=consumer, needs=needs)
    if opts.window_bytes is not None and consumer is None:
        # Nobody could advance a cursor made here: warming would stop at the window.
        raise InvalidOptionError(
            f"window_bytes={opts.window_bytes!r} needs a consumer: pass "
            "consumer=ConsumerCursor() and advance it as the loader reads "
            "(start_prefetch's handle does this)"
        )
    return await prefetcher.run()
