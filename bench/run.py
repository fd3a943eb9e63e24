"""Orchestration: checkpoints, filesystems, cold-cache measurements in fresh processes.

One **measurement** (a sample):

1. make the checkpoint cold: ``fs.evict()`` on a simulated network filesystem (the
   mount's page cache and the backing files'), ``posix_fadvise(DONTNEED)`` on every file
   on local disk; then check with the residency query that under 1% is still cached
   (the run stops with an error otherwise);
2. start W fresh rank processes (``bench.worker``); each imports torch and the loader,
   allocates its copy buffer, says ready and waits;
3. release them together and wait until the last rank has copied every tensor;
4. record the wall time (release to the last rank done, on the shared monotonic clock),
   each rank's time, CPU seconds, peak RSS, the checksum, and the bytes the storage
   served (the netfs counters, or the block device's sectors read on local disk).

Rank processes are forked from a **fork server** (``python -m bench.worker
--fork-server``) that has imported torch once: a fresh interpreter per rank costs 1.4 s
of CPU for ``import torch``, which on 2 cores would eat the quick suite's time budget.
Each fork is a fresh process (its own address space, no state from an earlier
measurement); only the imported modules are shared. ``launcher="subprocess"`` runs
``python -m bench.worker`` instead, a new interpreter per rank.

A **suite** is a list of matrices (scenario x filesystems x rank counts x shapes x
configurations). For each (filesystem, shape, rank count) it runs one untimed warm-up
(a cold raw read of the whole checkpoint, which pays this VM's first-touch cost of the
page-cache memory), then `repeats` rounds; each round measures the raw-read floor and
every configuration once, in an order rotated by one each round. Then the hot-cache
load (``none`` with every byte cached), and ``fio`` once per (filesystem, shape).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import select
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import results as res
from bench.blockdev import block_device, sectors_read
from bench.worker import Config, Job, parse_config
from engine.backends import BACKENDS
from engine.residency import evict

__all__ = [
    "BenchError",
    "ChecksumMismatch",
    "Matrix",
    "ProgressEvent",
    "Suite",
    "block_device",
    "default_workdir",
    "ensure_checkpoint",
    "full_suite",
    "quick_suite",
    "run_suite",
    "scan_checkpoint",
]

log = logging.getLogger(__name__)

#: Fraction of the checkpoint that may still be cached when a measurement starts cold.
COLD_RESIDENT_MAX = 0.01
#: Fraction that must be cached for a hot-cache measurement.
HOT_RESIDENT_MIN = 0.99
_MARKER = ".bench-checkpoint.json"
#: Read buffers a rank may hold inside the memory cgroup (4 threads x 16 MiB).
_READ_BUFFERS_PER_RANK = 64 << 20
_REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """The bench cannot go on (a rank failed, the cache is not cold, ...).

    Attributes:
        document: the results gathered so far, when there are any.
    """

    document: dict[str, Any] | None = None


class ChecksumMismatch(BenchError):
    """Two configurations or ranks loaded different bytes: a correctness bug."""


class BenchInterrupted(BenchError):
    """The run was interrupted (Ctrl-C, SIGINT); ``document`` holds what was measured."""


# --------------------------------------------------------------------------------------
# Suites


@dataclass(frozen=True)
class Matrix:
    """One block of measurements: every combination of its lists.

    Attributes:
        scenario: label (``cold``, ``sweep``, ``bigger-than-memory``, ...).
        fs: filesystems: ``local`` or a netfs profile name.
        ranks: rank counts.
        shapes: checkpoint shapes.
        configs: configuration strings (see ``bench.worker``).
        size_bytes: checkpoint size.
        memory_limit_bytes: run the ranks in a memory cgroup with this limit, or None.
        hot: also measure the hot-cache load.
        fio: also run fio.
    """

    scenario: str
    fs: tuple[str, ...]
    ranks: tuple[int, ...]
    shapes: tuple[str, ...]
    configs: tuple[str, ...]
    size_bytes: int
    memory_limit_bytes: int | None = None
    hot: bool = True
    fio: bool = True


@dataclass(frozen=True)
class Suite:
    """Everything `run_suite` needs.

    Attributes:
        name: ``quick``, ``full`` or ``custom``.
        matrices: the blocks of measurements.
        repeats: samples per measurement.
        warmup: untimed cold raw reads per (filesystem, shape, ranks) before sampling.
        workdir: where checkpoints are made (and reused).
        shards: shards of ``uniform`` and ``skewed`` checkpoints.
        skew: size ratio of the first shard of a ``skewed`` checkpoint.
        dtypes: tensor dtypes.
        seed: data seed.
        launcher: ``forkserver`` or ``subprocess``.
        timeout_s: longest a single measurement may take.
        argv: the command line, recorded in the results.
    """

    name: str
    matrices: tuple[Matrix, ...]
    repeats: int = 3
    warmup: int = 1
    workdir: Path = field(default_factory=lambda: default_workdir())
    shards: int = 8
    skew: float = 4.0
    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp8_e4m3")
    seed: int = 0
    launcher: str = "forkserver"
    timeout_s: float = 600.0
    argv: tuple[str, ...] | None = None


def default_workdir() -> Path:
    """``$XDG_CACHE_HOME/ckpt-prefetch-bench`` (``~/.cache/ckpt-prefetch-bench``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckpt-prefetch-bench"


QUICK_CONFIGS = ("none", "sglang", "ours")
FULL_CONFIGS = ("none", "sglang", "ours", "ours-files")
SWEEP_CONFIGS = tuple(f"ours-c{c}-{m}m" for c in (1, 2, 4, 8) for m in (16, 64))


def quick_suite(**overrides: Any) -> Suite:
    """The default suite: 512 MiB, slow-nfs, 4 ranks, uniform/skewed/single, none/sglang/ours.

    It takes under 3 minutes on the project's 2-core machine, making the checkpoints
    included (they are reused afterwards).

    Args:
        **overrides: Suite fields to replace.

    Returns:
        The Suite.

    Example:
        >>> quick_suite().matrices[0].fs
        ('slow-nfs',)
    """
    m = Matrix(
        scenario="cold",
        fs=("slow-nfs",),
        ranks=(4,),
        shapes=("uniform", "skewed", "single"),
        configs=QUICK_CONFIGS,
        size_bytes=512 << 20,
    )
    base = {"name": "quick", "matrices": (m,), "repeats": 3, "warmup": 1}
    base.update(overrides)
    return Suite(**base)


def full_suite(**overrides: Any) -> Suite:
    """The full suite (7,145 s, about 2 hours, measured on a 2-core VM on 2026-11-29).

    ``cold``: local disk and every netfs profile x ranks 1, 2, 4, 8 x shapes uniform,
    skewed, single, many-small x none, sglang, ours, ours-files, 2 GiB.
    ``sweep``: slow-nfs, 4 ranks, uniform, concurrency 1/2/4/8 x chunk 16/64 MiB.
    ``backends``: local and slow-nfs, 4 ranks, uniform: every read backend and the
    ``files`` strategy through the loader.
    ``bigger-than-memory``: slow-nfs, 4 ranks, a 3 GiB uniform checkpoint in a memory
    cgroup limited to 1 GiB: none, sglang, ours (window auto), ours-nowindow.

    Args:
        **overrides: Suite fields to replace.

    Returns:
        The Suite.
    """
    from bench import netfs

    fss = ("local", *netfs.PROFILES)
    mats = (
        Matrix(
            "cold",
            fss,
            (1, 2, 4, 8),
            ("uniform", "skewed", "single", "many-small"),
            FULL_CONFIGS,
            2 << 30,
        ),
        Matrix(
            "sweep",
            ("slow-nfs",),
            (4,),
            ("uniform",),
            ("sglang", "ours", *SWEEP_CONFIGS),
            2 << 30,
            hot=False,
            fio=False,
        ),
        Matrix(
            "backends",
            ("local", "slow-nfs"),
            (4,),
            ("uniform",),
            (*tuple(f"ours-{b}" for b in BACKENDS), "ours-files"),
            2 << 30,
            hot=False,
            fio=False,
        ),
        Matrix(
            "bigger-than-memory",
            ("slow-nfs",),
            (4,),
            ("uniform",),
            ("none", "sglang", "ours-window", "ours-nowindow"),
            3 << 30,
            memory_limit_bytes=1 << 30,
            hot=False,
            fio=False,
        ),
    )
    base = {"name": "full", "matrices": mats, "repeats": 3, "warmup": 1}
    base.update(overrides)
    return Suite(**base)


# --------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint ready for measuring (made or reused by `ensure_checkpoint`)."""

    shape: str
    directory: Path
    files: tuple[Path, ...]
    total_bytes: int
    tensor_count: int
    max_tensor_bytes: int
    params: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The ``checkpoints`` entry of a results document (checksum added later)."""
        return {
            "shape": self.shape,
            "total_bytes": self.total_bytes,
            "tensor_count": self.tensor_count,
            "max_tensor_bytes": self.max_tensor_bytes,
            "directory": str(self.directory),
            "params": dict(self.params),
            "files": [{"name": f.name, "size": f.stat().st_size} for f in self.files],
            "checksum": None,
        }


def scan_checkpoint(files: Sequence[str | os.PathLike[str]]) -> tuple[int, int]:
    """Read the safetensors headers: (tensor count, largest tensor in bytes).

    Args:
        files: safetensors files.

    Returns:
        (tensor_count, max_tensor_bytes).

    Example:
        >>> scan_checkpoint(["model.safetensors"])  # doctest: +SKIP
        (291, 131072000)
    """
    count, largest = 0, 0
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            lo, hi = meta["data_offsets"]
            count += 1
            largest = max(largest, hi - lo)
    return count, largest


def _shards_for(shape: str, shards: int) -> int | None:
    if shape == "single":
        return 1
    if shape == "many-small":
        return None  # the checkpoint maker's default (64)
    return shards


def ensure_checkpoint(
    workdir: str | os.PathLike[str],
    *,
    shape: str,
    size_bytes: int,
    shards: int = 8,
    skew: float = 4.0,
    dtypes: Sequence[str] = ("bf16", "fp16", "fp8_e4m3"),
    seed: int = 0,
) -> tuple[Checkpoint, bool]:
    """Make a checkpoint under `workdir`, or reuse the one made with the same parameters.

    Args:
        workdir: the bench's work directory.
        shape: checkpoint shape (``bench.checkpoint.SHAPES``).
        size_bytes: tensor data size.
        shards: shards for ``uniform``/``skewed`` (``single`` has 1, ``many-small`` 64).
        skew: first-shard ratio for ``skewed``.
        dtypes: tensor dtypes.
        seed: data seed.

    Returns:
        (checkpoint, made): made is False when an existing one was reused.

    Example:
        >>> ckpt, made = ensure_checkpoint("/tmp/w", shape="single", size_bytes=64 << 20)
    """
    from bench.checkpoint import make_checkpoint

    n = _shards_for(shape, shards)
    params = {
        "shape": shape,
        "size_bytes": int(size_bytes),
        "shards": n,
        "skew": float(skew) if shape == "skewed" else None,
        "dtypes": list(dtypes),
        "seed": int(seed),
    }
    tag = "-".join(
        [
            shape,
            f"{size_bytes}",
            f"s{n if n is not None else 'd'}",
            f"k{skew:g}" if shape == "skewed" else "k-",
            "+".join(dtypes),
            f"seed{seed}",
        ]
    )
    directory = Path(workdir) / "checkpoints" / tag
    marker = directory / _MARKER
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(marker.read_text())
        files = tuple(directory / name for name in saved["files"])
        if (
            saved["params"] == params
            and len(files) == len(saved["sizes"])
            and all(
                f.is_file() and f.stat().st_size == s
                for f, s in zip(files, saved["sizes"], strict=True)
            )
        ):
            return Checkpoint(
                shape,
                directory,
                files,
                int(saved["total_bytes"]),
                int(saved["tensor_count"]),
                int(saved["max_tensor_bytes"]),
                params,
            ), False
    marker.unlink(missing_ok=True)
    info = make_checkpoint(
        directory,
        size_bytes=size_bytes,
        shards=n,
        shape=shape,
        dtypes=tuple(dtypes),
        seed=seed,
        **({"skew": skew} if shape == "skewed" else {}),
    )
    files = tuple(sorted(Path(f) for f in info.files))
    count, largest = scan_checkpoint(files)
    marker.write_text(
        json.dumps(
            {
                "params": params,
                "files": [f.name for f in files],
                "sizes": [f.stat().st_size for f in files],
                "total_bytes": info.total_bytes,
                "tensor_count": count,
                "max_tensor_bytes": largest,
            },
            indent=1,
        )
    )
    return Checkpoint(shape, directory, files, info.total_bytes, count, largest, params), True


# --------------------------------------------------------------------------------------
# Filesystems


def _mount_of(path: str) -> tuple[str | None, str | None]:
    """(fstype, source) of the mount that holds `path`, from /proc/self/mountinfo."""
    path = os.path.realpath(path)
    best, fstype, source = "", None, None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts, rparts = left.split(), right.split()
            if len(parts) < 5 or len(rparts) < 2:
                continue
            mp = parts[4].replace("\\040", " ")
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, fstype, source = mp, rparts[0], rparts[1]
    return fstype, source


def _resident(files: Sequence[str]) -> int:
    from engine import resident_bytes

    return sum(resident_bytes(f) for f in files)


class _FS:
    """A filesystem under test, holding one checkpoint.

    Attributes:
        name: ``local`` or a netfs profile.
        files: the checkpoint's files as the ranks open them.
        cache_layers: every set of files whose page cache must be cold before a sample
            (for a netfs mount: the files through the mount, and the backing files the
            server reads, else the "storage" would answer from memory).
    """

    name: str
    files: list[str]
    cache_layers: list[list[str]]

    def evict(self) -> None:
        raise NotImplementedError

    def start_count(self) -> None:
        raise NotImplementedError

    def served(self) -> int | None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class _LocalFS(_FS):
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

    def describe(self) -> dict[str, Any]:
        fstype, source = _mount_of(os.path.dirname(self.files[0]))
        dev = self.dev or "no block device"
        return {
            "kind": "local",
            "fstype": fstype,
            "device": self.dev,
            "label": f"local disk ({fstype or '?'} on {dev}); bytes served = storage "
            "reads of the rank processes (/proc/<pid>/io read_bytes), device "
            "sectors read (whole node) kept in each sample's detail",
            "source": source,
        }


class _NetFS(_FS):
    def __init__(self, name: str, mount: Any, ckpt: Checkpoint) -> None:
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

    def _quiet(self, timeout: float = 10.0) -> Any:
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
        prof = dataclasses.asdict(self.mount.profile)
        return {
            "kind": "netfs",
            "fstype": "fuse",
            "device": None,
            "profile": prof,
            "read_ahead_kb": self.mount.read_ahead_kb,
            "label": f"{self.name}: {prof.get('description', '')}",
        }


@contextlib.contextmanager
def _open_fs(name: str, ckpt: Checkpoint) -> Iterator[_FS]:
    if name == "local":
        yield _LocalFS(ckpt)
        return
    from bench import netfs

    with netfs.mounted(ckpt.directory, profile=name) as mount:
        yield _NetFS(name, mount, ckpt)


# --------------------------------------------------------------------------------------
# Launchers


class _Launcher:
    def run(self, job: Job, world: int, timeout: float) -> tuple[float, list[dict[str, Any]]]:
        """Start `world` ranks, release them together, return (t_release, results)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release resources."""


class _ForkserverLauncher(_Launcher):
    """Ranks forked from a server (``python -m bench.worker --fork-server``) that imported
    torch and the loader once. The server is started on first use and restarted after
    a failure; a timed-out measurement kills its whole process group."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in close())
        self.buf = b""

    def _start(self, deadline: float) -> subprocess.Popen[bytes]:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
        }
        self.buf = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", "--fork-server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            start_new_session=True,
        )
        self._expect("server-ready", deadline)
        return self.proc

    def _tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def _read(self, deadline: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("timed out waiting for the rank processes")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise BenchError(f"the fork server exited:\n{self._tail()}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def _expect(self, event: str, deadline: float) -> dict[str, Any]:
        msg = self._read(deadline)
        if msg.get("event") != event:
            raise BenchError(f"fork server: expected {event!r}, got {msg!r}")
        return msg

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def _kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            for s in (self.proc.stdin, self.proc.stdout):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()
            self.proc = None

    def run(self, job: Job, world: int, timeout: float) -> tuple[float, list[dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
            try:
                self._start(deadline)
                self._send({"op": "start", "job": job.to_json(), "world": world, "dir": tmp})
                msg = self._read(deadline)
                if msg.get("event") == "ready":
                    self._send({"op": "release"})
                    t_release = float(self._expect("released", deadline)["t_release"])
                else:
                    t_release = math.nan
                done = self._expect("done", deadline)
            except BaseException:
                self._kill()
                raise
            results: list[dict[str, Any]] = []
            errors: list[str] = []
            for rank in range(world):
                path = Path(tmp) / f"rank-{rank}.json"
                if not path.exists():
                    errors.append(
                        f"rank {rank} exited with status {done['status'][rank]} and "
                        f"no result (killed? out of memory?)\n{self._tail()}"
                    )
                    continue
                out = json.loads(path.read_text())
                if not out.get("ok"):
                    errors.append(
                        f"rank {rank} failed: {out.get('error')}\n{out.get('traceback', '')}"
                    )
                    continue
                results.append(out["result"])
            if errors or math.isnan(t_release):
                # The rank that failed first says why; the others were stopped by EOF.
                errors.sort(key=lambda e: "released by EOF" in e)
                raise BenchError(errors[0] if errors else "the ranks were not released")
            return t_release, results

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self._kill()
        self.log.close()


class _SubprocessLauncher(_Launcher):
    """Ranks as ``python -m bench.worker``: a new interpreter each (slow to start)."""

    def run(self, job: Job, world: int, timeout: float) -> tuple[float, list[dict[str, Any]]]:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
        }
        procs: list[subprocess.Popen[bytes]] = []
        logs: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            for rank in range(world):
                err = tempfile.TemporaryFile()  # noqa: SIM115  (closed in finally)
                logs.append(err)
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "bench.worker",
                            "--job",
                            job.to_json(),
                            "--rank",
                            str(rank),
                            "--barrier",
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        env=env,
                    )
                )
            ready = self._lines(procs, logs, deadline, "ready")
            del ready
            t_release = time.monotonic()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"g")
                p.stdin.flush()
            msgs = self._lines(procs, logs, deadline, "result")
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            return t_release, [m["result"] for m in msgs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=5)
                for s in (p.stdin, p.stdout):
                    if s is not None:
                        with contextlib.suppress(OSError):
                            s.close()
            for f in logs:
                f.close()

    @staticmethod
    def _lines(
        procs: Sequence[subprocess.Popen[bytes]], logs: Sequence[Any], deadline: float, want: str
    ) -> list[dict[str, Any]]:
        sel = selectors.DefaultSelector()
        bufs: dict[int, bytes] = {}
        out: dict[int, dict[str, Any]] = {}
        for rank, p in enumerate(procs):
            assert p.stdout is not None
            sel.register(p.stdout, selectors.EVENT_READ, rank)
            bufs[rank] = b""
        try:
            while len(out) < len(procs):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"ranks timed out waiting for {want!r}")
                for key, _ in sel.select(timeout=left):
                    rank = key.data
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        logs[rank].seek(0)
                        tail = logs[rank].read().decode(errors="replace")[-2000:]
                        raise BenchError(f"rank {rank} exited before {want!r}:\n{tail}")
                    bufs[rank] += chunk
                    if b"\n" in bufs[rank]:
                        line, _, rest = bufs[rank].partition(b"\n")
                        bufs[rank] = rest
                        msg = json.loads(line)
                        if msg.get("event") == "error":
                            raise BenchError(
                                f"rank {rank} failed: {msg.get('error')}\n"
                                f"{msg.get('traceback', '')}"
                            )
                        out[rank] = msg
                        sel.unregister(key.fileobj)
        finally:
            sel.close()
        return [out[r] for r in range(len(procs))]


