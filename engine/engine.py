"""`prefetch_async()`: the asyncio scheduler that warms one rank's share of a checkpoint.

The event loop only decides what to submit and when; every system call (stat, open,
residency check, read) runs on a bounded pool of daemon threads (`engine.pool`). At most
`concurrency` extents are in flight, and with a window at most `window_bytes` are warmed
ahead of the consumer's position, and bytes more than a trail behind it are dropped from
the page cache (`engine.memory` says why). Failures are recorded per file, never raised.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from engine.backends import AiofilesBackend, Backend, resolve_backend
from engine.cursor import ConsumerCursor, RankBoard
from engine.errors import Failure, InvalidOptionError
from engine.memory import auto_window, trail_bytes
from engine.plan import (
    Extent,
    Order,
    ResolvedFile,
    Strategy,
    check_chunk_bytes,
    check_rank_world,
    plan,
    resolve_files,
)
from engine.pool import DaemonPool
from engine.residency import resident_bytes_fd
from engine.tuning import NODE_STREAMS, auto_tuning

__all__ = ["PrefetchReport", "Prefetcher", "Progress", "prefetch_async"]

log = logging.getLogger(__name__)

#: The most worker threads one prefetch may ask for.
MAX_CONCURRENCY = 256
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
_PAGE = os.sysconf("SC_PAGE_SIZE")
_PROGRESS_EVERY_S = 0.1
#: How often a window held back by a slower rank looks at the other ranks' positions.
_BOARD_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of a running prefetch (immutable; cheap to take).

    Attributes:
        done_bytes: planned bytes dealt with so far (warmed, already cached, skipped or failed).
        total_bytes: bytes this rank planned to warm.
        warmed_bytes: bytes read into the page cache.
        cached_bytes: bytes found already resident and not read.
        skipped_bytes: bytes whose turn had passed (the consumer was already beyond them).
        failed_bytes: bytes that could not be read.
        in_flight: extents being read now.
        dropped_bytes: bytes behind the consumer dropped from the page cache (window only).
        window_bytes: the window in effect (None: no window, or not resolved yet).
        elapsed_s: seconds since the prefetch started.
        rate_bps: warmed bytes per second so far.
    """

    done_bytes: int = 0
    total_bytes: int = 0
    warmed_bytes: int = 0
    cached_bytes: int = 0
    skipped_bytes: int = 0
    failed_bytes: int = 0
    in_flight: int = 0
    elapsed_s: float = 0.0
    rate_bps: float = 0.0
    dropped_bytes: int = 0
    window_bytes: int | None = None

    @property
    def fraction(self) -> float:
        """Share of the planned bytes dealt with, 0..1 (1 when nothing was planned)."""
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0


@dataclass(frozen=True, slots=True)
class PrefetchReport:
    """What one rank's prefetch did.

    Attributes:
        rank: the local rank.
        world: the number of local ranks.
        strategy: the partition strategy used.
        backend: the read backend really used (a fallback says so).
        concurrency: extents in flight at most (resolved when ``"auto"``).
        chunk_bytes: the stripe unit (resolved when ``"auto"``).
        files: regular files in the plan (after de-duplication).
        planned_bytes: bytes of this rank's share.
        warmed_bytes: bytes read into the page cache by this rank.
        cached_bytes: bytes skipped because they were already resident.
        skipped_bytes: bytes skipped because the consumer had passed them.
        failed_bytes: bytes of planned extents that could not be read.
        failures: one entry per failed file range (path, range, errno, message).
        notes: things worth knowing that are not failures (a file that grew, ...).
        elapsed_s: wall seconds from start to end.
        cpu_s: CPU seconds spent by the prefetch's threads.
        cancelled: whether the prefetch was cancelled before it finished.
        dropped_bytes: bytes (all ranks' stripes, on the checkpoint's axis) that this rank
            asked the kernel to drop because the consumer was a trail past them (with a
            window only; pages some process still maps stay cached).
    """

    rank: int
    world: int
    strategy: str
    backend: str
    concurrency: int
    chunk_bytes: int
    files: int
    planned_bytes: int
    warmed_bytes: int
    cached_bytes: int
    skipped_bytes: int
    failed_bytes: int
    failures: tuple[Failure, ...]
    notes: tuple[str, ...]
    elapsed_s: float
    cpu_s: float
    cancelled: bool = False
    dropped_bytes: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing failed and the prefetch ran to its end."""
        return not self.failures and not self.cancelled

    @property
    def throughput_bps(self) -> float:
        """Warmed bytes per wall second."""
        return self.warmed_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (failures as dicts, with the errno's name)."""
        d = asdict(self)
        d["failures"] = [f.to_dict() for f in self.failures]
        d["notes"] = list(self.notes)
        d["throughput_bps"] = self.throughput_bps
        return d


