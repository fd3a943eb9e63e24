"""Residency of files the caller neither owns nor may write (a shared read-only checkpoint).

Linux answers `cachestat` with EPERM for such files and `mincore` claims every page is
cached. Reading that claim as "already cached" made a non-root prefetch skip a cold
checkpoint entirely; these tests run the engine as 'nobody' to hold that shut.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import resident_bytes
from engine.errors import ResidencyUnknownError
from tests.conftest import write_random

MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become 'nobody'")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory 'nobody' can traverse (pytest's tmp_path sits under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="ckpt-shared-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_nobody(body: str) -> dict:
    """Run `body` as uid/gid 65534 (imports done as root first); return its JSON output."""
    code = (
        "import json, os, sys\n"
        f"sys.path.insert(0, {os.getcwd()!r})\n"
        "import engine, engine.residency, engine.cli\n"
        "import uvloop, asyncio.base_events\n"  # nobody cannot read /root's site-packages
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n" + body
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cold_shared_file(d: Path, name: str = "shard.safetensors", size: int = 8 * MiB) -> Path:
    p = write_random(d / name, size)
    os.chmod(p, 0o644)  # readable by all, writable by root only
    assert resident_bytes(p) == 0
    return p


@pytest.mark.parametrize("syscall", ["cachestat", "mincore"])
def test_residency_of_a_file_others_own_is_unknown_not_all_cached(
    shared_dir: Path, syscall: str
) -> None:
    p = _cold_shared_file(shared_dir)
    force = "engine.residency._cachestat_works = False\n" if syscall == "mincore" else ""
    got = _as_nobody(
        force + "try:\n"
        f"    r = engine.resident_bytes({str(p)!r})\n"
        "    print(json.dumps({'resident': r}))\n"
        "except engine.residency.ResidencyUnknownError as e:\n"
        "    print(json.dumps({'unknown': e.errno, 'filename': e.filename}))\n"
    )
    assert got == {"unknown": 1, "filename": str(p)}  # EPERM, never "8 MiB cached"


def test_owner_still_gets_real_residency_from_both_syscalls(shared_dir: Path) -> None:
    p = _cold_shared_file(shared_dir)
    os.chown(p, 65534, 65534)
    with open(p, "rb") as f:
        f.read(MiB)
    got = _as_nobody(
        f"a = engine.resident_bytes({str(p)!r})\n"
        "engine.residency._cachestat_works = False\n"
        f"b = engine.resident_bytes({str(p)!r})\n"
        "print(json.dumps([a, b]))\n"
    )
    assert MiB <= got[0] < 8 * MiB and got[0] == got[1]


@pytest.mark.parametrize("backend", ["sendfile", "fadvise", "pread"])
def test_non_root_prefetch_of_a_cold_shared_file_reads_it(shared_dir: Path, backend: str) -> None:
    a = _cold_shared_file(shared_dir, "a.safetensors")
    b = _cold_shared_file(shared_dir, "b.safetensors")
    got = _as_nobody(
        f"r = engine.start_prefetch([{str(a)!r}, {str(b)!r}], backend={backend!r}).wait(30)\n"
        "print(json.dumps({'warmed': r.warmed_bytes, 'cached': r.cached_bytes,\n"
        "                  'failures': [str(f) for f in r.failures]}))\n"
    )
    assert got == {"warmed": 16 * MiB, "cached": 0, "failures": []}
    assert resident_bytes(a) == resident_bytes(b) == 8 * MiB  # root sees the truth


def test_status_cli_says_unknown_instead_of_cached(shared_dir: Path) -> None:
    p = _cold_shared_file(shared_dir)
    got = _as_nobody(
        "import contextlib, io\n"
        "out, err = io.StringIO(), io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        f"    code = engine.cli.main(['status', {str(p)!r}])\n"
        "print(json.dumps({'code': code, 'out': out.getvalue(), 'err': err.getvalue()}))\n"
    )
    assert got["code"] == 1
    assert str(p) not in got["out"]  # not listed as cached
    assert "EPERM" in got["err"] and "owns or may write" in got["err"]


def test_the_error_is_an_oserror_with_eperm() -> None:
    exc = ResidencyUnknownError(1, "x", "/p")
    assert isinstance(exc, OSError) and exc.errno == 1 and exc.filename == "/p"
