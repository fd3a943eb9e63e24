"""Filesystems under test, and the cache state a sample starts from (cold or hot).

A filesystem under test holds one checkpoint and knows three things: which files the
ranks open, how to drop every cache layer in front of the storage (for a simulated
network mount: its page cache *and* the backing files' cache, else the "storage" would
answer from memory), and how many bytes the storage served during a sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from bench.blockdev import block_device, sectors_read
from bench.checkpoint import Checkpoint
from bench.errors import BenchError
from bench.mounts import mount_of
from engine.residency import evict
from engine.units import format_size

__all__ = [
    "COLD_RESIDENT_MAX",
    "HOT_RESIDENT_MIN",
    "FileSystem",
    "LocalFS",
    "NetworkFS",
    "check_fs",
    "effective_fs",
    "filesystem_names",
    "make_cold",
    "make_hot",
    "open_fs",
    "split_fs",
    "why_cached",
]

log = logging.getLogger(__name__)

#: Fraction of the checkpoint that may still be cached when a measurement starts cold.
COLD_RESIDENT_MAX = 0.01
#: Fraction that must be cached for a hot-cache measurement.
HOT_RESIDENT_MIN = 0.99
#: Pauses between eviction attempts: several seconds in all, for a disk still writing.
COLD_BACKOFF_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


class FileSystem:
    """A filesystem under test, holding one checkpoint.

    Attributes:
        name: ``local`` or a netfs profile.
        files: the checkpoint's files as the ranks open them.
        cache_layers: every set of files whose page cache must be cold before a sample.
    """

    name: str
    files: list[str]
    cache_layers: list[list[str]]

    def evict(self) -> None:
        """Drop the page cache of every layer."""
        raise NotImplementedError

    def start_count(self) -> None:
        """Start counting the bytes the storage serves."""
        raise NotImplementedError

    def served(self) -> int | None:
        """Bytes the storage served since `start_count`, or None when unknown."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The ``filesystems`` entry of a results document."""
        raise NotImplementedError

    def account(
        self, served: int | None, ranks_io: Sequence[int | None] | None
    ) -> tuple[int | None, dict[str, Any]]:
        """The bytes served to report for a sample, and what its detail records besides.

        Args:
            served: what `served` returned.
            ranks_io: each rank's own storage reads, or None for a sample without ranks
                (fio).
        """
        raise NotImplementedError