@dataclass(frozen=True, slots=True)
class Options:
    """Validated options of one prefetch (resolved once, before any thread starts)."""

    rank: int
    world: int
    strategy: Strategy
    backend: Backend
    backend_reason: str
    concurrency: int | Literal["auto"]
    chunk_bytes: int | Literal["auto"]
    skip_cached: bool
    window_bytes: int | Literal["auto"] | None
    order: Order
    progress: Callable[[Progress], object] | None

    @classmethod
    def validate(
        cls,
        rank: int,
        world: int,
        *,
        strategy: str | Strategy = "balanced",
        backend: str | Backend = "auto",
        concurrency: int | Literal["auto"] = "auto",
        chunk_bytes: int | Literal["auto"] = "auto",
        skip_cached: bool = True,
        window_bytes: int | Literal["auto"] | None = None,
        order: str | Order = "sorted",
        progress: Callable[[Progress], object] | None = None,
    ) -> Options:
        """Check every option; raise ValueError naming the valid values."""
        check_rank_world(rank, world)
        if chunk_bytes != "auto":
            check_chunk_bytes(chunk_bytes)
        if concurrency != "auto" and (
            isinstance(concurrency, bool)
            or not isinstance(concurrency, int)
            or not 1 <= concurrency <= MAX_CONCURRENCY
        ):
            raise ValueError(
                f"concurrency must be 'auto' or an integer in [1, {MAX_CONCURRENCY}], "
                f"got {concurrency!r}"
            )
        if (
            window_bytes is not None
            and window_bytes != "auto"
            and (
                isinstance(window_bytes, bool)
                or not isinstance(window_bytes, int)
                or window_bytes < 1
            )
        ):
            raise ValueError(
                f"window_bytes must be None, 'auto' or an integer >= 1, got {window_bytes!r}"
            )
        if progress is not None and not callable(progress):
            raise ValueError(f"progress must be a callable or None, got {progress!r}")
        strat = Strategy.parse(strategy)
        ordering = Order.parse(order)
        impl, reason = resolve_backend(backend)
        return cls(
            rank,
            world,
            strat,
            impl,
            reason,
            concurrency,
            chunk_bytes,
            bool(skip_cached),
            window_bytes,
            ordering,
            progress,
        )


class _File:
    """One planned file: opened lazily by the first worker that needs it, closed after its
    rank's last extent, so open descriptors stay bounded by the number of in-flight extents."""

    __slots__ = ("error", "fd", "lock", "meta", "note", "remaining")

    def __init__(self, meta: ResolvedFile, remaining: int) -> None:
        self.meta = meta
        self.remaining = remaining
        self.fd = -1
        self.error: Failure | None = None  # set once: later extents of the file skip at once
        self.note: str | None = None
        self.lock = threading.Lock()

    def acquire(self) -> int:
        """Open the file if needed and return its fd; raise OSError when that fails."""
        with self.lock:
            if self.error is not None:
                raise _AlreadyFailed
            if self.fd < 0:
                try:
                    fd = os.open(self.meta.path, _OPEN_FLAGS)
                except OSError as exc:
                    if exc.errno not in _TRANSIENT_OPEN_ERRORS:
                        raise
                    time.sleep(_OPEN_RETRY_S)  # out of fds for a moment, a soft mount
                    fd = os.open(self.meta.path, _OPEN_FLAGS)  # once more, then it is final
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        raise OSError(errno.EINVAL, "no longer a regular file")
                    if (st.st_dev, st.st_ino) != (self.meta.dev, self.meta.ino):
                        raise OSError(errno.ESTALE, "replaced by a new file since planning")
                except BaseException:
                    os.close(fd)
                    raise
                if st.st_size != self.meta.size:
                    self.note = (
                        f"{self.meta.path}: size changed from {self.meta.size} to "
                        f"{st.st_size} bytes since planning"
                    )
                self.fd = fd
            return self.fd

    def fail(self, failure: Failure) -> bool:
        """Record the whole-file failure; return False if one was already recorded."""
        with self.lock:
            if self.error is not None:
                return False
            self.error = failure
            return True

    def release(self, n: int = 1) -> None:
        """Mark `n` extents finished; close the fd after the last one."""
        with self.lock:
            self.remaining -= n
            if self.remaining <= 0 and self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