def _launcher(name: str) -> _Launcher:
    if name == "forkserver":
        return _ForkserverLauncher()
    if name == "subprocess":
        return _SubprocessLauncher()
    raise ValueError(f"unknown launcher {name!r} (forkserver, subprocess)")


# --------------------------------------------------------------------------------------
# One measurement


#: Pauses between eviction attempts: several seconds in all, for a disk still writing.
_COLD_BACKOFF_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


def _make_cold(fs: _FS, total: int) -> float:
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
    for pause in (*_COLD_BACKOFF_S, None):
        fs.evict()
        frac = max(_resident(layer) for layer in fs.cache_layers) / total if total else 0.0
        if frac < COLD_RESIDENT_MAX or pause is None:
            break
        time.sleep(pause)
    if frac < COLD_RESIDENT_MAX:
        return frac
    raise BenchError(
        f"cannot make the checkpoint cold on {fs.name}: {frac:.1%} still cached after "
        f"{time.monotonic() - t0:.1f} s of eviction; {_why_cached(fs.cache_layers)}"
    )


def _why_cached(layers: Sequence[Sequence[str]]) -> str:
    """What keeps pages of these files in the page cache, in words."""
    from engine.residency import cache_status, processes_mapping

    files = [f for layer in layers for f in layer]
    dirty = writeback = 0
    known = False
    for f in files:
        with contextlib.suppress(OSError):
            st = cache_status(f)
            if st is not None:
                known = True
                dirty += st.dirty_bytes
                writeback += st.writeback_bytes
    reasons = []
    if dirty or writeback:
        reasons.append(
            f"{_fmt_size(dirty)} dirty and {_fmt_size(writeback)} under writeback "
            "(the disk has not written them yet)"
        )
    holders = processes_mapping(files)
    if holders:
        names = ", ".join(f"{pid} ({comm})" for pid, comm in sorted(holders.items()))
        reasons.append(f"mapped by process {names}")
    if reasons:
        return "; ".join(reasons)
    if known:
        return "no page is dirty, under writeback or mapped (the kernel kept them anyway)"
    return "no process maps them (cachestat is unavailable to tell dirty pages)"


