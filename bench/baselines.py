"""The baselines the bench compares against: no prefetch, and the SGLang-style prefetch.

``none``
    What serving engines do without prefetch: for each file (sorted), ``safe_open`` and
    ``get_tensor`` for every name in ``keys()`` order (safetensors returns the names
    sorted, which is how vLLM and SGLang iterate). The tensors are backed by the file
    mapping, so the bytes arrive by page faults when the consumer touches them.

``sglang``
    Written from SGLang's published description of ``--weight-loader-prefetch-checkpoints``
    (``_prefetch_all_checkpoints`` in ``sglang/srt/model_loader/weight_utils.py``):
    the sorted files are dealt round-robin over the node's local ranks
    (``sorted(files)[rank::world]``); a daemon thread, started before loading, runs a
    pool of 4 threads, each reading one of the rank's files from start to end with
    ``f.read(16 MiB)`` calls whose data are thrown away; loading starts at once, beside
    the prefetch, and does not wait for it.

``stripe``
    The simplest byte-striping prefetch, as a yardstick for ours: the sorted files are
    concatenated and cut into 64 MiB stripes, stripe *i* goes to local rank *i mod world*,
    and one daemon thread per rank ``sendfile``s its stripes to ``/dev/null`` in order,
    with no residency check, no window and no adaptation; loading starts at once beside it.

The load functions call ``consume(name, tensor)`` for every tensor; the bench's rank
process copies each tensor into its own buffer there (see ``bench.consumer``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SGLANG_BLOCK_BYTES",
    "SGLANG_THREADS",
    "SGLangStylePrefetcher",
    "STRIPE_BYTES",
    "load_plain",
    "load_sglang",
    "load_stripe",
    "stripe_plan",
    "sglang_plan",
]

log = logging.getLogger(__name__)

#: SGLang's default ``--weight-loader-prefetch-num-threads``.
SGLANG_THREADS = 4
#: SGLang's default ``SGLANG_PREFETCH_BLOCK_SIZE_MB`` (16), in bytes.
SGLANG_BLOCK_BYTES = 16 << 20

#: Stripe of the plain striping baseline.
STRIPE_BYTES = 64 << 20

Consume = Callable[[str, Any], None]


def load_plain(files: Sequence[str | os.PathLike[str]], consume: Consume) -> int:
    """Load every tensor with ``safe_open`` + ``get_tensor`` (mmap faults), in keys() order.

    Args:
        files: the safetensors files; loaded in sorted order.
        consume: called with (name, tensor) for every tensor, in loading order.

    Returns:
        The number of tensors loaded.

    Example:
        >>> load_plain(["model.safetensors"], lambda n, t: None)  # doctest: +SKIP
        291
    """
    from safetensors import safe_open

    count = 0
    for path in sorted(os.fspath(f) for f in files):
        with safe_open(path, framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                consume(name, handle.get_tensor(name))
                count += 1
    return count


def sglang_plan(files: Sequence[str | os.PathLike[str]], rank: int, world: int) -> list[str]:
    """The files the SGLang-style prefetch warms on local rank `rank` of `world`.

    Args:
        files: all checkpoint files.
        rank: this process's local rank, 0 <= rank < world.
        world: the number of local ranks.

    Returns:
        ``sorted(files)[rank::world]``.

    Example:
        >>> sglang_plan(["c", "a", "b"], 0, 2)
        ['a', 'c']
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank} world={world}")
    return sorted(os.fspath(f) for f in files)[rank::world]


@dataclass
class SGLangStylePrefetcher:
    """SGLang's page-cache warming: a daemon thread running a pool of `threads` readers.

    Each reader reads one whole file with ``f.read(block_bytes)`` until EOF and drops
    the data. Errors on a file are logged and counted, never raised (as in SGLang).

    Attributes:
        files: the files of this rank (see `sglang_plan`).
        threads: reader threads (SGLang: ``--weight-loader-prefetch-num-threads``, 4).
        block_bytes: bytes per ``read()`` (SGLang: ``SGLANG_PREFETCH_BLOCK_SIZE_MB``, 16).
        bytes_read: bytes read so far (updated block by block).
        cpu_s: CPU seconds of the reader threads (updated block by block).
        errors: one message per file that failed.
        started_at: ``time.monotonic()`` at start; None before.
        finished_at: ``time.monotonic()`` when every file was read; None before.
    """

    files: list[str]
    threads: int = SGLANG_THREADS
    block_bytes: int = SGLANG_BLOCK_BYTES
    bytes_read: int = 0
    cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _read_file(self, path: str) -> None:
        # Counted block by block: the load may end before a large file is read through.
        cpu = time.thread_time()
        try:
            with open(path, "rb") as f:
                while data := f.read(self.block_bytes):
                    now = time.thread_time()
                    with self._lock:
                        self.bytes_read += len(data)
                        self.cpu_s += now - cpu
                    cpu = now
        except OSError as exc:
            with self._lock:
                self.errors.append(f"{path}: {exc.strerror or exc}")
            log.warning("SGLang-style prefetch failed on %s: %s", path, exc)

    def _run(self) -> None:
        with ThreadPoolExecutor(
            max_workers=self.threads, thread_name_prefix="sglang-prefetch"
        ) as pool:
            list(pool.map(self._read_file, self.files))
        self.finished_at = time.monotonic()

    def start(self) -> SGLangStylePrefetcher:
        """Start the daemon thread and return at once (loading must not wait for it)."""
        if self.threads < 1:
            raise ValueError("prefetch threads must be >= 1")
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="sglang-prefetch", daemon=True)
        self._thread.start()
        return self

    def stats(self) -> dict[str, Any]:
        """Bytes read, files, errors and (when finished) seconds, as a JSON-able dict."""
        with self._lock:
            return {
                "files": len(self.files),
                "bytes_read": self.bytes_read,
                "cpu_s": self.cpu_s,
                "errors": list(self.errors),
                "finished": self.finished_at is not None,
                "seconds": (self.finished_at - self.started_at)
                if self.finished_at is not None and self.started_at is not None
                else None,
            }


