"""Launchers: start a measurement's rank processes, release them together, collect.

Two ways to get fresh rank processes (the messages are in `bench.protocol`):

* `ForkserverLauncher` (default): ranks forked from a server that imported torch and
  the loader once (``python -m bench.worker --fork-server``). The server is started on
  first use and restarted after a failure; a timed-out measurement kills its whole
  process group.
* `SubprocessLauncher`: a new interpreter per rank (``python -m bench.worker --job``),
  slower to start; the timing starts after the imports either way.

The rank processes import the bench from the tree this module belongs to, whatever the
installed copy, so a measurement always runs the code under test.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from bench import protocol as proto
from bench.errors import BenchError
from bench.protocol import Job, RankReport

__all__ = ["ForkserverLauncher", "Launcher", "SubprocessLauncher", "child_env", "make_launcher"]

_REPO = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """This environment, with this tree first on a child process's import path (the rank
    processes, and the harnesses the suite runs in a child)."""
    path = os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def _tail(log: IO[bytes], limit: int) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]


class Launcher:
    """Starts the ranks of one measurement; `run` returns when every rank has finished."""

    def run(self, job: Job, world: int, timeout: float) -> tuple[float, list[RankReport]]:
        """Start `world` ranks, release them together, return (t_release, reports)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release resources."""


class ForkserverLauncher(Launcher):
    """Ranks forked from a server process that imported torch and the loader once."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in close())
        self.buf = b""

    def _start(self, deadline: float) -> subprocess.Popen[bytes]:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        self.buf = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", "--fork-server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=child_env(),
            start_new_session=True,
        )
        self._expect(proto.ServerReady, deadline)
        return self.proc

    def _read(self, deadline: float) -> Any:
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
                raise BenchError(f"the fork server exited:\n{_tail(self.log, 3000)}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return proto.decode_rank(line)

    def _expect(self, kind: type, deadline: float) -> Any:
        msg = self._read(deadline)
        if not isinstance(msg, kind):
            raise BenchError(f"fork server: expected {kind.__name__}, got {msg!r}")
        return msg

    def _send(self, message: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(proto.encode(message))
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

    def _exchange(self, start: proto.Start, deadline: float) -> tuple[float, proto.Done]:
        """Start, release and wait for the ranks; t_release is NaN when not released."""
        self._start(deadline)
        self._send(start)
        t_release = math.nan
        if isinstance(self._read(deadline), proto.Ready):
            self._send(proto.Release())
            t_release = self._expect(proto.Released, deadline).t_release
        return t_release, self._expect(proto.Done, deadline)

    def _outcome(self, start: proto.Start, done: proto.Done, rank: int) -> RankReport | str:
        """Rank `rank`'s report, or why there is none."""
        path = Path(start.result_path(rank))
        if not path.exists():
            return (
                f"rank {rank} exited with status {done.status[rank]} and "
                f"no result (killed? out of memory?)\n{_tail(self.log, 3000)}"
            )
        try:
            out = proto.decode_rank(path.read_bytes())
        except proto.ProtocolError as exc:
            return f"rank {rank}: {exc}"
        if isinstance(out, proto.RankResult):
            return out.result
        return f"rank {rank} failed: {out.error}\n{out.traceback}"

    def run(self, job: Job, world: int, timeout: float) -> tuple[float, list[RankReport]]:
        deadline = time.monotonic() + timeout
        with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
            start = proto.Start(job=job, world=world, dir=tmp)
            try:
                t_release, done = self._exchange(start, deadline)
            except BaseException:
                self._kill()
                raise
            outcomes = [self._outcome(start, done, r) for r in range(world)]
        reports = [o for o in outcomes if isinstance(o, RankReport)]
        errors = [o for o in outcomes if isinstance(o, str)]
        if errors or math.isnan(t_release):
            # The rank that failed first says why; the others were stopped by EOF.
            errors.sort(key=lambda e: "released by EOF" in e)
            raise BenchError(errors[0] if errors else "the ranks were not released")
        return t_release, reports

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self._kill()
        self.log.close()


class SubprocessLauncher(Launcher):
    """Ranks as ``python -m bench.worker``: a new interpreter each (slow to start)."""

    def _spawn(self, job: Job, rank: int, err: IO[bytes]) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "bench.worker", "--job", job.to_json()]
        return subprocess.Popen(
            [*cmd, "--rank", str(rank), "--barrier"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=child_env(),
        )

    def run(self, job: Job, world: int, timeout: float) -> tuple[float, list[RankReport]]:
        procs: list[subprocess.Popen[bytes]] = []
        logs: list[IO[bytes]] = []
        deadline = time.monotonic() + timeout
        try:
            for rank in range(world):
                logs.append(tempfile.TemporaryFile())  # noqa: SIM115  (closed in finally)
                procs.append(self._spawn(job, rank, logs[-1]))
            _RankLines(procs, logs).collect(proto.Ready, deadline)
            t_release = time.monotonic()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(proto.GO)
                p.stdin.flush()
            results = _RankLines(procs, logs).collect(proto.RankResult, deadline)
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            return t_release, [m.result for m in results]
        finally:
            _reap(procs, logs)


def _reap(procs: Sequence[subprocess.Popen[bytes]], logs: Sequence[IO[bytes]]) -> None:
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


class _RankLines:
    """Reads one message of a given type from each rank's stdout, all ranks at once."""

    def __init__(self, procs: Sequence[subprocess.Popen[bytes]], logs: Sequence[IO[bytes]]):
        self.procs, self.logs = procs, logs
        self.bufs = [b""] * len(procs)

    def _line(self, rank: int, fd: int, want: type) -> bytes | None:
        chunk = os.read(fd, 65536)
        if not chunk:
            tail = _tail(self.logs[rank], 2000)
            raise BenchError(f"rank {rank} exited before {want.__name__}:\n{tail}")
        self.bufs[rank] += chunk
        if b"\n" not in self.bufs[rank]:
            return None
        line, _, self.bufs[rank] = self.bufs[rank].partition(b"\n")
        return line

    def collect(self, want: type, deadline: float) -> list[Any]:
        out: dict[int, Any] = {}
        with selectors.DefaultSelector() as sel:
            for rank, p in enumerate(self.procs):
                assert p.stdout is not None
                sel.register(p.stdout, selectors.EVENT_READ, rank)
            while len(out) < len(self.procs):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"ranks timed out waiting for {want.__name__}")
                for key, _ in sel.select(timeout=left):
                    line = self._line(key.data, key.fd, want)
                    if line is None:
                        continue
                    msg = proto.decode_rank(line)
                    if isinstance(msg, proto.Error):
                        raise BenchError(f"rank {key.data} failed: {msg.error}\n{msg.traceback}")
                    out[key.data] = msg
                    sel.unregister(key.fileobj)
        return [out[r] for r in range(len(self.procs))]


def make_launcher(name: str) -> Launcher:
    """The launcher called `name`: ``forkserver`` or ``subprocess``."""
    if name == "forkserver":
        return ForkserverLauncher()
    if name == "subprocess":
        return SubprocessLauncher()
    raise ValueError(f"unknown launcher {name!r} (forkserver, subprocess)")
