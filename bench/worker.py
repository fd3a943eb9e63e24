"""One rank process of a measurement, and the configurations it can run.

A rank process imports what it needs, allocates its copy buffer, reports "ready" and
waits to be released together with the other ranks. Released, it loads the whole
checkpoint with its configuration and copies every tensor's bytes into its own buffer
(as a serving engine copies each tensor to GPU memory at once; ``get_tensor`` alone
returns lazy, file-backed tensors and would measure nothing), computing a checksum of
all tensors on the way. It then reports wall time, CPU seconds, peak RSS and the
checksum, and exits.

Configurations are strings: a kind and options, ``kind[:key=value,...]``, or an alias::

    none                      safe_open + get_tensor, mmap faults (bench.baselines)
    sglang[:threads=4,block_mb=16]
                              the SGLang-style prefetch, then a plain load
    ours[:strategy=,backend=,concurrency=,chunk_mb=,window=,skip_cached=,order=]
                              loader_adapter.safetensors_weights_iterator(prefetch=True)
    raw[:threads=4,chunk_mb=16]
                              the floor: raw parallel reads, no parsing (bench.floor)

    ours-files = ours:strategy=files     ours-c1-64m = ours:concurrency=1,chunk_mb=64
    ours-window = ours:window=auto       ours-nowindow = ours:window=off
    ours-<backend> = ours:backend=<backend>   (sendfile, pread, populate, fadvise, ...)

Run one rank by hand (it starts at once, no barrier)::

    python -m bench.worker --config ours --rank 0 --world 1 DIR/*.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import resource
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ALIASES",
    "KINDS",
    "Config",
    "Job",
    "parse_config",
    "run_rank",
]

log = logging.getLogger(__name__)

#: The kinds of configuration a rank can run.
KINDS: tuple[str, ...] = ("none", "sglang", "ours", "raw")

_OPTIONS: dict[str, tuple[str, ...]] = {
    "none": (),
    "sglang": ("threads", "block_mb"),
    "ours": (
        "strategy",
        "backend",
        "concurrency",
        "chunk_mb",
        "window",
        "skip_cached",
        "order",
        "prefetch",
    ),
    "raw": ("threads", "chunk_mb"),
}

#: Aliases accepted besides ``kind:options`` (patterns are handled in `parse_config`).
ALIASES: dict[str, str] = {
    "ours-files": "ours:strategy=files",
    "ours-balanced": "ours:strategy=balanced",
    "ours-window": "ours:window=auto",
    "ours-nowindow": "ours:window=off",
    "ours-noprefetch": "ours:prefetch=off",
}
_MASK64 = (1 << 64) - 1
_SWEEP_RE = re.compile(r"^ours-c(\d+)-(\d+(?:\.\d+)?)m$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class Config:
    """A parsed configuration.

    Attributes:
        name: the label shown in tables (the text the user gave, e.g. ``ours-c1-64m``).
        kind: one of KINDS.
        options: sorted (key, value) pairs, values as text.
    """

    name: str
    kind: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def spec(self) -> str:
        """The canonical string, ``kind:key=value,...`` (just ``kind`` without options)."""
        if not self.options:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={v}" for k, v in self.options)

    def opts(self) -> dict[str, str]:
        """The options as a dict."""
        return dict(self.options)

    def loader_options(self) -> dict[str, Any]:
        """Keyword options for ``safetensors_weights_iterator`` (kind ``ours`` only).

        ``chunk_mb`` becomes ``chunk_bytes``; ``window=off`` means no window
        (``window_bytes=None``), ``window=auto`` leaves the engine's default, a size
        (``512MiB``) sets ``window_bytes``; ``prefetch`` (on/off/auto) is returned under
        the key ``prefetch``.
        """
        from bench.checkpoint import parse_size

        out: dict[str, Any] = {"prefetch": True}
        for key, value in self.options:
            if key == "chunk_mb":
                out["chunk_bytes"] = int(float(value) * (1 << 20))
            elif key == "concurrency":
                out["concurrency"] = int(value)
            elif key == "window":
                if value == "off":
                    out["window_bytes"] = None
                elif value != "auto":
                    out["window_bytes"] = parse_size(value)
            elif key == "skip_cached":
                out["skip_cached"] = _parse_bool(value)
            elif key == "prefetch":
                out["prefetch"] = "auto" if value == "auto" else _parse_bool(value)
            else:
                out[key] = value
        return out


def _parse_bool(value: str) -> bool:
    low = value.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r} (use on/off)")


def parse_config(text: str) -> Config:
    """Parse a configuration string (see the module docstring for the syntax).

    Args:
        text: ``kind``, ``kind:key=value,...`` or an alias such as ``ours-c1-64m``.

    Returns:
        The Config, named `text`.

    Raises:
        ValueError: unknown kind, alias or option, or a malformed value.

    Example:
        >>> parse_config("ours-c1-64m").spec
        'ours:chunk_mb=64,concurrency=1'
        >>> parse_config("sglang").kind
        'sglang'
    """
    name = text.strip()
    if not name:
        raise ValueError("empty configuration")
    body = name
    m = _SWEEP_RE.match(name)
    if m:
        body = f"ours:concurrency={m.group(1)},chunk_mb={m.group(2)}"
    elif name in ALIASES:
        body = ALIASES[name]
    elif name.startswith("ours-") and ":" not in name and _NAME_RE.match(name):
        body = f"ours:backend={name[len('ours-') :]}"
    kind, _, rest = body.partition(":")
    if kind not in KINDS:
        raise ValueError(
            f"unknown configuration {name!r}: kind must be one of {', '.join(KINDS)} "
            f"(or an alias: {', '.join(ALIASES)}, ours-c<N>-<MB>m, ours-<backend>)"
        )
    opts: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise ValueError(f"configuration {name!r}: option {item!r} is not key=value")
        if key not in _OPTIONS[kind]:
            valid = ", ".join(_OPTIONS[kind]) or "none"
            raise ValueError(
                f"configuration {name!r}: unknown option {key!r} for {kind} (valid: {valid})"
            )
        if key in ("threads", "concurrency") and (not value.isdigit() or int(value) < 1):
            raise ValueError(f"configuration {name!r}: {key} must be an integer >= 1")
        if key in ("chunk_mb", "block_mb"):
            try:
                if float(value) <= 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"configuration {name!r}: {key} must be a number > 0") from None
        opts[key] = value
    cfg = Config(name=name, kind=kind, options=tuple(sorted(opts.items())))
    if kind == "ours":
        cfg.loader_options()  # validate sizes and booleans now, not in the rank process
    return cfg


@dataclass(frozen=True)
class Job:
    """What every rank of one measurement runs.

    Attributes:
        config: the configuration string (parsed again in the rank process).
        files: the checkpoint files, as the ranks see them (through the mount).
        world: the number of ranks.
        max_tensor_bytes: size of the copy buffer (the largest tensor).
        cgroup: a memory cgroup directory to join once ready, or None.
        checksum: compute the checksum (off only for the raw floor, which has no tensors).
    """

    config: str
    files: list[str]
    world: int
    max_tensor_bytes: int = 0
    cgroup: str | None = None
    checksum: bool = True

    def to_json(self) -> str:
        """The job as JSON (for the subprocess launcher)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        """Rebuild a job from `to_json` output."""
        return cls(**json.loads(text))


