"""The cluster planner: each byte read once for the job, every node gets every stripe, and
the exchange schedules match pairwise and cannot deadlock."""

from __future__ import annotations

import collections
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.plan import plan
from loader_adapter.cluster.join import MemberInfo, agree
from loader_adapter.cluster.plan import (
    OpKind,
    Topology,
    cluster_plan,
)

sizes_st = st.lists(st.integers(0, 100_000), min_size=1, max_size=8)
chunk_st = st.sampled_from([4096, 8192, 65536])
# Host of each global rank: 1-4 nodes, 1-3 ranks each, ranks of a node interleaved or not.
hosts_st = st.lists(st.sampled_from("abcd"), min_size=1, max_size=9)


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_st, hosts=hosts_st, chunk=chunk_st)
def test_each_byte_is_read_by_exactly_one_rank_of_the_job(sizes, hosts, chunk):
    p = cluster_plan(sizes, hosts, chunk_bytes=chunk)
    covered: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for rank in range(len(hosts)):
        for s in p.reads(rank):
            assert s.reader == rank and 0 < s.length <= chunk
            covered[s.file].append((s.offset, s.offset + s.length))
    for f, size in enumerate(sizes):
        cursor = 0
        for lo, hi in sorted(covered[f]):
            assert lo == cursor
            cursor = hi
        assert cursor == size


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_st, hosts=hosts_st, chunk=chunk_st)
def test_every_node_gets_every_stripe_once(sizes, hosts, chunk):
    p = cluster_plan(sizes, hosts, chunk_bytes=chunk)
    topo = p.topology
    for s in p.stripes:
        reader_node = topo.node_of[s.reader]
        nodes = [topo.node_of[r] for r in s.receivers]
        assert sorted([reader_node, *nodes]) == list(range(topo.num_nodes))
        for node in range(topo.num_nodes):
            assert topo.node_of[p.holder(s, node)] == node


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_st, hosts=hosts_st, chunk=chunk_st)
def test_nodes_share_the_reading_evenly(sizes, hosts, chunk):
    p = cluster_plan(sizes, hosts, chunk_bytes=chunk)
    per_node = [0] * p.topology.num_nodes
    for s in p.stripes:
        per_node[p.topology.node_of[s.reader]] += s.length
    assert max(per_node) - min(per_node) <= chunk


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_st, chunk=chunk_st, ranks=st.integers(1, 5))
def test_one_node_is_the_node_local_balanced_plan(sizes, chunk, ranks):
    p = cluster_plan(sizes, ["h"] * ranks, chunk_bytes=chunk)
    files = [(str(i), s) for i, s in enumerate(sizes)]
    for rank in range(ranks):
        mine = [(s.file, s.offset, s.length) for s in p.reads(rank)]
        local = [
            (int(e.path), e.offset, e.length) for e in plan(files, rank, ranks, chunk_bytes=chunk)
        ]
        assert mine == local
        assert p.schedule(rank) == []


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_st, hosts=hosts_st, chunk=chunk_st)
def test_schedules_match_pairwise(sizes, hosts, chunk):
    """What a sends to b, in order, is what b receives from a, in order."""
    p = cluster_plan(sizes, hosts, chunk_bytes=chunk)
    sends: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    recvs: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    for rank in range(len(hosts)):
        for op in p.schedule(rank):
            if op.kind is OpKind.SEND:
                sends[(rank, op.peer)].append(op.stripe)
            else:
                recvs[(op.peer, rank)].append(op.stripe)
    assert sends == recvs


