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


# ----------------------------------------------------- regions: only what the node loads
@st.composite
def files_and_regions(draw):
    sizes = draw(sizes_st)
    files = _files(sizes)
    regions = {}
    for path, size in files:
        if draw(st.booleans()):  # absent: the whole file is needed
            cuts = sorted(draw(st.lists(st.integers(0, size + 100), max_size=8)))
            regions[path] = list(zip(cuts[::2], cuts[1::2], strict=False))
    return files, regions


def _bytes_of(ranges):
    out = set()
    for path, lo, hi in ranges:
        out.update((path, b) for b in range(lo, hi))
    return out


@settings(max_examples=150, deadline=None)
@given(fr=files_and_regions(), world=world_st, chunk=chunk_st,
       strategy=st.sampled_from(["balanced", "files"]))  # fmt: skip
def test_regions_every_needed_byte_exactly_once_and_nothing_else(fr, world, chunk, strategy):
    files, regions = fr
    needed = set()
    for path, size in files:
        spans = regions.get(path, [(0, size)])
        needed |= _bytes_of((path, lo, min(hi, size)) for lo, hi in spans)
    seen: list[tuple[str, int]] = []
    starts, pos = {}, 0
    for path, size in files:
        starts[path], pos = pos, pos + size
    shares = []
    for rank in range(world):
        extents = plan(files, rank, world, chunk_bytes=chunk, strategy=strategy, regions=regions)
        assert [e.position for e in extents] == sorted(e.position for e in extents)
        for e in extents:
            assert 0 < e.length <= chunk
            assert e.position == starts[e.path] + e.offset  # the whole files' axis
            seen.extend((e.path, b) for b in range(e.offset, e.offset + e.length))
        shares.append(sum(e.length for e in extents))
    assert len(seen) == len(set(seen))  # no byte twice
    assert set(seen) == needed  # every needed byte, and nothing else
    if strategy == "balanced":  # units of the needed bytes dealt in turn: even shares
        assert max(shares) - min(shares) <= chunk


def test_regions_deal_only_the_needed_bytes_evenly():
    # Two ranks, half of a 64 KiB file needed in four pieces: 16 KiB each, not 32 and 0.
    needed = [(0, 8192), (16384, 24576), (32768, 40960), (49152, 57344)]
    shares = [
        sum(e.length for e in plan([("f", 65536)], r, 2, chunk_bytes=8192, regions={"f": needed}))
        for r in range(2)
    ]
    assert shares == [16384, 16384]


def test_no_regions_is_every_byte():
    files = _files([100_000, 0, 70_000])
    for rank in range(3):
        whole = {p: [(0, s)] for p, s in files}
        assert plan(files, rank, 3, chunk_bytes=8192) == plan(
            files, rank, 3, chunk_bytes=8192, regions=whole
        )


def test_an_invalid_region_is_refused():
    with pytest.raises(ValueError, match="invalid region"):
        plan([("f", 100)], 0, 1, regions={"f": [(50, 10)]})
