"""The planner: which byte ranges of the checkpoint each local rank warms, in which order.

`plan()` is pure: it takes paths with sizes and returns extents, and opens no file.
`resolve_files()` is the one place that touches the filesystem to give the planner its
input (resolved paths, sizes, de-duplication), so that every rank computes the same plan
from the same list of files given in any order.
"""

from __future__ import annotations

import bisect
import enum
import errno
import itertools
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from engine.errors import Failure, InvalidOptionError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "STRATEGIES",
    "Extent",
    "Order",
    "Regions",
    "ResolvedFile",
    "Strategy",
    "needed_segments",
    "plan",
    "resolve_files",
    "split_extents",
]

#: Stripe unit when `plan` is called without one (the engine picks its own: `engine.tuning`).
DEFAULT_CHUNK_BYTES = 16 << 20
#: The smallest stripe unit accepted: one page.
MIN_CHUNK_BYTES = 4096
#: The largest stripe unit accepted (larger values are almost certainly a unit mistake).
MAX_CHUNK_BYTES = 1 << 34


class Strategy(str, enum.Enum):
    """How the checkpoint's bytes are divided among the local ranks."""

    #: Files concatenated in consumption order, cut into stripe units; unit i to rank i mod world.
    BALANCED = "balanced"
    #: Whole files: ``sorted(files)[rank::world]`` (the published SGLang behaviour).
    FILES = "files"

    @classmethod
    def parse(cls, value: str | Strategy) -> Strategy:
        """Return the strategy named by `value`, or raise ValueError naming the valid ones."""
        try:
            return cls(value)
        except ValueError:
            raise InvalidOptionError(
                f"unknown strategy {value!r}; valid strategies: {', '.join(STRATEGIES)}"
            ) from None


class Order(str, enum.Enum):
    """The consumption order of the files."""

    SORTED = "sorted"
    GIVEN = "given"

    @classmethod
    def parse(cls, value: str | Order) -> Order:
        """Return the order named by `value`, or raise ValueError naming the valid ones."""
        try:
            return cls(value)
        except ValueError:
            raise InvalidOptionError(
                f"unknown order {value!r}; valid orders: {', '.join(o.value for o in cls)}"
            ) from None


STRATEGIES: tuple[str, ...] = tuple(s.value for s in Strategy)


@dataclass(frozen=True, slots=True)
class ResolvedFile:
    """A checkpoint file after symlink resolution: what the planner needs to know."""

    path: str
    size: int
    dev: int = 0
    ino: int = 0


@dataclass(frozen=True, slots=True)
class Extent:
    """One byte range of one file that a rank warms.

    Attributes:
        path: the resolved file path.
        offset: first byte within the file.
        length: number of bytes (> 0).
        position: offset of the first byte in the concatenation of all files in
            consumption order: the loader's progress is measured on the same axis.
    """

    path: str
    offset: int
    length: int
    position: int

    @property
    def end(self) -> int:
        """Position just past the extent's last byte (on the concatenated axis)."""
        return self.position + self.length