def _run_rendezvous(schedules: list[list], inflight: int) -> bool:
    """Run the schedules with rendezvous semantics (a transfer completes only once both
    sides posted it), each rank posting in order with at most `inflight` outstanding and
    completing its oldest first. True when every operation completes."""
    n = len(schedules)
    posted: list[list] = [[] for _ in range(n)]  # outstanding, oldest first
    nxt = [0] * n
    done_keys: set = set()
    progress = True
    while progress:
        progress = False
        for r in range(n):
            while len(posted[r]) < inflight and nxt[r] < len(schedules[r]):
                posted[r].append(schedules[r][nxt[r]])
                nxt[r] += 1
                progress = True
        for r in range(n):
            while posted[r]:
                op = posted[r][0]
                key = (op.stripe, *sorted((r, op.peer)))
                other = op.peer
                if key in done_keys:
                    done_keys.discard(key)
                    posted[r].pop(0)
                    progress = True
                    continue
                mine = any((o.stripe, *sorted((other, o.peer))) == key for o in posted[other])
                if not mine:
                    break
                done_keys.add(key)
                posted[r].pop(0)
                progress = True
    return all(nxt[r] == len(schedules[r]) and not posted[r] for r in range(n))


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_st, hosts=hosts_st, chunk=chunk_st, inflight=st.integers(1, 4))
def test_schedules_cannot_deadlock(sizes, hosts, chunk, inflight):
    p = cluster_plan(sizes, hosts, chunk_bytes=chunk)
    assert _run_rendezvous([p.schedule(r) for r in range(len(hosts))], inflight)


def test_a_reversed_schedule_would_deadlock():
    """The check above can fail: one rank posting in the opposite order hangs."""
    p = cluster_plan([4 * 4096], ["a", "b"], chunk_bytes=4096)
    schedules = [p.schedule(0), list(reversed(p.schedule(1)))]
    assert not _run_rendezvous(schedules, 1)


def test_topology_groups_ranks_by_host():
    t = Topology.from_hosts(["x", "y", "x", "z", "y"])
    assert t.nodes == ((0, 2), (1, 4), (3,))
    assert t.node_of == (0, 1, 0, 2, 1)
    assert t.local_rank_of == (0, 0, 1, 0, 1)
    with pytest.raises(ValueError):
        Topology.from_hosts([])


def test_two_nodes_two_ranks_alternate_in_consumption_order():
    p = cluster_plan([8 * 4096], ["a", "b", "a", "b"], chunk_bytes=4096)
    assert [s.reader for s in p.stripes] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [s.receivers for s in p.stripes] == [(1,), (0,), (3,), (2,)] * 2
    assert [(op.stripe, op.kind.value, op.peer) for op in p.schedule(0)] == [
        (0, "send", 1), (1, "recv", 1), (4, "send", 1), (5, "recv", 1),
    ]  # fmt: skip


def test_covering():
    p = cluster_plan([5000, 5000], ["a"], chunk_bytes=4096)
    # stripes: [0,4096) [4096,5000) [5000,8192) [8192,10000)
    assert [(s.position, s.length) for s in p.stripes] == [
        (0, 4096), (4096, 904), (5000, 3192), (8192, 1808),
    ]  # fmt: skip
    assert list(p.covering(0, 1)) == [0]
    assert list(p.covering(4095, 5001)) == [0, 1, 2]
    assert list(p.covering(9000, 10000)) == [3]
    assert list(p.covering(10, 10)) == []


def test_agree_is_the_same_decision_everywhere():
    a = MemberInfo("a", ("m",), (1,))
    b = MemberInfo("b", ("m",), (1,))
    assert agree([a, b, a, b]) is None
    assert agree([a, a]) == "all ranks are on one node"
    bad = MemberInfo("b", ("m",), (1,), error="no room")
    assert "rank 1 (b) cannot take part: no room" in agree([a, bad])
    assert "different checkpoint files" in agree([a, MemberInfo("b", ("n",), (1,))])


