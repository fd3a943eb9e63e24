"""`Exchange` built directly: posed ranks as threads of this process, the in-process
transport of ``tests/fake_transport.py``, real replicas and real source files.

Each rank's loader walks the stripes its node needs, checks every byte against the
source as soon as `wait_range` returns, and advances; the reports give what was read,
sent and received.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from fake_transport import Switchboard

from loader_adapter.cluster.exchange import Exchange
from loader_adapter.cluster.plan import ClusterPlan, cluster_plan
from loader_adapter.cluster.replica import Replica, StripeState

CHUNK = 64 << 10
pytestmark = pytest.mark.timeout(120)


def _sources(tmp_path: Path, sizes: list[int]) -> list[str]:
    paths = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"src-{i}.bin"
        p.write_bytes(os.urandom(size))
        paths.append(str(p))
    return paths


def _run(
    tmp_path: Path,
    plan: ClusterPlan,
    sources: list[str],
    *,
    window: int | None = None,
    cut: tuple[int, ...] = (),
    timeout_s: float = 10.0,
) -> dict[int, object]:
    """Every rank not in `cut` loads its node's stripes; returns each rank's report."""
    board = Switchboard()
    for r in cut:
        board.cut(r)
    topo = plan.topology
    originals = [Path(s).read_bytes() for s in sources]
    reports: dict[int, object] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        node = topo.node_of[r]
        replica = Replica.open(
            tmp_path / f"node{node}", "ckpt-prefetch-test-x-h", [Path(s).name for s in sources],
            plan.sizes, len(plan.stripes), topo.local_rank_of[r], topo.local_world(node),
        )  # fmt: skip
        ex = Exchange(
            plan, r, board.transport(r), replica, sources,
            window_bytes=window, timeout_s=timeout_s, read_threads=2,
        )  # fmt: skip
        try:
            for s in plan.stripes:
                if not plan.needed_by(s, node):
                    continue
                ex.wait_range(s.position, s.end)
                got = bytes(replica.view(s.file, s.offset, s.length))
                assert got == originals[s.file][s.offset : s.offset + s.length], s
                ex.advance(s.end)
            ex.finish()
            reports[r] = ex.report()
        except BaseException as exc:
            errors.append(exc)
            ex.cancel()

    for d in {topo.node_of[r] for r in range(topo.world)}:
        (tmp_path / f"node{d}").mkdir()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(topo.world) if r not in cut]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors
    assert all(not any((tmp_path / f"node{d}").iterdir()) for d in range(topo.num_nodes))
    return reports


def test_two_nodes_exchange_every_stripe_once(tmp_path):
    sizes = [5 * CHUNK + 1000, 3 * CHUNK]
    plan = cluster_plan(sizes, ["a", "b", "a", "b"], chunk_bytes=CHUNK)
    reports = _run(tmp_path, plan, _sources(tmp_path, sizes))
    assert all(rep.failures == () for rep in reports.values())
    assert sum(rep.read_bytes for rep in reports.values()) == sum(sizes)  # once for the job
    assert sum(rep.fallback_bytes for rep in reports.values()) == 0
    for node in (0, 1):
        mine = [rep for rep in reports.values() if rep.node == node]
        assert sum(rep.read_bytes + rep.received_bytes for rep in mine) == sum(sizes)


def test_a_rank_that_never_came_is_given_up_and_its_stripes_read_by_the_others(tmp_path):
    sizes = [6 * CHUNK]
    plan = cluster_plan(sizes, ["a", "b", "a", "b"], chunk_bytes=CHUNK)
    reports = _run(tmp_path, plan, _sources(tmp_path, sizes), cut=(1,), timeout_s=1.0)
    assert set(reports) == {0, 2, 3}
    lost = sum(s.length for s in plan.reads(1))
    assert lost > 0
    # Node 0 never receives rank 1's stripes: its receivers give rank 1 up and read them.
    assert any(1 in rep.failed_peers for rep in reports.values() if rep.node == 0)
    # (Both local ranks may read one: a fill's claim is a lock per process, and these
    # posed ranks share one.)
    filled = sum(rep.fallback_bytes for rep in reports.values() if rep.node == 0)
    assert lost <= filled <= 2 * lost
    # Node 1's other rank reads what rank 1 would have (its holder is gone).
    assert reports[3].fallback_bytes > 0


def test_the_window_follows_a_loader_that_skips_what_its_node_does_not_need(tmp_path):
    """A node that loads the first and the last stripes only: between them lies more than
    the window. The loader's position must move to the next range it waits for, or no
    stripe past the window is brought in and it waits a timeout (failed before)."""
    sizes = [12 * CHUNK]
    needs = [{0: [(0, CHUNK), (11 * CHUNK, 12 * CHUNK)]}, None]
    plan = cluster_plan(sizes, ["a", "b"], chunk_bytes=CHUNK, node_needs=needs)
    reports = _run(tmp_path, plan, _sources(tmp_path, sizes), window=2 * CHUNK, timeout_s=3.0)
    assert [rep.failures for rep in reports.values()] == [(), ()]
    assert sum(rep.fallback_bytes for rep in reports.values()) == 0


_NAME = "ckpt-prefetch-test-x-h"


def _one_node(tmp_path: Path) -> tuple[ClusterPlan, list[str], Path]:
    """A job of one node with two local ranks: the plan, the sources, the replicas' base."""
    sizes = [6 * CHUNK]
    base = tmp_path / "node0"
    base.mkdir()
    return cluster_plan(sizes, ["a", "a"], chunk_bytes=CHUNK), _sources(tmp_path, sizes), base


