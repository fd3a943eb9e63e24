"""A prefetch never breaks, hangs or leaks: files changing underneath, hostile paths,
many cycles, many files, two jobs at once, random failures."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from fakes import FakeBackend
from fds import fds_under
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import prefetch_async, resident_bytes, start_prefetch
from engine.backends import Backend, SendfileBackend

MiB = 1 << 20


class _Hook(Backend):
    """Runs `hook` before the first read of `trigger` (path suffix), then reads for real."""

    name = "hook"

    def __init__(self, trigger: str, hook) -> None:
        self.inner = SendfileBackend()
        self.trigger, self.hook, self.fired = trigger, hook, False

    def read_into_cache(self, fd, offset, length):
        if not self.fired and os.readlink(f"/proc/self/fd/{fd}").endswith(self.trigger):
            self.fired = True
            self.hook()
        return self.inner.read_into_cache(fd, offset, length)


def _run_with_hook(files, trigger, hook):
    backend = _Hook(trigger, hook)
    report = asyncio.run(
        prefetch_async(files, backend=backend, concurrency=1, chunk_bytes=MiB, skip_cached=False)
    )
    assert backend.fired
    return report


def test_file_truncated_after_planning(make_file):
    a, b = make_file("a", 2 * MiB), make_file("b", 4 * MiB)
    report = _run_with_hook([a, b], "/a", lambda: os.truncate(b, MiB + 100))
    [failure] = report.failures
    assert failure.path.endswith("/b") and failure.errno is None
    assert (failure.offset, failure.offset + failure.length) == (MiB + 100, 4 * MiB)
    assert "ended early" in failure.message
    assert any("size changed" in n for n in report.notes)
    assert report.warmed_bytes == 2 * MiB + MiB + 100


def test_file_grown_after_planning(make_file):
    a, b = make_file("a", 2 * MiB), make_file("b", 2 * MiB)

    def grow():
        with open(b, "ab") as f:
            f.write(b"x" * MiB)

    report = _run_with_hook([a, b], "/a", grow)
    assert report.failures == ()
    assert report.warmed_bytes == 4 * MiB  # the planned range, no more
    assert any("size changed from 2097152 to 3145728" in n for n in report.notes)


def test_file_deleted_after_planning(make_file):
    a, b = make_file("a", 2 * MiB), make_file("b", 2 * MiB)
    report = _run_with_hook([a, b], "/a", lambda: os.remove(b))
    assert [(f.path.endswith("/b"), f.errno_name) for f in report.failures] == [(True, "ENOENT")]
    assert report.warmed_bytes == 2 * MiB


def test_file_replaced_by_a_new_inode_after_planning(make_file, tmp_path):
    a, b = make_file("a", 2 * MiB), make_file("b", 2 * MiB)
    new = make_file("new", 2 * MiB, seed=9)
    report = _run_with_hook([a, b], "/a", lambda: os.replace(new, b))
    [failure] = report.failures
    assert failure.errno_name == "ESTALE" and "replaced" in failure.message


def test_hostile_paths_are_recorded_or_deduplicated(make_file, tmp_path):
    good = make_file("with space ü.bin", MiB)
    weird = os.fsencode(tmp_path) + b"/bad-\xff\xfe-name.bin"
    with open(weird, "wb") as f:
        f.write(b"z" * MiB)
    link1, link2 = tmp_path / "l1", tmp_path / "l2"
    link1.symlink_to(good)
    link2.symlink_to(good)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    paths = [good, good, link1, link2, weird, loop, fifo, "/dev/zero", tmp_path / "nope", tmp_path]
    t0 = time.monotonic()
    report = start_prefetch(paths).wait(30)
    assert report is not None and time.monotonic() - t0 < 30
    assert report.files == 2  # good (listed 3 times and twice via symlinks) + the non-UTF-8 one
    assert report.warmed_bytes + report.cached_bytes == 2 * MiB
    assert sorted(f.errno_name for f in report.failures) == [
        "EINVAL", "EINVAL", "EISDIR", "ELOOP", "ENOENT",
    ]  # fmt: skip
    assert resident_bytes(good) == MiB


def test_unreadable_file_as_non_root_user(tmp_path):
    """Permission denied is recorded (run as 'nobody': root ignores file modes)."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * MiB)
    os.chmod(secret, 0o000)
    os.chmod(tmp_path, 0o755)
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {os.getcwd()!r})\n"
        "from engine import start_prefetch\n"  # import first: nobody cannot read /root
        "import uvloop, asyncio.base_events\n"
        "os.setgid(65534); os.setuid(65534)\n"
        f"r = start_prefetch([{str(secret)!r}], skip_cached=False).wait(20)\n"
        "print([f.errno_name for f in r.failures])\n"
    )
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['EACCES']"