def _make_hot(fs: _FS, total: int) -> float:
    from bench.floor import raw_read_share

    raw_read_share(fs.files, 0, 1, threads=4)
    frac = _resident(fs.files) / total if total else 1.0
    return frac


def _measure(
    launcher: _Launcher,
    fs: _FS,
    ckpt: Checkpoint,
    cfg: Config,
    ranks: int,
    *,
    hot: bool,
    timeout: float,
    cgroup: Any | None,
) -> dict[str, Any]:
    """One sample: cold (or hot) cache, fresh ranks, release, collect."""
    resident = _make_hot(fs, ckpt.total_bytes) if hot else _make_cold(fs, ckpt.total_bytes)
    if hot and resident < HOT_RESIDENT_MIN:
        log.warning("hot-cache run on %s: only %.1f%% cached", fs.name, 100 * resident)
    if cgroup is not None:
        cgroup.reset_peak()
    job = Job(
        config=cfg.spec,
        files=list(fs.files),
        world=ranks,
        max_tensor_bytes=ckpt.max_tensor_bytes,
        cgroup=str(cgroup.path) if cgroup is not None else None,
        checksum=cfg.kind != "raw",
    )
    fs.start_count()
    t_release, ranks_out = launcher.run(job, ranks, timeout)
    served = fs.served()
    detail: dict[str, Any] = {
        "hot": hot,
        "cpu_s_per_gb_definition": "CPU seconds of all ranks / GB consumed by all ranks",
    }
    if isinstance(fs, _LocalFS):
        # The device's counters see every process on the node (noisy on a shared
        # machine); the ranks' own read_bytes (/proc/<pid>/io, all threads) see only the
        # storage reads they caused, which is what "served for this load" means.
        detail["device_bytes_read"] = served
        io = [r.get("io_read_bytes") for r in ranks_out]
        served = sum(io) if all(v is not None for v in io) else served
    done = [r["t_done"] for r in ranks_out]
    wall = max(done) - t_release
    cpu = sum(r["cpu_s"] for r in ranks_out)
    consumed = sum(r.get("bytes_consumed", 0) for r in ranks_out)
    if cgroup is not None:
        detail["cgroup"] = cgroup.stats()
    if isinstance(fs, _NetFS):
        detail["netfs"] = dict(fs.last_counters)  # to tell a cache hit from a miscount
    for r in ranks_out:
        r["wall_s"] = r["t_done"] - t_release
    checksums = {r["checksum"] for r in ranks_out}
    return {
        "wall_s": wall,
        "rank_s": [r["wall_s"] for r in ranks_out],
        "cpu_s": cpu,
        "cpu_s_per_gb": cpu / (consumed / 1e9) if consumed else None,
        "bytes_served": served,
        "bytes_served_ratio": served / ckpt.total_bytes if served is not None else None,
        "resident_before": min(1.0, max(0.0, resident)),
        "checksum": checksums.pop() if len(checksums) == 1 else None,
        "ranks": ranks_out,
        "detail": detail,
    }


