"""Tests of bench.checkpoint: the synthetic checkpoint maker."""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bench.checkpoint import (
    DTYPES,
    SHAPES,
    Checkpoint,
    TensorSpec,
    make_checkpoint,
    plan_tensors,
    scan_checkpoint,
    write_safetensors,
)
from engine.units import parse_size
from loader_adapter.header import read_header

MiB = 1 << 20


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 << 30),
        ("256MiB", 256 << 20),
        ("1 KiB", 1024),
        ("1.5KB", 1500),
        ("2MB", 2_000_000),
        ("3GB", 3_000_000_000),
        ("12", 12),
        ("12B", 12),
        ("8gib", 8 << 30),
        ("1TiB", 1 << 40),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "4 XB", "-1MiB", "1e3", "four", "1.2.3MB", -5])
def test_parse_size_rejects(bad: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_deterministic(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a", size_bytes=4 * MiB, shards=3, seed=7)
    b = make_checkpoint(tmp_path / "b", size_bytes=4 * MiB, shards=3, seed=7)
    c = make_checkpoint(tmp_path / "c", size_bytes=4 * MiB, shards=3, seed=8)
    assert [p.name for p in a.files] == [p.name for p in b.files]
    assert _digest(a.files) == _digest(b.files)
    assert _digest(a.files) != _digest(c.files)
    assert a.index_path.read_bytes() == b.index_path.read_bytes()
    # Regenerating in place gives the same bytes again.
    before = _digest(a.files)
    make_checkpoint(tmp_path / "a", size_bytes=4 * MiB, shards=3, seed=7)
    assert _digest(a.files) == before


@pytest.mark.parametrize("shape", SHAPES)
def test_index_maps_every_tensor_and_loads(tmp_path: Path, shape: str) -> None:
    info = make_checkpoint(tmp_path, size_bytes=8 * MiB, shape=shape)
    assert isinstance(info, Checkpoint)
    assert info.shape == shape
    assert list(info.files) == sorted(info.files)
    assert info.total_bytes == sum(p.stat().st_size for p in info.files)
    index = json.loads(info.index_path.read_text())
    weight_map = index["weight_map"]
    seen: dict[str, str] = {}
    data_bytes = 0
    for path in info.files:
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert name not in seen
                seen[name] = path.name
                t = f.get_tensor(name)
                data_bytes += t.numel() * t.element_size()
        loaded = load_file(path)
        assert set(loaded) == {n for n, f in seen.items() if f == path.name}
    assert seen == weight_map
    assert scan_checkpoint(info.files) == (info.tensor_count, info.max_tensor_bytes)
    assert len(seen) == info.tensor_count
    assert index["metadata"]["total_size"] == data_bytes
    assert abs(data_bytes - 8 * MiB) / (8 * MiB) < 0.01
    assert "model.embed_tokens.weight" in seen
    assert "lm_head.weight" in seen
    assert "model.norm.weight" in seen
    if shape == "single":
        assert [p.name for p in info.files] == ["model.safetensors"]


def test_transformer_names_and_dtypes(tmp_path: Path) -> None:
    info = make_checkpoint(tmp_path, size_bytes=4 * MiB, shards=2)
    tensors: dict[str, torch.Tensor] = {}
    for p in info.files:
        tensors.update(load_file(p))
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model.layers.0.self_attn.{part}.weight" in tensors
    for part in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.1.mlp.{part}.weight" in tensors
    assert tensors["model.layers.0.input_layernorm.weight"].shape == (hidden,)
    assert tensors["model.layers.0.post_attention_layernorm.weight"].shape == (hidden,)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape[1] == hidden
    assert tensors["lm_head.weight"].shape == tensors["model.embed_tokens.weight"].shape
    dtypes = {t.dtype for t in tensors.values()}
    assert dtypes == {torch.bfloat16, torch.float16, torch.float8_e4m3fn}
    # Tensors are stored in model order within each file.
    header = read_header(info.files[0])
    assert header.metadata == {"format": "pt"}
    assert header.tensors[0].name == "model.embed_tokens.weight"  # tensors in byte order


def _sizes(info: Checkpoint) -> list[int]:
    return [p.stat().st_size for p in info.files]


def test_uniform_shards_equal(tmp_path: Path) -> None:
    info = make_checkpoint(tmp_path, size_bytes=16 * MiB, shape="uniform", shards=4)
    sizes = _sizes(info)
    assert len(sizes) == 4
    assert max(sizes) / min(sizes) < 1.10
    assert [p.name for p in info.files] == [
        f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)
    ]


@pytest.mark.parametrize("skew", [2.0, 4.0])
def test_skewed_first_shard_larger(tmp_path: Path, skew: float) -> None:
    info = make_checkpoint(tmp_path, size_bytes=16 * MiB, shape="skewed", shards=4, skew=skew)
    sizes = _sizes(info)
    ratio = sizes[0] / statistics.median(sizes[1:])
    assert skew * 0.9 < ratio < skew * 1.1
    assert max(sizes[1:]) / min(sizes[1:]) < 1.10


def test_single_one_file(tmp_path: Path) -> None:
    info = make_checkpoint(tmp_path, size_bytes=4 * MiB, shape="single", shards=8)
    assert len(info.files) == 1
    assert abs(info.total_bytes - 4 * MiB) / (4 * MiB) < 0.01


def test_many_small(tmp_path: Path) -> None:
    info = make_checkpoint(tmp_path, size_bytes=16 * MiB, shape="many-small")
    sizes = _sizes(info)
    assert len(sizes) == 64
    assert info.tensor_count >= 2000
    assert max(sizes) / min(sizes) < 1.25
    assert info.tensor_count / len(sizes) > 20
    weight_map = json.loads(info.index_path.read_text())["weight_map"]
    assert any(".mlp.experts." in name for name in weight_map)


@pytest.mark.parametrize(
    ("size", "shape", "shards"),
    [
        (1 * MiB, "uniform", 4),
        (256 * MiB, "uniform", 8),
        (4 << 30, "skewed", 8),
        (64 << 30, "many-small", 64),
        (1 << 40, "uniform", 64),
    ],
)
def test_plan_tensors_close_to_size(size: int, shape: str, shards: int) -> None:
    specs = plan_tensors(size, shape=shape, shards=shards)
    total = sum(s.nbytes for s in specs)
    assert abs(total - size) / size < 0.005
    assert len({s.name for s in specs}) == len(specs)


def test_write_safetensors_all_dtypes(tmp_path: Path) -> None:
    specs = [TensorSpec(f"t_{name}", name, (3, 5)) for name in DTYPES]
    specs.append(TensorSpec("scalar", "fp32", ()))
    specs.append(TensorSpec("empty", "bf16", (0, 4)))
    path = tmp_path / "all.safetensors"
    size = write_safetensors(path, specs, seed=1, metadata={"k": "v"})
    assert size == path.stat().st_size
    loaded = load_file(path)
    assert set(loaded) == {s.name for s in specs}
    assert loaded["scalar"].shape == ()
    assert loaded["empty"].shape == (0, 4)
    assert set(loaded["t_bool"].view(torch.uint8).unique().tolist()) <= {0, 1}
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid shapes"):
        make_checkpoint(tmp_path, shape="triangular")
    with pytest.raises(ValueError, match="valid dtypes"):
        make_checkpoint(tmp_path, dtypes=("fp7",))
    with pytest.raises(ValueError, match="shards"):
        make_checkpoint(tmp_path, shards=0)
    with pytest.raises(ValueError, match="skew"):
        make_checkpoint(tmp_path, shape="skewed", skew=0)


def test_accepts_size_string(tmp_path: Path) -> None:
    info = make_checkpoint(tmp_path, size_bytes="2MiB", shards=2)  # type: ignore[arg-type]
    assert abs(info.total_bytes - 2 * MiB) / (2 * MiB) < 0.01
