"""Expert- and pipeline-parallel jobs in the bench (bench/parallel.py, cluster_sim --split):
who loads which tensor, what a node needs, and posed nodes that read only that."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from bench.cluster_sim import rank_checksums_agree, simulate
from bench.consumer import Consumer
from bench.parallel import Split, expert_of, layer_of, local_experts, model_shape, stage_layers
from loader_adapter.header import read_header

MiB = 1 << 20


@pytest.mark.parametrize(("count", "parts"), [(32, 4), (10, 4), (3, 3), (7, 2), (1, 1)])
def test_blocks_cover_every_expert_and_layer_once(count, parts):
    for deal in (local_experts, stage_layers):
        got = [i for p in range(parts) for i in deal(count, parts, p)]
        assert got == list(range(count))  # contiguous, in order, each once


def test_expert_blocks_are_vllms():
    weight_utils = pytest.importorskip("vllm.model_executor.model_loader.ep_weight_filter")
    for experts, ep in [(32, 4), (10, 4), (8, 8), (9, 2)]:
        for rank in range(ep):
            want = weight_utils.compute_local_expert_ids(experts, ep, rank, "linear")
            assert set(local_experts(experts, ep, rank)) == want
            name = "model.layers.3.mlp.experts.{}.up_proj.weight"
            for e in range(experts):
                assert weight_utils.parse_expert_id(name.format(e)) == expert_of(name.format(e))


def test_names():
    assert layer_of("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_of("model.embed_tokens.weight") is None
    assert expert_of("model.layers.1.mlp.experts.5.down_proj.weight") == 5
    assert expert_of("model.layers.1.mlp.gate.weight") is None
    names = ["model.layers.0.mlp.experts.0.w1.weight", "model.layers.5.mlp.experts.31.w1.weight"]
    assert model_shape(names) == (6, 32)
    assert model_shape(["lm_head.weight"]) == (0, 0)


def test_pp_stages_split_the_model():
    split = Split("pp", nodes=2, ranks_per_node=2)
    names = [
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.input_layernorm.weight" for i in range(5)),
        "model.norm.weight",
        "lm_head.weight",
    ]
    kept = {
        rank: [n for n in names if split.keeps(rank=rank, layers=5, experts=0)(n)]
        for rank in range(split.world)
    }
    assert kept[0] == kept[2] and kept[1] == kept[3]  # a node's ranks load its stage
    assert sorted(kept[0] + kept[1]) == sorted(names)  # every tensor in exactly one stage
    assert kept[0][0] == "model.embed_tokens.weight" and kept[1][-1] == "lm_head.weight"


def test_ep_ranks_share_dense_tensors():
    split = Split("ep", nodes=2, ranks_per_node=2)
    dense = "model.layers.0.self_attn.q_proj.weight"
    assert all(split.keeps(rank=r, layers=1, experts=8)(dense) for r in range(4))
    owners = {
        e: [r for r in range(4) if split.keeps(rank=r, layers=1, experts=8)(
            f"model.layers.0.mlp.experts.{e}.up_proj.weight")]
        for e in range(8)
    }  # fmt: skip
    assert all(len(o) == 1 for o in owners.values())
    assert split.expert_ids(0, 8) == {0, 1}
    assert Split("ep", nodes=1, ranks_per_node=1).expert_ids(0, 8) is None  # nothing to split


def test_bad_split():
    with pytest.raises(ValueError, match="unknown split"):
        Split("tp", nodes=2, ranks_per_node=1)
    with pytest.raises(ValueError, match=">= 1"):
        Split("ep", nodes=0, ranks_per_node=1)


def _filtered_checksum(files, keep) -> str:
    """A plain filtered load: safe_open, the rank's tensors only, in the file's key order."""
    import torch

    consumer = Consumer(torch.empty(0, dtype=torch.uint8))
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118
                if keep(name):
                    consumer(name, st.get_tensor(name))
    return consumer.checksum


def _posed(ckpt, tmp_path, kind: str, modes: list[str]) -> list:
    """`kind` (ep or pp) on 2 posed nodes of one rank each, in `modes`."""
    return simulate(
        ckpt.directory, nodes=2, ranks_per_node=1, profile="slow-nfs", chunk_mb=1,
        timeout_s=20, workdir=tmp_path / "w", split=kind, modes=modes,
    )  # fmt: skip


def _expected(ckpt, kind: str) -> dict[int, str]:
    """Each rank's checksum from a plain filtered load of its share."""
    files = [str(f) for f in ckpt.files]
    split = Split(kind, nodes=2, ranks_per_node=1)
    layers, experts = model_shape(t.name for f in files for t in read_header(f).tensors)
    return {
        rank: _filtered_checksum(files, split.keeps(rank=rank, layers=layers, experts=experts))
        for rank in range(split.world)
    }


