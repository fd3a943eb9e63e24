"""The memory cgroup helper (v1 and v2), and the bench's bigger-than-memory scenario.

The real-kernel tests use whichever hierarchy this host lets us write (v1 here; v2 on
current distributions and in containers); they skip only where neither can be written,
and fail instead when CI=true. The v2 layout rules are also checked on fake trees, and the
moves in and out of a group on this host's real v2 mount (which has no memory controller
where v1 holds it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cgroup import (
    CgroupError,
    Hierarchy,
    MemoryCgroup,
    available,
    find_hierarchy,
    memory_cgroup,
)

MiB = 1 << 20


def require_cgroups() -> None:
    ok, why = available()
    if not ok:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"memory cgroups are required in CI: {why}")
        pytest.skip(why)


def _cgroup_of(pid: int, version: int = 1) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if version == 1 and "memory" in controllers.split(","):
            return path
        if version == 2 and hid == "0":
            return path
    return ""


def _relative(path: Path, hierarchy: Hierarchy) -> str:
    return "/" + str(path.relative_to(hierarchy.mount)) if path != hierarchy.mount else "/"


def test_create_limit_join_and_remove() -> None:
    require_cgroups()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    hierarchy, _ = find_hierarchy()
    assert hierarchy is not None
    before = _cgroup_of(child.pid, hierarchy.version)
    try:
        with memory_cgroup(256 * MiB, name=f"ckpt-prefetch-test-{os.getpid()}") as cg:
            assert cg.path.is_dir() and cg.path.parent == hierarchy.parent
            limit = int((cg.path / hierarchy.files["limit"]).read_text())
            assert limit == 256 * MiB
            cg.add(child.pid)
            assert cg.pids() == [child.pid]
            assert _cgroup_of(child.pid, hierarchy.version) == _relative(cg.path, hierarchy)
            assert cg.usage_bytes() >= 0 and cg.stats()["limit_bytes"] == 256 * MiB
            path = cg.path
        # removed, and the process still running, moved back to where it was
        assert not path.exists()
        assert child.poll() is None
        assert _cgroup_of(child.pid, hierarchy.version) == before
    finally:
        child.kill()
        child.wait()


def test_removed_after_an_exception() -> None:
    require_cgroups()
    name = f"ckpt-prefetch-test-exc-{os.getpid()}"
    hierarchy, _ = find_hierarchy()
    assert hierarchy is not None
    with pytest.raises(RuntimeError), memory_cgroup(64 * MiB, name=name):
        raise RuntimeError("boom")
    assert not (hierarchy.parent / name).exists()


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
    hierarchy, _ = find_hierarchy()
    assert hierarchy is not None
    before = {p.name for p in hierarchy.parent.iterdir() if p.is_dir()}
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
    after = {p.name for p in hierarchy.parent.iterdir() if p.is_dir()}
    # Only the bench's own groups: other software on the host may make its own meanwhile.
    assert not {n for n in after - before if n.startswith("ckpt-prefetch-bench-")}


# ------------------------------------------------------------------- cgroup v2
def _fake_v2(tmp_path: Path, own: str, controllers: str = "cpu io memory") -> tuple[Path, Path]:
    """A unified hierarchy's files as the kernel shows them, and a /proc/self/cgroup."""
    mount = tmp_path / "unified"
    group = mount / own.lstrip("/")
    group.mkdir(parents=True)
    for d in (mount, *[p for p in group.parents if mount in p.parents], group):
        (d / "cgroup.controllers").write_text(controllers + "\n")
        (d / "cgroup.subtree_control").write_text("")
        (d / "cgroup.procs").write_text("")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return mount, proc


def test_v2_group_is_made_beside_this_process_in_its_delegated_subtree(tmp_path: Path) -> None:
    mount, proc = _fake_v2(tmp_path, "/kubepods/pod1/ctr")
    hierarchy, why = find_hierarchy(
        v1_root=tmp_path / "no-v1", v2_mounts=(mount,), proc_cgroup=proc
    )
    assert why == "" and hierarchy is not None
    # not in its own group: a group with processes cannot give controllers to children
    assert hierarchy == Hierarchy(2, mount / "kubepods/pod1", mount / "kubepods/pod1/ctr", mount)
    assert (mount / "kubepods/pod1/cgroup.subtree_control").read_text() == "+memory\n"
    assert hierarchy.files["limit"] == "memory.max"


def test_v2_in_the_root_group_makes_groups_under_the_root(tmp_path: Path) -> None:
    mount, proc = _fake_v2(tmp_path, "/")
    hierarchy, _ = find_hierarchy(v1_root=tmp_path / "no-v1", v2_mounts=(mount,), proc_cgroup=proc)
    assert hierarchy is not None and hierarchy.parent == mount == hierarchy.home


def test_v2_without_a_memory_controller_says_why(tmp_path: Path) -> None:
    mount, proc = _fake_v2(tmp_path, "/job", controllers="hugetlb")
    hierarchy, why = find_hierarchy(
        v1_root=tmp_path / "no-v1", v2_mounts=(mount,), proc_cgroup=proc
    )
    assert hierarchy is None
    assert "no-v1 is not a cgroup v1 memory controller mount" in why
    assert "has no memory controller (its controllers: hugetlb" in why


def test_v2_files_limit_usage_peak_and_events(tmp_path: Path) -> None:
    mount, proc = _fake_v2(tmp_path, "/job")
    hierarchy, _ = find_hierarchy(v1_root=tmp_path / "no-v1", v2_mounts=(mount,), proc_cgroup=proc)
    assert hierarchy is not None
    group = hierarchy.parent / "bench"
    group.mkdir()
    cg = MemoryCgroup(group, 64 * MiB, hierarchy)
    (group / "memory.current").write_text("1048576\n")
    (group / "memory.peak").write_text("2097152\n")
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 0\noom_kill 0\n")
    stats = cg.stats()
    assert stats == {"limit_bytes": 64 * MiB, "cgroup_version": 2, "usage_bytes": 1 << 20,
                     "max_usage_bytes": 2 << 20, "failcnt": 7}  # fmt: skip
    cg.reset_peak()
    assert (group / "memory.peak").read_text() == "reset\n"
    assert (group / "memory.events").read_text().startswith("low 0")  # cannot be reset


def test_v2_moves_in_and_back_out_on_this_hosts_real_unified_mount() -> None:
    """The kernel's v2 rules for moving processes and removing a group, on the real mount.

    This host's v2 hierarchy has no memory controller (v1 holds it), so the group limits
    nothing here: what runs is the creation, the move in, the move back to the group the
    process came from, and the removal.
    """
    mount = next((m for m in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
                  if (m / "cgroup.controllers").exists()), None)  # fmt: skip
    if mount is None or not os.access(mount, os.W_OK):
        why = "no writable cgroup v2 mount on this host"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    own = _cgroup_of(child.pid, 2)
    home = mount / own.lstrip("/")
    hierarchy = Hierarchy(2, home if own == "/" else home.parent, home, mount)
    path = hierarchy.parent / f"ckpt-prefetch-test-v2-{os.getpid()}"
    path.mkdir()
    try:
        cg = MemoryCgroup(path, 0, hierarchy)
        cg.add(child.pid)
        assert _cgroup_of(child.pid, 2) == _relative(path, hierarchy)
        assert cg.pids() == [child.pid]
        cg.remove()
        assert not path.exists()
        assert _cgroup_of(child.pid, 2) == own and child.poll() is None
    finally:
        child.kill()
        child.wait()
        if path.exists():
            path.rmdir()
