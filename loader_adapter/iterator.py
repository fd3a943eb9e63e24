"""The weights iterator: safetensors tensors in the planner's order, with an optional prefetch.

Tensors come from ``safe_open(path, framework="pt").get_tensor(name)`` exactly as without
prefetch (file-backed, read on first touch); the prefetch only changes how fast their
pages arrive. Files are consumed in the engine's order (``engine.resolve_files``) and the
tensors of a file by data offset, so the prefetch front, which follows the same order,
stays ahead of the loader. After each tensor is consumed (when the next one is asked for)
the prefetch learns the loader's position, which moves its window forward.

With a prefetch window, the pages of tensors the caller has let go (no tensor, view or
array of them is left) are unmapped from this process's safetensors mapping
(`engine.release_mapped`): the page cache keeps them, but a page that no rank maps can be
dropped by the prefetch's trail when the checkpoint is larger than memory (`engine.memory`
explains why that matters). A tensor the caller keeps is never touched.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from safetensors import safe_open

from engine import (
    InvalidOptionError,
    PrefetchHandle,
    PrefetchOptions,
    PrefetchReport,
    Progress,
    ResolvedFile,
    resolve_files,
    start_prefetch,
)
from engine.memory import release_mapped
from engine.options import check_option_names
from loader_adapter.discovery import discover_local_rank
from loader_adapter.files import CheckpointFiles, expand_checkpoint_files
from loader_adapter.fsdetect import decide_auto
from loader_adapter.header import SafetensorsHeader, read_header

__all__ = [
    "PrefetchMode",
    "TensorFilter",
    "WeightsIterator",
    "load_state_dict",
    "node_weights_iterator",
    "tensor_order",
]

log = logging.getLogger(__name__)

#: ``prefetch=`` values: off, on, or on for network/FUSE filesystems only.
PrefetchMode = bool | Literal["auto"]
#: ``tensors=`` values: the names this rank loads, as a predicate or a collection.
TensorFilter = Callable[[str], bool] | Collection[str]

#: `load_state_dict` gives up waiting for a prefetch that made no progress for this long.
STALL_TIMEOUT_S = 30.0
#: The loader's position is reported to the prefetch when it moved at least this much.
_REPORT_EVERY_BYTES = 256 << 10
#: Pages of consumed tensors are unmapped in pieces of at least this many bytes.
_RELEASE_MIN_BYTES = 8 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")


def tensor_order(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """The tensors of a safetensors file by data offset, with the file offset of each end.

    Reads only the header (`loader_adapter.header.read_header`). Call it after
    ``safe_open`` accepted the file: a corrupt header then raises safetensors' own error
    first.

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
    return [(t.name, t.end) for t in read_header(path).tensors]


class _Prefetch:
    """The iterator's hold on a running prefetch: advance it, stop it once, warn once."""

    def __init__(self, handle: PrefetchHandle) -> None:
        self._handle: PrefetchHandle | None = handle
        #: The final report, once stopped (None until then, or if the thread hung).
        self.report: PrefetchReport | None = None
        self._windowed = False

    def advance_to(self, path: str, offset: int) -> None:
        h = self._handle
        if h is not None:
            h.advance_to(path, offset)

    def progress(self) -> Progress | None:
        """The running prefetch's snapshot; None once stopped."""
        h = self._handle
        return h.progress() if h is not None else None

    def windowed(self) -> bool:
        """Whether the prefetch runs with a window (and so drops what the loader left)."""
        if self._windowed:
            return True
        h = self._handle
        self._windowed = h is not None and h.progress().window_bytes is not None
        return self._windowed

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


def _storage_weakref(tensor: torch.Tensor) -> Any:
    """A weak reference to the tensor's storage (``expired()`` once no tensor uses it)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(tensor.untyped_storage())


def _file_mapping(address: int, path: str) -> tuple[int, int] | None:
    """(start, end) of this process's mapping of `path` at file offset 0 holding `address`."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 5:
                    continue
                lo, _, hi = fields[0].partition("-")
                start, end = int(lo, 16), int(hi, 16)
                if start <= address < end:
                    same = (fields[2], fields[3], int(fields[4])) == ("00000000", dev, st.st_ino)
                    return (start, end) if same else None
    except (OSError, ValueError):
        return None
    return None


