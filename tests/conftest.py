"""Shared fixtures: test files with known bytes, evicted from the page cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import evict


def write_random(path: Path, size: int, *, seed: int = 0) -> Path:
    """Write `size` pseudo-random bytes (deterministic per seed) and evict them."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rnd.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be evicted
    evict(path)
    return path


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_file(name, size, seed=0)`` -> an evicted file of random bytes."""

    def make(name: str, size: int, *, seed: int = 0) -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return write_random(p, size, seed=seed)

    return make
