"""Several rank processes warm one checkpoint together: each byte read from storage once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine import resident_bytes

MiB = 1 << 20
WORKER = """
import json, sys
from engine import start_prefetch
rank, world, strategy, *files = sys.argv[1:]
report = start_prefetch(files, int(rank), int(world), strategy=strategy, chunk_bytes=4 << 20).wait()
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({"planned": report.planned_bytes, "warmed": report.warmed_bytes,
                  "cached": report.cached_bytes, "ok": report.ok,
                  "read_bytes": int(io["read_bytes"])}))
"""


@pytest.mark.parametrize(("strategy", "world"), [("balanced", 4), ("balanced", 3), ("files", 4)])
def test_ranks_read_each_byte_once_and_everything_ends_resident(make_file, strategy, world):
    sizes = [40 * MiB, 9 * MiB, 3 * MiB + 4097, 17 * MiB]  # skewed, unaligned
    files = [str(make_file(f"m{i}.safetensors", s, seed=i)) for i, s in enumerate(sizes)]
    total = sum(sizes)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(r), str(world), strategy, *files],
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.getcwd(),
        )
        for r in range(world)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(r["ok"] for r in results)
    assert sum(r["planned"] for r in results) == total
    # Bytes fetched from the block device by all ranks together (per-process accounting).
    read = sum(r["read_bytes"] for r in results)
    assert read <= 1.02 * total, f"storage read {read / total:.3f}x the checkpoint"
    for path, size in zip(files, sizes, strict=True):
        assert resident_bytes(path) >= 0.99 * size
