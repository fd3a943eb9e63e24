"""loader_adapter's iterator: identical tensors with and without prefetch, order, cleanup."""

from __future__ import annotations

import errno
import gc
import json
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import loader_adapter
import loader_adapter.iterator as iterator_mod
from bench.checkpoint import make_checkpoint
from engine import BACKENDS, STRATEGIES, Backend, evict
from loader_adapter import (
    WeightsIterator,
    expand_checkpoint_files,
    load_state_dict,
    safetensors_weights_iterator,
    tensor_order,
)

KiB, MiB = 1 << 10, 1 << 20
LOG = "loader_adapter.iterator"

# Every dtype that safetensors 0.8 and torch 2.13 share (complex128 has no safetensors code).
ALL_DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
    torch.float4_e2m1fn_x2,
    torch.complex64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
]


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bytes reinterpreted as `dtype` (bool: 0/1 only)."""
    item = torch.empty((), dtype=dtype).element_size()
    n = math.prod(shape)
    raw = torch.randint(0, 256, (n * item,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (0-dim, empty, bool and fp4 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: list[tuple[str, torch.Tensor]], ref: dict[str, torch.Tensor]) -> None:
    names = [n for n, _ in got]
    assert len(names) == len(set(names)), "a tensor was yielded twice"
    assert set(names) == set(ref)
    for name, t in got:
        r = ref[name]
        assert t.dtype == r.dtype, name
        assert t.shape == r.shape, name
        assert torch.equal(as_bytes(t), as_bytes(r)), name


def load_reference(files: list[Path]) -> dict[str, torch.Tensor]:
    ref: dict[str, torch.Tensor] = {}
    for p in files:
        ref.update(load_file(p))
    return ref


def expected_order(files: list[Path]) -> list[str]:
    """Sorted by resolved path, then by data offset (computed independently of the code)."""
    out = []
    for path in sorted(files, key=lambda p: os.path.realpath(p)):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out += sorted(header, key=lambda k: (*header[k]["data_offsets"], k))
    return out


def engine_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("ckpt-prefetch")}


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def wait_until_clean(threads_before: set[threading.Thread], fds_before: set[str]) -> None:
    """Fail unless every thread and descriptor started since `*_before` is gone within 3 s."""
    deadline = time.monotonic() + 3.0
    while True:
        extra_threads = set(threading.enumerate()) - threads_before
        # listdir's own descriptor may appear in the listing: compare counts, not sets.
        extra_fds = len(open_fds()) - len(fds_before)
        if not extra_threads and extra_fds <= 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: threads {extra_threads}, {extra_fds} fds")
        time.sleep(0.02)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three files: every dtype and odd shapes; 10,000 tiny tensors; a synthetic shard."""
    d = tmp_path_factory.mktemp("zoo")
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(ALL_DTYPES):
        name = str(dtype).removeprefix("torch.")
        # safetensors counts fp4 in 4-bit elements: a tensor must end on a byte boundary,
        # so no 0-dim fp4 tensor can be saved, and fp4 sizes are kept even.
        even = dtype == torch.float4_e2m1fn_x2
        tensors[f"{name}.matrix"] = _random((7, 14 + 2 * i if even else 13 + i), dtype, gen)
        if not even:
            tensors[f"{name}.scalar"] = _random((), dtype, gen)
        tensors[f"{name}.empty"] = torch.empty((0, 3), dtype=dtype)
        tensors[f"{name}.vector"] = _random((4098 if even else 4099,), dtype, gen)
    tensors["big.odd"] = _random((3 * MiB + 5,), torch.int8, gen)  # spans chunk boundaries
    save_file(tensors, d / "a-zoo.safetensors", metadata={"format": "pt", "note": "zoo"})

    tiny_dtypes = [torch.float16, torch.int8, torch.float32, torch.bool, torch.float8_e5m2]
    tiny = {
        f"tiny.{i:05d}": _random((i % 5,), tiny_dtypes[i % len(tiny_dtypes)], gen)
        for i in range(10_000)
    }
    save_file(tiny, d / "b-tiny.safetensors")
    info = make_checkpoint(d / "synthetic", size_bytes=4 * MiB, shape="single")
    return [d / "a-zoo.safetensors", d / "b-tiny.safetensors", *info.files]


@pytest.fixture(scope="module")
def zoo_ref(zoo: list[Path]) -> dict[str, torch.Tensor]:
    return load_reference(zoo)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A skewed 4-shard checkpoint: more bytes than the window, many chunks per rank."""
    info = make_checkpoint(tmp_path_factory.mktemp("sharded"), size_bytes=12 * MiB, shape="skewed")
    return info.files


@pytest.fixture
def warmed_up(zoo: list[Path]) -> None:
    """Create the process-wide resources a first prefetch opens once (never per prefetch):
    the backend's shared /dev/null descriptor, uvloop's pipe, torch's thread pools."""
    list(safetensors_weights_iterator(zoo[-1], prefetch=True))
    time.sleep(0.05)


