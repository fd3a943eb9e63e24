"""The physical floor: how fast the storage can hand over the checkpoint's bytes at all.

Three reference figures appear in every report, next to the configurations:

``floor:raw``  (the floor; every "/floor" ratio divides by it)
    The same files, cold, read by W processes (W = the rank count of the row) x 4
    threads with ``os.preadv`` into one reused 16 MiB buffer per thread, no parsing:
    the files are cut into 16 MiB pieces, piece i goes to process i mod W, and each
    byte is read once. It runs through the same machinery as a load (fresh processes,
    cold cache, release together), see `raw_read_share`.
``floor:fio``
    ``fio`` (when installed) reading the same cold files once with io_uring, queue depth
    32, 1 MiB buffered reads: the device's (or mount's) sequential-read limit.
``hot``
    The ``none`` load with every byte already in the page cache: the parse + copy cost
    that no prefetch can remove.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

from engine.units import parse_size

__all__ = ["FIO_AVAILABLE", "fio_read", "raw_pieces", "raw_read_share"]

log = logging.getLogger(__name__)

#: Whether the ``fio`` binary is on PATH.
FIO_AVAILABLE = shutil.which("fio") is not None


def raw_pieces(
    sizes: Sequence[tuple[str, int]], rank: int, world: int, chunk_bytes: int = 16 << 20
) -> list[tuple[str, int, int]]:
    """The (path, offset, length) pieces raw reader `rank` of `world` reads.

    Files are taken in the given order and cut into `chunk_bytes` pieces (a file's last
    piece may be shorter); piece i, counted over all files, belongs to rank i mod world.

    Args:
        sizes: (path, size) of every file.
        rank: this reader, 0 <= rank < world.
        world: number of reader processes.
        chunk_bytes: piece size.

    Returns:
        This rank's pieces in file order.

    Example:
        >>> raw_pieces([("a", 10), ("b", 5)], 1, 2, chunk_bytes=4)
        [('a', 4, 4), ('b', 0, 4)]
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank} world={world}")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    out: list[tuple[str, int, int]] = []
    i = 0
    for path, size in sizes:
        for off in range(0, size, chunk_bytes):
            if i % world == rank:
                out.append((path, off, min(chunk_bytes, size - off)))
            i += 1
    return out


