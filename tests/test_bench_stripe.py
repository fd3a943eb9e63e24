"""The plain striping baseline (`stripe`): every byte once across the ranks, and it loads."""

from __future__ import annotations

import itertools

import pytest

from bench.baselines import load_stripe, stripe_plan
from bench.configs import parse_config
from engine import resident_bytes

MiB = 1 << 20


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_stripes_cover_every_byte_once(make_file, world):
    files = [make_file(f"s{i}", size) for i, size in enumerate([5 * MiB + 7, 3 * MiB, 1])]
    seen: dict[str, list[tuple[int, int]]] = {}
    for rank in range(world):
        for path, off, n in stripe_plan(files, rank, world, 2 * MiB):
            seen.setdefault(path, []).append((off, off + n))
    for f in files:
        spans = sorted(seen[str(f)])
        assert spans[0][0] == 0 and spans[-1][1] == f.stat().st_size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_stripe_loads_and_warms_its_share(make_file):
    import safetensors.torch as st
    import torch

    d = make_file("x", 1).parent
    path = d / "m.safetensors"
    st.save_file({"w": torch.arange(1 << 20, dtype=torch.float32)}, str(path))
    names = []
    stats = load_stripe([path], 0, 1, lambda n, t: names.append(n), stripe_bytes=MiB)
    assert names == ["w"]
    assert stats["bytes_read"] <= path.stat().st_size
    assert resident_bytes(path) == path.stat().st_size


def test_stripe_is_a_configuration():
    cfg = parse_config("stripe:chunk_mb=32")
    assert cfg.kind == "stripe" and cfg.mib("chunk_mb", 0) == 32 * MiB
    with pytest.raises(ValueError, match="unknown option"):
        parse_config("stripe:threads=2")


def test_ours_fixed_is_the_former_default():
    cfg = parse_config("ours-fixed")
    assert cfg.loader_options() == {
        "prefetch": True,
        "backend": "sendfile",
        "concurrency": "fixed",
    }


def test_vllm_is_a_configuration_whose_ranks_form_a_group():
    from bench.configs import NEEDS_GROUP

    cfg = parse_config("vllm:threads=4")
    assert cfg.kind == "vllm" and cfg.kind in NEEDS_GROUP and cfg.count("threads", 8) == 4
