"""The rank processes' entry point: ``python -m bench.worker``.

Two ways in, one per launcher (the messages are in `bench.protocol`):

* ``--fork-server``: import torch, safetensors and the loader once, then fork rank
  processes on request. A fresh interpreter per rank costs 1.4 s of CPU for
  ``import torch``, which on 2 cores would eat the quick suite's time budget; a forked
  child has a fresh address space (copy-on-write), no threads but its own, and nothing
  of a previous measurement: only the imports are shared.
* ``--job JOB --rank R --barrier``: run one rank in this interpreter (``--launcher
  subprocess``), released by one byte on stdin.

What a rank does is in `bench.rank`; what it runs is a configuration string
(`bench.configs`). Run one rank by hand (it starts at once, no barrier)::

    python -m bench.worker --config ours --rank 0 --world 1 DIR/*.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any, BinaryIO

from bench import protocol as proto
from bench.consumer import Consumer
from bench.protocol import Job
from bench.rank import run_rank

# Job and Consumer are what a hand-written rank driver needs besides this entry point.
__all__ = ["Consumer", "Job", "forkserver_main", "main", "run_rank"]

log = logging.getLogger(__name__)

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


def _send(stream: BinaryIO, message: Any) -> None:
    stream.write(proto.encode(message))
    stream.flush()


def _failure(exc: BaseException) -> proto.Error:
    return proto.Error(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())


def _rank_child(job: Job, rank: int, ready_w: int, release_r: int, out_path: str) -> int:
    """The body of a forked rank: run it, leave the outcome in `out_path`; the exit code."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stray prints go to the server's log, not its protocol stream

    def wait() -> None:
        os.write(ready_w, proto.READY)
        if os.read(release_r, 1) != proto.GO:
            raise RuntimeError("released by EOF: the fork server went away")

    code = 0
    try:
        outcome: Any = proto.RankResult(run_rank(job, rank, wait))
    except BaseException as exc:
        code, outcome = 1, _failure(exc)
        with contextlib.suppress(OSError):
            os.write(ready_w, proto.FAILED)  # fail fast if it failed before the release
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(proto.encode(outcome))
    os.replace(tmp, out_path)
    return code


def _fork_rank(start: proto.Start, rank: int, pipes: tuple[int, int, int, int]) -> int:
    """Fork one rank; the child never returns (it leaves with ``os._exit``)."""
    ready_r, ready_w, release_r, release_w = pipes
    pid = os.fork()
    if pid:
        return pid
    code = 2
    try:
        for fd in (ready_r, release_w):  # the server's pipe ends: EOF must reach the ranks
            os.close(fd)
        code = _rank_child(start.job, rank, ready_w, release_r, start.result_path(rank))
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def _wait_ready(ready_r: int, world: int) -> bool:
    """Whether every rank said ready (False at the first failure or EOF)."""
    got = b""
    while len(got) < world and proto.FAILED not in got:
        chunk = os.read(ready_r, world)
        if not chunk:
            break
        got += chunk
    return len(got) >= world and proto.FAILED not in got


def _serve_start(start: proto.Start, commands: BinaryIO, out: BinaryIO) -> None:
    """Fork the ranks of `start`, release them on `Release`, report when all have exited."""
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    pipes = (ready_r, ready_w, release_r, release_w)
    pids = [_fork_rank(start, r, pipes) for r in range(start.world)]
    os.close(ready_w)
    os.close(release_r)
    ok = _wait_ready(ready_r, start.world)
    _send(out, proto.Ready() if ok else proto.Failed())
    line = commands.readline() if ok else b""
    if line and isinstance(proto.decode_rank(line), proto.Release):
        t_release = time.monotonic()
        os.write(release_w, proto.GO * start.world)
        _send(out, proto.Released(t_release=t_release))
    os.close(release_w)  # unreleased ranks read EOF and stop
    os.close(ready_r)
    status = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    _send(out, proto.Done(status=tuple(status)))


def forkserver_main() -> int:
    """``python -m bench.worker --fork-server``: fork rank processes on request.

    Reads `Start` (then `Release`) on stdin, one JSON line each, and answers on stdout:
    `ServerReady` once, then per `Start` `Ready` or `Failed`, `Released` and `Done`.
    """
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # e.g. the loader is not installed: only ours needs it
            log.debug("fork server: cannot preload %s: %s", name, exc)
    out, commands = sys.stdout.buffer, sys.stdin.buffer
    _send(out, proto.ServerReady(pid=os.getpid()))
    for line in commands:
        try:
            cmd = proto.decode_rank(line)
        except proto.ProtocolError as exc:
            cmd = exc
        if isinstance(cmd, proto.Start):
            _serve_start(cmd, commands, out)
        else:
            _send(out, proto.Error(error=f"unexpected command {cmd!r}"))
    return 0


def _stdio_main(job: Job, rank: int, barrier: bool) -> int:
    """One rank on stdin/stdout: `Ready`, one byte releases, then the outcome."""

    def emit(message: Any) -> None:
        sys.stdout.flush()  # text a library printed goes before the message, not into it
        _send(sys.stdout.buffer, message)

    def wait() -> None:
        if not barrier:
            return
        emit(proto.Ready(pid=os.getpid()))
        if not sys.stdin.buffer.read(1):
            raise SystemExit("released by EOF: the orchestrator went away")

    try:
        outcome: Any = proto.RankResult(run_rank(job, rank, wait))
    except Exception as exc:
        emit(_failure(exc))
        return 1
    emit(outcome)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--fork-server", action="store_true", help="run the fork server (internal)")
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.worker``: the fork server, or one rank (``--launcher subprocess``)."""
    p = _parser()
    args = p.parse_args(argv)
    if args.fork_server:
        return forkserver_main()
    if args.job:
        job = Job.from_json(args.job)
    elif args.files:
        job = Job(config=args.config, files=list(args.files), world=args.world)
    else:
        p.error("give --job or the safetensors files")
    code = _stdio_main(job, args.rank, args.barrier)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
