"""The iterator on the simulated network filesystem (FUSE): auto turns prefetch on, the
tensors are identical, and a node's ranks make storage serve each byte once."""

from __future__ import annotations

import gc
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loader_adapter import safetensors_weights_iterator

MiB = 1 << 20


def _require_fuse() -> None:
    """Skip when /dev/fuse cannot be opened (fail under CI=true)."""
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"FUSE is required in CI: {exc}")
        pytest.skip(f"/dev/fuse cannot be opened: {exc}")
    from bench.netfs import fuse_available

    ok, why = fuse_available()
    if not ok:
        pytest.fail(f"/dev/fuse opens but FUSE is not usable: {why}")


@pytest.fixture(scope="module")
def checkpoint(synthetic_checkpoint) -> Path:
    _require_fuse()
    return synthetic_checkpoint(size_bytes=24 * MiB, shape="skewed", shards=3).directory


def _copy_all(files: Path, **kwargs: object) -> dict[str, torch.Tensor]:
    """Load like a serving engine: copy every tensor out of the mapping at once."""
    it = safetensors_weights_iterator(files, **kwargs)  # type: ignore[arg-type]
    out = {name: t.clone() for name, t in it}
    del it
    gc.collect()  # drop the file mappings before the mount goes away
    return out


def _reference(directory: Path) -> dict[str, torch.Tensor]:
    ref: dict[str, torch.Tensor] = {}
    for p in sorted(directory.glob("*.safetensors")):
        ref.update({k: v.clone() for k, v in load_file(p).items()})
    return ref


def _assert_same(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    for name, t in got.items():
        r = ref[name]
        assert t.dtype == r.dtype and t.shape == r.shape, name
        assert torch.equal(t.reshape(-1).view(torch.uint8), r.reshape(-1).view(torch.uint8))


@pytest.mark.fuse
def test_auto_prefetches_on_netfs_and_serves_once(
    checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bench.netfs import mounted

    ref = _reference(checkpoint)
    total = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    with mounted(checkpoint, profile="fast-nfs") as fs:
        fs.evict()
        fs.reset_counters()
        with caplog.at_level(logging.INFO, logger="loader_adapter"):
            got = _copy_all(fs.path, prefetch="auto")
        assert any("prefetch=auto -> on" in r.getMessage() for r in caplog.records)
        _assert_same(got, ref)
        served = fs.counters().bytes_served
        assert total <= served <= 1.02 * total


@pytest.mark.fuse
def test_two_ranks_on_netfs_each_byte_served_once(checkpoint: Path) -> None:
    from bench.netfs import mounted

    ref = _reference(checkpoint)
    total = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    results: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def rank(r: int, path: Path) -> None:
        try:
            results[r] = _copy_all(path, prefetch=True, rank=r, world=2, chunk_bytes=MiB)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with mounted(checkpoint, profile="fast-nfs") as fs:
        fs.evict()
        fs.reset_counters()
        threads = [threading.Thread(target=rank, args=(r, fs.path)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        served = fs.counters().bytes_served
    for r in range(2):
        _assert_same(results[r], ref)
    assert total <= served <= 1.02 * total
