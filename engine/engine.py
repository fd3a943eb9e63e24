"""`prefetch_async()`: the asyncio scheduler that warms one rank's share of a checkpoint.

A prefetch runs in named steps (`Prefetcher.run`): resolve the files, tune the stripe size
and concurrency, plan, set up the window and the trail, then schedule
(`engine.scheduler`): ask the pure `engine.schedule.decide` what to submit, skip and drop,
carry that out with `engine.warm`, and wait until a read, a drop or the consumer changes
something. The event
loop only decides and waits; every system call (stat, open, residency check, read, drop)
runs on a bounded pool of daemon threads (`engine.pool`). Failures are recorded per file,
never raised.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from engine.adapt import MIN_READ_BYTES
from engine.backends import ProcessBackend, SendfileBackend, resolve_backend
from engine.cursor import ConsumerCursor, RankBoard
from engine.errors import Failure, InvalidOptionError
from engine.memory import auto_window, trail_bytes
from engine.needs import (
    NodeNeeds,
    gather,
    needed_bytes,
    normalize,
    run_ends,
    union_bytes,
)
from engine.options import PrefetchOptions, takes_prefetch_options
from engine.pace import Pace
from engine.plan import (
    Extent,
    Regions,
    ResolvedFile,
    Strategy,
    check_rank_world,
    plan,
    resolve_files,
    split_extents,
)
from engine.pool import DaemonPool
from engine.reader_process import ReaderGone
from engine.report import PrefetchReport, Progress, Tally
from engine.schedule import TrailState
from engine.scheduler import Scheduler, Setup
from engine.settle import Choice, Settled, is_auto, settle_trail, settle_tuning
from engine.tuning import NODE_STREAMS, Tuning, auto_tuning, max_streams, stream_limit
from engine.warm import OpenFile, Warmer, warmer_for

__all__ = ["PrefetchReport", "Prefetcher", "Progress", "prefetch_async"]

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 0.1


def _files_and_starts(
    resolved: Sequence[ResolvedFile], extents: Sequence[Extent]
) -> tuple[dict[str, OpenFile], dict[str, int]]:
    """The planned files (each with its count of extents) and each file's start on the axis."""
    counts: dict[str, int] = {}
    for ext in extents:
        counts[ext.path] = counts.get(ext.path, 0) + 1
    files: dict[str, OpenFile] = {}
    starts: dict[str, int] = {}
    pos = 0
    for meta in resolved:
        starts[meta.path] = pos
        pos += meta.size
        if meta.path in counts:
            files[meta.path] = OpenFile(meta, counts[meta.path])
    return files, starts


