"""Every read backend really fills the page cache, and residency is measured right."""

from __future__ import annotations

import errno
import os

import pytest

from engine import BACKENDS, evict, residency, resident_bytes, start_prefetch
from engine.backends import SendfileBackend, resolve_backend
from engine.mounts import read_ahead_bytes

SIZE = 24 << 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_warms_an_evicted_file(make_file, backend):
    path = make_file("w.bin", SIZE + 12345)  # not a multiple of the page size
    evict(path)
    assert resident_bytes(path) < 0.01 * SIZE
    report = start_prefetch([path], backend=backend, chunk_bytes=4 << 20).wait(60)
    assert report is not None and report.ok, report
    # Read-ahead of one extent may bring in the next before its turn: then it is skipped.
    assert report.warmed_bytes + report.cached_bytes == SIZE + 12345
    assert report.warmed_bytes >= 4 << 20
    assert resident_bytes(path) >= 0.99 * (SIZE + 12345)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "process"])
def test_backend_stops_at_end_of_a_shrunk_file(make_file, backend):
    # (the process backend reads by path: tests/test_reader_process.py)
    path = make_file("s.bin", 1 << 20)
    impl, _ = resolve_backend(backend)
    fd = os.open(path, os.O_RDONLY)
    try:
        # Ask for more than the file has (as if it were truncated after planning).
        assert impl.read_into_cache(fd, (1 << 20) - 4096, 64 << 10) == 4096
        assert impl.read_into_cache(fd, 2 << 20, 4096) == 0
    finally:
        os.close(fd)
        impl.close()


def test_sendfile_falls_back_to_pread_once(make_file, monkeypatch, caplog):
    path = make_file("f.bin", 3 << 20)

    def no_splice(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", no_splice)
    backend = SendfileBackend()
    fd = os.open(path, os.O_RDONLY)
    try:
        with caplog.at_level("WARNING"):
            assert backend.read_into_cache(fd, 0, 1 << 20) == 1 << 20
            assert backend.read_into_cache(fd, 1 << 20, 2 << 20) == 2 << 20
    finally:
        os.close(fd)
        backend.close()
    assert backend.label == "pread (fallback from sendfile)"
    assert sum("falling back to pread" in r.message for r in caplog.records) == 1
    assert resident_bytes(path) >= 0.99 * (3 << 20)


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError, match="sendfile, populate, pread, aiofiles, fadvise"):
        resolve_backend("io_uring_magic")


def test_residency_partial_and_ranges(make_file):
    path = make_file("r.bin", 8 << 20)
    with open(path, "rb") as f:
        f.seek(2 << 20)
        f.read(1 << 20)  # read-ahead may bring in more, never less
    got = resident_bytes(path, 2 << 20, 1 << 20)
    assert got == 1 << 20
    assert resident_bytes(path, 0, 0) == 0
    assert resident_bytes(path, 100 << 20) == 0  # past the end
    evict(path)
    assert resident_bytes(path) == 0


def test_mincore_fallback_agrees_with_cachestat(make_file):
    path = make_file("m.bin", 4 << 20)
    with open(path, "rb") as f:
        f.read()
        fd = f.fileno()
        os.posix_fadvise(fd, 1 << 20, 2 << 20, os.POSIX_FADV_DONTNEED)  # a hole: stable
        via_cachestat = residency._cachestat(fd, 0, 4 << 20)
        via_mincore = residency._mincore(fd, 0, 4 << 20)
    assert via_cachestat is not None, "this kernel has cachestat (Linux >= 6.5)"
    assert via_cachestat == via_mincore > 0


def test_read_ahead_is_known_for_the_test_filesystem(tmp_path):
    assert read_ahead_bytes(os.stat(tmp_path).st_dev) >= 4096