# --------------------------------------------------------------------------------------
# The consumer: copy every tensor into a reused buffer, checksum the copy


@dataclass
class Consumer:
    """Copies each tensor's bytes into one preallocated buffer and checksums the copy.

    The checksum does not depend on the order tensors arrive in: it is the sum modulo
    2**64 of one 64-bit BLAKE2b digest per tensor, over its name, dtype, shape, size and
    the wrapping sum of its bytes read as int64 words (plus the last n % 8 bytes). It
    is computed on the copy, by torch at about 10 GB/s (CRC-32 would cost 4 times more
    CPU, which would crowd the 2 cores the ranks share). It catches a missing, truncated,
    zeroed or foreign byte range; not a permutation of 8-byte words inside one tensor.

    Attributes:
        buffer: the destination buffer (uint8, at least as large as the largest tensor).
        tensors: tensors consumed.
        nbytes: bytes copied.
    """

    buffer: Any
    with_checksum: bool = True
    tensors: int = 0
    nbytes: int = 0
    _acc: int = 0
    _np: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._np = self.buffer.numpy()

    def __call__(self, name: str, tensor: Any) -> None:
        import torch

        flat = tensor.reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
        n = flat.numel()
        if n > self.buffer.numel():
            self.buffer = torch.empty(n, dtype=torch.uint8)
            self._np = self.buffer.numpy()
        if n:
            self.buffer[:n].copy_(flat)
        self.tensors += 1
        self.nbytes += n
        if self.with_checksum:
            n8 = n - n % 8
            words = int(self.buffer[:n8].view(torch.int64).sum()) & _MASK64 if n8 else 0
            tail = bytes(self._np[n8:n]).hex()
            key = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{n}|{words}|{tail}".encode()
            digest = hashlib.blake2b(key, digest_size=8).digest()
            self._acc = (self._acc + int.from_bytes(digest, "little")) % (1 << 64)

    @property
    def checksum(self) -> str | None:
        """The checksum as 16 hex digits plus the tensor count, or None when off."""
        if not self.with_checksum:
            return None
        return f"{self._acc:016x}-{self.tensors}"