def _measure_fio(fs: _FS, ckpt: Checkpoint) -> dict[str, Any]:
    from bench.floor import fio_read

    resident = _make_cold(fs, ckpt.total_bytes)
    fs.start_count()
    out = fio_read(fs.files)
    served = fs.served()
    if isinstance(fs, _LocalFS):
        out["device_bytes_read"] = served  # whole node: not comparable, kept as detail
        served = None
    return {
        "wall_s": out["seconds"],
        "rank_s": [out["seconds"]],
        "cpu_s": 0.0,
        "cpu_s_per_gb": None,
        "bytes_served": served,
        "bytes_served_ratio": served / ckpt.total_bytes if served is not None else None,
        "resident_before": resident,
        "checksum": None,
        "ranks": [],
        "detail": out,
    }


# --------------------------------------------------------------------------------------
# The suite


@dataclass(frozen=True)
class ProgressEvent:
    """Where a running suite is.

    Attributes:
        done: steps finished.
        total: steps in the suite.
        description: the step now running.
        finished: a one-line summary of the step that just finished, or None.
    """

    done: int
    total: int
    description: str
    finished: str | None = None


def _count_steps(suite: Suite, fuse_ok: bool) -> int:
    n = 0
    shapes_seen: set[tuple[str, int]] = set()
    for m in suite.matrices:
        fss = _effective_fs(m.fs, fuse_ok)
        for shape in m.shapes:
            if (shape, m.size_bytes) not in shapes_seen:
                shapes_seen.add((shape, m.size_bytes))
                n += 1
            for _fs in fss:
                if m.fio and _fio_ok():
                    n += 1
                for _r in m.ranks:
                    n += suite.warmup + suite.repeats * (len(m.configs) + 1)
                    if m.hot:
                        n += suite.repeats
    return n


