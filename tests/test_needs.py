"""What each local rank loads (`engine.needs`): normalised, gathered, planned, served once."""

from __future__ import annotations

import os
import threading
import time

import pytest

from bench.netfs import mounted
from engine import resident_bytes, start_prefetch
from engine.needs import gather, normalize, union_bytes
from engine.plan import ResolvedFile

MiB = 1 << 20


def test_normalize_resolves_clips_sorts_and_merges(tmp_path):
    real = tmp_path / "model.safetensors"
    real.write_bytes(b"x" * 1000)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    sizes = {str(real): 1000}
    got = normalize({str(link): [(900, 2000), (0, 10), (5, 20)], "/elsewhere": [(0, 1)]}, sizes)
    assert got == {str(real): ((0, 20), (900, 1000))}  # a file not of the checkpoint: dropped
    with pytest.raises(ValueError, match="invalid byte range"):
        normalize({str(real): [(10, 5)]}, sizes)


def _files(n: int) -> list[ResolvedFile]:
    return [ResolvedFile(f"/ckpt/{i}", 1000 + i, 1, i) for i in range(n)]


def test_every_local_rank_gets_every_rank_s_needs(tmp_path):
    files, world = _files(2), 3
    own = [{"/ckpt/0": ((0, 10 * r + 10),)} for r in range(world)]
    own[2] = None  # this rank loads everything
    got: dict[int, object] = {}

    def rank(r: int) -> None:
        got[r] = gather(files, r, world, own[r], timeout_s=10, directory=tmp_path)[0]

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {r: own for r in range(world)}


def test_a_rank_that_never_says_leaves_the_node_s_needs_unknown(tmp_path):
    t0 = time.monotonic()
    node, slot = gather(_files(1), 0, 2, {}, timeout_s=0.3, directory=tmp_path)
    assert node is None and time.monotonic() - t0 >= 0.3
    assert slot is not None and slot.path.exists()  # this rank's stays for a late one
    slot.remove()
    assert not slot.path.exists()


def test_an_earlier_load_s_file_is_not_this_load_s(tmp_path):
    files = _files(1)
    _, old = gather(files, 1, 2, {"/ckpt/0": ((0, 5),)}, timeout_s=0.05, directory=tmp_path)
    assert old is not None
    past = time.time() - 3600
    os.utime(old.path, (past, past))  # written an hour ago
    node, _ = gather(files, 0, 2, {}, timeout_s=0.2, directory=tmp_path)
    assert node is None


def test_union_bytes_counts_each_byte_once():
    sizes = {"a": 100, "b": 50}
    assert union_bytes([{"a": ((0, 60),), "b": ()}, {"a": ((40, 80),), "b": ()}], sizes) == 80
    assert union_bytes([{"b": ((0, 10),)}, {"a": (), "b": ((5, 20),)}], sizes) == 100 + 20


# ------------------------------------------------------------- end to end, bytes served
def _layout(tmp_path, nfiles=2, size=32 * MiB):
    backing = tmp_path / "backing"
    backing.mkdir()
    for i in range(nfiles):
        (backing / f"model-{i}.safetensors").write_bytes(os.urandom(size))
    return backing


def _run(files, world, needs_of):
    handles = [
        start_prefetch(files, r, world, needs=needs_of(r), concurrency=2, window_bytes=None)
        for r in range(world)
    ]
    return [h.wait(timeout=120) for h in handles]