# --------------------------------------------------------------------------------------
# Memory sampling


def _status_kib(keys: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii", errors="replace") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


class _AnonSampler:
    """Samples RssAnon every `interval` seconds on a daemon thread; keeps the peak."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.peak_kib = max(self.peak_kib, _status_kib(("RssAnon",)).get("RssAnon", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> _AnonSampler:
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sampling; return the peak RssAnon in bytes."""
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._sample()
        return self.peak_kib * 1024


def _io_read_bytes() -> int | None:
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------------------
# One rank


def _load(
    cfg: Config, files: list[str], rank: int, world: int, consume: Callable[[str, Any], None]
) -> dict[str, Any] | None:
    """Run configuration `cfg`; return what the prefetch reported, if anything."""
    opts = cfg.opts()
    if cfg.kind == "none":
        from bench.baselines import load_plain

        load_plain(files, consume)
        return None
    if cfg.kind == "sglang":
        from bench.baselines import SGLANG_BLOCK_BYTES, SGLANG_THREADS, load_sglang

        pf = load_sglang(
            files,
            rank,
            world,
            consume,
            threads=int(opts.get("threads", SGLANG_THREADS)),
            block_bytes=int(float(opts.get("block_mb", SGLANG_BLOCK_BYTES >> 20)) * (1 << 20)),
        )
        return pf.stats()
    if cfg.kind == "ours":
        from loader_adapter import safetensors_weights_iterator

        kwargs = cfg.loader_options()
        prefetch = kwargs.pop("prefetch")
        it = safetensors_weights_iterator(
            files, prefetch=prefetch, rank=rank, world=world, **kwargs
        )
        with it:
            for name, tensor in it:
                consume(name, tensor)
        return it.report.to_dict() if it.report is not None else None
    if cfg.kind == "raw":
        from bench.floor import raw_read_share

        n = raw_read_share(
            files,
            rank,
            world,
            threads=int(opts.get("threads", 4)),
            chunk_bytes=int(float(opts.get("chunk_mb", 16)) * (1 << 20)),
        )
        return {"bytes_read": n}
    raise ValueError(f"unknown kind {cfg.kind!r}")


def run_rank(job: Job, rank: int, wait_release: Callable[[], None]) -> dict[str, Any]:
    """Prepare, wait for the release, load, and return this rank's result.

    Before the release: import torch (and the loader for ``ours``), limit torch to one
    intra-op thread (4 ranks on 2 cores must not oversubscribe), allocate and touch the
    copy buffer, join the memory cgroup when the job has one. The timed part runs from
    the return of `wait_release` to the last tensor copied.

    Args:
        job: the job shared by all ranks.
        rank: this rank.
        wait_release: blocks until every rank is ready and the orchestrator releases them.

    Returns:
        A JSON-able dict: rank, t_release / t_done (``time.monotonic()``, comparable across
        processes on Linux), wall_s, cpu_s, peak_rss_bytes, peak_anon_bytes,
        bytes_consumed, tensors, checksum, io_read_bytes, prefetch.

    Example:
        >>> run_rank(Job("none", files, 1), 0, lambda: None)["checksum"]  # doctest: +SKIP
    """
    cfg = parse_config(job.config)
    consumer: Consumer | None = None
    if cfg.kind != "raw":
        import torch

        torch.set_num_threads(1)
        import safetensors.torch  # noqa: F401  (import cost stays outside the timing)

        if cfg.kind == "ours":
            import loader_adapter  # noqa: F401
        buf = torch.empty(max(1, job.max_tensor_bytes), dtype=torch.uint8)
        buf.fill_(0)  # pay first-touch page faults before the release
        consumer = Consumer(buf, with_checksum=job.checksum)
    else:
        import bench.floor  # noqa: F401
    if job.cgroup:
        from bench.cgroup import join

        join(job.cgroup)
    sampler = _AnonSampler()
    io0 = _io_read_bytes()

    wait_release()
    t_release = time.monotonic()
    cpu0 = _cpu_seconds()
    sampler.start()
    prefetch = _load(
        cfg,
        list(job.files),
        rank,
        job.world,
        consumer if consumer is not None else (lambda n, t: None),
    )
    t_done = time.monotonic()
    cpu = _cpu_seconds() - cpu0
    peak_anon = sampler.stop()
    io1 = _io_read_bytes()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "rank": rank,
        "t_release": t_release,
        "t_done": t_done,
        "wall_s": t_done - t_release,
        "cpu_s": cpu,
        "peak_rss_bytes": int(peak_rss),
        "peak_anon_bytes": int(peak_anon),
        "bytes_consumed": consumer.nbytes
        if consumer
        else int((prefetch or {}).get("bytes_read", 0)),
        "tensors": consumer.tensors if consumer else 0,
        "checksum": consumer.checksum if consumer else None,
        "io_read_bytes": (io1 - io0) if io0 is not None and io1 is not None else None,
        "prefetch": prefetch,
    }


