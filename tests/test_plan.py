"""The planner: pure, byte-exact, balanced, identical on every rank."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import plan, resolve_files
from engine.plan import MIN_CHUNK_BYTES

sizes_st = st.lists(st.integers(0, 200_000), min_size=0, max_size=12)
world_st = st.integers(1, 9)
chunk_st = st.sampled_from([4096, 8192, 12288, 65536, 1 << 20])


def _files(sizes: list[int]) -> list[tuple[str, int]]:
    return [(f"/ckpt/f{i:03d}", s) for i, s in enumerate(sizes)]


@settings(max_examples=300, deadline=None)
@given(
    sizes=sizes_st, world=world_st, chunk=chunk_st, strategy=st.sampled_from(["balanced", "files"])
)
def test_every_byte_covered_exactly_once(sizes, world, chunk, strategy):
    files = _files(sizes)
    seen: dict[str, list[tuple[int, int]]] = {p: [] for p, _ in files}
    for rank in range(world):
        extents = plan(files, rank, world, strategy=strategy, chunk_bytes=chunk)
        positions = [e.position for e in extents]
        assert positions == sorted(positions), "extents must be in consumption order"
        for e in extents:
            assert 0 < e.length <= chunk
            seen[e.path].append((e.offset, e.offset + e.length))
    for path, size in files:
        ranges = sorted(seen[path])
        cursor = 0
        for lo, hi in ranges:
            assert lo == cursor, f"gap or overlap in {path} at {lo} (expected {cursor})"
            cursor = hi
        assert cursor == size


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_st, world=world_st, chunk=chunk_st)
def test_balanced_shares_differ_by_at_most_one_stripe(sizes, world, chunk):
    files = _files(sizes)
    shares = [sum(e.length for e in plan(files, r, world, chunk_bytes=chunk)) for r in range(world)]
    assert max(shares) - min(shares) <= chunk


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_st, world=world_st, chunk=chunk_st)
def test_positions_follow_the_concatenated_axis(sizes, world, chunk):
    files = _files(sizes)
    starts, pos = {}, 0
    for p, s in files:
        starts[p] = pos
        pos += s
    for rank in range(world):
        for e in plan(files, rank, world, chunk_bytes=chunk):
            assert e.position == starts[e.path] + e.offset


def test_files_strategy_is_sorted_round_robin():
    files = [("/c/b", 10), ("/c/a", 20), ("/c/d", 30), ("/c/c", 40)]
    expected = sorted(p for p, _ in files)
    for rank in range(3):
        got = {e.path for e in plan(files, rank, 3, strategy="files", chunk_bytes=4096)}
        assert got == set(expected[rank::3])


def test_balanced_stripes_are_dealt_round_robin_across_file_boundaries():
    files = [("a", 10_000), ("b", 10_000)]
    r0 = [(e.path, e.offset, e.length) for e in plan(files, 0, 2, chunk_bytes=4096)]
    r1 = [(e.path, e.offset, e.length) for e in plan(files, 1, 2, chunk_bytes=4096)]
    # units of 4096 over 20000 bytes: u0 a[0:4096] u1 a[4096:8192] u2 a[8192:10000]+b[0:2288]
    assert r0[:2] == [("a", 0, 4096), ("a", 8192, 1808)]
    assert r0[2] == ("b", 0, 2288)
    assert r1[0] == ("a", 4096, 4096)


def test_world_one_and_empty_files():
    files = [("a", 0), ("b", 5000), ("c", 0)]
    ext = plan(files, 0, 1, chunk_bytes=4096)
    assert [(e.path, e.offset, e.length) for e in ext] == [("b", 0, 4096), ("b", 4096, 904)]
    assert plan([], 0, 4) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 4, "world": 4}, "rank"),
        ({"rank": -1, "world": 4}, "rank"),
        ({"rank": 0, "world": 0}, "world"),
        ({"rank": 0, "world": 1, "chunk_bytes": MIN_CHUNK_BYTES - 1}, "chunk_bytes"),
        ({"rank": 0, "world": 1, "chunk_bytes": 1 << 40}, "chunk_bytes"),
        ({"rank": 0, "world": 1, "strategy": "random"}, "balanced, files"),
        ({"rank": True, "world": 2}, "rank"),
    ],
)
def test_bad_arguments_raise_value_error_naming_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan([("a", 1)], **kwargs)


def test_resolve_files_dedups_symlinks_and_sorts(tmp_path: Path):
    (tmp_path / "blobs").mkdir()
    a = tmp_path / "blobs" / "x"
    b = tmp_path / "blobs" / "y"
    a.write_bytes(b"1" * 10)
    b.write_bytes(b"2" * 20)
    link = tmp_path / "model-1.safetensors"
    link.symlink_to(a)
    hard = tmp_path / "hard"
    os.link(b, hard)
    given_order = [str(b), str(link), str(a), str(hard)]
    r1, f1 = resolve_files(given_order)
    r2, f2 = resolve_files(list(reversed(given_order)))
    assert f1 == f2 == []
    assert [f.path for f in r1] == [f.path for f in r2]  # same plan on every rank
    assert len(r1) == 2
    assert {f.size for f in r1} == {10, 20}


def test_resolve_files_given_order_keeps_first_appearance(tmp_path: Path):
    names = ["c", "a", "b"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    resolved, _ = resolve_files([tmp_path / n for n in names], order="given")
    assert [Path(f.path).name for f in resolved] == names


def test_resolve_files_records_bad_paths_without_opening(tmp_path: Path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    resolved, failures = resolve_files(
        [tmp_path / "missing", tmp_path, fifo, "/dev/zero", broken, loop]
    )
    assert resolved == []
    assert [f.errno_name for f in failures] == [
        "ENOENT",
        "EISDIR",
        "EINVAL",
        "EINVAL",
        "ENOENT",
        "ELOOP",
    ]


def test_invalid_options_are_one_family_and_value_errors():
    from engine import InvalidOptionError, PrefetchError

    with pytest.raises(InvalidOptionError) as info:
        plan([("a", 1)], 0, 0)
    assert isinstance(info.value, PrefetchError) and isinstance(info.value, ValueError)


def test_resolve_files_records_what_is_not_a_path_and_takes_one_path(tmp_path):
    good = tmp_path / "g"
    good.write_bytes(b"x")
    resolved, failures = resolve_files([good, None, "/a\0b", 7])
    assert [f.path for f in resolved] == [str(good)]
    assert [f.errno_name for f in failures] == ["EINVAL", "EINVAL", "EINVAL"]
    one, none = resolve_files(str(good))  # a single path is not a list of characters
    assert [f.path for f in one] == [str(good)] and none == []


def test_files_that_share_an_inode_number_but_differ_are_both_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """9p without multidevs, CIFS across DFS: one inode number, two files, two shards."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"a" * 100)
    b.write_bytes(b"b" * 200)
    real_stat = os.stat

    def same_inode(path, *args, **kw):
        st = real_stat(path, *args, **kw)
        fields = list(st)
        fields[1] = 42  # st_ino
        return os.stat_result(fields, {"st_mtime_ns": st.st_mtime_ns})

    with monkeypatch.context() as m:
        m.setattr(os, "stat", same_inode)
        resolved, failures = resolve_files([a, b])
    assert failures == []
    assert [(Path(f.path).name, f.size) for f in resolved] == [
        ("a.safetensors", 100), ("b.safetensors", 200),
    ]  # fmt: skip