# ------------------------------------------------------------------- identical tensors


def test_prefetch_off_identical_and_ordered(zoo: list[Path], zoo_ref: dict[str, Any]) -> None:
    got = list(safetensors_weights_iterator(zoo))
    assert_same(got, zoo_ref)
    assert [n for n, _ in got] == expected_order(zoo)
    assert sum(1 for n, _ in got if n.startswith("tiny.")) == 10_000


@pytest.fixture
def handles(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The prefetch handles the iterator starts (to read their reports)."""
    started: list[Any] = []
    real = iterator_mod.start_prefetch

    def spy(*args: Any, **kwargs: Any) -> Any:
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(iterator_mod, "start_prefetch", spy)
    return started


def copy_all(it: Iterator[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Consume like a serving engine: copy each tensor before asking for the next."""
    return [(name, t.clone()) for name, t in it]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_prefetch_on_identical_every_backend_and_strategy(
    zoo: list[Path], zoo_ref: dict[str, Any], handles: list[Any], backend: str, strategy: str
) -> None:
    for p in zoo:
        evict(str(p))
    got = copy_all(
        safetensors_weights_iterator(
            zoo,
            prefetch=True,
            rank=0,
            world=1,
            backend=backend,
            strategy=strategy,
            chunk_bytes=64 * KiB,
            concurrency=3,
        )
    )
    assert_same(got, zoo_ref)
    assert [n for n, _ in got] == expected_order(zoo)
    (handle,) = handles
    report = handle.report
    assert handle.done and report is not None
    assert report.failures == ()
    assert report.warmed_bytes + report.cached_bytes > 0, report
    assert report.backend.startswith(backend if backend != "auto" else "sendfile")
    assert report.strategy == strategy


@pytest.mark.parametrize(("rank", "world"), [(0, 2), (1, 3), (3, 4)])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_prefetch_on_identical_other_ranks_with_window(
    sharded: list[Path], rank: int, world: int, strategy: str
) -> None:
    ref = load_reference(sharded)
    for p in sharded:
        evict(str(p))
    got = copy_all(
        safetensors_weights_iterator(
            sharded,
            prefetch=True,
            rank=rank,
            world=world,
            strategy=strategy,
            chunk_bytes=32 * KiB,
            window_bytes=256 * KiB,
        )
    )
    assert_same(got, ref)
    assert [n for n, _ in got] == expected_order(sharded)


def test_order_given_is_kept(sharded: list[Path]) -> None:
    files = list(reversed(sharded))
    off = [n for n, _ in safetensors_weights_iterator(files, order="given")]
    on = [n for n, _ in safetensors_weights_iterator(files, prefetch=True, order="given")]
    assert off == on
    first_file = load_file(files[0])
    assert set(off[: len(first_file)]) == set(first_file)


def test_load_state_dict_identical(zoo: list[Path], zoo_ref: dict[str, Any]) -> None:
    for prefetch in (False, True):
        state = load_state_dict(zoo, prefetch=prefetch, chunk_bytes=64 * KiB)
        assert_same(list(state.items()), zoo_ref)


def test_load_state_dict_rejects_window(sharded: list[Path]) -> None:
    with pytest.raises(ValueError, match="window"):
        load_state_dict(sharded, prefetch=True, window_bytes=MiB)
    assert len(load_state_dict(sharded, prefetch=True, window_bytes="auto")) > 0


# --------------------------------------------------------------------- file expansion


def test_directory_index_and_list_give_same(tmp_path: Path) -> None:
    info = make_checkpoint(tmp_path / "ck", size_bytes=2 * MiB, shards=3)
    (tmp_path / "ck" / "stray.safetensors").write_bytes(b"not listed in the index")
    as_dir = [n for n, _ in safetensors_weights_iterator(tmp_path / "ck")]
    as_index = [n for n, _ in safetensors_weights_iterator(info.index_path)]
    as_list = [n for n, _ in safetensors_weights_iterator([str(p) for p in info.files])]
    as_list_dup = [n for n, _ in safetensors_weights_iterator([*info.files, info.files[0]])]
    assert as_dir == as_index == as_list == as_list_dup
    assert len(as_dir) == info.tensor_count


def test_directory_without_index_takes_all_files(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(3)}, tmp_path / "b.safetensors")
    save_file({"y": torch.ones(2)}, tmp_path / "a.safetensors")
    assert [n for n, _ in safetensors_weights_iterator(tmp_path)] == ["y", "x"]
    assert expand_checkpoint_files(tmp_path) == [
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.safetensors"),
    ]


