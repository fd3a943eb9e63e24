"""The real network filesystem client (bench/sshfs.py): counts, eviction, stalls, cleanup.

Like the other FUSE tests these skip only where the kernel lacks a feature (/dev/fuse,
network namespaces) or without root, and fail instead when CI=true. A missing program is
a failure: scripts/setup.sh installs them. Every test that mounts checks afterwards that
no mount, namespace, veth, process or temporary directory of its run is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from file_support import write_random
from fuse_support import require_fuse
from test_netfs import read_all, wait_until

from bench import sshfs, sshfs_env
from bench.mounts import is_mounted
from bench.sshfs import PROFILES, SSHFS, SSHFSError, SSHFSMissingError, mounted
from bench.sshfs_stack import Stack
from engine.cursor import pid_alive
from engine.residency import resident_bytes

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(60)]

MiB = 1 << 20
BIG = 24 * MiB
ODD = MiB + 3
SLOW = 12e6  # bytes/s: a BIG read takes about 2 s, time enough to act mid-read
TOOLS = ("sshfs", "ssh", "ssh-keygen", "sshd", "ip", "tc", "fusermount3")


def _require_kernel() -> None:
    """Skip (fail under CI=true) only where the kernel or privileges cannot do it."""
    require_fuse()
    why = ""
    if not os.path.exists("/proc/self/ns/net"):
        why = "the kernel has no network namespaces"
    elif os.geteuid() != 0:
        why = "network namespaces, veth and tc need root"
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the sshfs tests must run in CI: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def backing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A backing directory: big.bin (24 MiB) and sub/odd.bin (1 MiB + 3 bytes)."""
    _require_kernel()
    root = tmp_path_factory.mktemp("sshfs-backing")
    (root / "sub").mkdir()
    sizes = {"big.bin": BIG, "sub/odd.bin": ODD}
    return root, {rel: write_random(root / rel, n).read_bytes() for rel, n in sizes.items()}


@dataclasses.dataclass
class _Trace:
    """What a mount made, recorded while it was up, to check that none of it is left."""

    mountpoint: str
    runtime: Path
    netns: str
    veth: str
    pids: list[int]


def _trace(fs: SSHFS | Stack) -> _Trace:
    stack = fs.stack if isinstance(fs, SSHFS) else fs
    groups = [stack.client_pids(), *stack.server_pids().values()]
    pids = [p for group in groups for p in group]
    return _Trace(str(stack.path), stack.runtime, stack.netns, stack.veth_client, pids)


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if text.encode() in f.read() and pid_alive(int(entry.name)):
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def assert_nothing_left(trace: _Trace) -> None:
    assert trace.pids, "the mount recorded no process: the trace is empty"
    assert not is_mounted(trace.mountpoint)
    assert trace.netns not in _netns_names()
    link = subprocess.run(["ip", "link", "show", trace.veth], capture_output=True, timeout=10)
    assert link.returncode != 0, f"veth {trace.veth} is left"
    assert [p for p in trace.pids if pid_alive(p)] == []
    assert _processes_mentioning(str(trace.runtime)) == []
    assert not trace.runtime.exists()