# --------------------------------------------------- needs: only what the node's ranks load
small_sizes_st = st.lists(st.integers(0, 40_000), min_size=0, max_size=6)


@st.composite
def files_and_needs(draw):
    sizes = draw(small_sizes_st)
    files = _files(sizes)
    world = draw(world_st)
    needs = []
    for _ in range(world):
        if draw(st.integers(0, 4)) == 0:
            needs.append(None)  # this rank loads everything
            continue
        regions = {}
        for path, size in files:
            if draw(st.integers(0, 3)):  # absent (1 in 4): the whole file is needed
                cuts = sorted(draw(st.lists(st.integers(0, size + 100), max_size=6)))
                regions[path] = list(zip(cuts[::2], cuts[1::2], strict=False))
        needs.append(regions)
    return files, world, needs


def _needed_by(files, regions):
    out = set()
    for path, size in files:
        spans = [(0, size)] if regions is None or path not in regions else regions[path]
        for lo, hi in spans:
            out.update((path, b) for b in range(lo, min(hi, size)))
    return out


@settings(max_examples=150, deadline=None)
@given(fwn=files_and_needs(), chunk=chunk_st, strategy=st.sampled_from(["balanced", "files"]))
def test_needs_every_needed_byte_once_by_a_rank_that_needs_it(fwn, chunk, strategy):
    files, world, needs = fwn
    wanted = [_needed_by(files, n) for n in needs]
    starts, pos = {}, 0
    for path, size in files:
        starts[path], pos = pos, pos + size
    seen: list[tuple[str, int]] = []
    for rank in range(world):
        extents = plan(files, rank, world, chunk_bytes=chunk, strategy=strategy, needs=needs)
        assert [e.position for e in extents] == sorted(e.position for e in extents)
        mine = [(e.path, b) for e in extents for b in range(e.offset, e.offset + e.length)]
        assert set(mine) <= wanted[rank]  # nothing that only other ranks load
        for e in extents:
            assert 0 < e.length <= chunk
            assert e.position == starts[e.path] + e.offset  # the whole files' axis
        seen.extend(mine)
    assert len(seen) == len(set(seen))  # no byte twice
    assert set(seen) == set().union(*wanted)  # every byte some rank loads, nothing else