def test_symlinks_are_resolved_like_the_planner(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"first": torch.zeros(3)}, blobs / "zzz")
    save_file({"second": torch.ones(2)}, blobs / "aaa")
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "model-00001.safetensors").symlink_to(blobs / "zzz")
    (snap / "model-00002.safetensors").symlink_to(blobs / "aaa")
    names = [n for n, _ in safetensors_weights_iterator(snap, prefetch=True)]
    assert names == ["second", "first"]  # the engine's order: by resolved path


@pytest.mark.parametrize("prefetch", [False, True])
def test_missing_file_raises_file_not_found(tmp_path: Path, prefetch: bool) -> None:
    with pytest.raises(FileNotFoundError):
        safetensors_weights_iterator([tmp_path / "nope.safetensors"], prefetch=prefetch)
    with pytest.raises(FileNotFoundError):
        safetensors_weights_iterator(tmp_path, prefetch=prefetch)  # no safetensors inside
    with pytest.raises(FileNotFoundError):
        safetensors_weights_iterator(tmp_path / "model.safetensors.index.json")


def test_invalid_arguments(sharded: list[Path]) -> None:
    with pytest.raises(ValueError, match="prefetch"):
        safetensors_weights_iterator(sharded, prefetch="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown prefetch option"):
        safetensors_weights_iterator(sharded, prefetch=True, chunk_size=1)
    with pytest.raises(ValueError, match="rank"):
        safetensors_weights_iterator(sharded, prefetch=True, rank=4, world=4)
    with pytest.raises(ValueError, match="both"):
        safetensors_weights_iterator(sharded, prefetch=True, rank=1)
    with pytest.raises(ValueError, match="strategy"):
        safetensors_weights_iterator(sharded, prefetch=True, strategy="random")
    assert engine_threads() == set()


def test_tensor_order_reads_header(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    save_file({"b": torch.zeros(2), "a": torch.zeros(1, dtype=torch.int8)}, p)
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    assert tensor_order(p) == [("b", 8 + n + 8), ("a", 8 + n + 9)]


# --------------------------------------------------------------------------- cleanup


def _drain(it: Iterator[tuple[str, torch.Tensor]]) -> int:
    n = 0
    for _, t in it:
        as_bytes(t).sum()  # touch the bytes, as a serving engine does
        n += 1
    return n


@pytest.mark.usefixtures("warmed_up")
@pytest.mark.parametrize("how", ["exhausted", "break", "close", "gc", "never-started", "raises"])
def test_no_thread_or_fd_outlives_the_iterator(sharded: list[Path], how: str) -> None:
    threads, fds = set(threading.enumerate()), open_fds()
    it = safetensors_weights_iterator(
        sharded, prefetch=True, chunk_bytes=32 * KiB, window_bytes=128 * KiB, concurrency=2
    )
    assert engine_threads(), "prefetch should be running"
    if how == "exhausted":
        assert _drain(it) > 0
    elif how == "break":
        for i, _ in enumerate(it):
            if i == 3:
                break
        del it  # the for loop keeps no reference; the name does
    elif how == "close":
        next(it)
        it.close()
    elif how == "gc":
        next(it)
        del it
        gc.collect()
    elif how == "never-started":
        del it
        gc.collect()
    elif how == "raises":

        def consume() -> None:
            for i, _ in enumerate(it):
                if i == 5:
                    raise KeyError("consumer bug")

        with pytest.raises(KeyError):
            consume()
        del it
    wait_until_clean(threads, fds)
    assert engine_threads() == set()


# ------------------------------------------------------------- prefetch never changes


class FailingBackend(Backend):
    """Fails every `every`-th read with EIO (all of them by default)."""

    name = "failing"
    description = "test backend that fails reads"

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.calls = 0
        self._lock = threading.Lock()

    def read_into_cache(self, fd: int, offset: int, length: int) -> int:
        with self._lock:
            self.calls += 1
            n = self.calls
        if n % self.every == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return len(os.pread(fd, length, offset))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("loader_adapter") and r.levelno >= 30]


@pytest.mark.parametrize("every", [1, 3])
def test_failing_prefetch_same_tensors_one_warning(
    zoo: list[Path], zoo_ref: dict[str, Any], caplog: pytest.LogCaptureFixture, every: int
) -> None:
    backend = FailingBackend(every)
    with caplog.at_level(logging.WARNING):
        got = list(
            safetensors_weights_iterator(
                zoo, prefetch=True, backend=backend, chunk_bytes=64 * KiB, skip_cached=False
            )
        )
    assert_same(got, zoo_ref)
    assert backend.calls > 0
    warnings = _warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "prefetch incomplete" in warnings[0].getMessage()
    assert engine_threads() == set() or _eventually_no_engine_threads()