def _rank0(plan: ClusterPlan, sources: list[str], base: Path) -> tuple[Replica, Exchange]:
    replica = Replica.open(base, _NAME, ["src-0.bin"], plan.sizes, len(plan.stripes), 0, 2)
    ex = Exchange(plan, 0, Switchboard().transport(0), replica, sources,
                  window_bytes=None, timeout_s=0.5, read_threads=1)  # fmt: skip
    return replica, ex


def _load_in_thread(plan: ClusterPlan, sources: list[str], replica: Replica, ex: Exchange):
    """Rank 0's loader, on a thread: (whether it ended within 30 s, stripes that differ)."""
    original = Path(sources[0]).read_bytes()
    done = threading.Event()
    wrong: list[int] = []

    def load() -> None:
        for s in plan.stripes:
            ex.wait_range(s.position, s.end)
            if (
                bytes(replica.view(s.file, s.offset, s.length))
                != original[s.offset : s.offset + s.length]
            ):
                wrong.append(s.index)
            ex.advance(s.end)
        done.set()

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(30)
    ex.cancel()
    return done.is_set(), wrong


def test_a_stalled_node_mate_holding_a_fill_claim_does_not_hold_the_load(tmp_path):
    """A local rank stopped (SIGSTOP) while it filled a stripe keeps its claim: a lock
    dies with its process, not with a stop. The loader must read that stripe itself once
    it is overdue (on the 2-node simulation at 12 MB/s, the stalled rank's node-mate
    waited for it until the driver killed both, 90 s later; failed before)."""
    import signal
    import subprocess
    import sys

    plan, sources, base = _one_node(tmp_path)
    held = next(s.index for s in plan.stripes if s in plan.reads(1))  # rank 1's own
    code = (
        "import sys, time\n"
        "from loader_adapter.cluster.replica import Replica\n"
        f"r = Replica.open({str(base)!r}, {_NAME!r}, ['src-0.bin'], {list(plan.sizes)!r}, "
        f"{len(plan.stripes)}, 1, 2)\n"
        f"with r.claim({held}) as mine:\n"
        "    print(mine, flush=True)\n"
        "    time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    mate = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert mate.stdout is not None and mate.stdout.readline().split() == [b"True"]
        mate.send_signal(signal.SIGSTOP)
        replica, ex = _rank0(plan, sources, base)
        done, wrong = _load_in_thread(plan, sources, replica, ex)
        assert done, "the loader still waits for the stalled rank's stripe"
        assert wrong == []
        report = ex.report()
        assert report.fallback_bytes >= plan.stripes[held].length
        assert any("did not arrive" in f for f in report.failures), report.failures
    finally:
        mate.send_signal(signal.SIGCONT)
        mate.kill()
        mate.wait()


def test_an_overdue_loader_waits_for_a_claim_held_in_its_own_process(tmp_path):
    """A thread of this process that holds a claim (the repair thread, slow on a slow
    store) is alive: the loader waits for it instead of reading the stripe a second time
    (it stole from it before)."""
    import time

    plan, sources, base = _one_node(tmp_path)
    held = next(s.index for s in plan.stripes if s in plan.reads(1))  # rank 1 never comes
    replica, ex = _rank0(plan, sources, base)
    reads: list[tuple[int, float]] = []
    read = ex._core.storage.read

    def counted(stripe):
        reads.append((stripe.index, time.monotonic()))
        return read(stripe)

    ex._core.storage.read = counted
    released_at: list[float] = []
    claimed: list[bool] = []

    def hold() -> None:
        with replica.claim(held) as mine:
            claimed.append(mine)
            time.sleep(2.0)  # the loader is overdue after 0.75 s
            released_at.append(time.monotonic())

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.05)
    done, wrong = _load_in_thread(plan, sources, replica, ex)
    holder.join()
    assert claimed == [True]
    assert done and wrong == []
    assert [t for k, t in reads if k == held] != [], reads
    assert all(t >= released_at[0] for k, t in reads if k == held), (released_at, reads)


def test_a_fill_that_ends_after_the_stripe_became_ready_leaves_its_state(tmp_path):
    """A late fill (a node-mate that comes back after its stripe was read in its place,
    or after the planned reader brought it) must not turn SENDING into READY: the stripe
    could then be freed under its send. A freed stripe that a loader fills again does
    become READY (it is read after)."""
    plan, sources, base = _one_node(tmp_path)
    replica, ex = _rank0(plan, sources, base)
    try:
        k, n = 0, plan.stripes[0].length
        replica.set_state(k, StripeState.SENDING)
        ex._core.step(ex.machine.filled, k, n)
        assert replica.state(k) is StripeState.SENDING
        replica.set_state(k, StripeState.PUNCHED)
        ex._core.step(ex.machine.filled, k, n)
        assert replica.state(k) is StripeState.READY
    finally:
        ex.cancel()
