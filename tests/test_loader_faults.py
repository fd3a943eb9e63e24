"""The loader under server faults: same outcome with and without prefetch, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fuse_support import require_fuse

from bench.checkpoint import make_checkpoint
from bench.netfs import mounted
from loader_adapter import safetensors_weights_iterator

pytestmark = pytest.mark.fuse
MiB = 1 << 20

LOAD = textwrap.dedent(
    """
    import sys
    from loader_adapter import safetensors_weights_iterator
    prefetch = sys.argv[1] == "on"
    n = 0
    for name, t in safetensors_weights_iterator(sys.argv[2:], prefetch=prefetch,
                                                chunk_bytes=1 << 20):
        t.clone()
        n += 1
    print(n)
    """
)


@pytest.fixture
def ckpt(tmp_path: Path):
    require_fuse()
    return make_checkpoint(tmp_path / "ck", size_bytes=24 * MiB, shards=3, seed=5)


def _load(files: list[str], prefetch: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LOAD, prefetch, *files],
        capture_output=True, text=True, timeout=120, cwd=os.getcwd(),
    )  # fmt: skip


def test_persistent_eio_ends_the_load_the_same_way_with_and_without_prefetch(ckpt, tmp_path):
    with mounted(ckpt.directory, profile="local-fuse", mountpoint=tmp_path / "m") as fs:
        files = sorted(str(p) for p in fs.path.glob("*.safetensors"))
        fs.inject_eio(Path(files[1]).name, 2 * MiB, 4096)  # inside a tensor's data
        outcomes = []
        for prefetch in ("off", "on"):
            fs.evict()
            out = _load(files, prefetch)
            outcomes.append(out.returncode)
        # The mmap'd tensor page cannot be read: the kernel raises SIGBUS in both cases.
        assert outcomes[0] == outcomes[1] != 0, outcomes


def test_closing_the_iterator_on_a_stalled_server_returns_within_a_second(ckpt, tmp_path):
    with mounted(ckpt.directory, profile="local-fuse", mountpoint=tmp_path / "m") as fs:
        files = sorted(str(p) for p in fs.path.glob("*.safetensors"))
        for f in files:  # the loader's first pages are cached; the prefetch's reads are not
            with open(f, "rb") as fh:
                fh.read(64 << 10)
        fs.stall(30)
        it = safetensors_weights_iterator(files, prefetch=True, chunk_bytes=MiB)
        next(it)  # the loader is running; the prefetch is blocked in the server
        deadline = time.monotonic() + 5
        while fs.counters().stalled == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fs.counters().stalled > 0
        t0 = time.monotonic()
        it.close()
        assert time.monotonic() - t0 < 1.0
        fs.unstall()