def load_sglang(
    files: Sequence[str | os.PathLike[str]],
    rank: int,
    world: int,
    consume: Consume,
    *,
    threads: int = SGLANG_THREADS,
    block_bytes: int = SGLANG_BLOCK_BYTES,
) -> SGLangStylePrefetcher:
    """Start the SGLang-style prefetch of this rank's files, then load as `load_plain`.

    Args:
        files: all checkpoint files.
        rank: this process's local rank.
        world: the number of local ranks.
        consume: called with (name, tensor) for every tensor.
        threads: prefetch reader threads.
        block_bytes: bytes per ``read()`` call.

    Returns:
        The prefetcher (still running if loading finished first).

    Example:
        >>> p = load_sglang(files, 0, 4, lambda n, t: None)  # doctest: +SKIP
    """
    prefetcher = SGLangStylePrefetcher(
        sglang_plan(files, rank, world), threads=threads, block_bytes=block_bytes
    ).start()
    load_plain(files, consume)
    return prefetcher


def stripe_plan(
    files: Sequence[str | os.PathLike[str]], rank: int, world: int, stripe_bytes: int
) -> list[tuple[str, int, int]]:
    """This rank's stripes of the sorted, concatenated files: (path, offset, length).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for n in "ab":
        ...     _ = (d / n).write_bytes(b"x" * 10)
        >>> [(pathlib.Path(p).name, o, n) for p, o, n in stripe_plan([d/"b", d/"a"], 1, 2, 8)]
        [('a', 8, 2), ('b', 0, 6)]
    """
    out: list[tuple[str, int, int]] = []
    pos = 0
    for path in sorted(os.fspath(f) for f in files):
        size = os.path.getsize(path)
        unit = pos // stripe_bytes
        while unit * stripe_bytes < pos + size:
            lo, hi = max(unit * stripe_bytes, pos), min((unit + 1) * stripe_bytes, pos + size)
            if unit % world == rank:
                out.append((path, lo - pos, hi - lo))
            unit += 1
        pos += size
    return out


def _sendfile_stripes(stripes: list[tuple[str, int, int]], done: list[float]) -> None:
    """Warm `stripes` in order; ``done`` holds [bytes read, CPU seconds], kept current."""
    null = os.open(os.devnull, os.O_WRONLY)
    cpu0 = time.thread_time()
    try:
        for path, offset, length in stripes:
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    left = length
                    while left > 0:
                        n = os.sendfile(null, fd, offset + length - left, left)
                        if n == 0:
                            break
                        left -= n
                        done[0] += n
                        done[1] = time.thread_time() - cpu0
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("stripe prefetch failed on %s: %s", path, exc)
    finally:
        os.close(null)


def load_stripe(
    files: Sequence[str | os.PathLike[str]],
    rank: int,
    world: int,
    consume: Consume,
    *,
    stripe_bytes: int = STRIPE_BYTES,
) -> dict[str, Any]:
    """Start the plain striping prefetch of this rank's stripes, then load as `load_plain`.

    Returns:
        ``{"bytes_read": ..., "cpu_s": ...}`` of the prefetch thread when loading ended.

    Example:
        >>> load_stripe(files, 0, 4, lambda n, t: None)  # doctest: +SKIP
    """
    done = [0.0, 0.0]
    stripes = stripe_plan(files, rank, world, stripe_bytes)
    threading.Thread(
        target=_sendfile_stripes, args=(stripes, done), name="stripe-prefetch", daemon=True
    ).start()
    load_plain(files, consume)
    return {"bytes_read": int(done[0]), "cpu_s": done[1]}
