"""The asyncio scheduler: bounded concurrency, accounting, failures, window, cancellation."""

from __future__ import annotations

import asyncio
import errno
import os
import threading

import pytest
from fakes import FakeBackend
from fds import fds_under

from engine import (
    ConsumerCursor,
    PrefetchOptions,
    Progress,
    evict,
    prefetch_async,
    resident_bytes,
)
from engine.schedule import Wait

MiB = 1 << 20


@pytest.mark.asyncio
async def test_at_most_concurrency_extents_in_flight(make_file):
    files = [make_file(f"f{i}", 3 * MiB + i) for i in range(4)]
    fake = FakeBackend(delay_s=0.01)
    report = await prefetch_async(
        files, backend=fake, concurrency=3, chunk_bytes=MiB, skip_cached=False
    )
    assert fake.max_active == 3
    assert report.ok and report.unfinished_bytes == 0
    assert report.planned_bytes == report.warmed_bytes == sum(os.path.getsize(f) for f in files)
    assert len(fake.calls) == len(set(fake.calls)), "each extent read once"
    assert sum(n for _, _, n in fake.calls) == report.planned_bytes
    assert report.backend == "fake"


@pytest.mark.asyncio
async def test_hot_files_are_skipped_not_read(make_file):
    path = make_file("hot", 8 * MiB)
    with open(path, "rb") as f:
        f.read()
    fake = FakeBackend()
    report = await prefetch_async([path], backend=fake, chunk_bytes=MiB)
    assert fake.calls == []
    assert report.cached_bytes == 8 * MiB and report.warmed_bytes == 0


@pytest.mark.asyncio
async def test_ranks_split_the_bytes(make_file):
    files = [make_file(f"f{i}", 5 * MiB) for i in range(3)]
    reports = [
        await prefetch_async(files, r, 4, backend=FakeBackend(), chunk_bytes=MiB, skip_cached=False)
        for r in range(4)
    ]
    assert sum(r.planned_bytes for r in reports) == 15 * MiB
    assert max(r.planned_bytes for r in reports) - min(r.planned_bytes for r in reports) <= MiB


@pytest.mark.asyncio
async def test_bad_files_are_recorded_and_the_rest_is_warmed(make_file, tmp_path):
    good = make_file("good", 2 * MiB)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    report = await asyncio.wait_for(
        prefetch_async([good, tmp_path / "missing", tmp_path, fifo, "/dev/zero"]), 30
    )
    assert report.warmed_bytes + report.cached_bytes == 2 * MiB
    assert resident_bytes(good) == 2 * MiB
    assert sorted(f.errno_name for f in report.failures) == [
        "EINVAL", "EINVAL", "EISDIR", "ENOENT",
    ]  # fmt: skip
    assert not report.ok


@pytest.mark.asyncio
async def test_read_errors_are_recorded_per_range_and_coalesced(make_file):
    path = make_file("bad", 6 * MiB)
    real = os.path.realpath(path)
    fake = FakeBackend(fail={(real, 2 * MiB), (real, 3 * MiB)})
    report = await prefetch_async(
        [path], backend=fake, chunk_bytes=MiB, concurrency=1, skip_cached=False
    )
    assert len(report.failures) == 1
    f = report.failures[0]
    assert (f.path, f.offset, f.length, f.errno) == (real, 2 * MiB, 2 * MiB, errno.EIO)
    assert report.warmed_bytes == 4 * MiB and report.failed_bytes == 2 * MiB


@pytest.mark.asyncio
async def test_progress_snapshots_are_frozen_and_end_complete(make_file):
    path = make_file("p", 4 * MiB)
    seen: list[Progress] = []
    await prefetch_async([path], chunk_bytes=MiB, progress=seen.append)
    assert seen, "at least the final snapshot"
    last = seen[-1]
    assert last.done_bytes == last.total_bytes == 4 * MiB
    assert last.fraction == 1.0
    with pytest.raises(AttributeError):
        last.done_bytes = 0  # type: ignore[misc]


@pytest.mark.asyncio
async def test_window_follows_the_consumer(make_file):
    files = [make_file(f"w{i}", 4 * MiB) for i in range(4)]  # 16 MiB in all
    fake = FakeBackend()
    cursor = ConsumerCursor()
    task = asyncio.create_task(
        prefetch_async(
            files,
            backend=fake,
            chunk_bytes=MiB,
            window_bytes=3 * MiB,
            consumer=cursor,
            skip_cached=False,
            concurrency=8,
        )
    )
    await asyncio.sleep(0.3)
    assert len(fake.calls) == 3, "no more than the window ahead of a consumer at 0"
    cursor.advance_to(files[1], 0)  # consumer at 4 MiB: window now ends at 7 MiB
    await asyncio.sleep(0.3)
    offsets = sorted((os.path.basename(p), o) for p, o, _ in fake.calls)
    assert len(fake.calls) == 6, offsets
    assert ("w0", 3 * MiB) not in offsets, "an extent the consumer has passed is skipped"
    cursor.finish()
    report = await asyncio.wait_for(task, 10)
    assert report.skipped_bytes == 16 * MiB - 6 * MiB
    assert report.warmed_bytes == 6 * MiB


