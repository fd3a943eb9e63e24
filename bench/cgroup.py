"""A memory cgroup (v1 or v2) for the "bigger than memory" scenario: create, join, remove.

Page cache is charged to the memory cgroup of the process that reads it in, so running
the rank processes inside a cgroup whose limit is below the checkpoint's size models a node
(or a container) with less memory than the checkpoint.

The bench's rank processes join the cgroup *after* importing torch and allocating their
copy buffer: neither version moves existing charges with a process (v1 unless
``memory.move_charge_at_immigrate`` is set, which we leave off; v2 never), so the limit
applies to what the load itself brings in (page cache, prefetch buffers).

Both hierarchies are supported, found once by `find_hierarchy`:

- **v1** (this project's VMs): the memory controller's own mount
  (``/sys/fs/cgroup/memory``); groups under its root; ``memory.limit_in_bytes``,
  ``memory.usage_in_bytes``, ``memory.max_usage_in_bytes``, ``memory.failcnt``.
- **v2** (current distributions, Kubernetes, containers): the unified mount
  (``/sys/fs/cgroup``, or ``/sys/fs/cgroup/unified`` on hybrid hosts). A v2 group that
  limits memory needs ``memory`` in its parent's ``cgroup.subtree_control``, and a group
  with processes of its own cannot hand controllers to children ("no internal
  processes"), so the bench's group is made beside this process's own group (in the
  parent, the subtree delegated to a container or a systemd unit), or under the root when
  this process is in the root. Files: ``memory.max``, ``memory.current``,
  ``memory.peak`` (Linux 5.19+), the ``max`` count of ``memory.events``.

Processes moved in are moved back to the group they came from before it is removed.

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
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CGROUP_V1_MEMORY",
    "CgroupError",
    "Hierarchy",
    "MemoryCgroup",
    "available",
    "find_hierarchy",
    "join",
    "memory_cgroup",
]

log = logging.getLogger(__name__)

#: Where the cgroup v1 memory controller is mounted.
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
#: Where the unified (v2) hierarchy is mounted: alone, or beside v1 on hybrid hosts.
CGROUP_V2_MOUNTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


class CgroupError(Exception):
    """A memory cgroup could not be created, joined or removed."""


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """Where the bench can make memory groups, and which version's files they have.

    Attributes:
        version: 1 or 2.
        parent: the directory the bench's groups are made in.
        home: v2: this process's own group, where processes are moved back to when
            their group of origin is gone; v1: the controller's root.
        mount: the hierarchy's mount point.
    """

    version: int
    parent: Path
    home: Path
    mount: Path

    @property
    def files(self) -> dict[str, str]:
        """Role -> file name: limit, usage, peak, fails."""
        if self.version == 1:
            return {
                "limit": "memory.limit_in_bytes",
                "usage": "memory.usage_in_bytes",
                "peak": "memory.max_usage_in_bytes",
                "fails": "memory.failcnt",
            }
        return {
            "limit": "memory.max",
            "usage": "memory.current",
            "peak": "memory.peak",
            "fails": "memory.events",
        }


def _own_v2_group(proc_cgroup: Path) -> str | None:
    """This process's path in the unified hierarchy (``0::/path``), or None."""
    try:
        for line in proc_cgroup.read_text().splitlines():
            hid, controllers, path = line.split(":", 2)
            if hid == "0" and controllers == "":
                return path
    except OSError:
        return None
    return None


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _v2_hierarchy(mount: Path, proc_cgroup: Path) -> tuple[Hierarchy | None, str]:
    own = _own_v2_group(proc_cgroup)
    if own is None:
        return None, f"{proc_cgroup} names no cgroup v2 group"
    home = mount / own.lstrip("/")
    if not home.is_dir():  # inside a cgroup namespace the mount is the process's own group
        home = mount
    parent = home if home == mount else home.parent
    if "memory" not in _words(parent / "cgroup.controllers"):
        have = " ".join(sorted(_words(parent / "cgroup.controllers"))) or "none"
        return None, (
            f"the cgroup v2 group {parent} has no memory controller (its controllers: {have}; "
            "on a hybrid host the memory controller may be bound to cgroup v1)"
        )
    if "memory" not in _words(parent / "cgroup.subtree_control"):
        try:
            (parent / "cgroup.subtree_control").write_text("+memory\n")
        except OSError as exc:
            have = " ".join(sorted(_words(parent / "cgroup.controllers"))) or "none"
            return None, (
                f"cannot enable the memory controller for the children of {parent} "
                f"({exc.strerror}; its controllers: {have})"
            )
    if not os.access(parent, os.W_OK):
        return None, f"{parent} is not writable (needs root or a delegated subtree)"
    return Hierarchy(2, parent, home, mount), ""


