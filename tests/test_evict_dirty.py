"""Eviction of files whose pages are dirty or under writeback (a freshly written checkpoint).

`posix_fadvise(DONTNEED)` drops clean pages only: right after a write, or while the disk
still flushes other data, the pages of a new file are dirty or under writeback and stay.
"""

from __future__ import annotations

import mmap
import os

import pytest

from engine import evict, resident_bytes
from engine.residency import cache_status

SIZE = 96 << 20


def _write(path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)


def test_evict_drops_a_file_just_written_under_write_pressure(tmp_path, write_pressure):
    path = tmp_path / "fresh.safetensors"
    _write(path, SIZE)  # not synced: its pages are dirty now
    evict(path)
    assert resident_bytes(path) < 0.01 * SIZE


def test_cache_status_counts_dirty_pages_of_a_file_just_written(tmp_path):
    path = tmp_path / "dirty.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(8 << 20))
        status = cache_status(path)
        if status is None:
            pytest.skip("cachestat is not available on this kernel")
        assert status.cached_bytes == 8 << 20
        # Written a moment ago: still dirty, or already on its way to the disk (the flusher
        # takes dirty pages seconds later), not yet clean.
        assert status.dirty_bytes + status.writeback_bytes > 0
        os.fsync(f.fileno())
    status = cache_status(path)
    assert status is not None and status.dirty_bytes == 0 and status.writeback_bytes == 0


def test_evict_leaves_mapped_pages_and_says_so(tmp_path):
    path = tmp_path / "mapped.bin"
    _write(path, 4 << 20)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert sum(m[i] for i in range(0, len(m), 4096)) >= 0  # fault every page in
        evict(path)
        assert resident_bytes(path) == 4 << 20  # mapped pages are not dropped
        from engine.residency import processes_mapping

        holders = processes_mapping([path])
        assert os.getpid() in holders