def _fio_ok() -> bool:
    from bench.floor import FIO_AVAILABLE

    return FIO_AVAILABLE


def _effective_fs(names: Sequence[str], fuse_ok: bool) -> list[str]:
    out: list[str] = []
    for name in names:
        eff = name if (name == "local" or fuse_ok) else "local"
        if eff not in out:
            out.append(eff)
    return out


def _validate_suite(suite: Suite) -> None:
    from bench import netfs
    from bench.checkpoint import SHAPES

    if suite.repeats < 1:
        raise ValueError("repeats must be >= 1")
    if suite.warmup < 0:
        raise ValueError("warmup must be >= 0")
    for m in suite.matrices:
        for name in m.fs:
            if name != "local" and name not in netfs.PROFILES:
                raise ValueError(
                    f"unknown filesystem {name!r}: use local or one of {', '.join(netfs.PROFILES)}"
                )
        for shape in m.shapes:
            if shape not in SHAPES:
                raise ValueError(f"unknown shape {shape!r}: use {', '.join(SHAPES)}")
        for r in m.ranks:
            if r < 1:
                raise ValueError(f"rank counts must be >= 1, got {r}")
        for c in m.configs:
            parse_config(c)
        if m.memory_limit_bytes is not None:
            need = max(m.ranks) * _READ_BUFFERS_PER_RANK + (32 << 20)
            if m.memory_limit_bytes < need:
                raise ValueError(
                    f"memory limit {_fmt_size(m.memory_limit_bytes)} is too small for "
                    f"{max(m.ranks)} ranks: the SGLang-style prefetch and the raw floor "
                    f"hold up to 4 x 16 MiB of read buffers per rank; use at least "
                    f"{_fmt_size(need)}"
                )