def test_thousand_start_cancel_cycles_leak_nothing(make_file):
    files = [make_file(f"c{i}", 2 * MiB) for i in range(3)]
    proc = psutil.Process()

    def snapshot():
        gc.collect()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            names = [t.name for t in threading.enumerate() if t.name.startswith("ckpt-prefetch")]
            if not names:
                break
            time.sleep(0.01)
        return len(os.listdir("/proc/self/fd")), len(names), proc.memory_info().rss

    for _ in range(50):  # let allocator pools settle before the baseline
        start_prefetch(files, backend=FakeBackend(), skip_cached=False).cancel()
    fds0, threads0, rss0 = snapshot()
    cancelled = 0
    for _ in range(1000):
        # Each read takes 2 ms, so the cancel lands while reads are in flight.
        fake = FakeBackend(delay_s=0.002)
        h = start_prefetch(files, backend=fake, skip_cached=False, chunk_bytes=MiB)
        fake.started.wait(5)
        report = h.cancel()
        cancelled += bool(report and report.cancelled)
    assert cancelled >= 900, f"only {cancelled} of 1000 cancels hit a running prefetch"
    fds1, threads1, rss1 = snapshot()
    assert fds1 == fds0
    assert threads1 == threads0 == 0
    assert rss1 - rss0 < 32 * MiB, f"RSS grew {(rss1 - rss0) / MiB:.1f} MiB"


def test_ten_thousand_small_files_with_bounded_descriptors(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(10_000):
        (d / f"t{i:05d}").write_bytes(b"w" * 4096)
    peak, samples = [0], [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], fds_under(d))
            samples[0] += 1
            time.sleep(0.001)

    w = threading.Thread(target=watch)
    w.start()
    try:
        report = start_prefetch(sorted(d.iterdir()), concurrency=8, skip_cached=False).wait(120)
    finally:
        stop.set()
        w.join()
    assert report is not None and report.ok and report.files == 10_000
    assert report.warmed_bytes == 10_000 * 4096
    assert samples[0] > 0
    assert peak[0] <= 8, f"{peak[0]} checkpoint files open at once (concurrency 8)"


def test_two_jobs_with_different_world_sizes_at_once(make_file):
    files = [make_file(f"j{i}", 6 * MiB, seed=i) for i in range(4)]
    total = 24 * MiB
    code = (
        "import sys, json\n"
        f"sys.path.insert(0, {os.getcwd()!r})\n"
        "from engine import start_prefetch\n"
        "rank, world, *files = sys.argv[1:]\n"
        "r = start_prefetch(files, int(rank), int(world), chunk_bytes=1 << 20).wait(60)\n"
        "print(json.dumps([r.ok, r.planned_bytes, r.warmed_bytes + r.cached_bytes]))\n"
    )
    jobs = [(r, 2) for r in range(2)] + [(r, 3) for r in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(r), str(w), *map(str, files)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r, w in jobs
    ]
    import json

    out = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(ok and planned == done for ok, planned, done in out)
    assert sum(o[1] for o in out[:2]) == total and sum(o[1] for o in out[2:]) == total
    assert all(resident_bytes(f) == 6 * MiB for f in files)


class _Flaky(Backend):
    name = "flaky"

    def __init__(self, bad: set[tuple[str, int]]) -> None:
        self.bad = bad
        self.lock = threading.Lock()
        self.reads: list[tuple[str, int, int]] = []

    def read_into_cache(self, fd, offset, length):
        path = os.readlink(f"/proc/self/fd/{fd}")
        with self.lock:
            self.reads.append((path, offset, length))
        if (os.path.basename(path), offset) in self.bad:
            raise OSError(5, "injected")
        return min(length, os.fstat(fd).st_size - offset)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 300_000), min_size=1, max_size=6),
    world=st.integers(1, 4),
    chunk=st.sampled_from([4096, 16384, 65536]),
    concurrency=st.integers(1, 6),
    data=st.data(),
)
def test_random_plans_and_failures_read_each_byte_once_and_report_every_failure(
    tmp_path_factory, sizes, world, chunk, concurrency, data
):
    d: Path = tmp_path_factory.mktemp("prop")
    files = []
    for i, s in enumerate(sizes):
        p = d / f"f{i}"
        p.write_bytes(b"\0" * s)
        files.append(p)
    all_reads: list[tuple[str, int, int]] = []
    failed: set[tuple[str, int]] = set()
    reported: set[tuple[str, int]] = set()
    for rank in range(world):
        # pick random extents of this rank to fail
        from engine import plan, resolve_files

        resolved, _ = resolve_files(files)
        mine = plan(resolved, rank, world, chunk_bytes=chunk)
        bad = {
            (os.path.basename(e.path), e.offset)
            for e in mine
            if data.draw(st.booleans(), label="fail")
        } if mine else set()  # fmt: skip
        backend = _Flaky(bad)
        report = asyncio.run(
            prefetch_async(files, rank, world, backend=backend, chunk_bytes=chunk,
                           concurrency=concurrency, skip_cached=False)
        )  # fmt: skip
        all_reads += backend.reads
        failed |= bad
        for f in report.failures:  # coalesced ranges: expand back into extents
            for e in mine:
                if e.path == f.path and f.offset <= e.offset < f.offset + f.length:
                    reported.add((os.path.basename(e.path), e.offset))
        assert report.failed_bytes == sum(
            e.length for e in mine if (os.path.basename(e.path), e.offset) in bad
        )
    # every byte read exactly once per node (reads never overlap, and cover every file)
    by_file: dict[str, list[tuple[int, int]]] = {}
    for path, off, n in all_reads:
        by_file.setdefault(os.path.basename(path), []).append((off, off + n))
    for p, size in zip(files, sizes, strict=True):
        pos = 0
        for lo, hi in sorted(by_file.get(p.name, [])):
            assert lo == pos
            pos = hi
        assert pos == size
    assert reported == failed
