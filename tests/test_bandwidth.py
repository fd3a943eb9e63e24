"""The simulated storage's bandwidth limit (bench/bandwidth.py): its arithmetic with the
time passed in, and its shared home, a file that several processes draw from.

No wall-clock assertion: a reservation says when a request is delivered, so what the link
grants over a period is checked on those times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.bandwidth import LinkState, LocalLink, SharedBandwidth, SharedLink

REPO = Path(__file__).resolve().parents[1]


def _check_never_above_rate(grants: list[tuple[float, int]], bps: float) -> tuple[float, float]:
    """`grants`: (delivery time, bytes). Reservations must not overlap, and the bytes
    delivered by any delivery time t must be at most ``bps × (t − t0)``.

    Returns:
        (t0, the last delivery time).
    """
    grants = sorted(grants, key=lambda g: (g[0], g[0] - g[1] / bps))  # by end, then start
    t0 = min(when - nbytes / bps for when, nbytes in grants)
    delivered, end = 0, t0
    for when, nbytes in grants:
        slack = 1e-9 * max(1.0, abs(when))  # float rounding of times summed up
        assert when - nbytes / bps >= end - slack, "two reservations overlap"
        delivered += nbytes
        assert delivered / bps <= when - t0 + slack
        end = when
    return t0, end


@given(
    st.lists(st.tuples(st.floats(0.0, 5.0), st.integers(0, 4 << 20)), min_size=1, max_size=60),
    st.floats(1e3, 1e10),
)
def test_granted_bytes_never_exceed_the_rate(requests: list[tuple[float, int]], bps: float) -> None:
    # Requests ready at times of their own, reserved in order of arrival.
    state = LinkState(bps=bps)
    grants = []
    for ready, nbytes in sorted(requests):
        state, when = state.reserve(nbytes, ready)
        assert when >= ready + nbytes / bps - 1e-9  # never before its own transfer time
        grants.append((when, nbytes))
    _check_never_above_rate(grants, bps)
    assert state.granted_bytes == sum(n for _, n in requests)
    assert state.requests == len(requests)


def test_a_saturated_link_delivers_exactly_the_rate() -> None:
    state = LinkState(bps=1e6)
    for _ in range(10):  # all ready at once: queued back to back
        state, when = state.reserve(100_000, ready=50.0)
    assert when == pytest.approx(50.0 + 1.0)
    assert state.granted_bytes == 1_000_000
    state, when = state.reserve(0, ready=49.0)  # an error reply still waits its turn
    assert when == pytest.approx(51.0)
    state, when = state.reserve(1000, ready=60.0)  # an idle link saves nothing up
    assert when == pytest.approx(60.001)


def test_no_limit_delivers_when_ready_and_still_counts() -> None:
    link = LocalLink(None)
    assert link.reserve(1 << 30, ready=3.0) == 3.0
    link.set_bps(2e6)
    assert link.reserve(1_000_000, ready=3.0) == pytest.approx(3.5)
    link.set_bps(0)  # 0 means no limit, as SetBandwidth says
    assert link.bps is None and link.reserve(1_000_000, ready=3.0) == 3.0
    assert link.snapshot().granted_bytes == (1 << 30) + 2_000_000
    with pytest.raises(ValueError, match="bandwidth"):
        link.set_bps(-1.0)


def test_links_on_one_file_share_rate_and_reservations(tmp_path: Path) -> None:
    with SharedBandwidth(1e6, directory=tmp_path) as owner:
        assert Path(owner.path).parent == tmp_path
        other = SharedLink(owner.path)
        try:
            assert other.bps == 1e6
            assert owner.reserve(500_000, ready=10.0) == pytest.approx(10.5)
            assert other.reserve(500_000, ready=10.0) == pytest.approx(11.0)  # queued behind
            other.set_bps(2e6)
            assert owner.bps == 2e6
            assert owner.snapshot() == other.snapshot()
            assert owner.snapshot().granted_bytes == 1_000_000
        finally:
            other.close()
    assert not Path(owner.path).exists()
    with pytest.raises(ValueError, match="closed"):
        owner.reserve(1, ready=0.0)


def test_only_a_bandwidth_file_is_taken(tmp_path: Path) -> None:
    for content in (b"", b"x" * 64):
        path = tmp_path / f"f{len(content)}"
        path.write_bytes(content)
        with pytest.raises(ValueError, match="not a shared bandwidth file"):
            SharedLink(path)
    with pytest.raises(ValueError, match="bandwidth"):
        SharedBandwidth(-5.0, directory=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0", "f64"]  # nothing left


_DRAW = """
import json, sys, threading, time
from bench.bandwidth import SharedLink
link, grants = SharedLink(sys.argv[1]), []
def draw():
    for _ in range(int(sys.argv[2])):
        grants.append((link.reserve(65536, time.monotonic()), 65536))
sys.stdin.readline()  # start together
threads = [threading.Thread(target=draw) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(grants))
"""


def test_two_processes_together_get_the_rate_of_one_link(tmp_path: Path) -> None:
    # Two processes of two threads each ask for 64 KiB at a time from a 1 kB/s link: far
    # faster than it drains, so it stays busy from the first reservation to the last, and
    # the four together get exactly its rate (with a limit each: four times it).
    bps, per_thread = 1e3, 300
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with SharedBandwidth(bps, directory=tmp_path) as link:
        command = [sys.executable, "-c", _DRAW, link.path, str(per_thread)]
        procs = [
            subprocess.Popen(command, cwd=REPO, env=env, stdin=PIPE, stdout=PIPE, text=True)
            for _ in range(2)
        ]
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
        state = link.snapshot()
    grants = [tuple(g) for out in outputs for g in json.loads(out)]
    assert len(grants) == state.requests == 2 * 2 * per_thread
    total = sum(n for _, n in grants)
    assert state.granted_bytes == total
    t0, last = _check_never_above_rate(grants, bps)  # type: ignore[arg-type]
    assert last == pytest.approx(state.tat)
    assert total / (last - t0) == pytest.approx(bps, rel=1e-6)
