"""The sync adapter: a loop on a daemon thread that can be waited on and cancelled."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from fakes import FakeBackend

from engine import resident_bytes, start_prefetch

MiB = 1 << 20


def _engine_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("ckpt-prefetch")]


def test_wait_returns_the_report(make_file):
    path = make_file("a", 6 * MiB)
    with start_prefetch([path], chunk_bytes=MiB) as h:
        report = h.wait(30)
        assert h.done
    assert report is not None and report.ok
    assert report.warmed_bytes + report.cached_bytes == 6 * MiB
    assert resident_bytes(path) == 6 * MiB
    assert h.progress().done_bytes == 6 * MiB


def test_cancel_returns_within_a_second_while_reads_block(make_file):
    files = [make_file(f"b{i}", 4 * MiB) for i in range(2)]
    block = threading.Event()
    fake = FakeBackend(block=block)
    h = start_prefetch(files, backend=fake, chunk_bytes=MiB, concurrency=2)
    assert fake.started.wait(10)
    t0 = time.monotonic()
    report = h.cancel()
    assert time.monotonic() - t0 < 1.0
    assert report is not None and report.cancelled
    assert h.done
    assert len(fake.calls) <= 2
    block.set()


def test_wait_times_out_with_none(make_file):
    path = make_file("c", MiB)
    block = threading.Event()
    with start_prefetch([path], backend=FakeBackend(block=block), skip_cached=False) as h:
        assert h.wait(0.05) is None
        assert not h.done and h.report is None
        block.set()
        assert h.wait(10) is not None


def test_context_manager_leaves_no_thread_or_fd(make_file):
    files = [make_file(f"d{i}", 2 * MiB) for i in range(3)]
    fds = len(os.listdir("/proc/self/fd"))
    threads = len(_engine_threads())
    for _ in range(20):
        with start_prefetch(files, chunk_bytes=MiB, concurrency=4) as h:
            pass
        assert h.done
    deadline = time.monotonic() + 5
    while len(_engine_threads()) > threads and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_engine_threads()) == threads
    # Another test's leftovers may close descriptors meanwhile, never open ours.
    assert len(os.listdir("/proc/self/fd")) <= fds


def test_background_errors_do_not_leak_into_the_caller(make_file):
    path = make_file("e", 2 * MiB)

    class Broken(FakeBackend):
        def read_into_cache(self, fd, offset, length):
            raise RuntimeError("bug in a backend")

    h = start_prefetch([path], backend=Broken(), skip_cached=False, chunk_bytes=MiB)
    report = h.wait(10)
    assert report is not None
    assert report.failed_bytes == 2 * MiB
    assert "RuntimeError: bug in a backend" in report.failures[0].message


def test_progress_callback_errors_are_contained(make_file, caplog):
    path = make_file("f", 2 * MiB)

    def bad(_):
        raise ZeroDivisionError

    report = start_prefetch([path], progress=bad).wait(10)
    assert report is not None and report.ok
    assert any("progress callback failed" in r.message for r in caplog.records)


def test_bad_options_raise_in_the_callers_thread():
    with pytest.raises(ValueError, match="rank"):
        start_prefetch(["/etc/hostname"], 2, 2)


def test_interpreter_exit_is_not_blocked_by_a_stuck_read(tmp_path):
    """A worker stuck in a read must not hold up exit (daemon threads, not an executor)."""
    path = tmp_path / "x"
    path.write_bytes(b"0" * (4 * MiB))
    script = textwrap.dedent(
        f"""
        import threading, sys
        sys.path.insert(0, {os.getcwd()!r})
        from engine import start_prefetch
        from tests.fakes import FakeBackend
        fake = FakeBackend(block=threading.Event())  # never set: reads hang forever
        h = start_prefetch([{str(path)!r}], backend=fake, skip_cached=False)
        assert fake.started.wait(10)
        print("blocked", flush=True)
        """
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "blocked" in out.stdout
    assert time.monotonic() - t0 < 20  # generous: a hang would hit the 30 s timeout


def test_a_thread_limit_leaves_fewer_workers_not_a_failed_prefetch(
    make_file, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pids cgroup limit may refuse the 2nd thread: the first one does all the reads."""
    import threading

    import engine.pool

    real_start = threading.Thread.start
    started: list[str] = []

    class Limited(threading.Thread):
        def start(self) -> None:
            if self.name.startswith("ckpt-prefetch-io") and started:
                raise RuntimeError("can't start new thread")
            if self.name.startswith("ckpt-prefetch-io"):
                started.append(self.name)
            real_start(self)

    monkeypatch.setattr(engine.pool.threading, "Thread", Limited)
    files = [make_file(f"t{i}", 2 << 20) for i in range(3)]
    handle = start_prefetch(files, concurrency=4, chunk_bytes=1 << 20, skip_cached=False)
    report = handle.wait(30)
    assert report is not None and report.failures == ()
    assert report.warmed_bytes == 6 << 20 and len(started) == 1
    handle.cancel()  # joins only threads that started
