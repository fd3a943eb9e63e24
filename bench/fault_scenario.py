"""Injected faults as a scenario of the suite: one round of `bench.reliability` per step.

A matrix with ``faults=True`` (the ``faults`` scenario) loads the suite's checkpoint
through a simulated filesystem under each fault of `bench.reliability` (EIO on a range,
a stalled server, the iterator closed while it stalls, a flaky client, a shard that
vanishes), every tensor compared with a fault-free load. The runs need torch, so a round
runs in a child process; each fault becomes a result of the suite's document: its time
is the run's, and its ``detail`` says whether the run survived and how many tensors were
lost or wrong.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.checkpoint import Checkpoint
from bench.errors import BenchError
from bench.launchers import child_env
from bench.models import Sample

__all__ = ["FaultRound", "measure_round", "slug", "to_sample"]


@dataclasses.dataclass(frozen=True)
class FaultRound:
    """One run of every fault.

    Attributes:
        group: where (its filesystem is the simulated profile the faults are injected in).
        repeat: the round's number (0-based).
        label: the progress line.
    """

    group: Any
    repeat: int
    label: str


def slug(fault: str) -> str:
    """A fault's description as a configuration name.

    Example:
        >>> slug("server stalls 2 s, then recovers")
        'fault-server-stalls-2-s-then-recovers'
    """
    return "fault-" + re.sub(r"[^a-z0-9]+", "-", fault.lower()).strip("-")[:48].rstrip("-")


def measure_round(step: FaultRound, ckpt: Checkpoint, *, timeout_s: float) -> list[dict[str, Any]]:
    """Run every fault once on `ckpt` (a child process); return the outcomes.

    Raises:
        BenchError: the child failed before it wrote its outcomes.
    """
    with tempfile.TemporaryDirectory(prefix="ckpt-faults-") as tmp:
        out = Path(tmp) / "faults.json"
        cmd = [
            sys.executable, "-m", "bench.reliability", "--runs", "1", "--json", str(out),
            "--checkpoint", str(ckpt.directory), "--profile", step.group.fs,
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env()
        )
        if not out.exists():
            raise BenchError(
                f"{step.label}: the fault runs stopped (exit status {proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}"
            )
        return list(json.loads(out.read_text())["outcomes"])


def to_sample(outcome: dict[str, Any], total_bytes: int) -> Sample:
    """One fault's run as a suite sample (no rank reports: the run is one process)."""
    detail = {k: outcome[k] for k in ("fault", "runs", "survived", "lost", "wrong")}
    return Sample.of(
        wall_s=outcome["worst_s"], ranks=[], served=None, total_bytes=total_bytes,
        resident=0.0, detail=detail,
    )  # fmt: skip
