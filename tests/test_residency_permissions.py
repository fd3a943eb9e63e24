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
from file_support import write_random

from engine import resident_bytes
from engine.errors import ResidencyUnknownError

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


def _run_wrapped(wrapper: list[str], body: str) -> dict:
    """Run `body` under `wrapper` (unshare, setpriv) with /usr/bin/python3; JSON back."""
    script = (
        "import json, os, sys\n"
        f"sys.path.insert(0, {os.getcwd()!r})\n"
        "import engine, engine.residency\n" + body
    )
    out = subprocess.run(
        [*wrapper, "/usr/bin/python3", "-c", script], capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0 and "Operation not permitted" in out.stderr and "unshare" in out.stderr:
        pytest.skip(f"{wrapper[0]} is not allowed here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


_PROBE = (
    "engine.residency._cachestat_works = False  # a kernel before 6.5: mincore only\n"
    "caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1]\n"
    "try:\n"
    "    r = {'resident': engine.resident_bytes(sys.argv[1] if len(sys.argv) > 1 else P)}\n"
    "except engine.ResidencyUnknownError:\n"
    "    r = {'unknown': True}\n"
    "print(json.dumps({**r, 'caps': caps, 'euid': os.geteuid()}))\n"
)


@pytest.mark.parametrize(
    "wrapper",
    [
        ["unshare", "--user", "--map-root-user"],  # root in a user namespace
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all"],  # root without capabilities
    ],
    ids=["userns-root", "root-without-caps"],
)
def test_root_that_cannot_inspect_gets_unknown_on_old_kernels(
    shared_dir: Path, wrapper: list[str]
) -> None:
    if not Path("/usr/bin/python3").exists() or not shutil.which(wrapper[0]):
        pytest.skip(f"needs /usr/bin/python3 and {wrapper[0]}")
    p = _cold_shared_file(shared_dir)
    os.chown(p, 1234, 1234)  # someone else's shared checkpoint
    got = _run_wrapped(wrapper, f"P = {str(p)!r}\n" + _PROBE)
    assert got["euid"] == 0
    if wrapper[0] == "setpriv" and int(got["caps"], 16) != 0:
        pytest.skip("setpriv kept effective capabilities here")
    assert got.get("unknown") is True, got  # mincore would claim all 8 MiB


def test_cachestat_denied_by_policy_falls_back_to_mincore(
    make_file, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seccomp profile may answer EPERM for every file: then mincore answers (we own it)."""
    import ctypes
    import errno

    from engine import _libc, residency

    p = make_file("own.bin", 4 * MiB)
    with open(p, "rb") as f:
        f.read(MiB)

    def denied(*_args: object) -> int:
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(residency, "_cachestat_works", None)
    monkeypatch.setattr(_libc.libc, "syscall", denied)
    assert MiB <= resident_bytes(p) < 4 * MiB
    assert residency._cachestat_works is False


def test_overlayfs_residency_is_the_real_files(shared_dir: Path) -> None:
    """cachestat on an overlay file sees an empty mapping; the pages live in the real file."""
    if not shutil.which("unshare") or not Path("/usr/bin/python3").exists():
        pytest.skip("needs unshare and /usr/bin/python3")
    lower, upper, work, merged = (shared_dir / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    p = _cold_shared_file(lower)
    script = (
        "import json, os, sys\n"
        f"sys.path.insert(0, {os.getcwd()!r})\n"
        "import engine\n"
        "f = sys.argv[1]\n"
        "with open(f, 'rb') as fh:\n"
        "    fh.read(2 << 20)\n"
        "print(json.dumps({'resident': engine.resident_bytes(f)}))\n"
    )
    mount = (
        f"mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} "
        f'{merged} && /usr/bin/python3 -c "$0" {merged / p.name}'
    )
    out = subprocess.run(
        ["unshare", "--mount", "sh", "-c", mount, script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0 and "overlay" in out.stderr and "mount" in out.stderr:
        pytest.skip(f"cannot mount overlayfs here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert 2 * MiB <= got["resident"] < 8 * MiB
