"""Run-time adaptation wired into the engine: what is measured, what the report says."""

from __future__ import annotations

import pytest

from engine import PrefetchOptions, resident_bytes, start_prefetch
from engine.cursor import RankBoard
from engine.pace import Pace
from engine.plan import resolve_files
from engine.procstat import cpu_times

MiB = 1 << 20


def test_the_node_rate_adds_up_every_local_rank(make_file):
    files, _ = resolve_files([make_file("p.bin", MiB)])
    boards = [RankBoard.open(files, r, 2) for r in range(2)]
    try:
        pace = Pace(4, 16 * MiB, 2, boards[0], streams=1)
        boards[1].publish_warmed(300 * MiB)
        assert pace._node_warmed(100 * MiB) == 400 * MiB
        boards[1].publish_warmed(350 * MiB)
        assert pace._node_warmed(120 * MiB) == 70 * MiB  # differences, not totals
    finally:
        for b in boards:
            b.finish()


def test_cpu_times_are_busy_and_total_ticks():
    t = cpu_times()
    assert t is not None and 0 <= t[0] <= t[1]


def test_auto_concurrency_adapts_and_the_report_says_where_it_ended(make_file):
    files = [make_file(f"a{i}", 24 * MiB, seed=i) for i in range(3)]
    report = start_prefetch(files, skip_cached=False).wait(60)
    assert report is not None and report.ok
    assert report.tuning.startswith("adaptive: ")
    assert report.concurrency >= 1 and report.read_bytes >= 4 * MiB
    assert report.warmed_bytes == 72 * MiB
    assert all(resident_bytes(f) == 24 * MiB for f in files)


@pytest.mark.parametrize(("concurrency", "chunk"), [(3, 8 * MiB), (1, "auto")])
def test_integers_pin_the_values(make_file, concurrency, chunk):
    files = [make_file(f"b{i}", 16 * MiB, seed=i) for i in range(2)]
    opts = PrefetchOptions(concurrency=concurrency, chunk_bytes=chunk, skip_cached=False)
    report = start_prefetch(files, options=opts).wait(60)
    assert report is not None and report.ok
    assert report.concurrency == concurrency
    assert not report.tuning.startswith("adaptive")
    assert report.read_bytes == 0
