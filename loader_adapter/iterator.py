"""The weights iterator: safetensors tensors in the planner's order, with an optional prefetch.

Tensors come from ``safe_open(path, framework="pt").get_tensor(name)`` exactly as without
prefetch (file-backed, read on first touch); the prefetch only changes how fast their
pages arrive. Files are consumed in the engine's order (``engine.resolve_files``) and the
tensors of a file by data offset, so the prefetch front, which follows the same order,
stays ahead of the loader. After each tensor is consumed (when the next one is asked for)
the prefetch learns the loader's position, which moves its window forward.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import struct
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from safetensors import safe_open

from engine import PrefetchHandle, PrefetchReport, ResolvedFile, resolve_files, start_prefetch
from loader_adapter.discovery import discover_local_rank
from loader_adapter.files import CheckpointFiles, expand_checkpoint_files
from loader_adapter.fsdetect import decide_auto

__all__ = [
    "PrefetchMode",
    "WeightsIterator",
    "load_state_dict",
    "safetensors_weights_iterator",
    "tensor_order",
]

log = logging.getLogger(__name__)

#: ``prefetch=`` values: off, on, or on for network/FUSE filesystems only.
PrefetchMode = bool | Literal["auto"]

#: Keyword options passed through to `engine.start_prefetch`.
_ENGINE_OPTIONS = frozenset(
    name
    for name, p in inspect.signature(start_prefetch).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)
#: `load_state_dict` gives up waiting for a prefetch that made no progress for this long.
STALL_TIMEOUT_S = 30.0
#: The loader's position is reported to the prefetch when it moved at least this much.
_REPORT_EVERY_BYTES = 256 << 10


def tensor_order(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """The tensors of a safetensors file by data offset, with the file offset of each end.

    Reads only the header. Call it after ``safe_open`` accepted the file: a corrupt header
    then raises safetensors' own error first.

    Args:
        path: a safetensors file.

    Returns:
        ``[(name, end), ...]`` where `end` is the absolute file offset just past the
        tensor's data, sorted by (start, end, name).

    Example:
        >>> import tempfile, torch, safetensors.torch as st
        >>> p = tempfile.mkdtemp() + "/x.safetensors"
        >>> st.save_file({"b": torch.zeros(2), "a": torch.zeros(1, dtype=torch.int8)}, p)
        >>> [name for name, _ in tensor_order(p)]
        ['b', 'a']
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        entries.append((start, end, name))
    entries.sort()
    return [(name, base + end) for _, end, name in entries]


class _Prefetch:
    """The iterator's hold on a running prefetch: advance it, stop it once, warn once."""

    def __init__(self, handle: PrefetchHandle) -> None:
        self._handle: PrefetchHandle | None = handle
        #: The final report, once stopped (None until then, or if the thread hung).
        self.report: PrefetchReport | None = None

    def advance_to(self, path: str, offset: int) -> None:
        h = self._handle
        if h is not None:
            h.advance_to(path, offset)

    def wait(self, *, stall_timeout_s: float = STALL_TIMEOUT_S) -> None:
        """Wait for the prefetch to end, giving up when it makes no progress for a while."""
        h = self._handle
        if h is None:
            return
        last, since = -1, time.monotonic()
        while not h.done:
            h.wait(timeout=0.5)
            done = h.progress().done_bytes
            if done != last:
                last, since = done, time.monotonic()
            elif time.monotonic() - since > stall_timeout_s:
                log.warning(
                    "prefetch made no progress for %.0f s; going on without waiting for it",
                    stall_timeout_s,
                )
                return

    def stop(self) -> None:
        """Cancel and join the prefetch (idempotent); log one warning if it failed."""
        h, self._handle = self._handle, None
        if h is None:
            return
        early = h.report if h.done else None  # ended before the loader finished?
        try:
            h.finish_consuming()
            report = h.cancel()
        except Exception as exc:  # prefetch is an optimisation: never fail the load
            log.warning("stopping the prefetch failed: %r; the loaded tensors are unaffected", exc)
            return
        self.report = early if early is not None else report
        if report is None:
            log.warning(
                "the prefetch thread did not stop in time; it is a daemon thread and will "
                "not delay exit; the loaded tensors are unaffected"
            )
        elif h.error is not None or report.failures:
            first = str(report.failures[0]) if report.failures else repr(h.error)
            log.warning(
                "prefetch incomplete: %d failed range(s) in %d file(s) (first: %s); those "
                "bytes were read directly from the files, the loaded tensors are unaffected",
                len(report.failures),
                len({f.path for f in report.failures}),
                first,
            )
        elif early is not None and early.cancelled:
            log.warning(
                "the prefetch was cancelled before loading finished (warmed %d of %d bytes); "
                "the rest was read directly from the files, the loaded tensors are unaffected",
                early.warmed_bytes,
                early.planned_bytes,
            )
        else:
            log.debug(
                "prefetch stopped: warmed %d, cached %d, skipped %d of %d bytes in %.2f s",
                report.warmed_bytes,
                report.cached_bytes,
                report.skipped_bytes,
                report.planned_bytes,
                report.elapsed_s,
            )