class _Releaser:
    """Unmaps the pages of one file's tensors that the caller has let go.

    Each tracked tensor is looked at once, after the caller has asked for the tensor after
    it: if no tensor, view or array of its storage is left, its bytes can no longer be read
    or written through Python, so ``madvise(MADV_DONTNEED)`` on them is invisible (even on
    copy-on-write pages); if it is still alive, the caller keeps it and it is never
    touched. Runs of consecutive let-go tensors are unmapped together, whole pages only,
    so a page shared with a kept tensor stays. Anything unexpected (a tensor not backed by
    one mapping of this file at offset 0, a failed call) turns it off for the file.
    """

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.base: int | None = None
        self.pending: collections.deque[tuple[int, int, Any]] = collections.deque()
        self.run: tuple[int, int] | None = None  # [lo, hi): let-go bytes not yet unmapped
        self.on = True

    def add(self, tensor: torch.Tensor, end: int) -> None:
        """Track a tensor about to be yielded; `end` is its data's end in the file."""
        if not self.on:
            return
        try:
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes == 0:
                return
            start, ptr = end - nbytes, tensor.data_ptr()
            storage = tensor.untyped_storage()
            if storage.nbytes() != nbytes or storage.data_ptr() != ptr or ptr - start < 0:
                raise ValueError("tensor is not its own slice of the file mapping")
            if self.base is None:
                span = _file_mapping(ptr, self.path)
                if span is None or span[0] != ptr - start or span[1] - span[0] < self.size:
                    raise ValueError("no mapping of the whole file at offset 0")
                self.base = ptr - start
            elif ptr - start != self.base:
                raise ValueError("tensor outside the file's mapping")
            self.pending.append((start, end, _storage_weakref(tensor)))
        except Exception as exc:  # an optimisation only: never fail the load
            log.debug("not releasing mapped pages of %s: %r", self.path, exc)
            self.on = False
            self.pending.clear()

    def release(self) -> None:
        """Look at every tracked tensor but the last one yielded; unmap the let-go ones."""
        while self.on and len(self.pending) > 1:
            start, end, ref = self.pending.popleft()
            if not ref.expired():  # kept by the caller: end the run before it
                self._unmap(final=True)
                self.run = None
                continue
            if self.run is not None and self.run[1] == start:
                self.run = (self.run[0], end)
            else:
                self._unmap(final=True)
                self.run = (start, end)
            if self.run[1] - self.run[0] >= _RELEASE_MIN_BYTES:
                self._unmap(final=False)

    def _unmap(self, *, final: bool) -> None:
        """Unmap the whole pages of the run; unless `final`, keep its last partial page."""
        if self.run is None or self.base is None:
            return
        lo, hi = self.run
        top = hi - hi % _PAGE
        if release_mapped(self.base + lo, top - lo) is False:
            log.debug("madvise failed on %s; not releasing its pages any more", self.path)
            self.on = False
        if not final:
            self.run = (top, hi)


@dataclass
class _Setup:
    files: list[ResolvedFile]
    prefetch: _Prefetch | None
    wanted: Callable[[str], bool] | None = None
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict)  # read while planning


def tensor_predicate(tensors: TensorFilter | None) -> Callable[[str], bool] | None:
    """The ``tensors=`` filter as a predicate on names (None: every tensor)."""
    if tensors is None or callable(tensors):
        return tensors
    if isinstance(tensors, str) or not isinstance(tensors, Collection):
        raise InvalidOptionError(
            f"tensors must be a predicate on names or a collection of names, got {tensors!r}"
        )
    names = frozenset(tensors)
    return names.__contains__


def needed_ranges(
    files: Sequence[ResolvedFile], wanted: Callable[[str], bool]
) -> tuple[dict[str, list[tuple[int, int]]], dict[str, SafetensorsHeader]]:
    """The byte ranges this rank reads (each file's header, and the wanted tensors' data),
    and the headers read for them (the iterator reuses them).

    A file whose header cannot be read is left out (needed whole): the loader then meets
    it and raises safetensors' own error, as without prefetch.
    """
    needs: dict[str, list[tuple[int, int]]] = {}
    headers: dict[str, SafetensorsHeader] = {}
    for f in files:
        try:
            header = headers[f.path] = read_header(f.path)
        except (OSError, ValueError) as exc:
            log.debug("%s: no header to plan from (%s); the file is needed whole", f.path, exc)
            continue
        spans = [(t.start, t.end) for t in header.tensors if wanted(t.name)]
        needs[f.path] = [(0, header.data_start), *spans]
    return needs, headers


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


def _prefetch_options(options: dict[str, Any], *, follow_consumer: bool) -> PrefetchOptions:
    """The engine's options: the caller's, with the loader's default window ("auto": the
    engine bounds the bytes warmed ahead of the loader by the memory budget)."""
    window = options.get("window_bytes", "auto")
    if not follow_consumer:
        if window not in (None, "auto"):
            raise ValueError(
                "load_state_dict returns tensors that are read later, so no window can "
                "follow the reader: pass window_bytes=None, or use safetensors_weights_iterator"
            )
        window = None
    return PrefetchOptions.from_keywords(**{**options, "window_bytes": window})