def check_rank_world(rank: int, world: int) -> None:
    """Raise ValueError unless ``0 <= rank < world``."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise InvalidOptionError(f"world must be an integer >= 1, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise InvalidOptionError(f"rank must be an integer in [0, {world}), got {rank!r}")


def check_chunk_bytes(chunk_bytes: int) -> None:
    """Raise ValueError unless `chunk_bytes` is a sane stripe unit."""
    if (
        isinstance(chunk_bytes, bool)
        or not isinstance(chunk_bytes, int)
        or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES
    ):
        raise InvalidOptionError(
            f"chunk_bytes must be an integer in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], "
            f"got {chunk_bytes!r}"
        )


#: Byte ranges ``[start, end)`` of each file that one rank loads, by resolved path; a file
#: not in it is loaded whole.
Regions = Mapping[str, Sequence[tuple[int, int]]]


def plan(
    files: Sequence[ResolvedFile | tuple[str, int]],
    rank: int,
    world: int,
    *,
    strategy: str | Strategy = Strategy.BALANCED,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    needs: Sequence[Regions | None] | None = None,
) -> list[Extent]:
    """Return the extents that `rank` of `world` warms, in consumption order.

    The files are taken in the order given (call `resolve_files` first to get the
    canonical order every rank agrees on). No file is opened.

    Args:
        files: ``ResolvedFile`` objects or ``(path, size)`` pairs, in consumption order.
        rank: this process's local rank, ``0 <= rank < world``.
        world: number of local ranks sharing the node's page cache.
        strategy: ``"balanced"`` (stripe units of `chunk_bytes` dealt round-robin over the
            concatenated files) or ``"files"`` (``sorted(files)[rank::world]``, whole files).
        chunk_bytes: stripe unit and largest extent length, at least 4096.
        needs: what each local rank loads (`world` entries, by rank; None: everything),
            when the ranks load parts of the checkpoint (expert or pipeline parallelism).
            Only bytes some rank needs are planned, and each goes to one of the ranks
            that need it: a run of bytes that the same ranks need is dealt among those
            ranks alone (stripe units of that run, in turn), so no rank warms what only
            others load, and the shares of ranks that need the same bytes stay even.
            Positions stay on the axis of the whole files, where loaders report progress.

    Returns:
        The rank's extents, ordered by `Extent.position`; no extent is longer than
        `chunk_bytes` and none is empty.

    Raises:
        InvalidOptionError: a bad rank, world, size, stripe unit, or `needs` entry.

    Example:
        >>> [(e.offset, e.length) for e in plan([("a", 10000)], 1, 2, chunk_bytes=4096)]
        [(4096, 4096)]
        >>> half = [{"a": [(0, 5000)]}, {"a": [(5000, 10000)]}]  # two pipeline stages
        >>> [(e.offset, e.length) for e in plan([("a", 10000)], 1, 2, needs=half)]
        [(5000, 5000)]
    """
    check_rank_world(rank, world)
    check_chunk_bytes(chunk_bytes)
    strat = Strategy.parse(strategy)
    pairs = [
        (f.path, f.size) if isinstance(f, ResolvedFile) else (str(f[0]), int(f[1])) for f in files
    ]
    for path, size in pairs:
        if size < 0:
            raise InvalidOptionError(f"negative size {size} for {path!r}")
    if needs is not None and len(needs) != world:
        raise InvalidOptionError(f"needs must have one entry per rank ({world}), got {len(needs)}")
    segments = [needed_segments(path, size, needs, world) for path, size in pairs]
    if strat is Strategy.FILES:
        return _whole_files(pairs, segments, rank, world, chunk_bytes)
    return _balanced(pairs, segments, rank, chunk_bytes)


def merge_ranges(ranges: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Byte ranges clipped to ``[0, size)``, sorted, empty ones dropped, overlapping and
    touching ones merged (pure; the caller checks that each is ``0 <= start <= end``).

    Example:
        >>> merge_ranges([(8, 16), (0, 8), (100, 120), (30, 30)], 110)
        [(0, 16), (100, 110)]
    """
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        hi = min(hi, size)
        if hi <= lo:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _ranges(path: str, size: int, regions: Regions | None) -> list[tuple[int, int]]:
    """The ranges of one file that one rank needs, clipped to its size, sorted, merged."""
    if regions is None or path not in regions:
        return [(0, size)] if size else []
    for start, end in regions[path]:
        if start < 0 or end < start:
            raise InvalidOptionError(f"invalid region [{start}, {end}) of {path!r}")
    return merge_ranges(regions[path], size)


def needed_segments(
    path: str, size: int, needs: Sequence[Regions | None] | None, world: int
) -> list[tuple[int, int, tuple[int, ...]]]:
    """The file cut where the set of ranks needing it changes: ``(lo, hi, ranks)``, in
    order, runs that no rank needs left out (`needs`: per rank, as `plan` takes them;
    the cluster planner passes nodes for ranks).

    Example:
        >>> needed_segments("a", 100, [{"a": [(0, 60)]}, {"a": [(40, 100)]}], 2)
        [(0, 40, (0,)), (40, 60, (0, 1)), (60, 100, (1,))]
    """
    if needs is None or all(n is None or path not in n for n in needs):
        return [(0, size, tuple(range(world)))] if size else []
    per_rank = [_ranges(path, size, n) for n in needs]
    cuts = sorted({b for ranges in per_rank for r in ranges for b in r})
    out: list[tuple[int, int, tuple[int, ...]]] = []
    for lo, hi in itertools.pairwise(cuts):
        ranks = tuple(r for r, ranges in enumerate(per_rank) if _covers(ranges, lo))
        if not ranks:
            continue
        if out and out[-1][1] == lo and out[-1][2] == ranks:
            out[-1] = (out[-1][0], hi, ranks)
        else:
            out.append((lo, hi, ranks))
    return out