@pytest.mark.fuse
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["ep", "pp"])
def test_posed_nodes_read_only_what_their_ranks_load(tmp_path, kind, synthetic_checkpoint):
    ckpt = synthetic_checkpoint(size_bytes=24 * MiB, shape="many-small", shards=4)
    modes = ["ours-whole", "ours"]
    try:  # the plain filtered load of vLLM's own iterator, where vLLM is installed
        import vllm.model_executor.model_loader.weight_utils  # noqa: F401

        modes.insert(0, "vllm")
    except ImportError:
        pass
    results = _posed(ckpt, tmp_path, kind, modes)
    by_mode = {r.mode: r for r in results}
    assert list(by_mode) == modes and rank_checksums_agree(results)
    expected = _expected(ckpt, kind)
    for x in by_mode["ours"].ranks:
        assert x["checksum"] == expected[x["rank"]]
    whole, ours = by_mode["ours-whole"], by_mode["ours"]
    for node in whole.nodes:  # the control: before tensors=, each node read all of it
        assert node.bytes_served >= 0.99 * ckpt.total_bytes
    # Each node reads what its ranks load, a little more: pages at the ends of needed runs,
    # and read-around of the loader's own faults where it overtakes the prefetch. On this
    # small checkpoint's 6 KiB tensors that was 1.13x; at 2 GiB 1.004x (README).
    for node in ours.nodes:
        assert 0.4 * ckpt.total_bytes < node.needed_bytes < 0.7 * ckpt.total_bytes
        assert node.needed_bytes <= node.bytes_served <= 1.3 * node.needed_bytes, node
    assert ours.bytes_served < 0.7 * whole.bytes_served


@pytest.mark.fuse
@pytest.mark.timeout(300)
def test_cluster_scope_sends_a_stripe_only_to_the_nodes_that_need_it(
    tmp_path, synthetic_checkpoint
):
    ckpt = synthetic_checkpoint(size_bytes=24 * MiB, shape="many-small", shards=4)
    (result,) = _posed(ckpt, tmp_path, "ep", ["cluster"])
    assert result.failed_ranks == []
    split, expected = Split("ep", nodes=2, ranks_per_node=1), _expected(ckpt, "ep")
    for x in result.ranks:
        report = x["report"]
        assert report["scope"] == "cluster" and not report["failures"], report
        assert x["checksum"] == expected[x["rank"]]
        # What came into this node's replica (read, or received from the other node) is
        # what its rank loads, not the whole checkpoint (before: every stripe everywhere).
        node = result.nodes[split.node_of(x["rank"])]
        brought = report["read_bytes"] + report["received_bytes"] + report["fallback_bytes"]
        assert node.needed_bytes <= brought <= 1.02 * node.needed_bytes + 8 * 4096, (brought, node)
        assert node.needed_bytes < 0.7 * ckpt.total_bytes
    # Each needed byte read from storage once for the job: the union of the nodes' needs
    # (here the whole checkpoint, as every expert has an owner), and not twice: a
    # node-scope load reads the dense tensors on both nodes. On this checkpoint of 6 KiB
    # tensors, pages shared by pieces of two nodes and the headers (read by every node to
    # plan) add up to 1.08x; at 2 GiB 1.002x (docs/results.md).
    assert 0.99 * ckpt.total_bytes <= result.bytes_served <= 1.15 * ckpt.total_bytes
    # The dense tensors both nodes load are exchanged, not read twice.
    assert sum(x["report"]["received_bytes"] for x in result.ranks) > 0


