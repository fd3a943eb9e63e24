"""The bench makes a freshly made checkpoint cold, and says what holds it when it cannot."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from bench.checkpoint import Checkpoint, TensorSpec, write_safetensors
from bench.errors import BenchError
from bench.filesystems import LocalFS, make_cold
from engine.residency import cache_status

SIZE = 64 << 20


def _checkpoint(directory: Path, files: list[Path]) -> Checkpoint:
    total = sum(f.stat().st_size for f in files)
    return Checkpoint(
        directory=directory,
        files=tuple(files),
        total_bytes=total,
        tensor_count=len(files),
        shape="uniform",
        max_tensor_bytes=SIZE,
    )


def test_write_safetensors_leaves_no_dirty_page(tmp_path):
    path = tmp_path / "a.safetensors"
    write_safetensors(path, [TensorSpec("w", "uint8", (SIZE,))])
    st = cache_status(path)
    if st is None:
        pytest.skip("cachestat is not available on this kernel")
    assert st.dirty_bytes == 0 and st.writeback_bytes == 0


def test_make_cold_right_after_writing_under_write_pressure(tmp_path, write_pressure):
    files = []
    for i in range(3):  # written the plain way, not synced: dirty pages, as a busy disk leaves
        p = tmp_path / f"model-{i}.safetensors"
        with open(p, "wb") as f:
            f.write(os.urandom(SIZE))
        files.append(p)
    fs = LocalFS(_checkpoint(tmp_path, files))
    assert make_cold(fs, sum(f.stat().st_size for f in files)) < 0.01


def test_make_cold_names_the_process_that_maps_the_files(tmp_path):
    p = tmp_path / "model.safetensors"
    write_safetensors(p, [TensorSpec("w", "uint8", (4 << 20,))])
    fs = LocalFS(_checkpoint(tmp_path, [p]))
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert sum(m[i] for i in range(0, len(m), 4096)) >= 0  # fault every page in
        with pytest.raises(BenchError, match=rf"mapped by process {os.getpid()} "):
            make_cold(fs, p.stat().st_size)
