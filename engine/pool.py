"""A bounded pool of daemon worker threads that completes asyncio futures.

`concurrent.futures.ThreadPoolExecutor` joins its workers at interpreter exit, so one read
blocked on a stalled server turns into a hung exit. These workers are daemon threads: a
blocked one is abandoned at exit, and `shutdown()` never waits for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["DaemonPool"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = None


class _PoolExecutor(concurrent.futures.Executor):
    """Submits to a `DaemonPool` (whose threads never hold up interpreter exit)."""

    def __init__(self, pool: DaemonPool) -> None:
        self._pool = pool

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Any:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._pool._enqueue((functools.partial(fn, *args, **kwargs), (), fut, None))
        return fut


class DaemonPool:
    """`size` daemon threads running submitted calls; results land in asyncio futures.

    Args:
        size: number of worker threads (the most calls that run at once).
        name: prefix of the threads' names.

    Example:
        >>> async def main():
        ...     pool = DaemonPool(2)
        ...     try:
        ...         return await pool.run(sum, [1, 2])
        ...     finally:
        ...         pool.shutdown()
        >>> asyncio.run(main())
        3
    """

    def __init__(self, size: int, *, name: str = "ckpt-prefetch-io") -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._cpu_s = 0.0
        self._closed = False
        self._size = size
        self._name = name
        self._idle = 0  # workers waiting for a call
        self.threads: list[threading.Thread] = []  # started on demand, at most `size`

    @property
    def cpu_s(self) -> float:
        """CPU seconds the workers spent in submitted calls so far."""
        return self._cpu_s

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on a worker; return a future of the running loop for its result."""
        if self._closed:
            raise RuntimeError("pool is shut down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._enqueue((fn, args, fut, loop))
        return fut

    @property
    def executor(self) -> concurrent.futures.Executor:
        """A `concurrent.futures.Executor` view of the pool (for libraries that take one).

        Its calls run on the same daemon threads, within the same `size` bound.
        """
        return _PoolExecutor(self)

    def _enqueue(self, item: tuple[Any, ...]) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1  # that worker is spoken for
            elif len(self.threads) < self._size:
                t = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self.threads)}", daemon=True
                )
                try:
                    t.start()
                except RuntimeError:  # "can't start new thread": a pids limit, TasksMax
                    if not self.threads:
                        raise
                    log.warning(
                        "cannot start another worker thread; going on with %d",
                        len(self.threads),
                    )
                    self._size = len(self.threads)
                else:
                    self.threads.append(t)
        self._queue.put(item)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args, fut, loop = item
            t0 = time.thread_time()
            if loop is None and not fut.set_running_or_notify_cancel():
                fn = None  # a concurrent future cancelled before it ran
            try:
                result = fn(*args) if fn is not None else None
            except BaseException as exc:  # delivered to the awaiting coroutine
                if loop is None:
                    fut.set_exception(exc)
                else:
                    self._deliver(loop, fut, None, exc)
            else:
                if loop is None:
                    if fn is not None:
                        fut.set_result(result)
                else:
                    self._deliver(loop, fut, result, None)
            finally:
                dt = time.thread_time() - t0
                with self._lock:
                    self._cpu_s += dt
                    self._idle += 1
            del item, fn, args, fut, loop

    @staticmethod
    def _deliver(
        loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], result: Any, exc: Any
    ) -> None:
        def settle() -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody waits for this result any more
            pass

    def shutdown(self, *, wait_s: float = 0.0) -> None:
        """Stop the workers once their current call returns; wait at most `wait_s` for them.

        Never blocks longer than `wait_s`, even when a worker is stuck in a system call.
        """
        with self._lock:
            already, self._closed = self._closed, True
            threads = list(self.threads)
        if not already:
            for _ in threads:
                self._queue.put(_STOP)
        if wait_s > 0:
            deadline = time.monotonic() + wait_s
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))

    def alive(self) -> int:
        """Number of worker threads still running."""
        return sum(t.is_alive() for t in self.threads)