@pytest.mark.asyncio
async def test_the_loaders_moves_wake_the_scheduler_only_while_the_window_waits(
    make_file, monkeypatch
):
    # Each tensor the loader took woke the scheduler (a pipe write, a decision), even
    # while it waited for reads that no move of the loader could hurry.
    import engine.scheduler as scheduler_mod

    decisions = []
    real = scheduler_mod.decide
    monkeypatch.setattr(scheduler_mod, "decide", lambda p, s: decisions.append(s) or real(p, s))
    files = [make_file(f"m{i}", 4 * MiB) for i in range(2)]
    block = threading.Event()
    fake = FakeBackend(block=block)
    cursor = ConsumerCursor()
    task = asyncio.create_task(
        prefetch_async(
            files, backend=fake, chunk_bytes=MiB, consumer=cursor, skip_cached=False,
            concurrency=2,
        )
    )  # fmt: skip
    await asyncio.to_thread(fake.started.wait, 10)
    await asyncio.sleep(0.1)
    before = len(decisions)
    for _ in range(200):  # the loader takes tensors of the extents being read
        cursor.advance(1024)
    await asyncio.sleep(0.2)
    assert len(decisions) == before, "the reads, not the loader, wake it now"
    cursor.finish()  # a finish always wakes it
    block.set()
    report = await asyncio.wait_for(task, 10)
    assert report.warmed_bytes + report.skipped_bytes == 8 * MiB
    # With a window holding the next extent, the loader's moves are what it waits for.
    window = [make_file(f"n{i}", 4 * MiB) for i in range(2)]
    cursor = ConsumerCursor()
    task = asyncio.create_task(
        prefetch_async(
            window, backend=FakeBackend(), chunk_bytes=MiB, window_bytes=2 * MiB,
            consumer=cursor, skip_cached=False, concurrency=8,
        )
    )  # fmt: skip
    for _ in range(8):
        await asyncio.sleep(0.05)
        cursor.advance(MiB)
    cursor.finish()
    report = await asyncio.wait_for(task, 10)
    assert report.warmed_bytes == 8 * MiB, "each move let one more extent in"


@pytest.mark.asyncio
async def test_a_move_while_the_scheduler_starts_listening_is_not_lost(make_file, monkeypatch):
    # The loader moved after the decision that the window holds, before the scheduler
    # listened to its moves: with no read in flight, nothing woke it until the next move.
    import engine.scheduler as scheduler_mod

    cursor = ConsumerCursor()
    moved = []
    real = scheduler_mod.decide

    def decide_then_move(plan, s):
        d = real(plan, s)
        if d.wait is Wait.CONSUMER and s.in_flight == 0 and not d.submit and not moved:
            moved.append(True)
            cursor.advance(2 * MiB)  # the loader takes the two warmed extents, unheard
        return d

    monkeypatch.setattr(scheduler_mod, "decide", decide_then_move)
    files = [make_file(f"r{i}", 4 * MiB) for i in range(2)]
    fake = FakeBackend()
    task = asyncio.create_task(
        prefetch_async(
            files, backend=fake, chunk_bytes=MiB, window_bytes=2 * MiB, consumer=cursor,
            skip_cached=False, concurrency=1,  # reads, not the window, bound it until then
        )
    )  # fmt: skip
    await asyncio.sleep(0.5)
    assert moved and len(fake.calls) == 4, "the window moved on without another move"
    cursor.finish()
    await asyncio.wait_for(task, 10)


@pytest.mark.asyncio
async def test_cancel_stops_submitting_and_keeps_a_partial_report(make_file):
    files = [make_file(f"c{i}", 4 * MiB) for i in range(2)]
    block = threading.Event()
    fake = FakeBackend(block=block)
    from engine.engine import Prefetcher

    p = Prefetcher(files, 0, 1, PrefetchOptions(backend=fake, concurrency=2, chunk_bytes=MiB))
    task = asyncio.create_task(p.run())
    for _ in range(500):
        if fake.active == 2:
            break
        await asyncio.sleep(0.01)
    assert fds_under(*files) >= 1  # the file being read is open
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    block.set()
    assert p.report is not None and p.report.cancelled
    r = p.report  # the two reads running at the cancel are said, not lost
    assert r.unfinished_bytes == 2 * MiB
    assert r.warmed_bytes + r.cached_bytes + r.skipped_bytes + r.failed_bytes == 0
    for _ in range(500):  # the two blocked reads finish on their threads and close the file
        if fake.active == 0 and fds_under(*files) == 0:
            break
        await asyncio.sleep(0.01)
    assert len(fake.calls) == 2  # nothing submitted after the first two
    assert fds_under(*files) == 0