@pytest.mark.parametrize("shape", ["expert", "pipeline"])
@pytest.mark.fuse
def test_the_node_reads_only_what_its_ranks_load(tmp_path, shape):
    backing = _layout(tmp_path)
    with mounted(backing, profile="local-fuse", read_ahead_kb=128) as fs:
        files = sorted(str(p) for p in fs.path.iterdir())
        size = os.path.getsize(files[0])
        if shape == "expert":  # a dense quarter for all, then 4 experts, rank r owns r, r+2
            dense = (0, size // 4)
            part = (size - size // 4) // 4
            expert = [(size // 4 + e * part, size // 4 + (e + 1) * part) for e in range(4)]

            def needs_of(r: int) -> dict:
                return {f: [dense, expert[r], expert[r + 2]] for f in files}

            expect = 2 * size  # two ranks together load every expert and the dense part
            world = 2
        else:  # two stages: the first file, then the second

            def needs_of(r: int) -> dict:
                return {files[r]: [(0, size)], files[1 - r]: []}

            expect = 2 * size
            world = 2
        fs.evict()
        fs.reset_counters()
        reports = _run(files, world, needs_of)
        served = fs.counters().bytes_served
        assert all(not r.failures for r in reports)
        assert sum(r.planned_bytes for r in reports) == expect
        assert expect <= served <= expect + 256 * 1024  # once (a page shared at a run's end)
        assert any("needs: the node loads" in n for r in reports for n in r.notes)


@pytest.mark.fuse
def test_experts_no_rank_loads_are_neither_planned_nor_served(tmp_path):
    backing = _layout(tmp_path, nfiles=1, size=64 * MiB)
    with mounted(backing, profile="local-fuse", read_ahead_kb=128) as fs:
        files = [str(next(fs.path.iterdir()))]
        half = {files[0]: [(0, 32 * MiB)]}  # both ranks load the first half only
        fs.evict()
        fs.reset_counters()
        reports = _run(files, 2, lambda r: half)
        served = fs.counters().bytes_served
        assert sum(r.planned_bytes for r in reports) == 32 * MiB
        assert 32 * MiB <= served <= 32 * MiB + 64 * 1024
        assert resident_bytes(files[0], 48 * MiB, 16 * MiB) == 0  # the tail: never read
        # control: the same load without needs reads the whole file
        fs.evict()
        fs.reset_counters()
        reports = _run(files, 2, lambda r: None)
        assert fs.counters().bytes_served >= 64 * MiB


@pytest.mark.parametrize("read_ahead_kb", [128, 1024])
@pytest.mark.fuse
def test_read_ahead_stops_at_the_end_of_a_run_no_rank_loads_beyond(tmp_path, read_ahead_kb):
    # 1 MiB experts, two of every four needed: with a read-ahead of 1 MiB, each run's last
    # read used to read the next expert too (about the whole file instead of half).
    backing = _layout(tmp_path, nfiles=1, size=32 * MiB)
    with mounted(backing, profile="local-fuse", read_ahead_kb=read_ahead_kb) as fs:
        files = [str(next(fs.path.iterdir()))]
        runs = [(e * MiB, (e + 2) * MiB) for e in range(0, 32, 4)]  # 2 of every 4 MiB
        fs.evict()
        fs.reset_counters()
        reports = _run(files, 2, lambda r: {files[0]: runs})
        served = fs.counters().bytes_served
        assert sum(r.planned_bytes for r in reports) == 16 * MiB
        assert 16 * MiB <= served <= 16 * MiB + 64 * 1024, served


def test_a_rank_alone_warms_all_it_loads(tmp_path, monkeypatch):
    # Its partner never comes: after the wait, this rank warms its own needs, all of them.
    backing = _layout(tmp_path, nfiles=1, size=8 * MiB)
    files = [str(next(backing.iterdir()))]
    for f in files:
        with open(f, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    import engine.needs as needs_mod

    monkeypatch.setattr(needs_mod, "GATHER_TIMEOUT_S", 0.2)
    t0 = time.monotonic()
    h = start_prefetch(files, 0, 2, needs={files[0]: [(0, 4 * MiB)]}, window_bytes=None)
    report = h.wait(timeout=60)
    assert time.monotonic() - t0 < 5  # the short wait, not the default
    assert report.planned_bytes == 4 * MiB
    assert any("unknown" in n for n in report.notes)
