"""Progress lines during a load: the pure line, the thread's timing, and a real load."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from serving_support import make_tiny_llama

from engine import Progress
from loader_adapter.discovery import LocalRank
from loader_adapter.integrations._common import load_with_prefetch
from loader_adapter.progress_log import ProgressLog, interval_from_env, progress_line

GiB = 1 << 30


def test_line_gives_share_percentage_rate_eta_and_cached() -> None:
    before = Progress(done_bytes=1 * GiB, total_bytes=8 * GiB, warmed_bytes=1 * GiB,
                      elapsed_s=10.0)  # fmt: skip
    now = Progress(done_bytes=4 * GiB, total_bytes=8 * GiB, warmed_bytes=3 * GiB,
                   cached_bytes=1 * GiB, elapsed_s=20.0)  # fmt: skip
    line = progress_line(before, now, 10.0, "local rank 0 of 8")
    assert line.startswith("ckpt-prefetch: local rank 0 of 8: 4.00 GiB of 8.00 GiB warmed (50%)")
    assert f"{2 * GiB / 10 / 1e9:.2f} GB/s over the last 10 s" in line  # this interval only
    assert "ETA 20 s" in line  # 4 GiB left at 2 GiB per 10 s
    assert "1.00 GiB found already cached" in line


def test_line_without_progress_has_no_eta_and_names_failures() -> None:
    now = Progress(done_bytes=GiB, total_bytes=4 * GiB, warmed_bytes=GiB, failed_bytes=GiB,
                   elapsed_s=20.0)  # fmt: skip
    line = progress_line(now, now, 10.0, "x")
    assert "0.00 GB/s" in line and "ETA unknown" in line
    assert "1.00 GiB could not be read" in line
    long = progress_line(None, Progress(done_bytes=1, total_bytes=1 << 40, warmed_bytes=1 << 30,
                                        elapsed_s=10.0), 10.0, "x")  # fmt: skip
    assert "min" in long.split("ETA ")[1]


@pytest.mark.parametrize("raw", ["-1", "soon", "nan"])
def test_bad_interval_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="CKPT_PREFETCH_PROGRESS_S"):
        interval_from_env({"CKPT_PREFETCH_PROGRESS_S": raw})
    assert interval_from_env({"CKPT_PREFETCH_PROGRESS_S": "0"}) == 0


def _counting_snapshot(total: int) -> tuple[list[int], object]:
    calls: list[int] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def snapshot() -> Progress:
        with lock:
            calls.append(1)
            done = min(total, len(calls) * total // 4)
        return Progress(done_bytes=done, total_bytes=total, warmed_bytes=done,
                        elapsed_s=time.monotonic() - t0)  # fmt: skip

    return calls, snapshot


def test_thread_logs_each_interval_until_done_then_stops(caplog: pytest.LogCaptureFixture) -> None:
    calls, snapshot = _counting_snapshot(4 * GiB)
    with (
        caplog.at_level(logging.INFO, logger="loader_adapter.progress_log"),
        ProgressLog(snapshot, label="local rank 0 of 2", interval_s=0.05) as progress,
    ):
        time.sleep(0.6)
    lines = [r.getMessage() for r in caplog.records]
    # 25%, 50%, 75%, 100%: then nothing more although the load went on
    assert [line.split("(")[1].split(")")[0] for line in lines] == ["25%", "50%", "75%", "100%"]
    assert progress.lines == 4
    assert len(calls) > 4  # it kept looking, and said nothing


def test_no_line_for_a_load_shorter_than_the_interval(caplog: pytest.LogCaptureFixture) -> None:
    _, snapshot = _counting_snapshot(GiB)
    with caplog.at_level(logging.INFO, logger="loader_adapter.progress_log"):
        with ProgressLog(snapshot, label="x", interval_s=5.0):
            time.sleep(0.1)
        with ProgressLog(snapshot, label="x", interval_s=0.01, enabled=False):
            time.sleep(0.1)  # not local rank 0
    assert caplog.records == []


def test_a_plugin_load_logs_progress_then_the_end_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The plug-ins' load path (vLLM's and SGLang's): progress lines while the loader is
    # slow, then the end line with the mean rate and what was read from storage.
    files = make_tiny_llama(tmp_path)
    monkeypatch.setenv("CKPT_PREFETCH_PROGRESS_S", "0.05")
    with caplog.at_level(logging.INFO, logger="loader_adapter"):
        pairs = load_with_prefetch(
            [str(f) for f in files], {"concurrency": 1}, lambda: LocalRank(0, 1, "test"),
            engine="test",
        )  # fmt: skip
        for _ in pairs:
            time.sleep(0.02)  # a consumer slower than the interval
    lines = [r.getMessage() for r in caplog.records]
    progress = [m for m in lines if m.startswith("ckpt-prefetch: local rank 0 of 1: ")]
    assert progress and all("warmed (" in m and "GB/s over the last" in m for m in progress)
    assert "concurrency=1" in lines[0]
    end = lines[-1]
    assert "planned=" in end and "GB/s mean" in end and "read from storage" in end
