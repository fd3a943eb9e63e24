"""One tensor over 1 GiB: identical with and without prefetch, compared chunk by chunk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.checkpoint import TensorSpec, write_safetensors
from engine import evict
from loader_adapter import safetensors_weights_iterator

GiB, MiB = 1 << 30, 1 << 20
BIG_SHAPE = (16385, 32769)  # fp16: 1 GiB + 98,306 bytes, odd sizes


def _equal_in_chunks(a: torch.Tensor, b: torch.Tensor, chunk: int = 64 * MiB) -> bool:
    """Byte equality without materialising either tensor (both are file-backed)."""
    x, y = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    if x.numel() != y.numel():
        return False
    return all(torch.equal(x[i : i + chunk], y[i : i + chunk]) for i in range(0, x.numel(), chunk))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tensor_over_1gib(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    specs = [
        TensorSpec("before", "bf16", (3, 5)),
        TensorSpec("big", "fp16", BIG_SHAPE),
        TensorSpec("after", "int8", (7,)),
    ]
    try:
        write_safetensors(path, specs, seed=1, metadata={"format": "pt"})
        ref = load_file(path)
        assert ref["big"].numel() * 2 > GiB
        for prefetch in (False, True):
            evict(str(path))
            got = []
            for name, t in safetensors_weights_iterator(path, prefetch=prefetch):
                got.append(name)
                assert t.dtype == ref[name].dtype and t.shape == ref[name].shape
                assert _equal_in_chunks(t, ref[name]), name
            assert got == ["before", "big", "after"]
    finally:
        if path.exists():
            evict(str(path))
            os.unlink(path)