@dataclass
class _Setup:
    files: list[ResolvedFile]
    prefetch: _Prefetch | None


def _resolve(files: CheckpointFiles, order: str) -> list[ResolvedFile]:
    """Expand and resolve the checkpoint's files; raise the OS error of a bad path."""
    paths = expand_checkpoint_files(files)
    resolved, failures = resolve_files(paths, order=order)
    if failures:
        f = failures[0]
        raise OSError(f.errno or 0, f.message, f.path)
    if not resolved:
        raise ValueError("no checkpoint files given")
    return resolved


def _setup(
    files: CheckpointFiles,
    prefetch: PrefetchMode,
    rank: int | None,
    world: int | None,
    options: dict[str, Any],
    *,
    follow_consumer: bool,
) -> _Setup:
    if not (isinstance(prefetch, bool) or prefetch == "auto"):
        raise ValueError(f"prefetch must be True, False or 'auto', got {prefetch!r}")
    unknown = set(options) - _ENGINE_OPTIONS
    if unknown:
        raise TypeError(
            f"unknown prefetch option(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(_ENGINE_OPTIONS))}"
        )
    options = dict(options)
    order = options.get("order", "sorted")
    resolved = _resolve(files, order)
    if prefetch is False:
        return _Setup(resolved, None)

    local = discover_local_rank(rank, world)  # a collective under torch.distributed
    total = sum(f.size for f in resolved)
    if prefetch == "auto" and not decide_auto([f.path for f in resolved], total).enabled:
        return _Setup(resolved, None)

    # "auto": the engine bounds the warmed bytes ahead of the loader by the memory budget.
    window = options.get("window_bytes", "auto")
    if not follow_consumer:
        if window not in (None, "auto"):
            raise ValueError(
                "load_state_dict returns tensors that are read later, so no window can "
                "follow the reader: pass window_bytes=None, or use safetensors_weights_iterator"
            )
        window = None
    options["window_bytes"] = window
    paths = [f.path for f in resolved]
    try:
        handle = start_prefetch(paths, local.rank, local.world, **options)
    except (ValueError, TypeError):
        raise  # a programmer error: an invalid option
    except Exception as exc:  # prefetch is an optimisation: never fail the load
        log.warning("could not start the prefetch (%r); loading without it", exc)
        return _Setup(resolved, None)
    log.debug("prefetch started: local rank %d of %d (%s)", local.rank, local.world, local.source)
    return _Setup(resolved, _Prefetch(handle))