# ------------------------------------------------ a node that loads part of the checkpoint
@st.composite
def _with_needs(draw):
    """(sizes, hosts, chunk, node_needs): each node needs some ranges of some files, or all."""
    sizes = draw(sizes_st)
    hosts = draw(hosts_st)
    nodes = Topology.from_hosts(hosts).num_nodes
    needs = []
    for _ in range(nodes):
        if draw(st.booleans()) and draw(st.booleans()):
            needs.append(None)
            continue
        need = {}
        for f, size in enumerate(sizes):
            if draw(st.integers(0, 4)) == 0:
                continue  # a file not in a node's needs: all of it
            cuts = sorted(draw(st.lists(st.integers(0, size), max_size=6)))
            need[f] = [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if a < b]
        needs.append(need)
    return sizes, hosts, draw(chunk_st), needs


def _needs_byte(need, f, x) -> bool:
    return need is None or f not in need or any(a <= x < b for a, b in need[f])


@settings(max_examples=300, deadline=None)
@given(case=_with_needs())
def test_with_needs_each_needed_byte_is_read_once_and_reaches_every_node_that_needs_it(case):
    sizes, hosts, chunk, needs = case
    p = cluster_plan(sizes, hosts, chunk_bytes=chunk, node_needs=needs)
    topo = p.topology
    seen: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for s in p.stripes:
        assert 0 < s.length <= chunk
        seen[s.file].append((s.offset, s.end - s.position + s.offset))
        who = [n for n in range(topo.num_nodes) if p.needed_by(s, n)]
        assert topo.node_of[s.reader] in who
        assert sorted(topo.node_of[r] for r in s.receivers) == sorted(
            n for n in who if n != topo.node_of[s.reader]
        )
        for n in who:
            assert topo.node_of[p.holder(s, n)] == n
        # every byte of a stripe is needed by every node it goes to (no wasted sends);
        # checked at its ends and middle
        for x in {s.offset, s.offset + s.length // 2, s.offset + s.length - 1}:
            assert all(_needs_byte(needs[n], s.file, x) for n in who)
    for f, size in enumerate(sizes):
        ranges = sorted(seen[f])
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))  # read once
        for n, need in enumerate(needs):
            for lo, hi in [(0, size)] if need is None or f not in need else need[f]:
                # every needed byte lies in a stripe that goes to this node
                for x in {lo, (lo + hi) // 2, hi - 1} if hi > lo else ():
                    k = next(i for i, s in enumerate(p.stripes)
                             if s.file == f and s.offset <= x < s.offset + s.length)  # fmt: skip
                    assert p.needed_by(p.stripes[k], n)
                    assert k in p.covering(p.file_starts[f] + x, p.file_starts[f] + x + 1)


@settings(max_examples=200, deadline=None)
@given(case=_with_needs(), inflight=st.integers(1, 4))
def test_with_needs_schedules_match_and_cannot_deadlock(case, inflight):
    sizes, hosts, chunk, needs = case
    p = cluster_plan(sizes, hosts, chunk_bytes=chunk, node_needs=needs)
    assert _run_rendezvous([p.schedule(r) for r in range(len(hosts))], inflight)


def test_with_every_node_needing_all_the_plan_is_unchanged():
    hosts = ["a", "b", "a", "b"]
    plain = cluster_plan([50_000, 70_000], hosts, chunk_bytes=8192)
    assert cluster_plan([50_000, 70_000], hosts, chunk_bytes=8192, node_needs=[None, None]) == plain


def test_a_byte_no_node_needs_is_not_planned():
    p = cluster_plan([40_000], ["a", "b"], chunk_bytes=8192,
                     node_needs=[{0: [(0, 1000)]}, {0: [(30_000, 31_000)]}])  # fmt: skip
    assert [(s.offset, s.length, s.nodes) for s in p.stripes] == [
        (0, 1000, (0,)),
        (30_000, 1000, (1,)),
    ]
    assert [p.topology.node_of[s.reader] for s in p.stripes] == [0, 1]
    assert p.schedule(0) == [] and p.schedule(1) == []  # nothing to send: no exchange
    with pytest.raises(ValueError):
        p.holder(p.stripes[0], 1)
    with pytest.raises(ValueError, match="2 nodes"):
        cluster_plan([10], ["a", "b"], node_needs=[None])
