"""The node-local replica: sparse files, the shared ready map, claims, hole punching, cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loader_adapter.cluster.replica import Replica, StripeState, sweep_stale

MiB = 1 << 20
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def _open(
    base: Path, rank: int = 0, world: int = 2, *, name: str = "ckpt-prefetch-0-n-h"
) -> Replica:
    return Replica.open(
        base, name, ["a.safetensors", "b.safetensors"], [3 * MiB, 5000], 4, rank, world
    )


def test_files_are_sparse_and_sized(tmp_path):
    r = _open(tmp_path)
    try:
        assert [p.stat().st_size for p in r.paths] == [3 * MiB, 5000]
        assert [p.name for p in r.paths] == ["00000-a.safetensors", "00001-b.safetensors"]
        assert r.allocated_bytes() == 0
    finally:
        r.close()


def test_fill_from_copies_the_bytes_and_the_state_is_shared(tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(3 * MiB)
    src.write_bytes(data)
    a = _open(tmp_path / "rep", 0)
    b = _open(tmp_path / "rep", 1)
    try:
        fd = os.open(src, os.O_RDONLY)
        try:
            assert a.fill_from(0, MiB, MiB, fd) == MiB
        finally:
            os.close(fd)
        assert bytes(b.view(0, MiB, MiB)) == data[MiB : 2 * MiB]
        assert b.state(1) is StripeState.EMPTY and not b.ready(1)
        a.set_state(1, StripeState.SENDING)
        assert b.ready(1)
        assert not b.set_state(1, StripeState.ORPHAN, only_from=frozenset({StripeState.EMPTY}))
        assert a.state(1) is StripeState.SENDING
        assert MiB <= a.allocated_bytes() <= MiB + 8192
    finally:
        b.close()
        a.close()


def test_a_short_source_is_an_error(tmp_path):
    src = tmp_path / "short.bin"
    src.write_bytes(b"x" * 100)
    r = _open(tmp_path / "rep", 0, 1)
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="shorter"):
            r.fill_from(0, 0, 4096, fd)
    finally:
        os.close(fd)
        r.close()


def test_punch_frees_memory_and_reads_zeros(tmp_path):
    r = _open(Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path, 0, 1,
              name=f"ckpt-prefetch-test-{os.getpid()}-h")  # fmt: skip
    try:
        r.allocate(0, 0, 3 * MiB)
        r.view(0, 0, 3 * MiB)[:] = b"\x07" * (3 * MiB)
        held = r.allocated_bytes()
        assert held >= 3 * MiB
        assert r.punch(0, 0, 2 * MiB)
        assert r.allocated_bytes() <= held - 2 * MiB
        assert bytes(r.view(0, 0, 4)) == b"\0" * 4
        assert bytes(r.view(0, 2 * MiB, 4)) == b"\x07" * 4
    finally:
        r.close()


def test_a_local_rank_that_has_not_registered_yet_is_alive_for_the_grace(tmp_path):
    # A late-starting local rank is not dead: treating it so made its stripes fall back to
    # storage reads (a flaky "fallback_bytes == 0" in test_cluster_load).
    a = _open(tmp_path, 0)
    try:
        assert a.ranks.rank_alive(1, grace_s=60)
        assert not a.ranks.rank_alive(1, grace_s=0)
        b = _open(tmp_path, 1)
        assert a.ranks.rank_alive(1, grace_s=0)  # registered and running
        b.close()
    finally:
        a.close()


def test_slowest_follows_the_local_ranks(tmp_path):
    a = _open(tmp_path, 0)
    try:
        assert a.ranks.slowest(grace_s=60) == 0  # rank 1 has not registered: it needs everything
        assert a.ranks.slowest(grace_s=0) == 0  # ... or is gone after the grace: only rank 0 counts
        b = _open(tmp_path, 1)
        a.ranks.publish(500)
        b.ranks.publish(300)
        assert a.ranks.slowest(grace_s=60) == 300
        b.ranks.mark_failed(1)
        assert a.ranks.slowest(grace_s=60) == 500
        assert a.ranks.slowest(grace_s=60, include_failed=True) == 300
        assert not a.ranks.rank_alive(1, grace_s=60) and a.ranks.rank_alive(0, grace_s=60)
        a.ranks.finish_consuming()
        assert a.ranks.slowest(grace_s=60) is None
        b.close()
    finally:
        a.close()


def test_claims_exclude_other_processes_and_threads(tmp_path):
    r = _open(tmp_path, 0)
    try:
        with r.claim(2) as mine:
            assert mine
            with r.claim(2) as again:
                assert not again  # another thread of this process
            code = (
                "import sys; from pathlib import Path\n"
                "from loader_adapter.cluster.replica import Replica\n"
                f"r = Replica.open(Path({str(tmp_path)!r}), 'ckpt-prefetch-0-n-h', "
                "['a.safetensors', 'b.safetensors'], [3 << 20, 5000], 4, 1, 2)\n"
                "with r.claim(2) as m2, r.claim(3) as m3: print(m2, m3)\n"
                "r.close()"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=ENV
            )
            assert out.stdout.split() == ["False", "True"]
        with r.claim(2) as mine:
            assert mine
    finally:
        r.close()


def test_the_last_rank_to_leave_removes_the_directory(tmp_path):
    a = _open(tmp_path, 0)
    b = _open(tmp_path, 1)
    d = a.directory
    assert not a.close()
    assert d.exists()
    assert b.close()
    assert not d.exists()
    assert not b.close()  # idempotent


def test_a_dead_ranks_replica_is_swept_later(tmp_path):
    code = (
        "import os; from pathlib import Path; from loader_adapter.cluster.replica import Replica\n"
        f"r = Replica.open(Path({str(tmp_path)!r}), 'ckpt-prefetch-0-old-h', ['a'], [10], 1,"
        " 0, 1)\n"
        "os._exit(0)"  # killed: no close
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()}
    )
    stale = tmp_path / "ckpt-prefetch-0-old-h.replica"
    assert stale.is_dir()
    assert sweep_stale(tmp_path, "ckpt-prefetch-0") == 0  # too young to be sure
    old = time.time() - 3600
    os.utime(stale, (old, old))
    live = _open(tmp_path, 0, 1, name="ckpt-prefetch-0-new-h")
    try:
        os.utime(live.directory, (old, old))
        assert not stale.exists()  # Replica.open swept it
        assert sweep_stale(tmp_path, "ckpt-prefetch-0") == 0  # a replica in use stays
        assert live.directory.exists()
    finally:
        live.close()


def test_a_different_replica_under_the_same_name_is_refused(tmp_path):
    a = _open(tmp_path, 0)
    try:
        with pytest.raises(OSError, match="different replica"):
            Replica.open(tmp_path, "ckpt-prefetch-0-n-h", ["a"], [1], 9, 0, 2)
    finally:
        a.close()


def test_zombies_are_not_alive():
    from loader_adapter.cluster.replica import _alive

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while _alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(p.pid)  # exited, not reaped yet
    p.wait()
    assert _alive(os.getpid())


def test_the_pure_core_of_cluster_mode_imports_no_torch():
    code = (
        "import sys\n"
        "import loader_adapter.cluster.plan, loader_adapter.cluster.join\n"
        "import loader_adapter.cluster.machine, loader_adapter.cluster.replica\n"
        "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV)
