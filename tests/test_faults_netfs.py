"""Faults on a simulated network filesystem: EIO on a range, a stalled server.

A prefetch must record the error and warm the rest; a stalled server must not trap
cancel() or the process's exit.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from file_support import write_random
from fuse_support import require_fuse

from bench.netfs import mounted
from engine import start_prefetch

pytestmark = pytest.mark.fuse
MiB = 1 << 20


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    require_fuse()
    d = tmp_path / "backing"
    d.mkdir()
    for i in range(3):
        write_random(d / f"model-{i}.safetensors", 8 * MiB, seed=i)
    return d


def test_eio_on_one_range_is_reported_and_the_rest_warmed(backing, tmp_path):
    with mounted(backing, profile="local-fuse", mountpoint=tmp_path / "mnt") as fs:
        fs.inject_eio("model-1.safetensors", 3 * MiB, 4096)
        files = sorted(str(p) for p in fs.path.iterdir())
        report = start_prefetch(files, chunk_bytes=MiB, concurrency=4).wait(60)
        assert report is not None
        [failure] = report.failures
        assert failure.path.endswith("model-1.safetensors")
        assert failure.errno == errno.EIO
        assert failure.offset <= 3 * MiB < failure.offset + failure.length
        assert failure.length <= 2 * MiB  # only the stripe(s) touching the bad range
        assert report.warmed_bytes + report.cached_bytes + report.failed_bytes == 24 * MiB
        assert report.failed_bytes == failure.length
        served = fs.counters().bytes_served
        assert served >= 24 * MiB - report.failed_bytes - MiB  # the rest was read

        # The CLI exits 1 and names the file.
        fs.evict()
        out = subprocess.run(
            [sys.executable, "-m", "engine.cli", "warm", "--chunk", "1MiB", str(fs.path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 1, out.stderr
        assert "model-1.safetensors" in out.stderr and "EIO" in out.stderr


@pytest.mark.parametrize("backend", ["auto", "aiofiles"])
def test_cancel_returns_within_a_second_on_a_stalled_server(backing, tmp_path, backend):
    with mounted(backing, profile="local-fuse", mountpoint=tmp_path / "mnt") as fs:
        files = sorted(str(p) for p in fs.path.iterdir())
        fs.evict()
        fs.stall(30)
        h = start_prefetch(files, chunk_bytes=MiB, concurrency=2, backend=backend)
        deadline = time.monotonic() + 10
        while fs.counters().stalled == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fs.counters().stalled > 0, "a read should be blocked by now"
        t0 = time.monotonic()
        report = h.cancel()
        assert time.monotonic() - t0 < 1.0
        assert report is not None and report.cancelled
        fs.unstall()


@pytest.mark.parametrize("backend", ["auto", "aiofiles"])
def test_process_exits_promptly_while_a_worker_is_blocked_in_a_read(backing, tmp_path, backend):
    with mounted(backing, profile="local-fuse", mountpoint=tmp_path / "mnt") as fs:
        files = sorted(str(p) for p in fs.path.iterdir())
        fs.evict()
        fs.stall(30)
        script = textwrap.dedent(
            f"""
            import json, sys, time
            from engine import start_prefetch
            h = start_prefetch({files!r}, chunk_bytes=1 << 20, concurrency=2,
                               backend={backend!r})
            time.sleep(1.0)              # the reads are now blocked in the server
            print(json.dumps([h.progress().in_flight, time.time()]), flush=True)
            """  # the work is done: the interpreter must exit although a read blocks
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
            cwd=os.getcwd(),
        )  # fmt: skip
        exited = time.time()
        fs.unstall()
        assert out.returncode == 0, out.stderr
        in_flight, work_done = json.loads(out.stdout)
        assert in_flight > 0, "a read was in flight at exit"
        assert exited - work_done < 2.0, f"exit took {exited - work_done:.2f} s after the work"