#: open() errors worth one more try before the whole file counts as failed.
_TRANSIENT_OPEN_ERRORS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.EINTR, errno.EAGAIN, errno.ENOMEM, errno.ETIMEDOUT}
)
_OPEN_RETRY_S = 0.05


class _AlreadyFailed(Exception):
    """The file failed to open before; the extent is skipped without a new attempt."""


class _Trail:
    """Drops from the page cache what the consumer has left more than `lag` bytes behind.

    Only with a window: a checkpoint that needs one does not fit, and what the loader has
    consumed would otherwise crowd out what was warmed ahead of it (see `engine.memory`).
    Every rank drops the whole axis (not just its stripes) behind the slowest rank's
    position (`RankBoard`; its own when the board cannot be made): a page that a rank still
    maps is skipped by the kernel, and a later drop of another rank takes it.
    One drop runs at a time, on the pool; each opens the files it needs and closes them.
    """

    def __init__(self, files: Sequence[ResolvedFile], lag: int, step: int) -> None:
        self.lag = lag
        self.step = step
        self.done = 0  # drops were issued for the axis below this position
        self.busy = False
        self.dropped = 0
        self._spans: list[tuple[int, ResolvedFile]] = []
        pos = 0
        for meta in files:
            self._spans.append((pos, meta))
            pos += meta.size
        self._failed = False

    def wants(self, consumer: int) -> bool:
        """Whether a drop could be due with the consumer at `consumer` (cheap check)."""
        return not self.busy and consumer - self.lag - self.done >= self.step

    def due(self, consumer: int) -> tuple[int, int] | None:
        """The axis range to drop now that the slowest rank is at `consumer`, or None."""
        if not self.wants(consumer):
            return None
        lo, self.done = self.done, consumer - self.lag
        return lo, self.done

    def drop(self, lo: int, hi: int) -> int:
        """Runs on a worker thread: ``posix_fadvise(DONTNEED)`` on [lo, hi) of the axis."""
        n = 0
        for start, meta in self._spans:
            end = start + meta.size
            if end <= lo or meta.size == 0:
                continue
            if start >= hi:
                break
            a, b = max(lo, start) - start, min(hi, end) - start
            a -= a % _PAGE  # the kernel keeps partial pages: take the one left last time
            try:
                fd = os.open(meta.path, _OPEN_FLAGS)
                try:
                    os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except OSError as exc:  # only an optimisation: say it once, go on
                if not self._failed:
                    self._failed = True
                    log.info("could not drop consumed bytes of %s: %s", meta.path, exc)
                continue
            n += b - a
        return n


# Outcomes of one extent, returned by the worker.
_WARMED, _CACHED, _FAILED, _DUPLICATE_FAILURE = range(4)


def _prepare(
    f: _File, ext: Extent, skip_cached: bool
) -> tuple[int, tuple[int, int, Failure | None] | None]:
    """Runs on a worker thread: open the file (once) and check residency.

    Returns ``(fd, outcome)``: the outcome is set when nothing is left to read (the file
    failed, or the extent is already resident); ``fd`` is -1 then.
    """
    try:
        fd = f.acquire()
    except _AlreadyFailed:
        return -1, (_DUPLICATE_FAILURE, 0, None)
    except OSError as exc:
        failure = Failure.from_os_error(ext.path, 0, 0, exc)
        return -1, ((_FAILED if f.fail(failure) else _DUPLICATE_FAILURE), 0, failure)
    if skip_cached:
        try:
            if resident_bytes_fd(fd, ext.offset, ext.length) >= ext.length:
                return -1, (_CACHED, ext.length, None)
        except OSError:  # residency unknown (e.g. no cachestat, no mmap): just read
            pass
    return fd, None


def _read_outcome(ext: Extent, n: int) -> tuple[int, int, Failure | None]:
    """The outcome of reading `n` bytes of `ext` (fewer: the file ended early)."""
    if n >= ext.length:
        return _WARMED, n, None
    missing = Failure(
        ext.path, ext.offset + n, ext.length - n, None,
        "file ended early (truncated since planning?)",
    )  # fmt: skip
    return _WARMED, n, missing