def run_suite(
    suite: Suite, *, progress: Callable[[ProgressEvent], None] | None = None
) -> dict[str, Any]:
    """Run every measurement of `suite` and return the results document.

    Args:
        suite: what to run.
        progress: called before and after every step.

    Returns:
        The results document (validated against ``bench/schema.json``).

    Raises:
        ChecksumMismatch: two loads gave different bytes (the run stops at once).
        BenchError: a rank failed or timed out, or the cache could not be made cold;
            ``exc.document`` holds the results gathered so far.
        BenchInterrupted: Ctrl-C (SIGINT) stopped the run; ``exc.document`` holds
            the results gathered so far.

    Example:
        >>> doc = run_suite(quick_suite(repeats=1))  # doctest: +SKIP
    """
    from bench import netfs

    _validate_suite(suite)
    fuse_ok, fuse_why = netfs.fuse_available()
    settings = {
        "suite": suite.name,
        "argv": list(suite.argv) if suite.argv is not None else None,
        "repeats": suite.repeats,
        "warmup": suite.warmup,
        "launcher": suite.launcher,
        "workdir": str(suite.workdir),
        "shards": suite.shards,
        "skew": suite.skew,
        "dtypes": list(suite.dtypes),
        "seed": suite.seed,
        "timeout_s": suite.timeout_s,
        "matrices": [dataclasses.asdict(m) for m in suite.matrices],
        "floor_definition": "floor:raw = cold read of every byte by W processes x 4 "
        "threads (preadv, 16 MiB pieces, no parsing), W = ranks",
    }
    doc = res.new_document(settings=settings, host=res.host_metadata(fuse=(fuse_ok, fuse_why)))
    t_start = time.monotonic()
    wants_netfs = any(n != "local" for m in suite.matrices for n in m.fs)
    if wants_netfs and not fuse_ok:
        msg = (
            f"FUSE is unavailable ({fuse_why}): the simulated network filesystems are "
            "replaced by local disk"
        )
        log.warning("%s", msg)
        doc["warnings"].append(msg)

    total = _count_steps(suite, fuse_ok)
    state = {"done": 0}

    def tick(desc: str, finished: str | None = None, advance: bool = False) -> None:
        if advance:
            state["done"] += 1
        if progress is not None:
            progress(ProgressEvent(state["done"], total, desc, finished))

    launcher = _launcher(suite.launcher)
    checkpoints: dict[tuple[str, int], Checkpoint] = {}
    reference: dict[str, tuple[str, str]] = {}  # ckpt key -> (checksum, where)
    try:
        for m in suite.matrices:
            for shape in m.shapes:
                key = (shape, m.size_bytes)
                if key not in checkpoints:
                    desc = f"checkpoint {_ckpt_id(shape, m.size_bytes)}"
                    tick(desc)
                    t0 = time.monotonic()
                    ckpt, made = ensure_checkpoint(
                        suite.workdir,
                        shape=shape,
                        size_bytes=m.size_bytes,
                        shards=suite.shards,
                        skew=suite.skew,
                        dtypes=suite.dtypes,
                        seed=suite.seed,
                    )
                    checkpoints[key] = ckpt
                    doc["checkpoints"][_ckpt_id(shape, m.size_bytes)] = ckpt.to_json()
                    tick(
                        desc,
                        f"{desc}: {'made' if made else 'reused'} in "
                        f"{time.monotonic() - t0:.1f} s ({len(ckpt.files)} files)",
                        advance=True,
                    )
                ckpt = checkpoints[key]
                for fs_name in _effective_fs(m.fs, fuse_ok):
                    _run_group(suite, m, ckpt, fs_name, launcher, doc, reference, tick)
    except BaseException as exc:
        # Keep what was measured: a rank failed (BenchError), a mount or an eviction
        # failed (anything else), or Ctrl-C.
        if isinstance(exc, KeyboardInterrupt):
            stop: BenchError = BenchInterrupted("interrupted: the results so far are kept")
            verb, why = "interrupted", ""
        elif isinstance(exc, BenchError):
            stop, verb, why = exc, "stopped", f": {exc}"
        elif isinstance(exc, Exception):
            stop = BenchError(f"{type(exc).__name__}: {exc}")
            verb, why = "stopped", f": {stop}"
        else:
            raise  # SystemExit, GeneratorExit: not ours to wrap
        doc["warnings"].append(f"partial: {verb} after {state['done']} of {total} steps{why}")
        stop.document = _finish(doc, t_start, validate=False)
        if stop is exc:
            raise
        raise stop from exc
    finally:
        launcher.close()
    return _finish(doc, t_start)