class Prefetcher:
    """One rank's prefetch: plan, then warm with bounded concurrency. Run it once.

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
        self.files = list(files)
        self.needs = needs
        self._needs_slot: Any = None  # this rank's published needs, removed at the end
        self.rank = rank
        self.world = world
        self.options = options
        self.backend, self._backend_reason = resolve_backend(options.backend)
        self.cursor = cursor
        self.report: PrefetchReport | None = None
        self._tally = Tally()
        self._tuning: Tuning | None = None  # known once tuned
        self._pace: Pace | None = None  # run-time adaptation, when concurrency is "auto"
        #: What the prefetch settled before its first read (None before `run` got there).
        self.settled: Settled | None = None
        self._own_board: RankBoard | None = None  # a board no cursor finishes
        self._warmer: Warmer | None = None
        self._pool: DaemonPool | None = None
        self._progress_cb = options.progress
        self._last_progress = 0.0

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
            setup = await self._set_up(pool)
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
            if self._pace is not None:
                self._pace.stop()
            if self._own_board is not None:
                self._own_board.finish()
            if self._needs_slot is not None:
                self._needs_slot.remove()
            self.report = self._make_report(pool, time.thread_time() - loop_cpu0, cancelled)
            if self._pace is not None:
                log.info("prefetch rank %d/%d: %s", self.rank, self.world, self._pace.summary())
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

    async def _set_up(self, pool: DaemonPool) -> Setup:
        """Resolve, tune and plan; size the window and the trail; share the position."""
        resolved, failures = await pool.run(
            functools.partial(resolve_files, self.files, order=self.options.order)
        )
        for failure in failures:
            self._tally.record(failure)
        self._tally.files = len(resolved)
        tuning = self._tuning = await self._tune(pool, resolved)
        rank, world, node_needs = await self._node_needs(pool, resolved)
        extents = tuple(
            plan(
                resolved, rank, world, strategy=self.options.strategy,
                chunk_bytes=tuning.chunk_bytes, needs=node_needs,
            )
        )  # fmt: skip
        piece = 0
        if tuning.max_concurrency is not None and tuning.chunk_bytes > MIN_READ_BYTES:
            piece = MIN_READ_BYTES
            extents = tuple(split_extents(extents, piece))
        files, starts = _files_and_starts(resolved, extents)
        self._tally.total = sum(e.length for e in extents)
        window_choice = self._resolve_window(sum(m.size for m in resolved))
        window = self._tally.window = window_choice.value
        trail_choice = self._trail(window)
        lag = trail_choice.value
        trail = None if lag is None else TrailState(lag, step=max(tuning.chunk_bytes, lag // 4))
        self.settled = Settled(
            Choice(self.backend.name, self._backend_reason), tuning, window_choice, trail_choice
        )
        board = None
        if self.world > 1 and (trail is not None or tuning.max_concurrency is not None):
            board = await self._open_board(pool, resolved)
        if trail is not None and board is not None:
            self._share_position(board, starts)
        elif board is not None:
            self._own_board = board  # only for the node's rate: finished with the prefetch
        pace = None
        if tuning.max_concurrency is not None:
            pace = self._pace = Pace(
                tuning.max_concurrency, tuning.chunk_bytes, self.world, board,
                streams=tuning.concurrency, rank=self.rank,
            )  # fmt: skip
        ends = run_ends(node_needs, {f.path: f.size for f in resolved}) if node_needs else {}
        return Setup(
            tuple(resolved), extents, files, starts, tuning, window, trail, pace, piece or 0,
            ends,
        )  # fmt: skip

    async def _tune(self, pool: DaemonPool, resolved: Sequence[ResolvedFile]) -> Tuning:
        """The stripe size and concurrency: as given, or chosen for the filesystem.

        With ``concurrency="auto"`` the filesystem's default is only where run-time
        adaptation (`engine.pace`) starts. With ``backend="auto"`` a network or FUSE
        filesystem is read from a reader process (`engine.reader_process`).
        """
        opt = self.options
        first = resolved[0] if resolved else None
        auto = None
        if is_auto(opt.chunk_bytes) or is_auto(opt.concurrency) or is_auto(opt.backend):
            auto = await pool.run(  # the mount table, else statfs (may block): on the pool
                functools.partial(
                    auto_tuning, first.path if first else None, self.world,
                    dev=first.dev if first else None,
                )
            )  # fmt: skip
        if is_auto(opt.backend) and auto is not None and auto.network:
            self.backend, self._backend_reason = (
                ProcessBackend(),
                ("auto: network/FUSE filesystem -> " + ProcessBackend.description),
            )
        bound = stream_limit(self.world) if is_auto(opt.concurrency) else None
        return settle_tuning(opt.chunk_bytes, opt.concurrency, auto, bound=bound)

    async def _node_needs(
        self, pool: DaemonPool, resolved: list[ResolvedFile]
    ) -> tuple[int, int, list[NodeNeeds | None] | None]:
        """(rank, world, needs) to plan with: what every local rank loads, gathered; or,
        when a rank did not say in time, this rank alone warming all it loads."""
        if self.needs is None:
            return self.rank, self.world, None
        sizes = {f.path: f.size for f in resolved}
        own = await pool.run(normalize, self.needs, sizes)
        node, self._needs_slot = await pool.run(gather, resolved, self.rank, self.world, own)
        total = sum(sizes.values())
        if node is None:
            self._tally.notes.append(
                f"needs: the other local ranks' were unknown; warmed all "
                f"{needed_bytes(own, sizes)} of {total} bytes this rank loads"
            )
            return 0, 1, [own]
        union = union_bytes(node, sizes)
        self._tally.notes.append(f"needs: the node loads {union} of {total} bytes")
        return self.rank, self.world, node

    def _resolve_window(self, checkpoint_bytes: int) -> Choice[int | None]:
        """The window in bytes: as given, or chosen from the memory budget for "auto"."""
        window = self.options.window_bytes
        if not is_auto(window):
            return Choice(window, "given" if window is not None else "none given")
        assert self._tuning is not None
        # Two stripe units per rank, so every rank always has something to read.
        min_bytes = 2 * self._tuning.chunk_bytes * self.world
        return Choice(*auto_window(checkpoint_bytes, min_bytes=min_bytes))

    def _trail(self, window: int | None) -> Choice[int | None]:
        """The trail that goes with `window` (only where a consumer reports its position)."""
        assert self._tuning is not None
        lag = 0
        if window is not None:
            lag = trail_bytes(window, chunk_bytes=self._tuning.chunk_bytes, world=self.world)
        return settle_trail(window, lag, has_consumer=self.cursor is not None)

    async def _open_board(self, pool: DaemonPool, resolved: list[ResolvedFile]) -> RankBoard | None:
        """The local ranks' shared board (`RankBoard`), or None where it cannot be made."""
        try:
            return await pool.run(RankBoard.open, resolved, self.rank, self.world)
        except (OSError, ValueError) as exc:
            log.info(
                "prefetch rank %d/%d: cannot share positions and rates with the other "
                "ranks (%s); consumed bytes are dropped behind this rank's own position, "
                "and the pace follows this rank's own rate",
                self.rank,
                self.world,
                exc,
            )
            return None

    def _share_position(self, board: RankBoard, starts: dict[str, int]) -> None:
        """Publish the consumer's position for the other local ranks."""
        assert self.cursor is not None
        self.cursor.share(board, starts)

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
            self.backend, self._backend_reason = SendfileBackend(), f"fallback: {exc}"
            if self.settled is not None:
                backend = Choice(self.backend.name, self._backend_reason)
                self.settled = replace(self.settled, backend=backend)
            warmer = warmer_for(self.backend, pool, self.options.skip_cached)
        self._warmer = warmer
        return Scheduler(setup, warmer, pool, self._tally, self.cursor, self._emit_progress)

    def _concurrency_used(self) -> int:
        """Reads in flight at the end: the pace's streams, or the fixed concurrency."""
        if self._pace is not None:
            return self._pace.setting.streams
        return self._tuning.concurrency if self._tuning is not None else 0

    def _make_report(self, pool: DaemonPool, loop_cpu_s: float, cancelled: bool) -> PrefetchReport:
        t, tuning = self._tally, self._tuning
        reader_cpu_s = self._warmer.cpu_s if self._warmer is not None else 0.0
        return PrefetchReport(
            rank=self.rank,
            world=self.world,
            strategy=Strategy(self.options.strategy).value,
            backend=self.backend.label,
            concurrency=self._concurrency_used(),
            chunk_bytes=tuning.chunk_bytes if tuning is not None else 0,
            read_bytes=self._pace.setting.read_bytes if self._pace else 0,
            tuning=self._pace.summary() if self._pace else (tuning.reason if tuning else ""),
            adaptation=tuple(self._pace.history) if self._pace else (),
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
