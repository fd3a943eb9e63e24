"""Test files with known bytes, evicted from the page cache (used by fixtures and tests)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from engine import evict


def write_random(path: Path, size: int, *, seed: int = 0) -> Path:
    """Write `size` pseudo-random bytes (deterministic per seed) and evict them."""
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
