"""The memory budget and the automatic window, on fake cgroup trees and on this machine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fakes import FakeBackend

from engine import ConsumerCursor, MemoryBudget, auto_window, memory_budget, prefetch_async

GiB = 1 << 30


def _meminfo(tmp_path: Path, avail: int) -> Path:
    p = tmp_path / "meminfo"
    p.write_text(f"MemTotal: 99999999 kB\nMemAvailable: {avail // 1024} kB\n")
    return p


def test_cgroup_v1_limit_minus_anon_sets_the_budget(tmp_path):
    root = tmp_path / "cg"
    leaf = root / "memory" / "jobs" / "a"
    leaf.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "memory" / "jobs" / "memory.limit_in_bytes").write_text(str(3 * GiB))
    (root / "memory" / "jobs" / "memory.stat").write_text(f"cache 5\nrss {GiB // 2}\n")
    (leaf / "memory.limit_in_bytes").write_text(str(8 * GiB))
    (leaf / "memory.stat").write_text("cache 1\nrss 0\n")
    proc = tmp_path / "cgroup"
    proc.write_text("5:cpu:/\n4:memory:/jobs/a\n0::/\n")
    b = memory_budget(proc_cgroup=proc, cgroup_root=root, meminfo=_meminfo(tmp_path, 20 * GiB))
    assert b.available_bytes == 3 * GiB - GiB // 2  # the parent's limit is tighter
    assert b.cgroup_limit == 3 * GiB and b.source.endswith("jobs")


def _v2_pod_budget(tmp_path: Path, files: dict[str, str]):
    """The budget inside a fake cgroup v2 tree whose leaf ``pod`` holds `files`."""
    root = tmp_path / "cg"
    leaf = root / "pod"
    leaf.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    for name, text in files.items():
        (leaf / name).write_text(text)
    proc = tmp_path / "cgroup"
    proc.write_text("0::/pod\n")
    return memory_budget(proc_cgroup=proc, cgroup_root=root, meminfo=_meminfo(tmp_path, 20 * GiB))


def test_cgroup_v2_memory_max(tmp_path):
    b = _v2_pod_budget(
        tmp_path, {"memory.max": str(2 * GiB), "memory.stat": f"anon {GiB // 4}\nfile 7\n"}
    )
    assert b.available_bytes == 2 * GiB - GiB // 4


def test_cgroup_v1_counts_the_children_and_shmem(tmp_path):
    """A job's limit sits on a parent whose tasks live in children: rss alone reads 0."""
    root = tmp_path / "cg"
    leaf = root / "memory" / "job" / "task"
    leaf.mkdir(parents=True)
    (root / "memory" / "job" / "memory.limit_in_bytes").write_text(str(8 * GiB))
    (root / "memory" / "job" / "memory.stat").write_text(
        f"rss 0\nshmem 0\ntotal_rss {6 * GiB}\ntotal_shmem {GiB // 2}\n"
    )
    (leaf / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (leaf / "memory.stat").write_text(f"rss {6 * GiB}\ntotal_rss {6 * GiB}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/job/task\n")
    b = memory_budget(proc_cgroup=proc, cgroup_root=root, meminfo=_meminfo(tmp_path, 20 * GiB))
    assert b.available_bytes == 8 * GiB - 6 * GiB - GiB // 2


def test_cgroup_v2_memory_high_and_shmem(tmp_path):
    b = _v2_pod_budget(
        tmp_path,
        {
            "memory.max": "max\n",
            "memory.high": str(4 * GiB),
            "memory.stat": f"anon {GiB}\nshmem {GiB // 4}\nfile 7\n",
        },
    )
    assert b.available_bytes == 4 * GiB - GiB - GiB // 4


def test_unlimited_cgroup_falls_back_to_memavailable(tmp_path):
    root = tmp_path / "cg"
    (root / "pod").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    (root / "pod" / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/pod\n")
    b = memory_budget(proc_cgroup=proc, cgroup_root=root, meminfo=_meminfo(tmp_path, 5 * GiB))
    assert (b.available_bytes, b.source) == (5 * GiB, "MemAvailable")


def test_this_machine_has_a_budget():
    b = memory_budget()
    assert 0 < b.available_bytes <= b.mem_available


@pytest.mark.parametrize(
    ("total", "expected"),
    [(GiB, None), (8 * GiB, None), (9 * GiB, 5 * GiB), (100 * GiB, 5 * GiB)],
)
def test_auto_window_rule(total, expected):
    budget = MemoryBudget(10 * GiB, 10 * GiB, None, None, "MemAvailable")
    window, reason = auto_window(total, budget=budget)
    assert window == expected
    assert ("no window" in reason) == (expected is None)


def test_auto_window_is_resolved_and_logged_by_the_engine(make_file, caplog, monkeypatch):
    import engine.prepare as prep

    path = make_file("w", 8 << 20)
    small = MemoryBudget(4 << 20, 4 << 20, None, None, "test")
    monkeypatch.setattr(
        prep, "auto_window", lambda total, **kw: auto_window(total, budget=small, **kw)
    )
    cursor = ConsumerCursor()
    fake = FakeBackend()

    async def run():
        task = asyncio.create_task(
            prefetch_async([path], backend=fake, chunk_bytes=1 << 20, window_bytes="auto",
                           consumer=cursor, skip_cached=False)
        )  # fmt: skip
        await asyncio.sleep(0.3)
        first = len(fake.calls)
        cursor.finish()
        return first, await task

    with caplog.at_level("INFO"):
        first, report = asyncio.run(run())
    assert first == 2  # window = max(50% of 4 MiB, 2 stripes) = 2 MiB
    assert any(
        "window 0.00 GiB" in r.message and "does not fit" in r.message for r in caplog.records
    )
    assert report.skipped_bytes == 6 << 20
