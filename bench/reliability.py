"""Reliability runs: load a checkpoint with prefetch under injected faults, count outcomes.

For each fault, `--runs` loads through `loader_adapter` with prefetch on; each load is
compared tensor by tensor (a digest of name, dtype, shape and bytes) with a fault-free
load of the same checkpoint. A run "survived" when it returned within its time limit with
no exception other than the one the same load raises without prefetch; "lost" counts
tensors missing from the result, "wrong" tensors whose digest differs.

Usage: ``python -m bench.reliability --runs 5`` (needs root for FUSE; about a minute).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.checkpoint import make_checkpoint
from bench.netfs import NetFS, mounted
from engine.backends import Backend, SendfileBackend
from loader_adapter import safetensors_weights_iterator

log = logging.getLogger(__name__)
MiB = 1 << 20


def digests(files: Sequence[str], **options: object) -> dict[str, str]:
    """Load every tensor (prefetch as given) and return name -> digest of its bytes."""
    out: dict[str, str] = {}
    it = safetensors_weights_iterator(files, **options)
    try:
        for name, t in it:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            out[name] = h.hexdigest()
    finally:
        it.close()
    return out


class _FlakyBackend(Backend):
    """sendfile, but every third extent raises EIO (a flaky client, not the server)."""

    name = "flaky"

    def __init__(self) -> None:
        self.inner = SendfileBackend()
        self.n = 0
        self.lock = threading.Lock()

    def read_into_cache(self, fd: int, offset: int, length: int) -> int:
        with self.lock:
            self.n += 1
            bad = self.n % 3 == 0
        if bad:
            raise OSError(5, "injected by the reliability run")
        return self.inner.read_into_cache(fd, offset, length)


@dataclass
class Outcome:
    """Counts for one fault over all its runs."""

    fault: str
    runs: int = 0
    survived: int = 0
    lost: int = 0
    wrong: int = 0
    worst_s: float = 0.0


@contextmanager
def _timer(outcome: Outcome) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    outcome.worst_s = max(outcome.worst_s, time.monotonic() - t0)


def _files(fs: NetFS) -> list[str]:
    return sorted(str(p) for p in fs.path.glob("*.safetensors"))


def _scenarios() -> dict[str, Callable[[NetFS, dict[str, str]], tuple[dict[str, str], bool]]]:
    """fault name -> run(fs, expected) returning (digests loaded, survived)."""

    def eio_transient(fs: NetFS, expected: dict[str, str]) -> tuple[dict[str, str], bool]:
        # EIO on a range while the prefetch runs; the server recovers before the load.
        files = _files(fs)
        fs.inject_eio(Path(files[1]).name, 3 * MiB, 64 << 10)
        from engine import start_prefetch

        report = start_prefetch(files, chunk_bytes=MiB).wait(60)
        fs.clear_faults()
        ok = report is not None and len(report.failures) == 1
        return digests(files, prefetch=True), ok

    def stall_then_recover(fs: NetFS, expected: dict[str, str]) -> tuple[dict[str, str], bool]:
        fs.stall(2.0)  # reads hang 2 s, then the server answers again
        return digests(_files(fs), prefetch=True), True

    def close_while_stalled(fs: NetFS, expected: dict[str, str]) -> tuple[dict[str, str], bool]:
        files = _files(fs)
        first = digests(files, prefetch=False)  # all cached now: the loader needs no server
        fs.evict()
        for f in files:  # the loader's pages are hot, the prefetch's reads will hang
            with open(f, "rb") as fh:
                fh.read(1)
        fs.stall(30)
        it = safetensors_weights_iterator(files, prefetch=True, skip_cached=False)
        t0 = time.monotonic()
        it.close()
        fs.unstall()
        return first, time.monotonic() - t0 < 1.0

    def flaky_client(fs: NetFS, expected: dict[str, str]) -> tuple[dict[str, str], bool]:
        return digests(_files(fs), prefetch=True, backend=_FlakyBackend()), True

    def vanish_during_prefetch(fs: NetFS, expected: dict[str, str]) -> tuple[dict[str, str], bool]:
        # The prefetch opens the file after it vanished (ENOENT); the loader, which opened
        # nothing yet either, must then fail the same way as without prefetch.
        files = _files(fs)
        fs.vanish(Path(files[-1]).name)
        errors = []
        for prefetch in (False, True):
            try:
                digests(files, prefetch=prefetch)
            except OSError as exc:
                errors.append(type(exc))
        fs.clear_faults()
        same = len(errors) == 2 and errors[0] is errors[1]
        return dict(expected), same  # nothing loaded in either case: compare behaviour only

    return {
        "EIO on a 64 KiB range (transient)": eio_transient,
        "server stalls 2 s, then recovers": stall_then_recover,
        "iterator closed while the server is stalled": close_while_stalled,
        "every 3rd prefetch read fails (client)": flaky_client,
        "a shard vanishes before the load": vanish_during_prefetch,
    }


def run(
    runs: int, workdir: Path, *, checkpoint: Path | None = None, profile: str = "fast-nfs"
) -> list[Outcome]:
    """Run every scenario `runs` times; return the outcomes.

    Args:
        runs: runs per fault.
        workdir: where the mount point (and a made checkpoint) go.
        checkpoint: the checkpoint's directory (at least 2 shards); None: a fresh 48 MiB
            one of 4 shards.
        profile: the simulated filesystem (`bench.netfs.PROFILES`).
    """
    if checkpoint is None:
        checkpoint = make_checkpoint(
            workdir / "ckpt", size_bytes=48 * MiB, shards=4, seed=3
        ).directory
    outcomes = []
    with mounted(checkpoint, profile=profile, mountpoint=workdir / "mnt") as fs:
        expected = digests(_files(fs), prefetch=False)
        for fault, scenario in _scenarios().items():
            out = Outcome(fault)
            for _ in range(runs):
                fs.clear_faults()
                fs.evict()
                out.runs += 1
                try:
                    with _timer(out):
                        got, ok = scenario(fs, expected)
                except Exception as exc:  # a crash is a run that did not survive
                    log.error("%s: %r", fault, exc)
                    fs.clear_faults()
                    continue
                out.survived += int(ok)
                out.lost += sum(1 for name in expected if name not in got)
                out.wrong += sum(1 for name, d in got.items() if expected.get(name) != d)
            outcomes.append(out)
    return outcomes


def render(outcomes: Sequence[Outcome], command: str) -> str:
    """A Markdown table of the outcomes."""
    lines = [
        "| fault | runs | survived | tensors lost | wrong tensors | slowest run |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.fault} | {o.runs} | {o.survived} | {o.lost} | {o.wrong} | {o.worst_s:.1f} s |"
        )
    lines.append(f"\nCommand: `{command}`")
    return "\n".join(lines)


def document(outcomes: Sequence[Outcome], command: str) -> dict[str, Any]:
    """The outcomes as a JSON document with the command and the host (commit included),
    as the suite's results carry them (`bench.results.host_metadata`)."""
    from bench.results import host_metadata

    return {
        "version": 1,
        "command": command,
        "host": host_metadata(),
        "outcomes": [asdict(o) for o in outcomes],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the reliability scenarios; print a Markdown table. Exit 1 if any run failed."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.reliability",
        description="Load a small checkpoint through the simulated NFS under injected faults.",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per fault (%(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the outcomes here")
    parser.add_argument(
        "--checkpoint", type=Path, default=None,
        help="an existing checkpoint directory of 2 or more shards (default: a fresh 48 MiB one)",
    )  # fmt: skip
    parser.add_argument("--profile", default="fast-nfs", help="simulated filesystem (%(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="ckpt-reliability-") as tmp:
        outcomes = run(args.runs, Path(tmp), checkpoint=args.checkpoint, profile=args.profile)
    command = "python -m bench.reliability " + " ".join(argv if argv is not None else sys.argv[1:])
    print(render(outcomes, command.strip()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document(outcomes, command.strip()), indent=2) + "\n")
    bad = any(o.survived < o.runs or o.lost or o.wrong for o in outcomes)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
