"""Shared fixtures: test files with known bytes, evicted from the page cache; and the
``fuse`` marker's check (a test marked ``fuse`` skips only where /dev/fuse cannot be
opened, with the reason in the summary, and fails instead under ``CI=true``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from file_support import write_random


@pytest.fixture(scope="session")
def synthetic_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """Factory: ``synthetic_checkpoint(size_bytes=..., shape=..., shards=...)`` -> a
    `bench.checkpoint.Checkpoint`, made once per session for each set of arguments.

    Tests only read it. Its files are synced, so that a test can evict them (dirty pages
    cannot be evicted).
    """
    from bench.checkpoint import make_checkpoint

    made: dict[tuple[tuple[str, Any], ...], Any] = {}

    def make(**kwargs: Any) -> Any:
        key = tuple(sorted(kwargs.items()))
        if key not in made:
            ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt"), **kwargs)
            for path in ckpt.files:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            made[key] = ckpt
        return made[key]

    return make


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_file(name, size, seed=0)`` -> an evicted file of random bytes."""

    def make(name: str, size: int, *, seed: int = 0) -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return write_random(p, size, seed=seed)

    return make


@pytest.fixture
def write_pressure(tmp_path):
    """Another writer keeps the disk's writeback queue busy, as an install does."""
    stop = threading.Event()

    def churn() -> None:
        block = os.urandom(4 << 20)
        n = 0
        while not stop.is_set() and n < 64:
            p = tmp_path / f"pressure-{n % 4}.bin"
            with open(p, "wb") as f:
                for _ in range(16):
                    f.write(block)
            n += 1

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(60)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fuse") is not None:
        from fuse_support import require_fuse

        require_fuse()