class LocalFS(FileSystem):
    """The checkpoint on local disk; bytes served are the ranks' own storage reads."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.name = "local"
        self.files = [str(f) for f in ckpt.files]
        self.cache_layers = [self.files]
        self.dev = block_device(ckpt.directory)
        self._start: int | None = None

    def evict(self) -> None:
        for f in self.files:
            evict(f)

    def start_count(self) -> None:
        self._start = sectors_read(self.dev) if self.dev else None

    def served(self) -> int | None:
        if self.dev is None or self._start is None:
            return None
        return (sectors_read(self.dev) - self._start) * 512

    def account(
        self, served: int | None, ranks_io: Sequence[int | None] | None
    ) -> tuple[int | None, dict[str, Any]]:
        # The device's counters see every process on the node (noisy on a shared
        # machine): kept as detail. The ranks' own read_bytes (/proc/<pid>/io, all
        # threads) see only the storage reads they caused, which is what "served for
        # this load" means; a sample without ranks has no such figure.
        detail = {"device_bytes_read": served}
        if ranks_io is None:
            return None, detail
        if all(v is not None for v in ranks_io):
            return sum(v for v in ranks_io if v is not None), detail
        return served, detail

    def describe(self) -> dict[str, Any]:
        mount = mount_of(os.path.dirname(self.files[0]))
        fstype = mount.fstype if mount else None
        dev = self.dev or "no block device"
        return {
            "kind": "local",
            "fstype": fstype,
            "device": self.dev,
            "label": f"local disk ({fstype or '?'} on {dev}); bytes served = storage "
            "reads of the rank processes (/proc/<pid>/io read_bytes), device "
            "sectors read (whole node) kept in each sample's detail",
            "source": mount.source if mount else None,
        }


class MountCounters(Protocol):
    """What a mount's server counted (`bench.netfs.Counters`, `bench.sshfs.Counters`)."""

    @property
    def bytes_served(self) -> int: ...
    @property
    def requests(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def opens(self) -> int: ...
    @property
    def inflight(self) -> int: ...
    @property
    def stalled(self) -> int: ...


class Mount(Protocol):
    """A network mount whose server counts every byte: the simulated one
    (`bench.netfs.NetFS`) or the real client (`bench.sshfs.SSHFS`)."""

    @property
    def path(self) -> Path: ...
    def evict(self) -> None: ...
    def reset_counters(self) -> None: ...
    def counters(self) -> MountCounters: ...
    def describe(self) -> dict[str, Any]: ...


class NetworkFS(FileSystem):
    """The checkpoint through a network mount (the simulated netfs, or the real sshfs
    client); its server side counts every byte."""

    def __init__(self, name: str, mount: Mount, ckpt: Checkpoint) -> None:
        self.name = name
        self.mount = mount
        self.files = [str(Path(mount.path) / f.name) for f in ckpt.files]
        self.cache_layers = [self.files, [str(f) for f in ckpt.files]]
        self.last_counters: dict[str, int] = {}

    def evict(self) -> None:
        self._quiet()  # a read still in the server would refill what is evicted
        self.mount.evict()

    def start_count(self) -> None:
        self.mount.reset_counters()  # `evict` (always just before) waited for quiet

    def served(self) -> int | None:
        c = self._quiet()
        self.last_counters = {"requests": c.requests, "opens": c.opens, "errors": c.errors}
        return int(c.bytes_served)

    def account(
        self, served: int | None, ranks_io: Sequence[int | None] | None
    ) -> tuple[int | None, dict[str, Any]]:
        if ranks_io is None:
            return served, {}
        return served, {"netfs": dict(self.last_counters)}  # a cache hit or a miscount?

    def _quiet(self, timeout: float = 10.0) -> MountCounters:
        """Wait until no read request is in the server; return its counters."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.mount.counters()
            busy = c.inflight + c.stalled
            if busy == 0 or time.monotonic() > deadline:
                if busy:
                    log.warning("%s: %d read requests still in the server", self.name, busy)
                return c
            time.sleep(0.01)

    def describe(self) -> dict[str, Any]:
        return dict(self.mount.describe())


@contextlib.contextmanager
def open_fs(name: str, ckpt: Checkpoint) -> Iterator[FileSystem]:
    """`ckpt` on filesystem `name` (``local``, a netfs or an sshfs profile with optional
    overrides, see `split_fs`; mounted for the block)."""
    if name == "local":
        yield LocalFS(ckpt)
        return
    from bench import netfs, sshfs

    base, overrides = split_fs(name)
    if base in sshfs.PROFILES:
        with sshfs.mounted(ckpt.directory, profile=base, **overrides) as real:
            yield NetworkFS(name, real, ckpt)
        return
    with netfs.mounted(ckpt.directory, profile=base, **overrides) as mount:
        yield NetworkFS(name, mount, ckpt)


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_fs(name: str) -> tuple[str, dict[str, Any]]:
    """A filesystem name's profile and its overrides: ``PROFILE[:FIELD=VALUE;...]``.

    What a user's client varies (where the latency is added and how much, the client's
    connections, the link rate) is set per run without a new profile; the whole string
    stays the filesystem's label in the results.

    Raises:
        ValueError: an override that is not ``FIELD=VALUE``.

    Example:
        >>> split_fs("sshfs:max_conns=4;latency_s=0.005;latency_at=link")
        ('sshfs', {'max_conns': 4, 'latency_s': 0.005, 'latency_at': 'link'})
        >>> split_fs("slow-nfs")
        ('slow-nfs', {})
    """
    base, _, rest = name.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(";")):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"filesystem {name!r}: {item!r} is not FIELD=VALUE")
        overrides[key.strip()] = _value(value.strip())
    return base, overrides


def check_fs(name: str) -> None:
    """Raise ValueError unless `name` is a known filesystem whose overrides its profile
    accepts (checked before anything is mounted)."""
    from bench import netfs, sshfs

    base, overrides = split_fs(name)
    if base not in filesystem_names():
        raise ValueError(f"unknown filesystem {base!r}: use one of {', '.join(filesystem_names())}")
    if base == "local":
        if overrides:
            raise ValueError("local takes no overrides")
        return
    module = sshfs if base in sshfs.PROFILES else netfs
    fields = {f.name for f in dataclasses.fields(module.PROFILES[base])} - {"name", "description"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(
            f"filesystem {name!r}: unknown field(s) {sorted(unknown)}; valid: {sorted(fields)}"
        )


def filesystem_names() -> tuple[str, ...]:
    """Every filesystem a matrix may name: local disk, netfs and sshfs profiles.

    Example:
        >>> filesystem_names()[:2]
        ('local', 'fast-nfs')
    """
    from bench import netfs, sshfs

    return ("local", *netfs.PROFILES, *sshfs.PROFILES)


def effective_fs(names: Sequence[str], fuse_ok: bool) -> list[str]:
    """The filesystems a matrix runs on: netfs and sshfs profiles become ``local`` without
    FUSE."""
    out: list[str] = []
    for name in names:
        eff = name if (name == "local" or fuse_ok) else "local"
        if eff not in out:
            out.append(eff)
    return out


def _resident(files: Sequence[str]) -> int:
    from engine import resident_bytes

    return sum(resident_bytes(f) for f in files)


def make_cold(fs: FileSystem, total: int) -> float:
    """Evict, check residency of every cache layer; return the largest fraction cached.

    Eviction writes dirty pages to storage first (`engine.evict`); pages under writeback
    or held by an exiting rank's mapping may still need a moment, so the check is
    retried with a bounded back-off.

    Raises:
        BenchError: 1% or more is still cached after every attempt; the message says
            what holds the pages (dirty or writeback pages, processes mapping the files).
    """
    frac = 1.0
    t0 = time.monotonic()
    for pause in (*COLD_BACKOFF_S, None):
        fs.evict()
        frac = max(_resident(layer) for layer in fs.cache_layers) / total if total else 0.0
        if frac < COLD_RESIDENT_MAX or pause is None:
            break
        time.sleep(pause)
    if frac < COLD_RESIDENT_MAX:
        return frac
    raise BenchError(
        f"cannot make the checkpoint cold on {fs.name}: {frac:.1%} still cached after "
        f"{time.monotonic() - t0:.1f} s of eviction; {why_cached(fs.cache_layers)}"
    )


def _dirty_and_writeback(files: Sequence[str]) -> tuple[int, int] | None:
    """Dirty and writeback bytes of `files`, or None when cachestat cannot tell."""
    from engine.residency import cache_status

    dirty = writeback = 0
    known = False
    for f in files:
        with contextlib.suppress(OSError):
            st = cache_status(f)
            if st is not None:
                known = True
                dirty += st.dirty_bytes
                writeback += st.writeback_bytes
    return (dirty, writeback) if known else None


def why_cached(layers: Sequence[Sequence[str]]) -> str:
    """What keeps pages of these files in the page cache, in words."""
    from engine.residency import processes_mapping

    files = [f for layer in layers for f in layer]
    pending = _dirty_and_writeback(files)
    reasons = []
    if pending is not None and any(pending):
        reasons.append(
            f"{format_size(pending[0])} dirty and {format_size(pending[1])} under writeback "
            "(the disk has not written them yet)"
        )
    holders = processes_mapping(files)
    if holders:
        names = ", ".join(f"{pid} ({comm})" for pid, comm in sorted(holders.items()))
        reasons.append(f"mapped by process {names}")
    if reasons:
        return "; ".join(reasons)
    if pending is not None:
        return "no page is dirty, under writeback or mapped (the kernel kept them anyway)"
    return "no process maps them (cachestat is unavailable to tell dirty pages)"


def make_hot(fs: FileSystem, total: int) -> float:
    """Read every file once (4 threads); return the fraction now cached."""
    from bench.floor import raw_read_share

    raw_read_share(fs.files, 0, 1, threads=4)
    return _resident(fs.files) / total if total else 1.0
