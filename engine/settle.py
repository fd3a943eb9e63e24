"""What a prefetch settles before its first read, each choice with its reason. Pure.

A user leaves the stripe size, the reads in flight, the backend and the window to us by
writing ``"auto"`` (`AUTO`). The prefetcher resolves each of them once, before it reads,
from what it measured of the machine (the filesystem, the memory budget, the number of
local ranks), into one frozen `Settled` record that it logs once and keeps; what follows
reads the record.

Example:
    >>> from engine.tuning import Tuning
    >>> s = Settled(Choice("sendfile", "given"), Tuning(16 << 20, 4, "given"),
    ...             Choice(None, "no window: given"), Choice(None, "no window"))
    >>> s.line()
    'backend=sendfile (given), concurrency=4, chunk=16 MiB (given), window=none (no window: given), trail=none (no window)'
"""  # noqa: E501

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from engine.memory import TRAIL_FRACTION
from engine.tuning import Tuning

__all__ = ["AUTO", "Choice", "Settled", "is_auto", "settle_trail", "settle_tuning"]

#: The value of an option the prefetcher chooses for itself.
AUTO: Final = "auto"

T = TypeVar("T")


def is_auto(value: Any) -> bool:
    """Whether an option's value is `AUTO`.

    Example:
        >>> is_auto("auto"), is_auto(4), is_auto(None)
        (True, False, False)
    """
    return isinstance(value, str) and value == AUTO


@dataclass(frozen=True, slots=True)
class Choice(Generic[T]):
    """One settled value and why it is that."""

    value: T
    reason: str


@dataclass(frozen=True, slots=True)
class Settled:
    """Everything a prefetch settled before its first read.

    Attributes:
        backend: the backend's name, and why.
        tuning: the stripe size and the reads in flight (fixed, or where run-time
            adaptation starts and its bound), and why.
        window: the window in bytes (None: none), and why.
        trail: how far behind the slowest consumer cached bytes are kept (None: nothing
            is dropped), and why.
    """

    backend: Choice[str]
    tuning: Tuning
    window: Choice[int | None]
    trail: Choice[int | None]

    def line(self) -> str:
        """The one log line that says all of it."""
        t = self.tuning
        reads = f"concurrency={t.concurrency}"
        if t.max_concurrency is not None:
            reads += f" (adapted up to {t.max_concurrency})"
        return (
            f"backend={self.backend.value} ({self.backend.reason}), {reads}, "
            f"chunk={t.chunk_bytes >> 20} MiB ({t.reason}), "
            f"window={_size(self.window.value)} ({self.window.reason}), "
            f"trail={_size(self.trail.value)} ({self.trail.reason})"
        )


def _size(n: int | None) -> str:
    return "none" if n is None else f"{n >> 20} MiB"


def settle_tuning(
    chunk_bytes: int | str,
    concurrency: int | str,
    auto: Tuning | None,
    *,
    bound: tuple[int, str] | None = None,
) -> Tuning:
    """The stripe size and reads in flight: as given, or from the filesystem's `auto`.

    Args:
        chunk_bytes: the option (`AUTO` or bytes).
        concurrency: the option (`AUTO` or reads in flight).
        auto: what `engine.tuning.auto_tuning` chose for the filesystem (None: not asked,
            only when both options are given).
        bound: with ``concurrency="auto"``: the most reads in flight the resources allow
            and why (`engine.tuning.stream_limit`); adaptation then starts at the
            filesystem's value.

    Returns:
        A `Tuning` (its ``max_concurrency`` set when adapted at run time).

    Example:
        >>> fs = Tuning(64 << 20, 2, "auto: fs")
        >>> settle_tuning(AUTO, AUTO, fs, bound=(16, "nofile")).max_concurrency
        16
        >>> settle_tuning(1 << 20, 3, fs).reason
        'given'
    """
    network = auto.network if auto is not None else False
    if not is_auto(chunk_bytes) and not is_auto(concurrency):
        return Tuning(int(chunk_bytes), int(concurrency), "given", network=network)
    if auto is None:
        raise ValueError("an automatic stripe size or concurrency needs the filesystem's tuning")
    chunk = auto.chunk_bytes if is_auto(chunk_bytes) else int(chunk_bytes)
    if not is_auto(concurrency):
        return Tuning(chunk, int(concurrency), auto.reason, network=network)
    top, why = bound if bound is not None else (auto.concurrency, "no bound given")
    top = max(top, auto.concurrency)
    return Tuning(
        chunk, auto.concurrency, auto.reason + f"; adapted at run time (1..{top}, {why})",
        max_concurrency=top, network=network,
    )  # fmt: skip


def settle_trail(window: int | None, lag: int, *, has_consumer: bool) -> Choice[int | None]:
    """The trail that goes with `window`: `lag` bytes, where a consumer reports its position.

    Example:
        >>> settle_trail(512 << 20, 128 << 20, has_consumer=True).value == 128 << 20
        True
        >>> settle_trail(None, 0, has_consumer=True).reason
        'no window: nothing is dropped'
    """
    if window is None:
        return Choice(None, "no window: nothing is dropped")
    if not has_consumer:
        return Choice(None, "no consumer position: nothing is dropped")
    why = f"max({TRAIL_FRACTION:g} x window, 2 stripes per local rank) behind the slowest consumer"
    return Choice(lag, why)