@pytest.mark.fuse
@pytest.mark.timeout(300)
def test_cluster_scope_with_nothing_shared_loads_node_local(tmp_path, synthetic_checkpoint):
    # Pipeline stages share no tensor: there is nothing to exchange, so every rank takes
    # the node-local branch (the same decision everywhere), reading only its stage.
    ckpt = synthetic_checkpoint(size_bytes=24 * MiB, shape="many-small", shards=4)
    (result,) = _posed(ckpt, tmp_path, "pp", ["cluster"])
    assert result.failed_ranks == []
    expected = _expected(ckpt, "pp")
    for x in result.ranks:
        assert x["report"]["scope"] == "node", x["report"]
        assert "nothing to exchange" in x["report"]["reason"]
        assert x["checksum"] == expected[x["rank"]]
    for node in result.nodes:
        assert node.needed_bytes <= node.bytes_served <= 1.3 * node.needed_bytes, node


def _cluster_ep(ckpt, tmp_path, *, window_mb=0, fault=None, bps=64e6):
    """A 2-node x 2-rank EP job in the cluster scope on one shared storage; every rank
    compares each tensor it yields with `load_file` on the originals (its share only)."""
    import contextlib

    from bench.cluster_sim import run_mode
    from bench.netfs import SharedBandwidth, mounted

    reps = [tmp_path / "rep0", tmp_path / "rep1"]
    for d in reps:
        d.mkdir()
    verify = ["--verify", str(ckpt.directory)]
    with contextlib.ExitStack() as stack:
        storage = stack.enter_context(SharedBandwidth(bps))
        mounts = [
            stack.enter_context(
                mounted(ckpt.directory, profile="local-fuse", shared_bandwidth=storage)
            )
            for _ in range(2)
        ]
        ranks, failed, _ = run_mode(
            "cluster", [m.path for m in mounts], 2, workdir=tmp_path / "w", chunk_mb=1,
            window_mb=window_mb, timeout_s=10, replica_dirs=reps, limit_s=200, split="ep",
            worker_args={r: [*verify, *(fault or [] if r == 3 else [])] for r in range(4)},
        )  # fmt: skip
    return ranks, failed, reps


def _exact(ranks):
    for r in ranks:
        assert r["verified"] and r["mismatches"] == [], r["mismatches"][:5]
        assert r["tensors"] > 0


@pytest.mark.fuse
@pytest.mark.timeout(300)
def test_cluster_scope_with_needs_and_a_window_frees_behind_and_loads_exactly(
    tmp_path, synthetic_checkpoint
):
    # The janitor walks past the stripes its node was not planned to get (they never
    # arrive): it must not stop there, or nothing behind them would be freed.
    ckpt = synthetic_checkpoint(size_bytes=24 * MiB, shape="many-small", shards=4)
    ranks, failed, reps = _cluster_ep(ckpt, tmp_path, window_mb=4)
    assert failed == []
    _exact(ranks)
    assert all(r["report"]["scope"] == "cluster" and not r["report"]["failures"] for r in ranks)
    for node in (0, 1):
        punched = sum(r["report"]["punched_bytes"] for r in ranks if r["rank"] % 2 == node)
        assert punched > 0.3 * ckpt.total_bytes, (node, punched)
    assert [list(d.iterdir()) for d in reps] == [[], []]


@pytest.mark.fuse
@pytest.mark.timeout(300)
def test_cluster_scope_with_needs_survives_a_killed_rank(tmp_path, synthetic_checkpoint):
    # The repair walks past the stripes its node was not planned to get, and reads from
    # storage what the dead rank owed (its node-mate's and the other node's share).
    ckpt = synthetic_checkpoint(size_bytes=24 * MiB, shape="many-small", shards=4)
    # The rank dies when its node's replica has allocated 2 MiB, before its stripes are read and
    # sent, however far behind its loader is.
    ranks, failed, _ = _cluster_ep(ckpt, tmp_path, fault=["--die-at-replica-mb", "2"], bps=8e6)
    assert failed == [3]
    _exact(ranks)
    assert sum(r["report"]["fallback_bytes"] for r in ranks) > 0
    failures = [f for r in ranks for f in r["report"]["failures"]]
    assert any("gave up on rank 3" in f for f in failures)
    assert not any("crashed" in f for f in failures), failures  # no thread of ours died
