"""`engine.reader_process`: reads done in a child process warm the node's page cache."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from fds import fds_under
from file_support import write_random

from bench.netfs import Counters, mounted
from engine import resident_bytes, start_prefetch
from engine._reader_child import ASK_WINDOWS, FILES_PER_THREAD
from engine.cursor import pid_alive
from engine.reader_process import ReaderGone, ReaderProcess, ReadResult

MiB = 1 << 20


def _gone(pid: int, timeout: float = 15.0) -> bool:
    """Whether `pid` ends (or is a zombie awaiting its reaper) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_warms_an_evicted_file_for_this_process(make_file):
    path = make_file("a.bin", 12 * MiB + 123)
    r = ReaderProcess(threads=2)
    try:
        futures = [r.submit(path, off, 4 * MiB) for off in range(0, 13 * MiB, 4 * MiB)]
        results = [f.result(30) for f in futures]
    finally:
        r.close()
    assert sum(x.warmed_bytes for x in results) == 12 * MiB + 123
    assert resident_bytes(path) == 12 * MiB + 123
    assert fds_under(path) == 0  # the child opened the file, not this process


def test_each_reader_thread_opens_a_file_once_and_keeps_few_open(make_file, tmp_path):
    # On a network client every open and close is a round trip to the server.
    path = make_file("once.bin", 8 * MiB)
    others = [make_file(f"o{i}.bin", MiB) for i in range(FILES_PER_THREAD + 4)]
    r = ReaderProcess(threads=1)
    try:
        for off in range(0, 8 * MiB, MiB):
            assert r.submit(path, off, MiB).result(30).warmed_bytes == MiB
        assert fds_under(path, pid=r.pid) == 1
        for p in others:
            assert r.submit(p, 0, MiB).result(30).warmed_bytes == MiB
        assert fds_under(tmp_path, pid=r.pid) == FILES_PER_THREAD
    finally:
        r.close()


def test_one_read_at_a_time_stays_on_one_thread_and_one_descriptor(make_file):
    # The limit is the most streams the prefetch may adapt to (often 32 or more); a pool of
    # that size handed each read to a fresh thread, which opened the file again and lost
    # the kernel's read-ahead state.
    path = make_file("seq.bin", 8 * MiB)
    r = ReaderProcess(threads=32)
    try:
        for off in range(0, 8 * MiB, MiB):
            assert r.submit(path, off, MiB).result(30).warmed_bytes == MiB
        assert fds_under(path, pid=r.pid) == 1
        assert len(os.listdir(f"/proc/{r.pid}/task")) == 2  # the main thread and one reader
        with open(f"/proc/{r.pid}/comm", "rb") as f:  # named for top, ps and perf
            assert f.read().strip() == b"ckpt-reader"
    finally:
        r.close()


def test_a_blocked_read_does_not_hold_the_next_one(make_file, tmp_path):
    # Threads start as requests need them: while one read blocks (a FIFO nobody writes to),
    # another request gets a thread of its own, up to the limit.
    fifo = tmp_path / "blocked.fifo"
    os.mkfifo(fifo)
    path = make_file("free.bin", MiB)
    r = ReaderProcess(threads=4)
    try:
        blocked = r.submit(fifo, 0, MiB)
        assert r.submit(path, 0, MiB).result(30).warmed_bytes == MiB
        assert not blocked.done()
        with open(fifo, "wb"):  # the blocked open returns; a FIFO cannot be read at an offset
            pass
        with pytest.raises(OSError):
            blocked.result(30)
    finally:
        r.close()


def test_reads_stop_at_the_end_of_a_shrunk_file(make_file):
    path = make_file("s.bin", MiB)
    r = ReaderProcess(threads=1)
    try:
        # More than the file has (as if it were truncated after planning).
        assert r.submit(path, MiB - 4096, 64 << 10).result(30).warmed_bytes == 4096
        assert r.submit(path, 2 * MiB, 4096).result(30).warmed_bytes == 0
    finally:
        r.close()


def test_skip_cached_answers_without_reading(make_file):
    path = make_file("b.bin", 8 * MiB)
    path.read_bytes()
    r = ReaderProcess(threads=1)
    try:
        res = r.submit(path, 0, 8 * MiB, skip_cached=True).result(30)
    finally:
        r.close()
    assert (res.warmed_bytes, res.cached_bytes) == (0, 8 * MiB)


def test_a_missing_file_fails_with_its_errno(tmp_path):
    r = ReaderProcess(threads=1)
    try:
        with pytest.raises(OSError) as info:
            r.submit(tmp_path / "nope", 0, MiB).result(30)
    finally:
        r.close()
    assert info.value.errno == errno.ENOENT


def test_abandon_fails_pending_reads_and_the_child_exits(make_file):
    path = make_file("c.bin", MiB)
    r = ReaderProcess(threads=1)
    r.abandon()
    with pytest.raises(ReaderGone):
        r.submit(path, 0, MiB).result(5)
    assert _gone(r.pid)


def test_a_killed_child_fails_pending_reads(make_file):
    r = ReaderProcess(threads=1)
    os.kill(r.pid, signal.SIGKILL)
    assert _gone(r.pid)
    with pytest.raises(ReaderGone):
        r.submit(make_file("d.bin", MiB), 0, MiB).result(5)
    r.close()