def _warm_extent(
    f: _File, ext: Extent, backend: Backend, skip_cached: bool
) -> tuple[int, int, Failure | None]:
    """Runs on a worker thread: warm one extent; return (outcome, bytes, failure)."""
    try:
        fd, done = _prepare(f, ext, skip_cached)
        if done is not None:
            return done
        return _read_outcome(ext, backend.read_into_cache(fd, ext.offset, ext.length))
    except OSError as exc:
        return _FAILED, 0, Failure.from_os_error(ext.path, ext.offset, ext.length, exc)
    finally:
        f.release()


class Prefetcher:
    """One rank's prefetch: plan, then warm with bounded concurrency. Run it once.

    `prefetch_async` and `start_prefetch` are the public ways to use it; the handle keeps a
    reference to read progress from another thread.

    Args:
        files: the checkpoint's files.
        options: validated options (`Options.validate`).
        cursor: the loader's position; None when nobody reports one.
    """

    def __init__(
        self,
        files: Iterable[str | os.PathLike[str]],
        options: Options,
        *,
        cursor: ConsumerCursor | None = None,
    ) -> None:
        self.files = list(files)
        self.opt = options
        self.cursor = cursor
        self.report: PrefetchReport | None = None
        self._t0 = 0.0
        self._total = 0
        self._warmed = self._cached = self._skipped = self._failed = 0
        self._in_flight = 0
        self._failures: list[Failure] = []
        self._notes: list[str] = []
        self._file_count = 0
        self._last_progress = 0.0
        self._progress_cb = options.progress
        self._window: int | None = None
        self._trail: _Trail | None = None
        self._pool: DaemonPool | None = None
        self._tasks: set[asyncio.Future[Any]] = set()  # aiofiles reads in flight
        self._chunk = 0  # resolved stripe size and concurrency (known once planned)
        self._concurrency = 0

    # ----------------------------------------------------------------- progress
    def progress(self) -> Progress:
        """A snapshot of the counters (safe to call from any thread)."""
        elapsed = time.monotonic() - self._t0 if self._t0 else 0.0
        done = self._warmed + self._cached + self._skipped + self._failed
        return Progress(
            done_bytes=done,
            total_bytes=self._total,
            warmed_bytes=self._warmed,
            cached_bytes=self._cached,
            skipped_bytes=self._skipped,
            failed_bytes=self._failed,
            in_flight=self._in_flight,
            elapsed_s=elapsed,
            rate_bps=self._warmed / elapsed if elapsed > 0 else 0.0,
            dropped_bytes=self._trail.dropped if self._trail is not None else 0,
            window_bytes=self._window,
        )

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

    # ---------------------------------------------------------------- recording
    def _record(self, failure: Failure) -> None:
        """Record a failure; ranges of one file and errno that touch merge into one entry.

        Extents finish out of order, so any earlier entry may be the neighbour. Ranges
        that do not touch (other ranks' stripes lie between) stay separate and exact.
        """
        for i, prev in enumerate(self._failures):
            if prev.path != failure.path or prev.errno != failure.errno:
                continue
            if not (prev.length and failure.length):
                return  # the whole file failed already (or now): one entry is enough
            lo, hi = prev.offset, prev.offset + prev.length
            if failure.offset <= hi and lo <= failure.offset + failure.length:
                lo = min(lo, failure.offset)
                hi = max(hi, failure.offset + failure.length)
                self._failures[i] = Failure(prev.path, lo, hi - lo, prev.errno, prev.message)
                return
        if not any(f.path == failure.path for f in self._failures):
            log.warning("prefetch could not warm %s", failure)
        self._failures.append(failure)

    # --------------------------------------------------------------------- run
    async def run(self) -> PrefetchReport:
        """Warm this rank's share; return the report (also kept in `self.report`).

        Cancelling the task stops submission at once; reads already running finish on
        their daemon threads and are not waited for. The report is stored before the
        cancellation propagates.
        """
        self._t0 = time.monotonic()
        opt = self.opt
        pool = self._pool = DaemonPool(
            NODE_STREAMS if opt.concurrency == "auto" else opt.concurrency
        )
        loop_cpu0 = time.thread_time()
        files: dict[str, _File] = {}
        pending: collections.deque[Extent] = collections.deque()
        cancelled = False
        wake = asyncio.Event()
        if self.cursor is not None:
            self.cursor.subscribe(wake)
        try:
            resolved, failures = await pool.run(
                functools.partial(resolve_files, self.files, order=opt.order)
            )
            for failure in failures:
                self._record(failure)
            self._file_count = len(resolved)
            tuning_reason = "given"
            self._chunk = opt.chunk_bytes if opt.chunk_bytes != "auto" else 0
            self._concurrency = opt.concurrency if opt.concurrency != "auto" else 0
            if not (self._chunk and self._concurrency):  # statfs may block: on the pool
                first = resolved[0].path if resolved else None
                tuning = await pool.run(auto_tuning, first, opt.world)
                self._chunk = self._chunk or tuning.chunk_bytes
                self._concurrency = self._concurrency or tuning.concurrency
                tuning_reason = tuning.reason
            pending.extend(
                plan(
                    resolved,
                    opt.rank,
                    opt.world,
                    strategy=opt.strategy,
                    chunk_bytes=self._chunk,
                )
            )
            counts: dict[str, int] = {}
            for ext in pending:
                counts[ext.path] = counts.get(ext.path, 0) + 1
            starts: dict[str, int] = {}
            pos = 0
            for meta in resolved:
                starts[meta.path] = pos
                pos += meta.size
                if meta.path in counts:
                    files[meta.path] = _File(meta, counts[meta.path])
            self._total = sum(e.length for e in pending)
            self._window = self._resolve_window(sum(m.size for m in resolved))
            if self._window is not None and self.cursor is not None:
                lag = trail_bytes(self._window, chunk_bytes=self._chunk, world=opt.world)
                self._trail = _Trail(resolved, lag, step=max(self._chunk, lag // 4))
                if opt.world > 1:
                    await self._share_position(pool, resolved, starts)
            log.info(
                "prefetch rank %d/%d: %d files, %d bytes planned, strategy=%s, backend=%s (%s), "
                "concurrency=%d, chunk=%d MiB (%s), window=%s, trail=%s",
                opt.rank,
                opt.world,
                len(resolved),
                self._total,
                opt.strategy.value,
                opt.backend.name,
                opt.backend_reason,
                self._concurrency,
                self._chunk >> 20,
                tuning_reason,
                self._window,
                self._trail.lag if self._trail is not None else None,
            )
            await self._schedule(pool, pending, files, starts, wake)
        except asyncio.CancelledError:
            cancelled = True
            raise
        except Exception as exc:  # a bug of ours: recorded and logged, never raised
            log.exception("prefetch stopped by an internal error")
            self._failures.append(
                Failure("<prefetch>", 0, 0, None, f"internal error: {type(exc).__name__}: {exc}")
            )
        finally:
            if self._tasks:  # aiofiles reads: cancel them (their executor threads are daemons)
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
            for ext in pending:  # never submitted: give back their references (closes fds)
                f = files.get(ext.path)
                if f is not None:
                    f.release()
            if self.cursor is not None:
                self.cursor.unsubscribe(wake)
            pool.shutdown()
            self._notes.extend(f.note for f in files.values() if f.note)
            self.report = self._make_report(pool, time.thread_time() - loop_cpu0, cancelled)
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

    async def _share_position(
        self, pool: DaemonPool, resolved: list[ResolvedFile], starts: dict[str, int]
    ) -> None:
        """Publish the consumer's position for the other local ranks (`RankBoard`)."""
        opt = self.opt
        assert self.cursor is not None
        try:
            board = await pool.run(RankBoard.open, resolved, opt.rank, opt.world)
        except (OSError, ValueError) as exc:
            log.info(
                "prefetch rank %d/%d: cannot share positions with the other ranks (%s); "
                "consumed bytes are dropped behind this rank's own position",
                opt.rank,
                opt.world,
                exc,
            )
            return
        self.cursor.share(board, starts)

    def _resolve_window(self, checkpoint_bytes: int) -> int | None:
        """The window in bytes: as given, or chosen from the memory budget for "auto"."""
        opt = self.opt
        if opt.window_bytes != "auto":
            return opt.window_bytes
        # Two stripe units per rank, so every rank always has something to read.
        window, reason = auto_window(checkpoint_bytes, min_bytes=2 * self._chunk * opt.world)
        log.info("prefetch rank %d/%d: %s", opt.rank, opt.world, reason)
        return window

    async def _schedule(
        self,
        pool: DaemonPool,
        pending: collections.deque[Extent],
        files: dict[str, _File],
        starts: dict[str, int],
        wake: asyncio.Event,
    ) -> None:
        opt = self.opt
        cursor = self.cursor
        window = self._window
        trail = self._trail
        use_async = isinstance(opt.backend, AiofilesBackend)
        tasks = self._tasks

        def on_dropped(fut: asyncio.Future[int]) -> None:
            assert trail is not None
            trail.busy = False
            if not fut.cancelled() and fut.exception() is None:
                trail.dropped += fut.result()
            wake.set()

        def on_done(fut: asyncio.Future[tuple[int, int, Failure | None]], ext: Extent) -> None:
            self._in_flight -= 1
            wake.set()
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None:  # a bug in a backend: recorded, never raised
                outcome, nbytes, failure = (
                    _FAILED,
                    0,
                    Failure(ext.path, ext.offset, ext.length, None, f"{type(exc).__name__}: {exc}"),
                )
            else:
                outcome, nbytes, failure = fut.result()
            if outcome == _WARMED:
                self._warmed += nbytes
                if failure is not None:
                    self._failed += failure.length
            elif outcome == _CACHED:
                self._cached += nbytes
            else:
                self._failed += ext.length
            if failure is not None and outcome != _DUPLICATE_FAILURE:
                self._record(failure)
            self._emit_progress()

        while pending or self._in_flight or (trail is not None and trail.busy):
            consumer = 0
            if cursor is not None:
                consumer = 1 << 62 if cursor.finished else cursor.position(starts)
            # The window and the trail follow the slowest local rank (`RankBoard`), so that
            # the bytes kept cached stay within about trail + window even when ranks drift
            # apart; `slowest` is None when a rank may still need everything: nothing is
            # dropped then, and the window follows this rank alone.
            slowest = None
            if trail is not None and consumer < 1 << 62:
                assert cursor is not None
                slowest = cursor.slowest(starts)
                if slowest is not None:
                    due = trail.due(min(consumer, slowest))
                    if due is not None:
                        trail.busy = True
                        pool.run(trail.drop, *due).add_done_callback(on_dropped)
            front = consumer if slowest is None else min(consumer, slowest)
            held_by_other = False
            while pending and self._in_flight < self._concurrency:
                ext = pending[0]
                if cursor is not None and ext.end <= consumer:
                    # The loader is already past this extent: reading it now is waste.
                    pending.popleft()
                    self._skipped += ext.length
                    files[ext.path].release()
                    continue
                if window is not None and ext.end > front + max(window, ext.length):
                    held_by_other = front < consumer
                    break  # too far ahead of the consumer: wait for it to move
                pending.popleft()
                f = files[ext.path]
                if use_async:
                    fut = asyncio.ensure_future(self._warm_async(pool, f, ext))
                    tasks.add(fut)
                    fut.add_done_callback(tasks.discard)
                else:
                    fut = pool.run(_warm_extent, f, ext, opt.backend, opt.skip_cached)
                self._in_flight += 1
                fut.add_done_callback(functools.partial(on_done, ext=ext))
            if not pending and not self._in_flight and not (trail is not None and trail.busy):
                break
            wake.clear()
            if held_by_other:  # other ranks do not wake this loop: look again soon
                with contextlib.suppress(asyncio.TimeoutError):  # TimeoutError only from 3.11
                    await asyncio.wait_for(wake.wait(), _BOARD_POLL_S)
            else:
                await wake.wait()

    async def _warm_async(
        self, pool: DaemonPool, f: _File, ext: Extent
    ) -> tuple[int, int, Failure | None]:
        """The aiofiles path: open and residency checks on the pool, the read via aiofiles."""
        backend = self.opt.backend
        assert isinstance(backend, AiofilesBackend)
        try:
            fd, done = await pool.run(_prepare, f, ext, self.opt.skip_cached)
            if done is not None:
                return done
            n = await backend.aread_into_cache(fd, ext.offset, ext.length, executor=pool.executor)
            return _read_outcome(ext, n)
        except OSError as exc:
            return _FAILED, 0, Failure.from_os_error(ext.path, ext.offset, ext.length, exc)
        finally:
            f.release()

    def _make_report(self, pool: DaemonPool, loop_cpu_s: float, cancelled: bool) -> PrefetchReport:
        opt = self.opt
        return PrefetchReport(
            rank=opt.rank,
            world=opt.world,
            strategy=opt.strategy.value,
            backend=opt.backend.label,
            concurrency=self._concurrency,
            chunk_bytes=self._chunk,
            files=self._file_count,
            planned_bytes=self._total,
            warmed_bytes=self._warmed,
            cached_bytes=self._cached,
            skipped_bytes=self._skipped,
            failed_bytes=self._failed,
            failures=tuple(self._failures),
            notes=tuple(self._notes),
            elapsed_s=time.monotonic() - self._t0,
            cpu_s=pool.cpu_s + loop_cpu_s,
            cancelled=cancelled,
            dropped_bytes=self._trail.dropped if self._trail is not None else 0,
        )


async def prefetch_async(
    files: Sequence[str | os.PathLike[str]],
    rank: int = 0,
    world: int = 1,
    *,
    strategy: str = "balanced",
    backend: str | Backend = "auto",
    concurrency: int | Literal["auto"] = "auto",
    chunk_bytes: int | Literal["auto"] = "auto",
    skip_cached: bool = True,
    window_bytes: int | Literal["auto"] | None = None,
    order: str = "sorted",
    progress: Callable[[Progress], object] | None = None,
    consumer: ConsumerCursor | None = None,
) -> PrefetchReport:
    """Warm this rank's share of `files` into the page cache; return what was done.

    Every local rank calls this with the same files and its own `rank`; together they read
    each byte once. Bad files are recorded in the report's `failures`, never raised.

    Args:
        files: checkpoint files (the same list, in any order, on every rank).
        rank: this process's local rank, ``0 <= rank < world``.
        world: number of local ranks sharing the node's page cache.
        strategy: ``"balanced"`` (byte stripes) or ``"files"`` (whole files round-robin).
        backend: ``"auto"``, one of `engine.BACKENDS`, or a `Backend` instance.
        concurrency: extents in flight at once (worker threads), 1..256, or ``"auto"``:
            8 per node split among the ranks (`engine.tuning`).
        chunk_bytes: stripe unit and largest read, at least 4096, or ``"auto"``: 16 MiB on
            network/FUSE filesystems, 64 MiB on local ones (`engine.tuning`).
        skip_cached: skip extents already fully resident in the page cache.
        window_bytes: warm at most this many bytes (on the whole checkpoint's axis) ahead
            of `consumer`; None = no limit; ``"auto"`` = none when the checkpoint fits in
            the memory budget, else half of it (`engine.memory`). With a window, somebody
            must advance the consumer, or warming stops there; and bytes more than a
            trail (`engine.memory.trail_bytes`) behind the slowest local rank are dropped
            from the page cache. With ``world > 1`` the ranks learn each other's positions
            from a small shared-memory file (`engine.cursor.RankBoard`); where it cannot
            be made, a rank's own position stands for the slowest's (all ranks consume
            the same order).
        order: ``"sorted"`` (by resolved path; every rank agrees) or ``"given"``.
        progress: called on the event loop with `Progress` snapshots (about 10 per second).
        consumer: the loader's position; extents it has passed are skipped.

    Returns:
        A `PrefetchReport`. `cpu_s` counts the worker threads and this coroutine's thread
        while it ran (other work on the same thread is included).

    Raises:
        ValueError: an invalid option (before any thread starts), also a window without
            a consumer.

    Example:
        >>> import asyncio
        >>> report = asyncio.run(prefetch_async(["/etc/hostname"]))
        >>> report.failures
        ()
    """
    opts = Options.validate(
        rank,
        world,
        strategy=strategy,
        backend=backend,
        concurrency=concurrency,
        chunk_bytes=chunk_bytes,
        skip_cached=skip_cached,
        window_bytes=window_bytes,
        order=order,
        progress=progress,
    )
    if window_bytes is not None and consumer is None:
        # Nobody could advance a cursor made here: warming would stop at the window.
        raise InvalidOptionError(
            f"window_bytes={window_bytes!r} needs a consumer: pass consumer=ConsumerCursor() "
            "and advance it as the loader reads (start_prefetch's handle does this)"
        )
    return await Prefetcher(files, opts, cursor=consumer).run()