def _setup(
    files: CheckpointFiles,
    prefetch: PrefetchMode,
    rank: int | None,
    world: int | None,
    options: dict[str, Any],
    *,
    follow_consumer: bool,
    tensors: TensorFilter | None = None,
) -> _Setup:
    if not (isinstance(prefetch, bool) or prefetch == "auto"):
        raise ValueError(f"prefetch must be True, False or 'auto', got {prefetch!r}")
    check_option_names(options)  # their values are checked only if a prefetch starts
    wanted = tensor_predicate(tensors)
    resolved = _resolve(files, options.get("order", "sorted"))
    if prefetch is False:
        return _Setup(resolved, None, wanted)

    try:
        local = discover_local_rank(rank, world)  # a collective under torch.distributed
    except ValueError as exc:
        if rank is not None or world is not None:
            raise  # the caller's arguments: a programmer error
        # A launcher's environment the loader cannot use must not fail the load.
        log.warning("cannot tell this process's local rank (%s); loading without prefetch", exc)
        return _Setup(resolved, None, wanted)
    total = sum(f.size for f in resolved)
    if prefetch == "auto" and not decide_auto([f.path for f in resolved], total).enabled:
        return _Setup(resolved, None, wanted)

    opts = _prefetch_options(options, follow_consumer=follow_consumer)
    paths = [f.path for f in resolved]
    needs, headers = needed_ranges(resolved, wanted) if wanted is not None else (None, {})
    try:
        handle = start_prefetch(paths, local.rank, local.world, options=opts, needs=needs)
    except (ValueError, TypeError):
        raise  # a programmer error: an invalid option
    except Exception as exc:  # prefetch is an optimisation: never fail the load
        log.warning("could not start the prefetch (%r); loading without it", exc)
        return _Setup(resolved, None, wanted)
    log.debug("prefetch started: local rank %d of %d (%s)", local.rank, local.world, local.source)
    return _Setup(resolved, _Prefetch(handle), wanted, headers)


def _tensors(
    files: Sequence[ResolvedFile],
    prefetch: _Prefetch | None,
    wanted: Callable[[str], bool] | None = None,
    headers: dict[str, SafetensorsHeader] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every wanted tensor; report the position after each; stop the prefetch at the
    end."""
    try:
        for f in files:
            reported = 0
            releaser = _Releaser(f.path, f.size) if prefetch is not None else None
            with safe_open(f.path, framework="pt") as st:
                header = (headers or {}).get(f.path) or read_header(f.path)
                for name, end in ((t.name, t.end) for t in header.tensors):
                    if wanted is not None and not wanted(name):
                        continue  # another rank's: never read here
                    tensor = st.get_tensor(name)
                    # Only with a window is anything dropped: only then unmap what was used.
                    if releaser is not None and prefetch is not None and prefetch.windowed():
                        releaser.add(tensor, end)
                    yield name, tensor
                    del tensor  # the caller's references alone decide when it is released
                    # Each report wakes the prefetch's loop: batch small tensors.
                    if prefetch is not None and end - reported >= _REPORT_EVERY_BYTES:
                        if releaser is not None:
                            releaser.release()
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

    def progress(self) -> Progress | None:
        """The running prefetch's `engine.Progress`; None without prefetch or once closed."""
        return self._prefetch.progress() if self._prefetch is not None else None

    @property
    def report(self) -> PrefetchReport | None:
        """The prefetch's report once the iteration ended; None before, or without prefetch."""
        return self._prefetch.report if self._prefetch is not None else None


def node_weights_iterator(
    files: CheckpointFiles,
    *,
    prefetch: PrefetchMode = False,
    rank: int | None = None,
    world: int | None = None,
    tensors: TensorFilter | None = None,
    **prefetch_options: Any,
) -> WeightsIterator:
    """The node scope of `loader_adapter.safetensors_weights_iterator` (which documents
    the arguments): the node's local ranks share the prefetch.

    Returns:
        A `WeightsIterator` of ``(name, tensor)``.

    Example:
        >>> for name, tensor in node_weights_iterator("/ckpt", prefetch=True):
        ...     params[name].copy_(tensor)  # doctest: +SKIP
    """
    setup = _setup(
        files, prefetch, rank, world, prefetch_options, follow_consumer=True, tensors=tensors
    )
    gen = _tensors(setup.files, setup.prefetch, setup.wanted, setup.headers)
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
        **prefetch_options: fields of `engine.PrefetchOptions`; ``window_bytes`` must be
            None or ``"auto"`` (meaning None).

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