def test_the_child_dies_with_its_parent(tmp_path):
    script = textwrap.dedent(
        """
        import os, sys
        from engine.reader_process import ReaderProcess
        r = ReaderProcess(threads=1)
        print(r.pid, flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
        cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    child = int(out.stdout.split()[0])
    assert _gone(child)


@pytest.mark.fuse
def test_a_stalled_server_holds_only_the_child(tmp_path):
    backing = tmp_path / "backing"
    backing.mkdir()
    write_random(backing / "model.safetensors", 8 * MiB)
    with mounted(backing, profile="local-fuse", mountpoint=tmp_path / "mnt") as fs:
        fs.evict()
        fs.stall(30)
        script = textwrap.dedent(
            f"""
            import time
            from engine.reader_process import ReaderProcess
            r = ReaderProcess(threads=1)
            fut = r.submit({str(fs.path / "model.safetensors")!r}, 0, 8 << 20)
            time.sleep(1.0)
            print(r.pid, int(fut.done()), time.time(), flush=True)
            r.abandon()
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
            cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()},
        )  # fmt: skip
        exited = time.time()
        assert proc.returncode == 0, proc.stderr
        child, done, work_done = proc.stdout.split()
        assert done == "0", "the read should still be blocked in the server"
        assert exited - float(work_done) < 2.0
        assert fs.counters().stalled > 0
        fs.unstall()
        assert _gone(int(child))  # it ends by itself once the server answers


@pytest.mark.fuse
def test_auto_reads_a_network_mount_from_a_reader_process(tmp_path):
    backing = tmp_path / "backing"
    backing.mkdir()
    for i in range(2):
        write_random(backing / f"model-{i}.safetensors", 6 * MiB, seed=i)
    with mounted(backing, profile="local-fuse", mountpoint=tmp_path / "mnt") as fs:
        fs.evict()
        fs.reset_counters()
        files = sorted(str(p) for p in fs.path.iterdir())
        report = start_prefetch(files, skip_cached=False).wait(60)
        assert report is not None and report.ok, report
        assert report.backend == "process"
        assert report.warmed_bytes == 12 * MiB
        assert fs.counters().bytes_served == 12 * MiB
        assert all(resident_bytes(f) == 6 * MiB for f in files)


def test_a_reader_that_cannot_start_falls_back_to_reading_here(make_file, monkeypatch):
    import engine.reader_process as rp

    def refuse(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")  # a pids limit

    monkeypatch.setattr(rp.subprocess, "Popen", refuse)
    path = make_file("f.bin", 3 * MiB)
    report = start_prefetch([path], backend="process", skip_cached=False).wait(30)
    assert report is not None and report.ok, report
    assert report.backend == "sendfile" and report.warmed_bytes == 3 * MiB


def _one_read_on_a_slow_mount(
    tmp_path, size: int, offset: int, length: int, **profile: object
) -> tuple[ReadResult, Counters]:
    """One read of a cold file by a one-thread reader, on a many-streams mount with
    `profile`'s overrides: its result and the server's counters."""
    backing = tmp_path / "backing"
    backing.mkdir()
    write_random(backing / "a.bin", size, seed=3)
    with mounted(backing, profile="many-streams", mountpoint=tmp_path / "mnt", **profile) as fs:
        fs.evict()
        fs.reset_counters()
        r = ReaderProcess(threads=1)
        try:
            result = r.submit(fs.path / "a.bin", offset, length).result(60)
        finally:
            r.close()
        return result, fs.counters()


@pytest.mark.fuse
def test_a_read_keeps_many_windows_in_flight_but_no_more_than_its_depth(tmp_path):
    # A stream of plain reads keeps one read-ahead window or two in flight: on a link with
    # a long round trip it is slow however wide the link. The reader asks ahead of its
    # sendfile, up to ASK_WINDOWS windows (deeper only queues where bandwidth is the
    # limit), and reads no byte past the range. (1 MiB read-ahead windows and requests.)
    result, counters = _one_read_on_a_slow_mount(
        tmp_path, 48 * MiB, 4 * MiB, 32 * MiB, latency_s=0.05
    )
    assert result.warmed_bytes == 32 * MiB
    assert counters.bytes_served == 32 * MiB  # nothing read past the range
    assert 6 <= counters.max_inflight <= ASK_WINDOWS + 2, counters


@pytest.mark.fuse
def test_with_read_ahead_nearly_off_nothing_is_asked(tmp_path):
    # With a read-ahead under MIN_ASK_BYTES the kernel reads almost nothing per WILLNEED
    # call: asking is skipped (a call per 16 KiB would cost more CPU than it saves), and
    # the read is plain sendfile.
    result, counters = _one_read_on_a_slow_mount(
        tmp_path, 2 * MiB, 0, 1 * MiB, latency_s=0.005, read_ahead_kb=16
    )
    assert result.warmed_bytes == 1 * MiB
    assert counters.max_inflight <= 3, counters  # plain read-ahead, not 16 asked windows