# --------------------------------------------------------------------------------------
# Entry points: forkserver child, and ``python -m bench.worker``


_PRELOAD = (
    "torch",
    "safetensors.torch",
    "numpy",
    "loader_adapter",
    "bench.baselines",
    "bench.floor",
    "bench.cgroup",
    "bench.checkpoint",
)


def _send(stream: Any, obj: Mapping[str, Any]) -> None:
    stream.write((json.dumps(obj) + "\n").encode())
    stream.flush()


def _fork_rank(
    job: Job, rank: int, ready_w: int, release_r: int, out_path: str, server_fds: Sequence[int]
) -> int:
    """Fork one rank; the child never returns (it leaves with ``os._exit``)."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        for fd in server_fds:  # the server's pipe ends: EOF must reach the ranks
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(2, 1)  # stray prints go to the server's log, not its protocol stream

        def wait() -> None:
            os.write(ready_w, b"r")
            if os.read(release_r, 1) != b"g":
                raise RuntimeError("released by EOF: the fork server went away")

        try:
            result: dict[str, Any] = {"ok": True, "result": run_rank(job, rank, wait)}
        except BaseException as exc:
            import traceback

            code = 1
            result = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
            with contextlib.suppress(OSError):
                os.write(ready_w, b"x")  # fail fast if it failed before the release
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, out_path)
    except BaseException:
        code = 2
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def forkserver_main() -> int:
    """``python -m bench.worker --fork-server``: fork rank processes on request.

    The server imports torch, safetensors and the loader once, then reads one JSON
    command per line on stdin and answers one JSON line per event on stdout:

    * ``{"op": "start", "job": ..., "world": W, "dir": D}`` forks W ranks; each prepares,
      says ready on a pipe and waits; the server answers ``{"event": "ready"}`` when all
      are ready (or ``{"event": "failed"}`` when one failed before);
    * ``{"op": "release"}`` releases them together (W bytes on one pipe) and answers
      ``{"event": "released", "t_release": ...}``; when every rank has exited it answers
      ``{"event": "done", "status": [...]}``; rank r's result is in ``D/rank-r.json``.

    A forked child has a fresh address space (copy-on-write), no threads but its own,
    and nothing of a previous measurement; only the imports are shared.
    """
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # e.g. the loader is not installed: only ours needs it
            log.debug("fork server: cannot preload %s: %s", name, exc)
    out = sys.stdout.buffer
    _send(out, {"event": "server-ready", "pid": os.getpid()})
    for line in sys.stdin.buffer:
        cmd = json.loads(line)
        if cmd.get("op") != "start":
            _send(out, {"event": "error", "error": f"unexpected command {cmd!r}"})
            continue
        job = Job.from_json(cmd["job"])
        world = int(cmd["world"])
        ready_r, ready_w = os.pipe()
        release_r, release_w = os.pipe()
        pids = [
            _fork_rank(
                job,
                r,
                ready_w,
                release_r,
                os.path.join(cmd["dir"], f"rank-{r}.json"),
                (ready_r, release_w),
            )
            for r in range(world)
        ]
        os.close(ready_w)
        os.close(release_r)
        got = b""
        while len(got) < world and b"x" not in got:
            chunk = os.read(ready_r, world)
            if not chunk:
                break
            got += chunk
        ok = len(got) >= world and b"x" not in got
        _send(out, {"event": "ready" if ok else "failed"})
        if ok:
            nxt = json.loads(sys.stdin.buffer.readline() or b"{}")
            if nxt.get("op") == "release":
                t_release = time.monotonic()
                os.write(release_w, b"g" * world)
                _send(out, {"event": "released", "t_release": t_release})
        os.close(release_w)  # unreleased ranks read EOF and stop
        os.close(ready_r)
        status = [os.waitpid(pid, 0)[1] for pid in pids]
        _send(out, {"event": "done", "status": [os.waitstatus_to_exitcode(s) for s in status]})
    return 0


def _stdio_main(job: Job, rank: int, barrier: bool) -> int:
    """The subprocess protocol: ``ready`` on stdout, one byte on stdin releases."""

    def wait() -> None:
        if not barrier:
            return
        sys.stdout.write(json.dumps({"event": "ready", "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        if not sys.stdin.buffer.read(1):
            raise SystemExit("released by EOF: the orchestrator went away")

    try:
        result = run_rank(job, rank, wait)
    except Exception as exc:
        import traceback

        sys.stdout.write(
            json.dumps(
                {
                    "event": "error",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
            )
            + "\n"
        )
        sys.stdout.flush()
        return 1
    sys.stdout.write(json.dumps({"event": "result", "result": result}) + "\n")
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.worker``: run one rank (used by ``--launcher subprocess``)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--fork-server",
        action="store_true",
        help="run the fork server that bench.run talks to (internal)",
    )
    p.add_argument("--job", help="a JSON job (as written by the orchestrator)")
    p.add_argument("--config", default="none", help="configuration (default: none)")
    p.add_argument("--rank", type=int, default=0, help="this rank (default 0)")
    p.add_argument("--world", type=int, default=1, help="number of ranks (default 1)")
    p.add_argument(
        "--barrier",
        action="store_true",
        help="print a ready line and wait for one byte on stdin before loading",
    )
    p.add_argument("files", nargs="*", help="safetensors files (when no --job)")
    args = p.parse_args(argv)
    if args.fork_server:
        return forkserver_main()
    if args.job:
        job = Job.from_json(args.job)
    else:
        if not args.files:
            p.error("give --job or the safetensors files")
        job = Job(config=args.config, files=list(args.files), world=args.world, max_tensor_bytes=0)
    code = _stdio_main(job, args.rank, args.barrier)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
