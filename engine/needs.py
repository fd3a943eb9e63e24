"""What each local rank loads, gathered once per node (expert and pipeline parallelism).

With expert parallelism a rank loads only its experts; with pipeline parallelism only its
stage's layers. The node then needs the union of what its ranks load, and the planner
(`engine.plan.plan`, ``needs=``) deals each run of needed bytes among the ranks that need
it. Every rank must plan from the same list, so each rank publishes its own needs in a
small file beside the `engine.cursor.RankBoard` (``/dev/shm``, keyed by the checkpoint's
files and the world size) and reads the others'. A rank that has not published within
`GATHER_TIMEOUT_S` (it started late, or does not prefetch) leaves the node's list
unknown: then this rank warms what it needs itself, all of it, never less.

Example:
    >>> needs = normalize({"/ckpt/a": [(8, 16), (0, 8), (100, 120)]}, {"/ckpt/a": 110})
    >>> needs
    {'/ckpt/a': ((0, 16), (100, 110))}
    >>> needed_bytes(needs, {"/ckpt/a": 110})
    26
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from engine.cursor import pid_alive
from engine.errors import InvalidOptionError
from engine.plan import Regions, ResolvedFile, merge_ranges

__all__ = [
    "GATHER_TIMEOUT_S",
    "NodeNeeds",
    "gather",
    "needed_bytes",
    "ahead_limit",
    "normalize",
    "run_ends",
    "union_bytes",
]

log = logging.getLogger(__name__)

#: How long a rank waits for the other local ranks to publish what they load.
GATHER_TIMEOUT_S = 10.0
_POLL_S = 0.01

#: A rank's needs, normalised: sorted, merged ranges per resolved path.
NodeNeeds = dict[str, tuple[tuple[int, int], ...]]


def normalize(regions: Regions, sizes: Mapping[str, int]) -> NodeNeeds:
    """`regions` with paths resolved, ranges clipped to the file, sorted and merged.

    Args:
        regions: byte ranges ``[start, end)`` per path (a symlink, as the caller knows it).
        sizes: the checkpoint's files by resolved path (`ResolvedFile.path`) and size.

    Returns:
        The ranges by resolved path; a path that is not one of the files is left out.

    Raises:
        InvalidOptionError: a range that is not ``0 <= start <= end``.
    """
    out: NodeNeeds = {}
    for raw, ranges in regions.items():
        path = raw if raw in sizes else os.path.realpath(raw)
        if path not in sizes:
            continue
        for start, end in ranges:
            if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start <= end:
                raise InvalidOptionError(f"invalid byte range [{start!r}, {end!r}) of {raw!r}")
        out[path] = tuple(merge_ranges([*out.get(path, ()), *ranges], sizes[path]))
    return out


def needed_bytes(needs: NodeNeeds | None, sizes: Mapping[str, int]) -> int:
    """Bytes of the checkpoint that `needs` covers (a file not in it: all of it)."""
    if needs is None:
        return sum(sizes.values())
    return sum(
        sum(hi - lo for lo, hi in needs[path]) if path in needs else size
        for path, size in sizes.items()
    )


def _runs(node: Sequence[NodeNeeds | None], path: str, size: int) -> list[tuple[int, int]]:
    """The merged runs of `path` that at least one rank of `node` needs."""
    return merge_ranges(
        (r for n in node for r in ([(0, size)] if n is None or path not in n else n[path])), size
    )


def union_bytes(node: Sequence[NodeNeeds | None], sizes: Mapping[str, int]) -> int:
    """Bytes that at least one of the ranks' `node` needs loads.

    Example:
        >>> a, b = {"a": ((0, 10),), "b": ()}, {"a": ((5, 20),), "b": ((0, 3),)}
        >>> union_bytes([a, b], {"a": 30, "b": 7}), union_bytes([a, None], {"a": 30, "b": 7})
        (23, 37)
    """
    return sum(hi - lo for p, size in sizes.items() for lo, hi in _runs(node, p, size))


def run_ends(
    node: Sequence[NodeNeeds | None], sizes: Mapping[str, int]
) -> dict[str, tuple[int, ...]]:
    """Where the node's needed runs end before the end of their file, per path, sorted.

    Reading ahead past such an end reads bytes that no local rank loads.

    Example:
        >>> run_ends([{"a": ((0, 10), (20, 30))}, {"a": ((5, 15),)}], {"a": 30})
        {'a': (15,)}
    """
    out = {}
    for p, size in sizes.items():
        ends = tuple(hi for _, hi in _runs(node, p, size) if hi < size)
        if ends:
            out[p] = ends
    return out


def ahead_limit(ends: Mapping[str, Sequence[int]], path: str, end: int) -> int:
    """The end of the needed run that a read ending at `end` of `path` lies in (0: the run
    goes on to the end of the file, or nothing limits it).

    Example:
        >>> ahead_limit({"a": (15, 40)}, "a", 12), ahead_limit({"a": (15, 40)}, "a", 41)
        (15, 0)
    """
    marks = ends.get(path, ())
    i = bisect.bisect_left(marks, end)
    return marks[i] if i < len(marks) else 0


def _directory() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _key(files: Sequence[ResolvedFile], world: int) -> str:
    ident = repr(("needs-v1", world, [(f.dev, f.ino, f.size) for f in files])).encode()
    return hashlib.sha256(ident).hexdigest()[:20]


class _Slot:
    """One rank's published needs: ``<dir>/ckpt-prefetch-<uid>-<key>.needs.<rank>``."""

    def __init__(self, directory: Path, key: str, rank: int) -> None:
        self.path = directory / f"ckpt-prefetch-{os.geteuid()}-{key}.needs.{rank}"

    def write(self, needs: NodeNeeds | None) -> None:
        doc = {
            "pid": os.getpid(),
            "needs": None if needs is None else {p: list(map(list, r)) for p, r in needs.items()},
        }
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.path)  # readers see the whole file or none

    def read(self, since: float) -> tuple[bool, NodeNeeds | None]:
        """(found, needs): found only when written since `since` (wall clock) by a live
        process; an earlier load's file is not this load's."""
        try:
            if os.stat(self.path).st_mtime < since:
                return False, None
            with open(self.path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return False, None
        if not pid_alive(int(doc.get("pid", 0))):
            return False, None
        raw = doc.get("needs")
        if raw is None:
            return True, None
        return True, {p: tuple((int(lo), int(hi)) for lo, hi in r) for p, r in raw.items()}

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def gather(
    files: Sequence[ResolvedFile],
    rank: int,
    world: int,
    own: NodeNeeds | None,
    *,
    timeout_s: float | None = None,
    directory: Path | None = None,
) -> tuple[list[NodeNeeds | None] | None, _Slot | None]:
    """Publish this rank's needs and collect every local rank's (blocks up to `timeout_s`).

    Args:
        files: the resolved checkpoint files (every rank passes the same).
        rank: this rank.
        world: local ranks.
        own: what this rank loads (`normalize`), None for everything.
        timeout_s: how long to wait for the others (None: `GATHER_TIMEOUT_S`).
        directory: where the files go (default ``/dev/shm``, else the temp directory).

    Returns:
        (the needs of ranks 0..world-1, or None when some rank did not publish in time or
        the files cannot be written; this rank's published slot, to remove at the end).
    """
    if world == 1:
        return [own], None
    timeout_s = GATHER_TIMEOUT_S if timeout_s is None else timeout_s
    base = directory if directory is not None else _directory()
    key = _key(files, world)
    slots = [_Slot(base, key, r) for r in range(world)]
    since = time.time() - timeout_s  # a file older than one wait is an earlier load's
    try:
        slots[rank].write(own)
    except OSError as exc:
        log.info("prefetch rank %d/%d: cannot publish what it loads (%s)", rank, world, exc)
        return None, None
    found: dict[int, NodeNeeds | None] = {rank: own}
    deadline = time.monotonic() + timeout_s
    while True:
        for r in range(world):
            if r not in found:
                ok, needs = slots[r].read(since)
                if ok:
                    found[r] = needs
        if len(found) == world:
            return [found[r] for r in range(world)], slots[rank]
        if time.monotonic() >= deadline:
            missing = sorted(set(range(world)) - set(found))
            log.warning(
                "prefetch rank %d/%d: local rank(s) %s did not say what they load within "
                "%.0f s; this rank warms all of what it loads itself",
                rank, world, missing, timeout_s,
            )  # fmt: skip
            return None, slots[rank]
        time.sleep(_POLL_S)
