"""``tensors=``: a rank loads part of the checkpoint; the node warms only what its ranks load."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bench.netfs import mounted
from loader_adapter import safetensors_weights_iterator

LAYERS, EXPERTS = 4, 8
EXPERT_ELEMS = 512 << 10  # 1 MiB of bf16 each: experts are most of the bytes


def _moe(directory: Path) -> dict[str, int]:
    """A small MoE-shaped checkpoint in two shards; returns each tensor's byte size."""
    gen = torch.Generator().manual_seed(0)
    sizes: dict[str, int] = {}
    for shard in range(2):
        tensors = {}
        for layer in range(shard * LAYERS // 2, (shard + 1) * LAYERS // 2):
            tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.randn(
                512, generator=gen
            ).to(torch.bfloat16)
            for e in range(EXPERTS):
                name = f"model.layers.{layer}.mlp.experts.{e}.w1.weight"
                tensors[name] = torch.randn(EXPERT_ELEMS, generator=gen).to(torch.bfloat16)
        if shard == 0:
            tensors["model.embed_tokens.weight"] = torch.randn(4096, generator=gen)
        save_file(tensors, directory / f"model-{shard:05d}-of-00002.safetensors")
        sizes.update({n: t.numel() * t.element_size() for n, t in tensors.items()})
    return sizes


def _expert(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("experts") + 1]) if "experts" in parts else None


def _owns(rank: int, world: int):
    """Expert parallelism: rank r loads experts e with e % world == r, and all dense tensors."""
    return lambda name: _expert(name) is None or _expert(name) % world == rank


def _reference(files: list[str], keep) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118
                if keep(name):
                    out[name] = st.get_tensor(name).clone()
    return out


def test_only_the_tensors_asked_for_are_yielded_with_or_without_prefetch(tmp_path):
    _moe(tmp_path)
    files = sorted(str(p) for p in tmp_path.glob("*.safetensors"))
    keep = _owns(1, 2)
    ref = _reference(files, keep)
    for prefetch in (False, True):
        got = {n: t.clone() for n, t in safetensors_weights_iterator(
            files, prefetch=prefetch, rank=0, world=1, tensors=keep)}  # fmt: skip
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[n], ref[n]) for n in ref)
    names = {"model.embed_tokens.weight", "model.layers.0.mlp.experts.3.w1.weight"}
    got = dict(safetensors_weights_iterator(files, tensors=names))
    assert got.keys() == names  # a collection of names works too


def test_a_bad_filter_is_refused(tmp_path):
    _moe(tmp_path)
    with pytest.raises(ValueError, match="tensors must be"):
        safetensors_weights_iterator(tmp_path, tensors="model.embed_tokens.weight")
    with pytest.raises(ValueError, match="tensors must be"):
        safetensors_weights_iterator(tmp_path, prefetch=True, scope="cluster", tensors=3)


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.fuse
def test_expert_parallel_ranks_read_only_their_union_and_get_identical_tensors(tmp_path, world):
    backing = tmp_path / "ckpt"
    backing.mkdir()
    sizes = _moe(backing)
    # Two of the node's ranks (of `world` expert-parallel ranks in the job) are here: the
    # node needs its ranks' experts, the dense tensors and the headers.
    here = (0, 1)
    union = sum(s for n, s in sizes.items() if any(_owns(r, world)(n) for r in here))
    with mounted(backing, profile="local-fuse", read_ahead_kb=128) as fs:
        files = sorted(str(p) for p in fs.path.glob("*.safetensors"))
        refs = {r: _reference([str(backing / Path(f).name) for f in files], _owns(r, world))
                for r in here}  # fmt: skip
        fs.evict()
        fs.reset_counters()
        got: dict[int, dict[str, torch.Tensor]] = {}
        reports = {}

        def rank(r: int) -> None:
            it = safetensors_weights_iterator(
                files, prefetch=True, rank=here.index(r), world=len(here), tensors=_owns(r, world)
            )
            got[r] = {n: t.clone() for n, t in it}
            reports[r] = it.report

        threads = [threading.Thread(target=rank, args=(r,)) for r in here]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served = fs.counters().bytes_served
    for r in here:
        assert got[r].keys() == refs[r].keys()
        assert all(torch.equal(got[r][n], refs[r][n]) for n in refs[r])
    total = sum(sizes.values())
    assert union <= 0.6 * total  # the node loads part of the checkpoint
    # The prefetch reads the union once (`tests/test_needs.py` counts it alone); the
    # loaders' own page faults, where they overtake it on this small and fast mount, read
    # around the faulting page (128 KiB here) as any mmap load does.
    assert union <= served <= 1.3 * union, (union, served, total)
    assert all(any("needs: the node loads" in n for n in reports[r].notes) for r in here)


def test_a_corrupt_header_fails_as_without_prefetch(tmp_path):
    # Planning reads the headers first: a file it cannot parse is needed whole, and the
    # loader raises safetensors' own error, the same with and without prefetch.
    import struct

    save_file({"a": torch.zeros(4)}, tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    errors = []
    for prefetch in (False, True):
        with pytest.raises(Exception) as info:
            list(safetensors_weights_iterator(
                tmp_path, prefetch=prefetch, rank=0, world=1, tensors=lambda n: True))  # fmt: skip
        errors.append(type(info.value).__name__)
    assert errors[0] == errors[1] == "SafetensorError"