def _eventually_no_engine_threads() -> bool:
    deadline = time.monotonic() + 3
    while engine_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not engine_threads()


def test_prefetch_that_cannot_start_loads_anyway(
    sharded: list[Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(iterator_mod, "start_prefetch", broken)
    with caplog.at_level(logging.WARNING):
        got = list(safetensors_weights_iterator(sharded, prefetch=True))
    assert_same(got, load_reference(sharded))
    assert len(_warnings(caplog)) == 1


def test_prefetch_cancelled_from_outside_same_tensors_one_warning(
    sharded: list[Path], caplog: pytest.LogCaptureFixture, handles: list[Any]
) -> None:
    got = []
    with caplog.at_level(logging.WARNING):
        for i, item in enumerate(
            safetensors_weights_iterator(
                sharded, prefetch=True, chunk_bytes=32 * KiB, window_bytes=64 * KiB
            )
        ):
            got.append(item)
            if i == 2:
                handles[0].cancel()
    assert_same(got, load_reference(sharded))
    assert handles[0].done
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "cancelled" in warnings[0].getMessage()


def _corrupt(kind: str, good: bytes) -> bytes:
    n = struct.unpack("<Q", good[:8])[0]
    if kind == "header-beyond-file":
        return struct.pack("<Q", len(good) * 4) + good[8:]
    if kind == "invalid-json":
        return good[:8] + b"{" * n + good[8 + n :]
    if kind == "truncated-data":
        return good[: len(good) - 100]
    if kind == "too-short":
        return good[:5]
    if kind == "offsets-out-of-range":
        header = json.loads(good[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        start = header[name]["data_offsets"][0]
        header[name]["data_offsets"] = [start, len(good) * 8]  # past the end of the data
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + good[8 + n :]
    raise AssertionError(kind)


@pytest.mark.usefixtures("warmed_up")
@pytest.mark.parametrize(
    "kind",
    ["header-beyond-file", "invalid-json", "truncated-data", "too-short", "offsets-out-of-range"],
)
def test_corrupt_file_same_error_with_and_without_prefetch(tmp_path: Path, kind: str) -> None:
    info = make_checkpoint(tmp_path / "ck", size_bytes=2 * MiB, shards=3)
    bad = info.files[1]
    bad.write_bytes(_corrupt(kind, bad.read_bytes()))
    with pytest.raises(SafetensorError) as plain:
        for p in info.files:
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    f.get_tensor(k)

    outcomes = []
    for prefetch in (False, True):
        threads, fds = set(threading.enumerate()), open_fds()
        names: list[str] = []
        with pytest.raises(Exception) as caught:  # the type is compared below
            for name, _ in safetensors_weights_iterator(
                info.files, prefetch=prefetch, chunk_bytes=32 * KiB
            ):
                names.append(name)
        outcomes.append((type(caught.value), str(caught.value), names))
        del caught
        wait_until_clean(threads, fds)
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] is type(plain.value)
    assert outcomes[0][1] == str(plain.value)
    assert outcomes[0][2] == [n for n, _ in tensor_order(info.files[0])]


def test_public_api() -> None:
    assert set(loader_adapter.__all__) >= {
        "safetensors_weights_iterator",
        "load_state_dict",
        "add_prefetch_args",
        "prefetch_options_from_args",
        "discover_local_rank",
    }
    for name in loader_adapter.__all__:
        assert hasattr(loader_adapter, name)


def test_iterator_object_report_and_context_manager(sharded: list[Path]) -> None:
    with safetensors_weights_iterator(sharded, prefetch=True, chunk_bytes=64 * KiB) as it:
        assert isinstance(it, WeightsIterator)
        assert it.prefetching and iter(it) is it
        next(it)
        assert it.report is None  # still running
    report = it.report
    assert report is not None and report.failures == ()  # possibly cancelled early
    assert _eventually_no_engine_threads()
    with pytest.raises(StopIteration):
        next(it)
    it.close()  # idempotent

    plain = safetensors_weights_iterator(sharded)
    assert not plain.prefetching
    assert sum(1 for _ in plain) > 0 and plain.report is None


def test_exhausted_iterator_has_full_report(sharded: list[Path]) -> None:
    for p in sharded:
        evict(str(p))
    it = safetensors_weights_iterator(sharded, prefetch=True, chunk_bytes=64 * KiB)
    copy_all(it)
    assert it.report is not None
    assert it.report.planned_bytes == sum(p.stat().st_size for p in sharded)
