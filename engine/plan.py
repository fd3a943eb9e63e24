"""The planner: which byte ranges of the checkpoint each local rank warms, in which order.

`plan()` is pure: it takes paths with sizes and returns extents, and opens no file.
`resolve_files()` is the one place that touches the filesystem to give the planner its
input (resolved paths, sizes, de-duplication), so that every rank computes the same plan
from the same list of files given in any order.
"""

from __future__ import annotations

import enum
import errno
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


#: Byte ranges ``[start, end)`` of each file that the node needs, by resolved path.
Regions = Mapping[str, Sequence[tuple[int, int]]]


def plan(
    files: Sequence[ResolvedFile | tuple[str, int]],
    rank: int,
    world: int,
    *,
    strategy: str | Strategy = Strategy.BALANCED,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    regions: Regions | None = None,
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
        regions: the byte ranges the node needs, per path (`engine.needs`: the union of
            what its ranks load); a path not in it is needed whole; None: every byte.
            Only needed bytes are planned: ``balanced`` deals stripe units of the needed
            bytes alone, so the ranks' shares stay even; positions stay on the axis of the
            whole files, where the loader reports its progress.

    Returns:
        The rank's extents, ordered by `Extent.position`; no extent is longer than
        `chunk_bytes` and none is empty.

    Example:
        >>> [(e.offset, e.length) for e in plan([("a", 10000)], 1, 2, chunk_bytes=4096)]
        [(4096, 4096)]
        >>> [(e.offset, e.length) for e in plan([("a", 10000)], 0, 1, chunk_bytes=4096,
        ...                                     regions={"a": [(100, 200), (9000, 9500)]})]
        [(100, 100), (9000, 500)]
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
    spans = [_needed(path, size, regions) for path, size in pairs]
    if strat is Strategy.FILES:
        return _whole_files(pairs, spans, rank, world, chunk_bytes)
    return _balanced(pairs, spans, rank, world, chunk_bytes)


def _needed(path: str, size: int, regions: Regions | None) -> list[tuple[int, int]]:
    """The needed ranges of one file, clipped to its size, sorted and merged."""
    if regions is None or path not in regions:
        return [(0, size)] if size else []
    out: list[tuple[int, int]] = []
    for start, end in sorted(regions[path]):
        if start < 0 or end < start:
            raise InvalidOptionError(f"invalid region [{start}, {end}) of {path!r}")
        lo, hi = start, min(end, size)
        if hi <= lo:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _whole_files(
    pairs: list[tuple[str, int]],
    spans: list[list[tuple[int, int]]],
    rank: int,
    world: int,
    chunk: int,
) -> list[Extent]:
    """``sorted(files)[rank::world]``, the needed part of each in pieces of at most `chunk`."""
    extents: list[Extent] = []
    mine = set(sorted(p for p, _ in pairs)[rank::world])
    position = 0
    for (path, size), needed in zip(pairs, spans, strict=True):
        if path in mine:
            for lo, hi in needed:
                _append_pieces(extents, path, lo, hi - lo, position + lo, chunk)
        position += size
    return extents


def _balanced(
    pairs: list[tuple[str, int]],
    spans: list[list[tuple[int, int]]],
    rank: int,
    world: int,
    chunk_bytes: int,
) -> list[Extent]:
    """Unit u covers [u*chunk, (u+1)*chunk) of the needed bytes concatenated (every byte,
    without regions); it is rank u % world's."""
    extents: list[Extent] = []
    position = 0  # start of the file on the axis of the whole files
    need = 0  # needed bytes before this range, on the axis of the needed bytes
    for (path, size), needed in zip(pairs, spans, strict=True):
        for lo, hi in needed:
            start, end = need, need + hi - lo
            first_unit = start // chunk_bytes
            # The first unit of this range that belongs to `rank`.
            unit = first_unit + ((rank - first_unit) % world)
            while unit * chunk_bytes < end:
                a = max(unit * chunk_bytes, start) - start + lo  # offset in the file
                b = min((unit + 1) * chunk_bytes, end) - start + lo
                extents.append(Extent(path, a, b - a, position + a))
                unit += world
            need = end
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
