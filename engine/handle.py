"""The sync adapter: run `prefetch_async` on an event loop in a background daemon thread.

Modelled on the "blocking portal": the loop lives in a thread of its own, the caller gets
a handle to wait on, cancel, or read progress from, and nothing keeps running that nobody
can reach. Background errors never leak into the caller's thread; they are logged and
kept in the handle's `error`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from engine.cursor import ConsumerCursor
from engine.engine import Prefetcher
from engine.options import PrefetchOptions, takes_prefetch_options
from engine.plan import Regions
from engine.report import PrefetchReport, Progress

__all__ = ["PrefetchHandle", "start_prefetch"]

log = logging.getLogger(__name__)
_live: weakref.WeakSet[PrefetchHandle] = weakref.WeakSet()
#: How long `cancel()` waits for the loop thread; the workers get what is left of it, so
#: that `cancel()` returns within about a second even while reads block.
CANCEL_WAIT_S = 0.8


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # optional: plain asyncio works the same, a little slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class PrefetchHandle:
    """A prefetch running on a background thread. Create it with `start_prefetch`.

    Example:
        >>> with start_prefetch(["/etc/hostname"]) as h:
        ...     report = h.wait(timeout=10)
        >>> report.failures
        ()
    """

    def __init__(self, prefetcher: Prefetcher) -> None:
        self._prefetcher = prefetcher
        self._cursor = prefetcher.cursor or ConsumerCursor()
        prefetcher.cursor = self._cursor
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._loop = _new_loop()
        self._task = self._loop.create_task(prefetcher.run())
        self._thread = threading.Thread(target=self._main, name="ckpt-prefetch-loop", daemon=True)
        _live.add(self)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # never leaks into the caller's thread
            self._error = exc
            log.error("prefetch failed in the background: %r", exc, exc_info=exc)
        finally:
            try:
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            finally:
                self._loop.close()
                self._done.set()

    # ----------------------------------------------------------------- queries
    @property
    def done(self) -> bool:
        """Whether the prefetch has ended (finished, failed or cancelled)."""
        return self._done.is_set()

    @property
    def report(self) -> PrefetchReport | None:
        """The report, once the prefetch has ended (a partial one after `cancel`)."""
        return self._prefetcher.report if self.done else None

    @property
    def error(self) -> BaseException | None:
        """An unexpected exception raised inside the background thread, if any."""
        return self._error

    def progress(self) -> Progress:
        """A frozen snapshot of the counters."""
        return self._prefetcher.progress()

    # ---------------------------------------------------------------- control
    def wait(self, timeout: float | None = None) -> PrefetchReport | None:
        """Block until the prefetch ends or `timeout` seconds pass.

        Args:
            timeout: seconds to wait; None waits for the end.

        Returns:
            The report, or None on timeout.
        """
        self._done.wait(timeout)
        return self.report

    def cancel(self) -> PrefetchReport | None:
        """Stop submitting reads and end the prefetch; return within about a second.

        Reads already running finish on their daemon threads (a read blocked on a stalled
        server is abandoned, and does not keep the interpreter from exiting).

        Returns:
            The partial report, or None if the loop thread did not end in time.
        """
        t0 = time.monotonic()
        if not self.done:
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # the loop closed meanwhile
                pass
            self._done.wait(CANCEL_WAIT_S)
        if self.done:
            self._thread.join(0.1)
            # Workers finish their current read and exit; wait for them within the budget.
            self._prefetcher.join_workers(max(0.0, CANCEL_WAIT_S - (time.monotonic() - t0)))
        return self.report

    def advance(self, nbytes: int) -> None:
        """Tell the prefetch the loader consumed `nbytes` more, in plan order.

        Args:
            nbytes: bytes consumed since the last call (>= 0), on the axis of all files
                concatenated in consumption order.

        Example:
            >>> with start_prefetch(["/etc/hostname"]) as h:
            ...     h.advance(4096)
        """
        self._cursor.advance(nbytes)

    def advance_to(self, path: str | os.PathLike[str], offset: int) -> None:
        """Tell the prefetch the loader consumed file `path` up to byte `offset`.

        Extents the loader has passed are skipped; with a window, warming moves on.

        Args:
            path: one of the checkpoint's files (as given, or resolved).
            offset: the byte of that file the loader has reached (>= 0).

        Example:
            >>> with start_prefetch(["/etc/hostname"]) as h:
            ...     h.advance_to("/etc/hostname", 1)
        """
        self._cursor.advance_to(path, offset)

    def finish_consuming(self) -> None:
        """Tell the prefetch the loader is done: nothing left is worth reading.

        Example:
            >>> with start_prefetch(["/etc/hostname"]) as h:
            ...     h.finish_consuming()
        """
        self._cursor.finish()

    def __enter__(self) -> PrefetchHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()

    def __repr__(self) -> str:
        p = self.progress()
        state = "done" if self.done else "running"
        return f"<PrefetchHandle {state} {p.done_bytes}/{p.total_bytes} bytes>"


@takes_prefetch_options
def start_prefetch(
    files: Sequence[str | os.PathLike[str]],
    rank: int = 0,
    world: int = 1,
    *,
    options: PrefetchOptions | None = None,
    needs: Regions | None = None,
    **option_fields: Any,
) -> PrefetchHandle:
    """Start warming this rank's share of `files` on a background thread.

    Takes the same options as `engine.prefetch_async`; they are validated here, in the
    caller's thread, before any thread starts. The loader reports its position with
    `PrefetchHandle.advance_to` so that a window can follow it.

    Args:
        files: checkpoint files (the same list on every rank).
        rank: this process's local rank.
        world: number of local ranks.
        options: how to prefetch (`engine.PrefetchOptions`); None for the defaults.
            Its `progress` callback runs on the background thread.
        needs: the byte ranges this rank loads, per file (see `engine.prefetch_async`).
        **option_fields: fields of `engine.PrefetchOptions`, replacing those of `options`.

    Returns:
        A running `PrefetchHandle`; use it as a context manager to cancel it on exit.

    Raises:
        ValueError: an invalid option.
        TypeError: an unknown option.

    Example:
        >>> h = start_prefetch(["/etc/hostname"], 0, 1)
        >>> h.wait(timeout=10).planned_bytes > 0
        True
    """
    opts = PrefetchOptions.from_keywords(options, **option_fields)
    return PrefetchHandle(
        Prefetcher(files, rank, world, opts, cursor=ConsumerCursor(), needs=needs)
    )


@atexit.register
def _cancel_live_handles() -> None:
    """At exit, stop what is still running instead of reading during interpreter teardown."""
    for handle in list(_live):
        if not handle.done:
            with contextlib.suppress(RuntimeError):
                handle._loop.call_soon_threadsafe(handle._task.cancel)
