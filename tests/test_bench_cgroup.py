"""The memory cgroup helper, and the bench's bigger-than-memory scenario in a small size.

Skips only where /sys/fs/cgroup/memory is not writable, and fails instead when CI=true.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cgroup import CGROUP_V1_MEMORY, CgroupError, available, memory_cgroup

MiB = 1 << 20


def require_cgroups() -> None:
    ok, why = available()
    if not ok:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"memory cgroups are required in CI: {why}")
        pytest.skip(why)


def _cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    return ""


def test_create_limit_join_and_remove() -> None:
    require_cgroups()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with memory_cgroup(256 * MiB, name=f"ckpt-prefetch-test-{os.getpid()}") as cg:
            assert cg.path.is_dir() and cg.path.parent == CGROUP_V1_MEMORY
            limit = int((cg.path / "memory.limit_in_bytes").read_text())
            assert limit == 256 * MiB
            cg.add(child.pid)
            assert cg.pids() == [child.pid]
            assert _cgroup_of(child.pid) == "/" + cg.path.name
            assert cg.usage_bytes() >= 0 and cg.stats()["limit_bytes"] == 256 * MiB
            path = cg.path
        # removed, and the process still running, moved back to the root group
        assert not path.exists()
        assert child.poll() is None
        assert _cgroup_of(child.pid) == "/"
    finally:
        child.kill()
        child.wait()


def test_removed_after_an_exception() -> None:
    require_cgroups()
    name = f"ckpt-prefetch-test-exc-{os.getpid()}"
    with pytest.raises(RuntimeError), memory_cgroup(64 * MiB, name=name):
        raise RuntimeError("boom")
    assert not (CGROUP_V1_MEMORY / name).exists()


def test_limit_caps_page_cache(make_file: object) -> None:
    """A reader inside a 64 MiB group cannot keep 256 MiB of a file cached."""
    require_cgroups()
    from engine import resident_bytes

    big = make_file("big.bin", 256 * MiB)  # type: ignore[operator]
    with memory_cgroup(64 * MiB, name=f"ckpt-prefetch-test-cap-{os.getpid()}") as cg:
        code = (
            "import os,sys\n"
            f"open('{cg.path}/cgroup.procs','w').write(str(os.getpid()))\n"
            f"f=open('{big}','rb')\n"
            "while f.read(1<<20): pass\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert cg.max_usage_bytes() <= 64 * MiB + (4 * MiB)
    assert resident_bytes(big) <= 80 * MiB


def test_bad_root_raises(tmp_path: Path) -> None:
    with pytest.raises(CgroupError), memory_cgroup(64 * MiB, root=tmp_path):
        pass


@pytest.mark.fuse
@pytest.mark.slow
def test_bigger_than_memory_scenario(tmp_path: Path) -> None:
    """The scenario runs inside a cgroup, validates, agrees on checksums, cleans up."""
    require_cgroups()
    from fuse_support import require_fuse

    require_fuse()
    from bench import results
    from bench.runner import run_suite
    from bench.suites import Matrix, Suite

    # The limit must leave room for the readers' buffers (the SGLang-style prefetch and
    # the raw floor hold up to 4 x 16 MiB per rank), and be well below the checkpoint.
    limit = 192 * MiB
    m = Matrix(
        "bigger-than-memory",
        ("fast-nfs",),
        (2,),
        ("uniform",),
        ("none", "sglang", "ours-window", "ours-nowindow"),
        512 * MiB,
        memory_limit_bytes=limit,
        hot=False,
        fio=False,
    )
    before = {p.name for p in CGROUP_V1_MEMORY.iterdir() if p.is_dir()}
    doc = run_suite(
        Suite("test", (m,), repeats=1, warmup=0, workdir=tmp_path, shards=4, timeout_s=300)
    )
    results.validate(doc)
    loads = [r for r in doc["results"] if r["kind"] == "load"]
    assert {r["config"] for r in loads} == {"none", "sglang", "ours-window", "ours-nowindow"}
    assert len({s["checksum"] for r in loads for s in r["samples"]}) == 1
    for r in doc["results"]:
        assert r["memory_limit_bytes"] == limit
        for s in r["samples"]:
            cg = s["detail"]["cgroup"]
            assert cg["limit_bytes"] == limit and cg["max_usage_bytes"] <= limit + 4 * MiB
            # every byte at least once; under the limit some are read again
            assert s["bytes_served_ratio"] >= 0.999
    after = {p.name for p in CGROUP_V1_MEMORY.iterdir() if p.is_dir()}
    # Only the bench's own groups: other software on the host may make its own meanwhile.
    assert not {n for n in after - before if n.startswith("ckpt-prefetch-bench-")}
