"""The options of a prefetch, defined once: `PrefetchOptions`.

`engine.prefetch_async`, `engine.start_prefetch` and the loader
(`loader_adapter.safetensors_weights_iterator`) take these fields as keyword arguments, or
a whole `PrefetchOptions` as ``options=``; every value is checked here, in the caller's
thread, before any thread starts.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from engine.backends import Backend, check_backend
from engine.errors import InvalidOptionError
from engine.plan import Order, Strategy, check_chunk_bytes
from engine.report import Progress
from engine.settle import is_auto

__all__ = [
    "MAX_CONCURRENCY",
    "OPTION_NAMES",
    "PrefetchOptions",
    "check_option_names",
    "takes_prefetch_options",
]

#: The most worker threads one prefetch may ask for.
MAX_CONCURRENCY = 256
F = TypeVar("F", bound=Callable[..., Any])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefetchOptions:
    """How one rank's prefetch runs. Every field is keyword-only with a safe default.

    Attributes:
        strategy: ``"balanced"`` (byte stripes dealt round-robin to the ranks) or
            ``"files"`` (whole files round-robin). Kept as a `engine.plan.Strategy`.
        backend: ``"auto"`` (sendfile), one of `engine.BACKENDS`, or a `Backend`
            instance.
        concurrency: extents in flight at once (worker threads), 1..256, or ``"auto"``:
            8 per node split among the ranks (`engine.tuning`).
        chunk_bytes: stripe unit and largest read, at least 4096, or ``"auto"``: 16 MiB
            on network/FUSE filesystems, 64 MiB on local ones (`engine.tuning`).
        skip_cached: skip extents already fully resident in the page cache.
        window_bytes: warm at most this many bytes (on the whole checkpoint's axis) ahead
            of the consumer; None = no limit; ``"auto"`` = none when the checkpoint fits
            in the memory budget, else half of it (`engine.memory`). With a window,
            somebody must advance the consumer, or warming stops there; and bytes more
            than a trail (`engine.memory.trail_bytes`) behind the slowest local rank are
            dropped from the page cache. With ``world > 1`` the ranks learn each other's
            positions from a small shared-memory file (`engine.cursor.RankBoard`); where
            it cannot be made, a rank's own position stands for the slowest's (all ranks
            consume the same order).
        order: ``"sorted"`` (by resolved path; every rank agrees) or ``"given"``. Kept as
            an `engine.plan.Order`.
        progress: called with `Progress` snapshots (about 10 per second, and once at the
            end) on the thread of the prefetch's event loop (the handle's background
            thread for `start_prefetch`); if it raises, it is not called again.

    Raises:
        InvalidOptionError: a value out of range (a `ValueError` naming the valid values).

    Example:
        >>> PrefetchOptions(strategy="files", concurrency=2).strategy.value
        'files'
        >>> PrefetchOptions(concurrency=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        engine.errors.InvalidOptionError: concurrency must be 'auto' or an integer in [1, 256], ...
    """

    strategy: str | Strategy = "balanced"
    backend: str | Backend = "auto"
    concurrency: int | Literal["auto"] = "auto"
    chunk_bytes: int | Literal["auto"] = "auto"
    skip_cached: bool = True
    window_bytes: int | Literal["auto"] | None = None
    order: str | Order = "sorted"
    progress: Callable[[Progress], object] | None = None

    def __post_init__(self) -> None:
        if not is_auto(self.chunk_bytes):
            check_chunk_bytes(self.chunk_bytes)
        concurrency = self.concurrency
        if not is_auto(concurrency) and not (
            _is_int(concurrency) and 1 <= concurrency <= MAX_CONCURRENCY
        ):
            raise InvalidOptionError(
                f"concurrency must be 'auto' or an integer in [1, {MAX_CONCURRENCY}], "
                f"got {concurrency!r}"
            )
        window = self.window_bytes
        if window is not None and not is_auto(window) and not (_is_int(window) and window >= 1):
            raise InvalidOptionError(
                f"window_bytes must be None, 'auto' or an integer >= 1, got {window!r}"
            )
        if self.progress is not None and not callable(self.progress):
            raise InvalidOptionError(f"progress must be a callable or None, got {self.progress!r}")
        check_backend(self.backend)
        object.__setattr__(self, "strategy", Strategy.parse(self.strategy))
        object.__setattr__(self, "order", Order.parse(self.order))
        object.__setattr__(self, "skip_cached", bool(self.skip_cached))

    @classmethod
    def from_keywords(
        cls, options: PrefetchOptions | None = None, /, **fields: Any
    ) -> PrefetchOptions:
        """`options` (or the defaults) with the fields given as keywords replaced.

        Args:
            options: a base to start from; None for the defaults.
            **fields: fields of `PrefetchOptions`.

        Raises:
            TypeError: a keyword that is not a field (the message lists the valid ones).
            InvalidOptionError: a value out of range.

        Example:
            >>> o = PrefetchOptions.from_keywords(PrefetchOptions(concurrency=2), skip_cached=False)
            >>> o.concurrency, o.skip_cached
            (2, False)
        """
        check_option_names(fields)
        if options is None:
            return cls(**fields)
        return dataclasses.replace(options, **fields) if fields else options


#: The names of `PrefetchOptions`' fields: the option keywords every entry point takes.
OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PrefetchOptions))


def check_option_names(names: Iterable[str]) -> None:
    """Raise TypeError, listing the valid options, if a name is not a `PrefetchOptions` field.

    Example:
        >>> check_option_names(["chunk_bytes", "window_bytes"])
    """
    unknown = set(names) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(
            f"unknown prefetch option(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(OPTION_NAMES))}"
        )


def takes_prefetch_options(func: F) -> F:
    """Show the fields of `PrefetchOptions` in the signature of `func`, which takes them
    through ``**kwargs``: `help` and `inspect.signature` then list every option with its
    type and default, as if each were written out.
    """
    sig = inspect.signature(func)
    kept = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    options = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
        )
        for f in dataclasses.fields(PrefetchOptions)
    ]
    func.__signature__ = sig.replace(parameters=[*kept, *options])  # type: ignore[attr-defined]
    return func