def _finish(doc: dict[str, Any], t_start: float, *, validate: bool = True) -> dict[str, Any]:
    doc["duration_s"] = time.monotonic() - t_start
    for r in doc["results"]:
        if r["summary"]["unstable"]:
            msg = (
                f"unstable: {r['config']} on {r['fs']}/{r['shape']}/{r['ranks']} ranks "
                f"spread {r['summary']['spread']:.0%} > "
                f"{res.UNSTABLE_SPREAD:.0%} (add --repeats)"
            )
            if msg not in doc["warnings"]:
                doc["warnings"].append(msg)
    if validate:
        res.validate(doc)
    return doc


def _fmt_size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g}{unit}"
    return f"{n}B"


def _ckpt_id(shape: str, size_bytes: int) -> str:
    return f"{shape}-{_fmt_size(size_bytes)}"


def _run_group(
    suite: Suite,
    m: Matrix,
    ckpt: Checkpoint,
    fs_name: str,
    launcher: _Launcher,
    doc: dict[str, Any],
    reference: dict[str, tuple[str, str]],
    tick: Callable[..., None],
) -> None:
    from bench.netfs import NetFSError

    cg_ctx: Any = contextlib.nullcontext(None)
    if m.memory_limit_bytes is not None:
        from bench.cgroup import memory_cgroup

        cg_ctx = memory_cgroup(m.memory_limit_bytes)
    ckpt_id = _ckpt_id(ckpt.shape, m.size_bytes)
    where = f"{fs_name} {ckpt.shape}"
    tick(f"mount {where}")
    with _open_fs(fs_name, ckpt) as fs, cg_ctx as cgroup:
        doc["filesystems"].setdefault(fs_name, {**fs.describe(), "requested": fs_name})
        raw_cfg = parse_config("raw")
        configs = [parse_config(c) for c in m.configs]

        def add(kind: str, cfg: Config, ranks: int, sample: dict[str, Any]) -> None:
            for r in doc["results"]:
                if (
                    r["scenario"],
                    r["kind"],
                    r["fs"],
                    r["checkpoint"],
                    r["ranks"],
                    r["config"],
                ) == (m.scenario, kind, fs_name, ckpt_id, ranks, cfg.name):
                    r["samples"].append(sample)
                    r["summary"] = res.summarize(r["samples"], total_bytes=ckpt.total_bytes)
                    return
            doc["results"].append(
                {
                    "scenario": m.scenario,
                    "kind": kind,
                    "fs": fs_name,
                    "shape": ckpt.shape,
                    "checkpoint": ckpt_id,
                    "ranks": ranks,
                    "config": cfg.name,
                    "spec": cfg.spec,
                    "memory_limit_bytes": m.memory_limit_bytes,
                    "samples": [sample],
                    "summary": res.summarize([sample], total_bytes=ckpt.total_bytes),
                }
            )

        def check(cfg: Config, ranks: int, sample: dict[str, Any]) -> None:
            got = {r["checksum"] for r in sample["ranks"]}
            if len(got) != 1:
                per = ", ".join(f"rank {r['rank']}: {r['checksum']}" for r in sample["ranks"])
                raise ChecksumMismatch(
                    f"{cfg.name} on {where} with {ranks} ranks: ranks "
                    f"loaded different bytes ({per})"
                )
            value = got.pop()
            tensors = {r["tensors"] for r in sample["ranks"]}
            if tensors != {ckpt.tensor_count}:
                raise ChecksumMismatch(
                    f"{cfg.name} on {where}: loaded {sorted(tensors)} "
                    f"tensors, the checkpoint has {ckpt.tensor_count}"
                )
            ref = reference.get(ckpt_id)
            if ref is None:
                reference[ckpt_id] = (value, f"{cfg.name} on {fs_name} with {ranks} ranks")
                doc["checkpoints"][ckpt_id]["checksum"] = value
            elif ref[0] != value:
                raise ChecksumMismatch(
                    f"CHECKSUM MISMATCH on checkpoint {ckpt_id}: {cfg.name} on {fs_name} "
                    f"with {ranks} ranks loaded {value}, but {ref[1]} loaded {ref[0]}. "
                    "The tensors differ between configurations: this is a bug."
                )

        def one(
            kind: str, cfg: Config, ranks: int, label: str, *, hot: bool = False, keep: bool = True
        ) -> None:
            tick(label)
            sample = _measure(
                launcher, fs, ckpt, cfg, ranks, hot=hot, timeout=suite.timeout_s, cgroup=cgroup
            )
            if cfg.kind != "raw":
                check(cfg, ranks, sample)
            else:
                read = sum(r["bytes_consumed"] for r in sample["ranks"])
                if read != ckpt.total_bytes:
                    raise BenchError(
                        f"{label}: the raw readers read {read} bytes of {ckpt.total_bytes} "
                        "(a short read would make the floor look faster than it is)"
                    )
            served = sample["bytes_served_ratio"]
            served_txt = f", served {served:.2f}x" if served is not None else ""
            if keep:
                add(kind, cfg, ranks, sample)
            tick(label, f"{label}: {sample['wall_s']:.2f} s{served_txt}", advance=True)

        if m.fio and _fio_ok():
            label = f"{where}: fio floor"
            tick(label)
            try:
                sample = _measure_fio(fs, ckpt)
                got, want = sample["detail"]["bytes"], sample["detail"]["whole_block_bytes"]
                if got != want:
                    raise RuntimeError(f"fio read {got} bytes of {want}")
                fio_cfg = Config(name="floor:fio", kind="raw")
                doc["results"].append(
                    {
                        "scenario": m.scenario,
                        "kind": "floor-fio",
                        "fs": fs_name,
                        "shape": ckpt.shape,
                        "checkpoint": ckpt_id,
                        "ranks": 1,
                        "config": "floor:fio",
                        "spec": fio_cfg.spec + ":fio",
                        "memory_limit_bytes": m.memory_limit_bytes,
                        "samples": [sample],
                        "summary": res.summarize([sample], total_bytes=ckpt.total_bytes),
                    }
                )
                tick(label, f"{label}: {sample['wall_s']:.2f} s", advance=True)
            except NetFSError:
                raise  # the mount failed, not fio
            except RuntimeError as exc:
                doc["warnings"].append(f"fio on {where}: {exc}")
                tick(label, f"{label}: failed ({exc})", advance=True)

        for ranks in m.ranks:
            grp = f"{where} {ranks}r"
            for i in range(suite.warmup):
                one("floor-raw", raw_cfg, ranks, f"{grp}: warm-up {i + 1}", keep=False)
            floor_cfg = Config(name="floor:raw", kind="raw")
            order: list[tuple[str, Config]] = [("floor-raw", floor_cfg)] + [
                ("load", c) for c in configs
            ]
            for rep in range(suite.repeats):
                k = rep % len(order)
                for kind, cfg in order[k:] + order[:k]:
                    one(kind, cfg, ranks, f"{grp}: {cfg.name} #{rep + 1}")
            if m.hot:
                hot_cfg = Config(name="hot", kind="none")
                for rep in range(suite.repeats):
                    one("hot", hot_cfg, ranks, f"{grp}: hot #{rep + 1}", hot=True)
