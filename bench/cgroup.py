"""A memory cgroup (v1) for the "bigger than memory" scenario: create, join, always remove.

Page cache is charged to the memory cgroup of the process that reads it in, so running
the rank processes inside a cgroup with ``memory.limit_in_bytes`` below the checkpoint's
size models a node (or a container) with less memory than the checkpoint.

The bench's rank processes join the cgroup *after* importing torch and allocating their
copy buffer: cgroup v1 does not move existing charges with a process (unless
``memory.move_charge_at_immigrate`` is set, which we leave off), so the limit applies to
what the load itself brings in (page cache, prefetch buffers), not to the interpreter.

Only the cgroup v1 memory controller is supported (this project's machines mount it at
``/sys/fs/cgroup/memory`` and root may create groups there).

Example:
    >>> with memory_cgroup(limit_bytes=1 << 30) as cg:  # doctest: +SKIP
    ...     cg.add(pid)
    ...     ...
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CGROUP_V1_MEMORY", "CgroupError", "MemoryCgroup", "available", "join", "memory_cgroup"]

log = logging.getLogger(__name__)

#: Where the cgroup v1 memory controller is mounted.
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


class CgroupError(Exception):
    """A memory cgroup could not be created, joined or removed."""


def available(root: str | os.PathLike[str] = CGROUP_V1_MEMORY) -> tuple[bool, str]:
    """Whether memory cgroups can be created under `root`, and why not.

    Args:
        root: the cgroup v1 memory controller's mount point.

    Returns:
        (True, "") or (False, a reason for a skip message).

    Example:
        >>> ok, why = available()
    """
    root = Path(root)
    if not (root / "cgroup.procs").exists():
        return False, f"{root} is not a cgroup v1 memory controller mount"
    if not os.access(root, os.W_OK):
        return False, f"{root} is not writable (needs root)"
    return True, ""


def join(cgroup_dir: str | os.PathLike[str], pid: int | None = None) -> None:
    """Move process `pid` (default: this process) into the cgroup at `cgroup_dir`.

    Args:
        cgroup_dir: the cgroup's directory.
        pid: the process; None for the calling process.

    Raises:
        CgroupError: when the write is refused.

    Example:
        >>> join("/sys/fs/cgroup/memory/bench-1234")  # doctest: +SKIP
    """
    pid = os.getpid() if pid is None else pid
    try:
        with open(Path(cgroup_dir) / "cgroup.procs", "w") as f:
            f.write(f"{pid}\n")
    except OSError as exc:
        raise CgroupError(f"cannot move pid {pid} into {cgroup_dir}: {exc.strerror}") from exc


class MemoryCgroup:
    """One cgroup v1 memory group. Use `memory_cgroup()` so that it is always removed.

    Attributes:
        path: the cgroup's directory.
        limit_bytes: the memory limit set at creation.
    """

    def __init__(self, path: Path, limit_bytes: int) -> None:
        self.path = path
        self.limit_bytes = limit_bytes

    def _read_int(self, name: str) -> int:
        return int((self.path / name).read_text().strip())

    def add(self, pid: int) -> None:
        """Move `pid` into this cgroup (see `join`)."""
        join(self.path, pid)

    def pids(self) -> list[int]:
        """The processes now in the cgroup."""
        try:
            text = (self.path / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(x) for x in text.split()]

    def usage_bytes(self) -> int:
        """Memory charged now (page cache included): ``memory.usage_in_bytes``."""
        return self._read_int("memory.usage_in_bytes")

    def max_usage_bytes(self) -> int:
        """Highest charge since creation: ``memory.max_usage_in_bytes``."""
        return self._read_int("memory.max_usage_in_bytes")

    def failcnt(self) -> int:
        """How many times the limit was hit (each time, the kernel reclaimed)."""
        return self._read_int("memory.failcnt")

    def stats(self) -> dict[str, int]:
        """The limit, usage, peak usage and failure count, for the results file."""
        out = {"limit_bytes": self.limit_bytes}
        for key, fn in (
            ("usage_bytes", self.usage_bytes),
            ("max_usage_bytes", self.max_usage_bytes),
            ("failcnt", self.failcnt),
        ):
            with contextlib.suppress(OSError, ValueError):
                out[key] = fn()
        return out

    def reset_peak(self) -> None:
        """Reset ``memory.max_usage_in_bytes`` and ``memory.failcnt`` to start a sample."""
        for name in ("memory.max_usage_in_bytes", "memory.failcnt"):
            with contextlib.suppress(OSError):
                (self.path / name).write_text("0\n")

    def remove(self, *, timeout: float = 10.0) -> None:
        """Move every process out to the root group, then remove the cgroup directory.

        Args:
            timeout: seconds to keep retrying the removal while processes are leaving.

        Raises:
            CgroupError: when the directory is still there after `timeout`.
        """
        root = self.path.parent
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids():
                try:
                    join(root, pid)
                except CgroupError as exc:  # a process that exited meanwhile is fine
                    log.debug("%s", exc)
            try:
                self.path.rmdir()
                log.debug("removed memory cgroup %s", self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove cgroup {self.path}: {exc.strerror}") from exc
            time.sleep(0.05)


@contextlib.contextmanager
def memory_cgroup(
    limit_bytes: int,
    *,
    name: str | None = None,
    root: str | os.PathLike[str] = CGROUP_V1_MEMORY,
) -> Iterator[MemoryCgroup]:
    """Create a memory cgroup limited to `limit_bytes`, and always remove it afterwards.

    Args:
        limit_bytes: ``memory.limit_in_bytes`` (page cache included).
        name: the cgroup's name; default ``ckpt-prefetch-bench-<pid>``.
        root: the cgroup v1 memory controller's mount point.

    Yields:
        The MemoryCgroup; processes added to it are moved back to `root` on exit.

    Raises:
        CgroupError: when the cgroup cannot be created or limited.

    Example:
        >>> with memory_cgroup(1 << 30) as cg:  # doctest: +SKIP
        ...     cg.add(os.getpid())
    """
    ok, why = available(root)
    if not ok:
        raise CgroupError(f"memory cgroups are unavailable: {why}")
    if limit_bytes < (4 << 20):
        raise ValueError(f"limit_bytes must be at least 4 MiB, got {limit_bytes}")
    path = Path(root) / (name or f"ckpt-prefetch-bench-{os.getpid()}")
    try:
        path.mkdir()
    except FileExistsError:
        # Left over by a killed run: take it over (it is ours by name) and reset it.
        log.warning("memory cgroup %s already exists; reusing it", path)
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}") from exc
    cg = MemoryCgroup(path, int(limit_bytes))
    try:
        try:
            (path / "memory.limit_in_bytes").write_text(f"{int(limit_bytes)}\n")
        except OSError as exc:
            raise CgroupError(f"cannot set {path}/memory.limit_in_bytes: {exc.strerror}") from exc
        log.info("memory cgroup %s limited to %.0f MiB", path, limit_bytes / (1 << 20))
        yield cg
    finally:
        cg.remove()
