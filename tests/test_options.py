"""`PrefetchOptions`: one definition of the options every entry point takes."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

from engine import InvalidOptionError, PrefetchOptions, prefetch_async, start_prefetch
from engine.options import OPTION_NAMES, check_option_names
from engine.plan import Order, Strategy
from loader_adapter import safetensors_weights_iterator
from tests.fakes import FakeBackend

MiB = 1 << 20


def test_defaults_are_the_safe_ones() -> None:
    o = PrefetchOptions()
    assert (o.strategy, o.backend, o.concurrency, o.chunk_bytes) == (
        Strategy.BALANCED,
        "auto",
        "auto",
        "auto",
    )
    assert o.skip_cached is True and o.window_bytes is None and o.progress is None
    assert o.order is Order.SORTED
    assert OPTION_NAMES == (
        "strategy", "backend", "concurrency", "chunk_bytes", "skip_cached", "window_bytes",
        "order", "progress",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"concurrency": "8"}, "concurrency"),
        ({"chunk_bytes": 100}, "chunk_bytes"),
        ({"chunk_bytes": 1.5}, "chunk_bytes"),
        ({"backend": "nope"}, "valid backends"),
        ({"backend": 3}, "valid backends"),
        ({"strategy": "nope"}, "valid strategies"),
        ({"window_bytes": 0}, "window_bytes"),
        ({"window_bytes": False}, "window_bytes"),
        ({"order": "random"}, "valid orders"),
        ({"progress": 3}, "progress"),
    ],
)
def test_bad_values_name_the_valid_ones(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        PrefetchOptions(**kwargs)


def test_options_are_keyword_only_frozen_and_replaceable() -> None:
    with pytest.raises(TypeError):
        PrefetchOptions("files")  # type: ignore[misc]
    o = PrefetchOptions(strategy="files", concurrency=2)
    with pytest.raises(AttributeError):
        o.concurrency = 3  # type: ignore[misc]
    p = PrefetchOptions.from_keywords(o, chunk_bytes=MiB)
    assert (p.strategy, p.concurrency, p.chunk_bytes) == (Strategy.FILES, 2, MiB)
    assert PrefetchOptions.from_keywords(o) is o
    assert PrefetchOptions.from_keywords(window_bytes="auto").window_bytes == "auto"
    with pytest.raises(InvalidOptionError, match="concurrency"):
        PrefetchOptions.from_keywords(o, concurrency=0)


def test_unknown_names_are_a_type_error_listing_the_valid_ones() -> None:
    with pytest.raises(TypeError, match=r"unknown prefetch option.*chunk_size.*valid: backend"):
        PrefetchOptions.from_keywords(chunk_size=1)
    with pytest.raises(TypeError, match="unknown prefetch option"):
        check_option_names(["order", "threads"])
    check_option_names(OPTION_NAMES)


@pytest.mark.parametrize("func", [prefetch_async, start_prefetch])
def test_the_entry_points_show_every_option_in_their_signature(func: object) -> None:
    params = inspect.signature(func).parameters  # type: ignore[arg-type]
    for name in OPTION_NAMES:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == getattr(PrefetchOptions(), name)
    assert params["options"].default is None


def test_options_object_and_keywords_together(make_file) -> None:  # type: ignore[no-untyped-def]
    path = make_file("o", 4 * MiB)
    fake = FakeBackend()
    opts = PrefetchOptions(backend=fake, chunk_bytes=MiB, concurrency=1)
    report = asyncio.run(prefetch_async([path], options=opts, skip_cached=False))
    assert (report.chunk_bytes, report.concurrency, report.backend) == (MiB, 1, "fake")
    assert len(fake.calls) == 4
    report = start_prefetch([path], options=opts, chunk_bytes=2 * MiB).wait(10)
    assert report is not None and report.chunk_bytes == 2 * MiB


def test_the_loader_takes_the_same_options(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unknown prefetch option"):
        safetensors_weights_iterator(tmp_path / "x.safetensors", prefetch=True, chunk_size=1)