def find_hierarchy(
    *,
    v1_root: Path = CGROUP_V1_MEMORY,
    v2_mounts: tuple[Path, ...] = CGROUP_V2_MOUNTS,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> tuple[Hierarchy | None, str]:
    """Where memory groups can be made: the v1 memory controller, else a v2 subtree.

    Args:
        v1_root: the cgroup v1 memory controller's mount point.
        v2_mounts: where the unified hierarchy may be mounted, in order.
        proc_cgroup: this process's cgroup file (tests pass a fake tree).

    Returns:
        (the hierarchy, "") or (None, why neither can be used, for a skip message).

    Example:
        >>> hierarchy, why = find_hierarchy()
    """
    reasons = []
    if (v1_root / "cgroup.procs").exists():
        if os.access(v1_root, os.W_OK):
            return Hierarchy(1, v1_root, v1_root, v1_root), ""
        reasons.append(f"{v1_root} is not writable (needs root)")
    else:
        reasons.append(f"{v1_root} is not a cgroup v1 memory controller mount")
    for mount in v2_mounts:
        if (mount / "cgroup.controllers").exists():
            found, why = _v2_hierarchy(mount, proc_cgroup)
            if found is not None:
                return found, ""
            reasons.append(why)
            break
    else:
        reasons.append("no cgroup v2 mount at " + " or ".join(str(m) for m in v2_mounts))
    return None, "; ".join(reasons)


def available(root: str | os.PathLike[str] | None = None) -> tuple[bool, str]:
    """Whether memory cgroups can be created (v1 or v2), and why not.

    Args:
        root: a cgroup v1 memory controller mount to use; None finds one (`find_hierarchy`).

    Returns:
        (True, "") or (False, a reason for a skip message).

    Example:
        >>> ok, why = available()
    """
    if root is not None:
        hierarchy, why = find_hierarchy(v1_root=Path(root), v2_mounts=())
    else:
        hierarchy, why = find_hierarchy()
    return hierarchy is not None, why


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


def _group_of(pid: int, hierarchy: Hierarchy) -> Path | None:
    """The directory of `pid`'s group in `hierarchy` (None where unknown)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        v1 = hierarchy.version == 1 and "memory" in controllers.split(",")
        if v1 or (hierarchy.version == 2 and hid == "0" and controllers == ""):
            group = hierarchy.mount / path.lstrip("/")
            return group if group.is_dir() else None
    return None


class MemoryCgroup:
    """One memory group. Use `memory_cgroup()` so that it is always removed.

    Attributes:
        path: the cgroup's directory.
        limit_bytes: the memory limit set at creation.
        hierarchy: where it lives (v1 or v2).
    """

    def __init__(self, path: Path, limit_bytes: int, hierarchy: Hierarchy | None = None) -> None:
        self.path = path
        self.limit_bytes = limit_bytes
        self.hierarchy = hierarchy or Hierarchy(1, path.parent, path.parent, path.parent)
        self._origin: dict[int, Path] = {}

    def _file(self, role: str) -> Path:
        return self.path / self.hierarchy.files[role]

    def _read_int(self, role: str) -> int:
        text = self._file(role).read_text()
        if role == "fails" and self.hierarchy.version == 2:
            fields = dict(line.split() for line in text.splitlines() if line.strip())
            return int(fields.get("max", 0))
        value = text.strip()
        return (1 << 63) - 1 if value == "max" else int(value)

    def add(self, pid: int) -> None:
        """Move `pid` into this cgroup (see `join`), remembering where it came from."""
        origin = _group_of(pid, self.hierarchy)
        if origin is not None:
            self._origin[pid] = origin
        join(self.path, pid)

    def pids(self) -> list[int]:
        """The processes now in the cgroup."""
        try:
            text = (self.path / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(x) for x in text.split()]

    def usage_bytes(self) -> int:
        """Memory charged now, page cache included (v1 ``memory.usage_in_bytes``, v2
        ``memory.current``)."""
        return self._read_int("usage")

    def max_usage_bytes(self) -> int:
        """Highest charge since creation or the last `reset_peak` (v1
        ``memory.max_usage_in_bytes``, v2 ``memory.peak``)."""
        return self._read_int("peak")

    def failcnt(self) -> int:
        """How many times the limit was hit (v1 ``memory.failcnt``, v2 the ``max`` count of
        ``memory.events``); each time, the kernel reclaimed."""
        return self._read_int("fails")

    def stats(self) -> dict[str, int]:
        """The limit, usage, peak usage and failure count, for the results file."""
        out = {"limit_bytes": self.limit_bytes, "cgroup_version": self.hierarchy.version}
        for key, fn in (
            ("usage_bytes", self.usage_bytes),
            ("max_usage_bytes", self.max_usage_bytes),
            ("failcnt", self.failcnt),
        ):
            with contextlib.suppress(OSError, ValueError):
                out[key] = fn()
        return out

    def reset_peak(self) -> None:
        """Reset the peak (and, on v1, the failure count) to start a sample.

        v2's ``memory.peak`` is reset by a write on Linux 6.12+; ``memory.events`` cannot
        be reset, so on v2 `stats` reports its count since creation.
        """
        roles = ("peak", "fails") if self.hierarchy.version == 1 else ("peak",)
        for role in roles:
            with contextlib.suppress(OSError):
                self._file(role).write_text("0\n" if self.hierarchy.version == 1 else "reset\n")

    def _move_out(self, pid: int) -> None:
        targets = [self._origin.get(pid), self.hierarchy.home]
        last: CgroupError | None = None
        for target in targets:
            if target is None:
                continue
            try:
                join(target, pid)
                return
            except CgroupError as exc:
                last = exc
        if last is not None:
            raise last

    def remove(self, *, timeout: float = 10.0) -> None:
        """Move every process back to where it came from (else to `Hierarchy.home`), then
        remove the group.

        Args:
            timeout: seconds to keep retrying the removal while processes are leaving.

        Raises:
            CgroupError: when the directory is still there after `timeout`.
        """
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids():
                try:
                    self._move_out(pid)
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
    root: str | os.PathLike[str] | None = None,
    hierarchy: Hierarchy | None = None,
) -> Iterator[MemoryCgroup]:
    """Create a memory cgroup limited to `limit_bytes`, and always remove it afterwards.

    Args:
        limit_bytes: the limit, page cache included (v1 ``memory.limit_in_bytes``, v2
            ``memory.max``).
        name: the cgroup's name; default ``ckpt-prefetch-bench-<pid>``.
        root: a cgroup v1 memory controller mount to use (None: `find_hierarchy`).
        hierarchy: where to make it (None: `find_hierarchy`; tests pass a fake tree).

    Yields:
        The MemoryCgroup; processes added to it are moved out again on exit.

    Raises:
        CgroupError: when the cgroup cannot be created or limited.

    Example:
        >>> with memory_cgroup(1 << 30) as cg:  # doctest: +SKIP
        ...     cg.add(os.getpid())
    """
    if hierarchy is None:
        if root is not None:
            hierarchy, why = find_hierarchy(v1_root=Path(root), v2_mounts=())
        else:
            hierarchy, why = find_hierarchy()
        if hierarchy is None:
            raise CgroupError(f"memory cgroups are unavailable: {why}")
    if limit_bytes < (4 << 20):
        raise ValueError(f"limit_bytes must be at least 4 MiB, got {limit_bytes}")
    path = hierarchy.parent / (name or f"ckpt-prefetch-bench-{os.getpid()}")
    try:
        path.mkdir()
    except FileExistsError:
        # Left over by a killed run: take it over (it is ours by name) and reset it.
        log.warning("memory cgroup %s already exists; reusing it", path)
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}") from exc
    cg = MemoryCgroup(path, int(limit_bytes), hierarchy)
    try:
        limit_file = path / hierarchy.files["limit"]
        try:
            limit_file.write_text(f"{int(limit_bytes)}\n")
        except OSError as exc:
            raise CgroupError(f"cannot set {limit_file}: {exc.strerror}") from exc
        log.info(
            "memory cgroup %s (v%d) limited to %.0f MiB",
            path, hierarchy.version, limit_bytes / (1 << 20),
        )  # fmt: skip
        yield cg
    finally:
        cg.remove()
