"""Automatic stripe size and concurrency: by filesystem kind and rank count."""

from __future__ import annotations

import pytest
from file_support import write_random

from bench.netfs import mounted
from engine import start_prefetch
from engine.fstype import is_network_fs
from engine.tuning import LOCAL_CHUNK_BYTES, NETWORK_CHUNK_BYTES, NODE_STREAMS, auto_tuning

MiB = 1 << 20


@pytest.mark.parametrize(("world", "per_rank"), [(1, 8), (2, 4), (3, 3), (4, 2), (8, 1), (16, 1)])
def test_node_streams_are_split_among_ranks(world, per_rank, tmp_path):
    t = auto_tuning(tmp_path, world)
    assert t.concurrency == per_rank
    assert t.concurrency * world >= NODE_STREAMS or per_rank == 1


def test_local_filesystem_gets_large_stripes(make_file):
    path = make_file("l.bin", 3 * MiB)
    assert not is_network_fs(path)
    report = start_prefetch([path], 0, 4).wait(30)
    assert (report.chunk_bytes, report.concurrency) == (LOCAL_CHUNK_BYTES, 2)
    explicit = start_prefetch([path], 0, 4, concurrency=3, chunk_bytes=MiB).wait(30)
    assert (explicit.chunk_bytes, explicit.concurrency) == (MiB, 3)


def test_missing_path_falls_back_to_local_choice(tmp_path):
    assert auto_tuning(tmp_path / "missing", 1).chunk_bytes == LOCAL_CHUNK_BYTES
    assert auto_tuning(None, 1).chunk_bytes == LOCAL_CHUNK_BYTES


@pytest.mark.fuse
def test_fuse_mount_gets_network_stripes(tmp_path):
    backing = tmp_path / "b"
    backing.mkdir()
    write_random(backing / "x.safetensors", 2 * MiB)
    with mounted(backing, profile="local-fuse", mountpoint=tmp_path / "m") as fs:
        path = fs.path / "x.safetensors"
        assert is_network_fs(path)
        report = start_prefetch([path], 0, 1).wait(30)
        assert (report.chunk_bytes, report.concurrency) == (NETWORK_CHUNK_BYTES, 8)
        assert report.ok and fs.counters().bytes_served == 2 * MiB
