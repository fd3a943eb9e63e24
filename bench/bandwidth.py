"""The simulated storage's bandwidth limit: one link that read requests reserve in turn.

A request of ``n`` bytes that is ready at time ``r`` (its arrival plus the latency)
reserves the link from ``max(r, tat)`` for ``n / bps`` seconds and is delivered when that
reservation ends; ``tat`` (GCRA's theoretical arrival time) is where the last reservation
ended. Reservations never overlap, so the bytes delivered by any time ``t`` are at most
``bps × (t − t0)``, ``t0`` the first reservation's start: a token bucket of rate ``bps``
with no burst. `LinkState.reserve` is that arithmetic, pure, with the time passed in.

Where the link's state lives decides who shares the limit:

* `LocalLink`: in one server process, for the threads of one mount (the default);
* `SharedLink`: in a small file that every server given its path maps, changed under
  ``flock``: mounts that share the file are one storage with one limit, and a change of
  the rate through any of them holds for all. `SharedBandwidth` makes that file (in
  ``/dev/shm`` where it can), owns it, and is what callers hand to `bench.netfs.mounted`.

Delivery times are ``time.monotonic()`` values: CLOCK_MONOTONIC is one clock for every
process of the machine, so reservations made by different servers compare. This module
imports only the standard library: the netfs server imports it.

Example:
    >>> state = LinkState(bps=100.0)
    >>> state, when = state.reserve(50, ready=10.0)
    >>> when, state.tat
    (10.5, 10.5)
    >>> state.reserve(100, ready=10.2)[1]  # waits for the link: 10.5 + 1.0
    11.5
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import mmap
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["LinkState", "LocalLink", "SharedBandwidth", "SharedLink"]

# magic, bps (0: no limit), tat, granted bytes, granted requests
_LAYOUT = struct.Struct("<8sddQQ")
_MAGIC = b"netfsbw1"
T = TypeVar("T")


def _check_bps(bps: float | None) -> float | None:
    """The rate as stored: ``None`` or 0 mean no limit; a negative rate is an error."""
    if bps is not None and bps < 0:
        raise ValueError(f"bandwidth must be > 0 bytes/s, 0 or None (no limit), not {bps}")
    return float(bps) if bps else None


@dataclass(frozen=True)
class LinkState:
    """The link at one moment (also what `snapshot` reports).

    Attributes:
        bps: Bytes per second; None: no limit (requests are delivered when ready).
        tat: ``time.monotonic()`` at which the last reservation ends.
        granted_bytes: Bytes of every request reserved so far, by every user of the link.
        requests: Requests reserved so far.
    """

    bps: float | None = None
    tat: float = 0.0
    granted_bytes: int = 0
    requests: int = 0

    def reserve(self, nbytes: int, ready: float) -> tuple[LinkState, float]:
        """Reserve the link for a request of `nbytes` ready at `ready`.

        Returns:
            ``(the new state, the time at which the request is delivered)``.
        """
        tat = max(ready, self.tat) + nbytes / self.bps if self.bps else self.tat
        when = tat if self.bps else ready
        # Built directly, not with dataclasses.replace: this runs for every read request.
        return LinkState(self.bps, tat, self.granted_bytes + nbytes, self.requests + 1), when


class _Link:
    """What both homes of the state offer; `_transact` is the one place that changes it."""

    def _transact(self, change: Callable[[LinkState], tuple[LinkState, T]]) -> T:
        """Replace the state by ``change(state)[0]`` atomically; return ``[1]``."""
        raise NotImplementedError

    def reserve(self, nbytes: int, ready: float) -> float:
        """Reserve the link for `nbytes` ready at `ready`; returns the delivery time."""
        return self._transact(lambda state: state.reserve(nbytes, ready))

    def set_bps(self, bps: float | None) -> None:
        """Change the rate (None or 0: no limit), for every user of the link."""
        checked = _check_bps(bps)
        self._transact(lambda state: (dataclasses.replace(state, bps=checked), None))

    @property
    def bps(self) -> float | None:
        """The rate now, bytes/s (None: no limit)."""
        return self.snapshot().bps

    def snapshot(self) -> LinkState:
        """The link's state now (rate, reservations and what they granted)."""
        return self._transact(lambda state: (state, state))


class LocalLink(_Link):
    """The link of one server process, shared by its threads.

    Args:
        bps: Bytes per second; None or 0: no limit.
    """

    def __init__(self, bps: float | None) -> None:
        self._lock = threading.Lock()
        self._state = LinkState(bps=_check_bps(bps))

    def _transact(self, change: Callable[[LinkState], tuple[LinkState, T]]) -> T:
        with self._lock:
            self._state, result = change(self._state)
            return result


class SharedLink(_Link):
    """The link whose state is a file that several processes map (see the module doc).

    Args:
        path: A state file made by `SharedBandwidth`.

    Raises:
        ValueError: `path` is not such a file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        # flock excludes other processes (other open files), the lock this one's threads.
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(self._fd, _LAYOUT.size)
        except (OSError, ValueError) as exc:
            os.close(self._fd)
            raise ValueError(f"{self.path} is not a shared bandwidth file: {exc}") from exc
        if self._map[: len(_MAGIC)] != _MAGIC:
            self.close()
            raise ValueError(f"{self.path} is not a shared bandwidth file")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._map.closed:
            raise ValueError(f"{self!r} is closed")
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _transact(self, change: Callable[[LinkState], tuple[LinkState, T]]) -> T:
        with self._locked():
            _, bps, tat, granted, requests = _LAYOUT.unpack_from(self._map)
            state, result = change(LinkState(bps or None, tat, granted, requests))
            _write(self._map, state)
            return result

    def close(self) -> None:
        """Unmap the file (other users keep their mappings); idempotent."""
        if not self._map.closed:
            self._map.close()
            os.close(self._fd)


def _write(buffer: mmap.mmap | bytearray, state: LinkState) -> None:
    _LAYOUT.pack_into(
        buffer, 0, _MAGIC, state.bps or 0.0, state.tat, state.granted_bytes, state.requests
    )


class SharedBandwidth(SharedLink):
    """One bandwidth limit for several mounts of the simulated storage.

    Make it once, pass it to every `bench.netfs.mounted` that should share it, close it
    after them (a context manager). Each mount keeps its own counters; `snapshot`
    tells what the storage granted to all of them together.

    Args:
        bps: Bytes per second for all mounts together; None: no limit (still counted).
        directory: Where to make the state file; default ``/dev/shm`` when writable,
            else the temporary directory.

    Example:
        >>> with SharedBandwidth(300e6) as link:
        ...     link.set_bps(150e6)
        ...     link.bps, link.snapshot().granted_bytes
        (150000000.0, 0)
    """

    def __init__(
        self, bps: float | None, *, directory: str | os.PathLike[str] | None = None
    ) -> None:
        initial = bytearray(_LAYOUT.size)
        _write(initial, LinkState(bps=_check_bps(bps)))
        if directory is None and os.access("/dev/shm", os.W_OK):
            directory = "/dev/shm"
        fd, path = tempfile.mkstemp(prefix="netfs-bandwidth-", dir=directory)
        try:
            os.write(fd, initial)
        finally:
            os.close(fd)
        try:
            super().__init__(path)
        except BaseException:
            os.unlink(path)
            raise

    def __enter__(self) -> SharedBandwidth:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap and remove the file; servers that mapped it keep their limit. Idempotent."""
        super().close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