@settings(max_examples=80, deadline=None)
@given(sizes=small_sizes_st, world=world_st, chunk=chunk_st)
def test_ranks_that_need_the_same_bytes_share_them_evenly(sizes, world, chunk):
    files = _files(sizes)
    same = {p: [(s // 4, s // 2), (3 * s // 4, s)] for p, s in files}
    shares = [
        sum(e.length for e in plan(files, r, world, chunk_bytes=chunk, needs=[same] * world))
        for r in range(world)
    ]
    assert max(shares) - min(shares) <= chunk


def test_expert_parallel_ranks_each_warm_their_own_experts_and_share_the_rest():
    # One file: 16 KiB dense (every rank), then 4 experts of 16 KiB, rank r owning r and
    # r + 2: each rank warms its two experts and half of the dense part.
    dense, expert = (0, 16384), [(16384 * (1 + e), 16384 * (2 + e)) for e in range(4)]
    needs = [{"f": [dense, expert[r], expert[r + 2]]} for r in range(2)]
    for r in range(2):
        got = plan([("f", 5 * 16384)], r, 2, chunk_bytes=4096, needs=needs)
        ranges = {(e.offset, e.offset + e.length) for e in got}
        assert sum(e.length for e in got) == 8192 + 2 * 16384
        assert all(any(lo <= a and b <= hi for lo, hi in (dense, expert[r], expert[r + 2]))
                   for a, b in ranges)  # fmt: skip


def test_no_needs_is_every_byte():
    files = _files([100_000, 0, 70_000])
    for rank in range(3):
        assert plan(files, rank, 3, chunk_bytes=8192) == plan(
            files, rank, 3, chunk_bytes=8192, needs=[None, None, None]
        )


def test_invalid_needs_are_refused():
    with pytest.raises(ValueError, match="invalid region"):
        plan([("f", 100)], 0, 1, needs=[{"f": [(50, 10)]}])
    with pytest.raises(ValueError, match="one entry per rank"):
        plan([("f", 100)], 0, 2, needs=[None])