@pytest.mark.asyncio
async def test_a_loader_that_finished_first_leaves_no_byte_unaccounted(make_file):
    # The loader ends, then the prefetch is cancelled at once (what the iterator does):
    # the extents never submitted lie behind the finished loader and count as skipped,
    # the reads still running as unfinished, so the counts add up to the plan.
    files = [make_file(f"f{i}", 4 * MiB) for i in range(2)]
    block = threading.Event()
    fake = FakeBackend(block=block)
    cursor = ConsumerCursor()
    from engine.engine import Prefetcher

    options = PrefetchOptions(backend=fake, concurrency=2, chunk_bytes=MiB, skip_cached=False)
    p = Prefetcher(files, 0, 1, options, cursor=cursor)
    task = asyncio.create_task(p.run())
    for _ in range(500):
        if fake.active == 2:
            break
        await asyncio.sleep(0.01)
    cursor.finish()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    block.set()
    r = p.report
    assert r is not None and r.cancelled
    assert r.unfinished_bytes == 2 * MiB and r.skipped_bytes == 6 * MiB, r
    assert r.warmed_bytes + r.cached_bytes + r.failed_bytes == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 10_000}, "concurrency"),
        ({"chunk_bytes": 100}, "chunk_bytes"),
        ({"backend": "nope"}, "valid backends"),
        ({"strategy": "nope"}, "valid strategies"),
        ({"window_bytes": -1}, "window_bytes"),
        ({"window_bytes": 0}, "window_bytes"),
        ({"order": "random"}, "valid orders"),
        ({"progress": 3}, "progress"),
    ],
)
@pytest.mark.asyncio
async def test_bad_options_raise_before_anything_runs(kwargs, match):
    before = threading.active_count()
    with pytest.raises(ValueError, match=match):
        await prefetch_async(["/etc/hostname"], **kwargs)
    assert threading.active_count() == before


@pytest.mark.asyncio
async def test_real_backend_end_to_end(make_file):
    path = make_file("e2e", 10 * MiB + 1)
    evict(path)
    report = await prefetch_async([path], chunk_bytes=MiB)
    assert report.ok and report.warmed_bytes + report.cached_bytes == 10 * MiB + 1
    assert resident_bytes(path) == 10 * MiB + 1
    assert report.to_dict()["failures"] == []


@pytest.mark.asyncio
async def test_an_internal_error_is_reported_never_raised(make_file, monkeypatch):
    import engine.prepare as prep

    def broken_plan(*args, **kwargs):
        raise RuntimeError("planner bug")

    monkeypatch.setattr(prep, "plan", broken_plan)
    report = await prefetch_async([make_file("x", MiB)])
    assert not report.ok
    assert report.failures[0].path == "<prefetch>"
    assert "RuntimeError: planner bug" in report.failures[0].message


@pytest.mark.parametrize("window", [8192, "auto"])
def test_a_window_without_a_consumer_is_refused_not_a_hang(make_file, window) -> None:
    """Nobody could advance a cursor prefetch_async made itself: it would wait forever."""
    path = make_file("w", 1 << 20)
    with pytest.raises(ValueError, match="needs a consumer"):
        asyncio.run(asyncio.wait_for(prefetch_async([path], window_bytes=window), 10))


@pytest.mark.parametrize(("failures", "failed"), [(1, False), (2, True)])
def test_a_transient_open_error_is_tried_once_more(
    make_file, monkeypatch: pytest.MonkeyPatch, failures: int, failed: bool
) -> None:
    """EMFILE for a moment (another library's fds) must not cost a whole file's prefetch."""
    import engine.engine as eng

    path = make_file("t", 2 << 20)
    real_open = os.open
    calls: list[str] = []

    def flaky(p, *args, **kw):
        if str(p) == str(path) and len(calls) < failures:
            calls.append("EMFILE")
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(p, *args, **kw)

    monkeypatch.setattr(eng.os, "open", flaky)
    report = asyncio.run(prefetch_async([path], skip_cached=False))
    monkeypatch.undo()
    assert [f.errno_name for f in report.failures] == (["EMFILE"] if failed else [])
    assert report.warmed_bytes == (0 if failed else 2 << 20)