class _Reader(threading.Thread):
    """Reads a file in a daemon thread; keeps the bytes or the error."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.data: bytes | None = None
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            self.data = read_all(self.path)
        except OSError as exc:
            self.error = exc


@contextlib.contextmanager
def reading_slowly(root: Path, **overrides: Any) -> Iterator[tuple[SSHFS, _Reader, _Trace]]:
    """A slow mount with a reader of big.bin under way (the server has answered)."""
    with mounted(root, profile="sshfs-quick", bandwidth_bps=SLOW, **overrides) as fs:
        fs.evict()
        reader = _Reader(fs.path / "big.bin")
        reader.start()
        wait_until(lambda: fs.counters().bytes_served > 0)
        yield fs, reader, _trace(fs)


# ------------------------------------------------------------ no mount needed
def test_profiles_resolve_and_reject_bad_settings() -> None:
    assert {"sshfs", "sshfs-quick"} <= set(PROFILES)
    for name, p in PROFILES.items():
        assert p.name == name and p.description
        assert p.bandwidth_bps and p.latency_s > 0 and p.max_read == 65536
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.latency_s = 1.0  # type: ignore[misc]
    assert sshfs._resolve_profile("sshfs", {"latency_s": 0.0}).latency_s == 0.0
    with pytest.raises(ValueError, match="unknown profile"):
        sshfs._resolve_profile("nfs", {})
    with pytest.raises(TypeError, match="threads"):
        sshfs._resolve_profile("sshfs", {"threads": 4})
    with pytest.raises(ValueError, match="invalid"):
        sshfs._resolve_profile("sshfs", {"max_read": 1 << 20})  # sshfs caps at 64 KiB


@pytest.mark.parametrize("missing", ["sshfs", "sshd", "tc"])
def test_a_missing_program_is_named(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_kernel()
    for tool in TOOLS:
        real = shutil.which(tool)
        assert real is not None, f"{tool} is not installed (run scripts/setup.sh)"
        if tool != missing:
            (tmp_path / tool).symlink_to(real)
    monkeypatch.setenv("PATH", str(tmp_path))
    before = _netns_names()
    with pytest.raises(SSHFSMissingError, match=missing) as info, mounted(tmp_path):
        pass
    assert info.value.piece == missing
    assert _netns_names() == before
    ok, why = sshfs.sshfs_available()
    assert not ok and missing in why


def test_a_missing_dev_fuse_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_kernel()
    monkeypatch.setattr(sshfs_env, "DEV_FUSE", str(tmp_path / "no-fuse"))
    with pytest.raises(SSHFSMissingError, match="no-fuse"), mounted(tmp_path):
        pass


# --------------------------------------------------------------------- mounts
@pytest.fixture(scope="module")
def fs(backing: tuple[Path, dict[str, bytes]]) -> Iterator[SSHFS]:
    """One quick mount shared by the reading tests; checked for leftovers at the end."""
    with mounted(backing[0], profile="sshfs-quick") as mount:
        trace = _trace(mount)
        yield mount
    assert_nothing_left(trace)


def test_reads_give_the_backing_bytes_and_exact_counts(
    fs: SSHFS, backing: tuple[Path, dict[str, bytes]]
) -> None:
    _, files = backing
    fs.evict()
    for rel, expected in files.items():
        fs.reset_counters()
        assert read_all(fs.path / rel) == expected
        cold = fs.counters()
        assert cold.bytes_served == len(expected), rel  # exact, to the byte
        assert cold.errors == 0 and cold.inflight == 0 and cold.stalled == 0
        assert cold.requests >= len(expected) // 65536
        assert cold.max_request_bytes == 65536
        fs.reset_counters()
        assert read_all(fs.path / rel) == expected
        hot = fs.counters()
        # the page cache answers; the VM may reclaim a few idle pages (DESIGN.md)
        assert hot.bytes_served <= len(expected) // 50, rel
    assert fs.counters().connections == 1


def test_evict_makes_both_layers_cold(fs: SSHFS, backing: tuple[Path, dict[str, bytes]]) -> None:
    root, files = backing
    read_all(fs.path / "big.bin")
    assert resident_bytes(fs.path / "big.bin") >= BIG * 0.9
    assert resident_bytes(root / "big.bin") >= BIG * 0.9  # the server read it
    fs.evict()
    assert resident_bytes(fs.path / "big.bin") == 0
    assert resident_bytes(root / "big.bin") == 0
    fs.reset_counters()
    assert read_all(fs.path / "big.bin") == files["big.bin"]
    assert fs.counters().bytes_served == BIG


def test_describe_and_cpu_times(fs: SSHFS) -> None:
    info = fs.describe()
    assert info["kind"] == "sshfs" and info["profile"]["name"] == "sshfs-quick"
    assert info["versions"]["sshfs"].startswith("SSHFS") and info["link"]["qdisc"] == "tbf"
    assert info["link"]["server_addr"].startswith("169.254.")
    before = fs.cpu_times()
    fs.evict()
    read_all(fs.path / "big.bin")
    after = fs.cpu_times()
    assert after.client_s > before.client_s and after.server_s > before.server_s
    assert set(fs.pids()) == {"client", "server"}  # latency without a relay by default
    assert info["link"]["latency"] == "sftp request delay"
    assert len(fs.pids()["client"]) >= 2  # sshfs and its ssh


def test_teardown_with_an_open_file_leaves_nothing(
    backing: tuple[Path, dict[str, bytes]],
) -> None:
    with mounted(backing[0], profile="sshfs-quick") as fs:
        trace = _trace(fs)
        f = open(fs.path / "big.bin", "rb")  # noqa: SIM115 - open across the exit: lazy unmount
        f.read(4096)
    try:
        assert_nothing_left(trace)
        with pytest.raises(OSError):  # the connection went with sshfs: an error, not a hang
            os.pread(f.fileno(), 4096, BIG - 4096)
    finally:
        with contextlib.suppress(OSError):
            f.close()


def test_ctrl_c_inside_the_context_tears_down(backing: tuple[Path, dict[str, bytes]]) -> None:
    with pytest.raises(KeyboardInterrupt), mounted(backing[0], profile="sshfs-quick") as fs:
        trace = _trace(fs)
        raise KeyboardInterrupt
    assert_nothing_left(trace)


@pytest.mark.parametrize("failure", ["sshfs cannot connect", "ctrl-c during set-up"])
def test_a_failed_start_raises_and_leaves_nothing(
    failure: str, backing: tuple[Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    traces: list[_Trace] = []
    real_mount = Stack._mount

    def spy(self: Stack, *args: object) -> None:
        traces.append(_trace(self))  # the namespace, sshd (and the relay) are up
        if failure == "ctrl-c during set-up":
            raise KeyboardInterrupt
        real_mount(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Stack, "_mount", spy)
    if failure == "sshfs cannot connect":
        expected, overrides = pytest.raises(SSHFSError, match="sshfs exited"), {"ciphers": "x"}
    else:
        expected, overrides = pytest.raises(KeyboardInterrupt), {"latency_at": "link"}
    with expected, mounted(backing[0], profile="sshfs-quick", **overrides):
        pass
    (trace,) = traces
    assert_nothing_left(trace)


@pytest.mark.parametrize("where", ["server", "link"])
def test_latency_delays_each_request(
    where: Literal["server", "link"], backing: tuple[Path, dict[str, bytes]]
) -> None:
    latency = 0.1
    with mounted(backing[0], profile="sshfs-quick", latency_s=latency, latency_at=where) as fs:
        trace = _trace(fs)
        assert ("relay" in fs.pids()) == (where == "link")
        fs.evict()
        with open(fs.path / "big.bin", "rb", buffering=0) as f:
            for offset in (0, BIG // 2):  # each a cold page: one request, one round trip
                start = time.monotonic()
                assert len(os.pread(f.fileno(), 4096, offset)) == 4096
                assert time.monotonic() - start >= latency
    assert_nothing_left(trace)


@pytest.mark.parametrize("target", ["server", "link"])
def test_stall_holds_a_reader_until_unstall(
    target: Literal["server", "link"], backing: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = backing
    with reading_slowly(root, latency_at=target) as (fs, reader, trace):
        fs.stall(target)
        time.sleep(0.3)  # answers already in the pipes drain
        held = fs.counters()
        time.sleep(1.0)
        assert reader.is_alive()
        if target == "server":  # requests held in a stopped link never reach the server
            assert held.stalled > 0
            assert fs.counters().bytes_served == held.bytes_served < BIG
        with pytest.raises(SSHFSError, match="stalled"):
            fs.evict()
        fs.unstall()
        reader.join(20)
        assert not reader.is_alive() and reader.error is None
        assert reader.data == files["big.bin"]
        assert fs.counters().stalled == 0
    assert_nothing_left(trace)


def test_teardown_while_stalled_frees_the_reader(backing: tuple[Path, dict[str, bytes]]) -> None:
    with reading_slowly(backing[0]) as (fs, reader, trace):
        fs.stall()
        time.sleep(0.3)
        assert reader.is_alive()
    reader.join(20)
    assert not reader.is_alive()
    assert_nothing_left(trace)


def test_a_dead_server_is_an_error_not_a_hang(backing: tuple[Path, dict[str, bytes]]) -> None:
    with reading_slowly(backing[0]) as (fs, reader, trace):
        fs.kill_server()
        reader.join(20)
        assert not reader.is_alive(), "a read hangs on a dead server"
        assert reader.error is not None and reader.data is None
        with pytest.raises(OSError):
            read_all(fs.path / "sub" / "odd.bin")
        assert fs.counters().bytes_served < BIG
    assert_nothing_left(trace)


def _sshfs_mounts_of(source_part: str) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [
            line.split()[1]
            for line in f
            if line.split()[2] == "fuse.sshfs" and source_part in line.split()[0]
        ]


@pytest.mark.timeout(240)
def test_sigterm_to_the_bench_tears_the_real_client_down(tmp_path: Path) -> None:
    # A bench stopped by SIGTERM (a job's time limit, `kill`) left sshfs mounted, sshd
    # running and the namespace in place: SIGTERM now unwinds as Ctrl-C does.
    _require_kernel()
    cache = tmp_path / "cache"
    netns_before = _netns_names()
    cmd = [
        sys.executable, "-m", "bench.cli", "run", "--fs", "sshfs", "--shapes", "single",
        "--size", "64MiB", "--configs", "none", "--repeats", "50", "--warmup", "0",
        "--no-fio", "--no-hot", "--out", str(tmp_path / "out"), "--no-plot",
    ]  # fmt: skip
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_until(lambda: bool(_sshfs_mounts_of(str(cache))) or proc.poll() is not None, 180)
        mounts = _sshfs_mounts_of(str(cache))
        assert mounts, f"the bench never mounted sshfs: {proc.poll()}"
        runtime = Path(mounts[0]).parent
        time.sleep(1.0)  # a load under way
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, out[-3000:]
    assert _sshfs_mounts_of(str(cache)) == []
    assert _netns_names() <= netns_before
    assert _processes_mentioning(str(runtime)) == []
    assert not runtime.exists()
    assert (tmp_path / "out" / "quick-custom-partial.json").exists(), out[-3000:]