def raw_read_share(
    files: Sequence[str | os.PathLike[str]],
    rank: int,
    world: int,
    *,
    threads: int = 4,
    chunk_bytes: int = 16 << 20,
) -> int:
    """Read this rank's share of the files with `threads` threads, no parsing.

    Each thread reads whole pieces (see `raw_pieces`, files sorted) with ``os.preadv``
    into its own reused buffer.

    Args:
        files: the checkpoint files.
        rank: this reader, 0 <= rank < world.
        world: number of reader processes.
        threads: reader threads in this process.
        chunk_bytes: piece size and buffer size.

    Returns:
        The bytes read.

    Raises:
        OSError: the first read error (the floor must read every byte).

    Example:
        >>> raw_read_share(["model.safetensors"], 0, 1)  # doctest: +SKIP
        1073741824
    """
    paths = sorted(os.fspath(f) for f in files)
    fds = {p: os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths}
    try:
        sizes = [(p, os.fstat(fds[p]).st_size) for p in paths]
        share = _Share(raw_pieces(sizes, rank, world, chunk_bytes), fds)
        workers = [
            threading.Thread(target=share.read, args=(chunk_bytes,), name=f"raw-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        if share.errors:
            raise share.errors[0]
        return share.bytes
    finally:
        for fd in fds.values():
            os.close(fd)


class _Share:
    """One rank's pieces, handed out one at a time to its reader threads."""

    def __init__(self, pieces: list[tuple[str, int, int]], fds: dict[str, int]) -> None:
        self.pieces, self.fds = pieces, fds
        self.bytes = 0
        self.errors: list[BaseException] = []
        self._next = 0
        self._lock = threading.Lock()

    def _take(self) -> tuple[str, int, int] | None:
        with self._lock:
            k, self._next = self._next, self._next + 1
        return self.pieces[k] if k < len(self.pieces) and not self.errors else None

    def read(self, chunk_bytes: int) -> None:
        """A reader thread: whole pieces with ``os.preadv`` into one reused buffer."""
        view = memoryview(bytearray(chunk_bytes))
        got = 0
        try:
            while (piece := self._take()) is not None:
                path, off, length = piece
                done = 0
                while done < length:
                    n = os.preadv(self.fds[path], [view[: length - done]], off + done)
                    if n == 0:
                        break
                    done += n
                got += done
        except BaseException as exc:  # raised by raw_read_share once the threads are done
            self.errors.append(exc)
        with self._lock:
            self.bytes += got


def _fio_filename(paths: Sequence[str]) -> str:
    # fio separates file names with ':'; a literal ':' in a name is written '\:'.
    return ":".join(p.replace("\\", "\\\\").replace(":", "\\:") for p in paths)


_FIO_OPTION_MAX = 4000  # fio refuses an option value over 4096 characters


def _fio_jobs(paths: Sequence[str]) -> list[str]:
    """Job options reading `paths` in order: relative to their common directory, split
    into jobs run one after another (``stonewall``) so each file list fits fio's limit."""
    base = os.path.commonpath([os.path.dirname(p) for p in paths])
    names = [os.path.relpath(p, base) for p in paths]
    groups: list[list[str]] = [[]]
    for name in names:
        if groups[-1] and len(_fio_filename([*groups[-1], name])) > _FIO_OPTION_MAX:
            groups.append([])
        groups[-1].append(name)
    args = [f"--directory={_fio_filename([base])}"]
    for i, group in enumerate(groups):
        if len(_fio_filename(group)) > _FIO_OPTION_MAX:
            raise RuntimeError(f"a file name is too long for fio: {group[0][:80]}...")
        args += [f"--name=floor{i}", f"--filename={_fio_filename(group)}"]
        if i:
            args.append("--stonewall")
    return args


def _run_fio(cmd: list[str], timeout: float) -> tuple[float, int, float] | str:
    """(wall seconds, bytes read, fio's own runtime in seconds), or why fio failed."""
    t0 = time.monotonic()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"fio timed out after {timeout:.0f} s"
    seconds = time.monotonic() - t0
    if out.returncode != 0:
        return (out.stderr or out.stdout).strip()[:400]
    try:
        data = json.loads(out.stdout[out.stdout.index("{") :])
        reads = [job["read"] for job in data["jobs"]]
        io_bytes = sum(int(r["io_bytes"]) for r in reads)
        runtime_s = sum(float(r.get("runtime", 0)) for r in reads) / 1000.0
    except (ValueError, KeyError, IndexError) as exc:
        return f"cannot parse fio output: {exc}"
    return seconds, io_bytes, runtime_s


def fio_read(
    files: Sequence[str | os.PathLike[str]],
    *,
    iodepth: int = 32,
    block: str = "1M",
    ioengine: str = "io_uring",
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Read the files once with fio (buffered, sequential) and return time and bytes.

    The caller makes the files cold first. fio's own ``invalidate`` is left on.

    Args:
        files: the files to read.
        iodepth: queue depth.
        block: block size (fio syntax).
        ioengine: fio's I/O engine; ``psync`` is tried when `ioengine` fails.
        timeout: seconds before fio is killed.

    Returns:
        ``{"seconds", "bytes", "whole_block_bytes", "ioengine", "command"}``; seconds is
        the wall time of the fio process (startup included, about 10 ms), bytes what fio
        reports as read, whole_block_bytes what it should read (fio skips each file's
        tail past its last whole block: under 1 MiB a file).

    Raises:
        RuntimeError: when fio is missing or fails with every engine tried.

    Example:
        >>> fio_read(["model.safetensors"])["bytes"]  # doctest: +SKIP
        1073741824
    """
    if not FIO_AVAILABLE:
        raise RuntimeError("fio is not installed")
    paths = sorted(os.fspath(f) for f in files)
    block_bytes = parse_size(block)
    # fio reads whole blocks only: the tail of each file past the last one is not read.
    whole_blocks = sum(os.path.getsize(p) // block_bytes * block_bytes for p in paths)
    last_error = ""
    for engine in dict.fromkeys((ioengine, "psync")):
        cmd = ["fio", f"--ioengine={engine}", f"--iodepth={iodepth}", f"--bs={block}"]
        cmd += ["--direct=0", "--rw=read", "--numjobs=1", "--output-format=json"]
        cmd += _fio_jobs(paths)
        outcome = _run_fio(cmd, timeout)
        if isinstance(outcome, str):
            last_error = outcome
            log.info("fio with ioengine=%s failed: %s", engine, last_error)
            continue
        seconds, io_bytes, runtime_s = outcome
        return {
            "seconds": seconds,
            "fio_runtime_s": runtime_s,
            "bytes": io_bytes,
            "whole_block_bytes": whole_blocks,
            "ioengine": engine,
            "command": " ".join(cmd),
        }
    raise RuntimeError(f"fio failed: {last_error}")