def _covers(ranges: list[tuple[int, int]], at: int) -> bool:
    i = bisect.bisect_right(ranges, (at, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= at < ranges[i][1]


def _whole_files(
    pairs: list[tuple[str, int]],
    segments: list[list[tuple[int, int, tuple[int, ...]]]],
    rank: int,
    world: int,
    chunk: int,
) -> list[Extent]:
    """``sorted(files)[rank::world]``, in pieces of at most `chunk`; a run of a file that
    only some ranks need goes to one of them, by the file's sorted index."""
    extents: list[Extent] = []
    index = {p: i for i, p in enumerate(sorted(p for p, _ in pairs))}
    position = 0
    for (path, size), segs in zip(pairs, segments, strict=True):
        for lo, hi, ranks in segs:
            if ranks[index[path] % len(ranks)] == rank:
                _append_pieces(extents, path, lo, hi - lo, position + lo, chunk)
        position += size
    return extents


def _balanced(
    pairs: list[tuple[str, int]],
    segments: list[list[tuple[int, int, tuple[int, ...]]]],
    rank: int,
    chunk_bytes: int,
) -> list[Extent]:
    """For each set of ranks, unit u covers [u*chunk, (u+1)*chunk) of the bytes that set
    needs, concatenated in order; it is ``ranks[u % len(ranks)]``'s. Without `needs`, one
    set (every rank) and every byte: unit u of the concatenated files is rank u % world's."""
    extents: list[Extent] = []
    dealt: dict[tuple[int, ...], int] = {}  # bytes of each set's axis so far
    position = 0  # start of the file on the axis of the whole files
    for (path, size), segs in zip(pairs, segments, strict=True):
        for lo, hi, ranks in segs:
            start = dealt.get(ranks, 0)
            end = dealt[ranks] = start + hi - lo
            if rank not in ranks:
                continue
            n, me = len(ranks), ranks.index(rank)
            first_unit = start // chunk_bytes
            unit = first_unit + ((me - first_unit) % n)  # the first of this run that is mine
            while unit * chunk_bytes < end:
                a = max(unit * chunk_bytes, start) - start + lo  # offset in the file
                b = min((unit + 1) * chunk_bytes, end) - start + lo
                extents.append(Extent(path, a, b - a, position + a))
                unit += n
        position += size
    return extents


def _append_pieces(
    out: list[Extent], path: str, offset: int, length: int, position: int, chunk: int
) -> None:
    """Append [offset, offset+length) of `path` to `out` in pieces of at most `chunk`."""
    done = 0
    while done < length:
        n = min(chunk, length - done)
        out.append(Extent(path, offset + done, n, position + done))
        done += n


def split_extents(extents: Iterable[Extent], piece_bytes: int) -> list[Extent]:
    """Cut each extent into pieces of at most `piece_bytes`, in order (pure).

    The scheduler joins neighbouring pieces again into reads of the size it chooses.

    Example:
        >>> [(e.offset, e.length) for e in split_extents([Extent("f", 0, 10, 0)], 4)]
        [(0, 4), (4, 4), (8, 2)]
    """
    out: list[Extent] = []
    for ext in extents:
        _append_pieces(out, ext.path, ext.offset, ext.length, ext.position, piece_bytes)
    return out


def resolve_files(
    files: Iterable[str | os.PathLike[str]],
    *,
    order: str | Order = Order.SORTED,
) -> tuple[list[ResolvedFile], list[Failure]]:
    """Resolve symlinks, stat and de-duplicate checkpoint files.

    Every rank must pass the same set of files; with ``order="sorted"`` the result does
    not depend on the order in which they were given. Files are de-duplicated by
    (device, inode), so a file listed twice or reached through two symlinks is warmed once.
    Nothing is opened, so a FIFO or device node cannot block.

    Args:
        files: paths of the checkpoint's files.
        order: ``"sorted"`` (by resolved path) or ``"given"`` (first appearance).

    Returns:
        ``(resolved, failures)``: regular files in consumption order, and one
        `Failure` for each path that is missing, not a regular file, or unreadable.

    Example:
        >>> resolved, failures = resolve_files(["/etc/hostname"])
        >>> resolved[0].size > 0, failures
        (True, [])
    """
    ordering = Order.parse(order)
    if isinstance(files, (str, bytes, os.PathLike)):  # one path, not its characters
        files = [files]
    by_key: dict[tuple[int, int, int, int], ResolvedFile] = {}
    failures: list[Failure] = []
    for raw in files:
        found = _stat_regular(raw)
        if isinstance(found, Failure):
            failures.append(found)
            continue
        real, st = found
        # The same file reached twice (symlinks, hard links). Size and mtime too: some
        # filesystems (9p without multidevs, CIFS across DFS) reuse inode numbers for
        # different files, and dropping one of those would drop its tensors.
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        prev = by_key.get(key)
        if prev is None:
            by_key[key] = ResolvedFile(real, st.st_size, st.st_dev, st.st_ino)
        elif real < prev.path:  # hard links: the same name on every rank, whatever the order
            by_key[key] = ResolvedFile(real, prev.size, prev.dev, prev.ino)
    resolved = list(by_key.values())  # first-appearance order
    if ordering is Order.SORTED:
        resolved.sort(key=lambda f: f.path)
    return resolved, failures


def _stat_regular(raw: str | bytes | os.PathLike[str]) -> tuple[str, os.stat_result] | Failure:
    """``(resolved path, stat)`` of the regular file `raw` names, or why it is not one."""
    try:
        name = os.fsdecode(raw) if isinstance(raw, bytes) else os.fspath(raw)
    except TypeError as exc:  # not a path at all (None, a number, ...)
        return Failure(repr(raw), 0, 0, errno.EINVAL, f"not a path: {exc}")
    try:
        real = os.path.realpath(name, strict=True)
        st = os.stat(real)
    except OSError as exc:
        return Failure.from_os_error(name, 0, 0, exc)
    except RuntimeError as exc:  # symlink loop on some Python versions
        return Failure(name, 0, 0, errno.ELOOP, str(exc))
    except ValueError as exc:  # an embedded NUL byte
        return Failure(repr(name), 0, 0, errno.EINVAL, str(exc))
    if stat.S_ISDIR(st.st_mode):
        return Failure(name, 0, 0, errno.EISDIR, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        return Failure(name, 0, 0, errno.EINVAL, "not a regular file")
    return real, st