def _tensors(
    files: Sequence[ResolvedFile], prefetch: _Prefetch | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor; report the position after each; stop the prefetch at the end."""
    try:
        for f in files:
            reported = 0
            with safe_open(f.path, framework="pt") as st:
                for name, end in tensor_order(f.path):
                    yield name, st.get_tensor(name)
                    # Each report wakes the prefetch's loop: batch small tensors.
                    if prefetch is not None and end - reported >= _REPORT_EVERY_BYTES:
                        prefetch.advance_to(f.path, end)
                        reported = end
            if prefetch is not None:
                prefetch.advance_to(f.path, f.size)
    finally:
        if prefetch is not None:
            prefetch.stop()


class WeightsIterator(Iterator[tuple[str, torch.Tensor]]):
    """The iterator `safetensors_weights_iterator` returns: ``(name, tensor)`` pairs.

    A plain iterator with three extras: `close()` stops it early (and the prefetch with
    it), it is a context manager that closes on exit, and `report` gives the prefetch's
    `engine.PrefetchReport` once the iteration has ended.
    """

    def __init__(self, gen: Iterator[tuple[str, torch.Tensor]], prefetch: _Prefetch | None) -> None:
        self._gen = gen
        self._prefetch = prefetch

    def __iter__(self) -> WeightsIterator:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._gen)

    def close(self) -> None:
        """Stop the iteration: the prefetch is cancelled and joined. Idempotent."""
        self._gen.close()  # type: ignore[attr-defined]
        if self._prefetch is not None:
            self._prefetch.stop()

    def __enter__(self) -> WeightsIterator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def prefetching(self) -> bool:
        """Whether a prefetch was started (False when off, or ``"auto"`` said no)."""
        return self._prefetch is not None

    @property
    def report(self) -> PrefetchReport | None:
        """The prefetch's report once the iteration ended; None before, or without prefetch."""
        return self._prefetch.report if self._prefetch is not None else None


def safetensors_weights_iterator(
    files: CheckpointFiles,
    *,
    prefetch: PrefetchMode = False,
    rank: int | None = None,
    world: int | None = None,
    **prefetch_options: Any,
) -> WeightsIterator:
    """Iterate over a safetensors checkpoint's tensors, optionally prefetching the files.

    The tensors are those of ``safe_open(path, framework="pt").get_tensor(name)``:
    prefetch never changes them, and a failed prefetch only logs one warning. Files come
    in the engine's order (sorted by resolved path, or as given with ``order="given"``),
    the tensors of a file by offset. Use (copy) each tensor before asking for the next, as
    a serving engine does when it copies weights to the GPU: the prefetch window follows
    the loader's position. The prefetch starts when this function is called and is
    cancelled and joined when the iterator is exhausted, closed, garbage-collected, or
    raises. Errors about the files (missing file, corrupt header) are the same with and
    without prefetch.

    Args:
        files: ``.safetensors`` paths, a checkpoint directory, or a Hugging Face
            ``model.safetensors.index.json``.
        prefetch: False, True, or ``"auto"`` (on when the files are on a network or FUSE
            filesystem; logs its decision).
        rank: this process's local rank; None discovers it (``LOCAL_RANK``, then
            ``torch.distributed`` grouped by host, then 0). With torch.distributed, every
            rank must call this with the same `prefetch`.
        world: number of ranks on this node; None discovers it with `rank`.
        **prefetch_options: options of `engine.start_prefetch` (``strategy``, ``backend``,
            ``concurrency``, ``chunk_bytes``, ``skip_cached``, ``window_bytes``,
            ``order``, ``progress``). ``window_bytes`` defaults to ``"auto"``: no limit
            when the checkpoint fits in the page cache this process can use (MemAvailable,
            or its memory cgroup's room if smaller), else a window of half of that
            (`engine.auto_window`).

    Returns:
        A `WeightsIterator` of ``(name, tensor)`` (its ``report`` is the prefetch's
        report once the iteration has ended).

    Raises:
        OSError: a checkpoint file is missing or unreadable.
        ValueError: an invalid option, rank or world.
        TypeError: an unknown prefetch option.

    Example:
        >>> for name, tensor in safetensors_weights_iterator("/ckpt", prefetch="auto"):
        ...     model.load_weight(name, tensor.to("cuda"))  # doctest: +SKIP
    """
    setup = _setup(files, prefetch, rank, world, prefetch_options, follow_consumer=True)
    gen = _tensors(setup.files, setup.prefetch)
    if setup.prefetch is not None:
        # A generator that is never started does not run its `finally`: stop it on GC too.
        weakref.finalize(gen, setup.prefetch.stop)
    return WeightsIterator(gen, setup.prefetch)


def load_state_dict(
    files: CheckpointFiles,
    *,
    prefetch: PrefetchMode = False,
    rank: int | None = None,
    world: int | None = None,
    **prefetch_options: Any,
) -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint into a dict of tensors, optionally prefetching it.

    Like ``safetensors.torch.load_file`` over all the files: the tensors are file-backed
    and read when first used. With prefetch on, the function returns once this rank's
    share of the checkpoint is in the page cache (or the prefetch failed or stalled for
    30 s), so that using the tensors afterwards reads from memory. The window cannot follow
    a reader here: ``window_bytes`` must be None or ``"auto"`` (meaning None).

    Args:
        files: ``.safetensors`` paths, a checkpoint directory, or an index JSON.
        prefetch: False, True or ``"auto"``.
        rank: this process's local rank, or None to discover it.
        world: number of ranks on this node, or None to discover it.
        **prefetch_options: options of `engine.start_prefetch`.

    Returns:
        ``{name: tensor}`` for every tensor of every file.

    Raises:
        OSError: a checkpoint file is missing or unreadable.
        ValueError: an invalid option, rank or world, or a window.
        TypeError: an unknown prefetch option.

    Example:
        >>> model.load_state_dict(load_state_dict("/ckpt", prefetch=True))  # doctest: +SKIP
    """
    setup = _setup(files, prefetch, rank, world, prefetch_options, follow_consumer=False)
    try:
        state = dict(_tensors(setup.files, None))
        if setup.prefetch is not None:
            setup.prefetch.wait()
        return state
    finally:
        if setup.prefetch is not None:
            setup.prefetch.stop()
