"""What a prefetch settles before its first read: resolved once, kept, logged once."""

from __future__ import annotations

import asyncio
import logging

import pytest

from engine import ConsumerCursor
from engine.engine import Prefetcher
from engine.options import PrefetchOptions
from engine.settle import AUTO, Choice, Settled, is_auto, settle_trail, settle_tuning
from engine.tuning import Tuning

FS = Tuning(64 << 20, 2, "auto: fs", network=True)


def test_given_options_are_kept_and_need_no_filesystem():
    t = settle_tuning(8 << 20, 3, None)
    assert (t.chunk_bytes, t.concurrency, t.max_concurrency) == (8 << 20, 3, None)
    assert t.reason == "given"


def test_auto_options_come_from_the_filesystem_and_adapt_up_to_the_bound():
    t = settle_tuning(AUTO, AUTO, FS, bound=(24, "fds"))
    assert (t.chunk_bytes, t.concurrency, t.max_concurrency) == (64 << 20, 2, 24)
    assert t.reason.startswith("auto: fs") and "1..24, fds" in t.reason and t.network
    half = settle_tuning(1 << 20, AUTO, FS, bound=(1, "small"))
    assert (half.chunk_bytes, half.max_concurrency) == (1 << 20, 2)  # never below the start
    fixed = settle_tuning(AUTO, 5, FS)
    assert (fixed.chunk_bytes, fixed.concurrency, fixed.max_concurrency) == (64 << 20, 5, None)


def test_an_auto_option_without_the_filesystem_is_a_bug_not_a_guess():
    with pytest.raises(ValueError, match="filesystem"):
        settle_tuning(AUTO, 4, None)


def test_the_trail_goes_with_a_window_and_a_consumer():
    trail = settle_trail(64 << 20, 16 << 20, has_consumer=True)
    assert trail.value == 16 << 20 and "behind the slowest consumer" in trail.reason
    assert settle_trail(64 << 20, 16 << 20, has_consumer=False).value is None
    assert settle_trail(None, 0, has_consumer=True).value is None
    assert is_auto("auto") and not is_auto("AUTO ") and not is_auto(0)


def test_settled_dataclass_is_frozen():
    s = Settled(Choice("pread", "given"), FS, Choice(None, "x"), Choice(None, "y"))
    with pytest.raises(AttributeError):
        s.window = Choice(1, "z")  # type: ignore[misc]


def test_the_prefetcher_settles_once_and_logs_it_in_one_line(make_file, caplog):
    path = make_file("s", 3 << 20)
    cursor = ConsumerCursor()
    opts = PrefetchOptions(window_bytes=AUTO, skip_cached=False)
    p = Prefetcher([path], 0, 1, opts, cursor=cursor)
    assert p.settled is None

    async def run():
        task = asyncio.create_task(p.run())
        await asyncio.sleep(0.2)
        cursor.finish()
        return await task

    with caplog.at_level(logging.INFO, logger="engine"):
        report = asyncio.run(run())
    s = p.settled
    assert s is not None and report.failures == ()
    assert s.tuning.max_concurrency is not None  # concurrency="auto": adapted at run time
    assert s.window.value is None and "fits" in s.window.reason  # 3 MiB fits in memory
    assert s.trail == Choice(None, "no window: nothing is dropped")
    assert s.backend.value == p.backend.name and s.backend.reason
    lines = [r.getMessage() for r in caplog.records if "backend=" in r.getMessage()]
    assert len(lines) == 1 and s.line() in lines[0]
    assert s.window.reason in lines[0] and s.tuning.reason in lines[0]
