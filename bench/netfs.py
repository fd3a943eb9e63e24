"""A simulated network filesystem: a throttled, fault-injecting, counting FUSE mount.

A real network filesystem (NFS, Lustre, ...) has three properties the prefetcher cares
about: every byte read from it costs bandwidth and per-request latency, the client keeps
a page cache across opens, and each node has its own cache. This module gives all three
on one machine, with exact counts of the bytes and requests the "server" answered:

* a FUSE server (mfusepy over libfuse3) serves a backing directory read-only, in its own
  process, so that a stalled server never deadlocks the reads of the process under test;
* every open keeps the kernel page cache (``keep_cache``), attribute and entry timeouts
  are a day, ``auto_cache`` is off: a second read of a byte is served from the page cache
  and never reaches the server, as with NFS;
* a token bucket shared by all server threads caps the aggregate bandwidth, each read
  request waits ``latency_s`` first, and ``max_background`` is raised above the kernel's
  default of 12 so that high latency does not serialise readahead;
* several mounts can share one bandwidth limit (`SharedBandwidth`: one storage serving
  several nodes), each with its own counters;
* faults on demand: EIO for a byte range, a stall, a file that vanishes.

Each :func:`mounted` context is one "node": two mounts of the same backing directory have
separate page caches. By default each mount has its own bandwidth limit; give the mounts
one `SharedBandwidth` to make them one storage with one limit. These are simulations; the
profile names say what they imitate, not what they measured.

Only the server process imports mfusepy, so this module imports on machines without FUSE.

Example:
    >>> with mounted("/data/ckpt", profile="slow-nfs") as fs:      # doctest: +SKIP
    ...     data = (fs.path / "model.safetensors").read_bytes()
    ...     fs.counters().bytes_served
    >>> with SharedBandwidth(300e6) as link:                        # doctest: +SKIP
    ...     with mounted(d, shared_bandwidth=link) as a, mounted(d, shared_bandwidth=link) as b:
    ...         ...  # a and b together get 300 MB/s; a.counters() counts a's bytes only
"""

from __future__ import annotations

import contextlib
import ctypes.util
import dataclasses
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import protocol as proto
from bench.bandwidth import SharedBandwidth
from bench.mounts import (
    evict_mirrored,
    is_mounted,
    read_ahead_kb,
    set_read_ahead_kb,
    stat_within,
)
from bench.netfs_profiles import PROFILES, NetFSProfile, profile_with_overrides, resolve_profile

__all__ = [
    "PROFILES",
    "ControlClient",
    "Counters",
    "NetFS",
    "NetFSError",
    "NetFSProfile",
    "SharedBandwidth",
    "fuse_available",
    "mounted",
    "profile_with_overrides",
    "set_read_ahead",
    "unmount",
]

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parent.parent
_CONTROL_TIMEOUT_S = 20.0  # per control request; one retry (see ControlClient)


class NetFSError(RuntimeError):
    """The simulated filesystem could not be mounted, controlled or unmounted."""


@dataclass(frozen=True)
class Counters:
    """What the server answered since the mount (or the last reset).

    Attributes:
        bytes_served: Bytes returned by successful read requests.
        requests: Successful read requests.
        per_file: Relative path -> ``(bytes, requests)``.
        errors: Read requests answered with EIO (injected faults, vanished files).
        opens: Successful opens.
        max_request_bytes: Largest successful read request.
        max_inflight: Most read requests in the server at once.
        inflight: Read requests in the server now.
        stalled: Read requests held by a stall now.
    """

    bytes_served: int
    requests: int
    per_file: dict[str, tuple[int, int]] = field(default_factory=dict)
    errors: int = 0
    opens: int = 0
    max_request_bytes: int = 0
    max_inflight: int = 0
    inflight: int = 0
    stalled: int = 0

    @classmethod
    def _from_wire(cls, data: dict[str, Any]) -> Counters:
        per_file = {k: (int(v[0]), int(v[1])) for k, v in data.pop("per_file", {}).items()}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(per_file=per_file, **{k: v for k, v in data.items() if k in names})


def fuse_available() -> tuple[bool, str]:
    """Tell whether FUSE mounts can be made here.

    Checks that ``/dev/fuse`` opens read-write, that ``fusermount3`` is on ``PATH``,
    that libfuse3 can be found and that mfusepy is installed (without importing it).

    Returns:
        ``(True, description)`` when :func:`mounted` can work, else ``(False, reason)``.

    Example:
        >>> ok, why = fuse_available()
    """
    import importlib.util

    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/fuse cannot be opened: {exc.strerror} (errno {exc.errno})"
    os.close(fd)
    fusermount = shutil.which("fusermount3")
    if fusermount is None:
        return False, "fusermount3 not found on PATH (apt-get install fuse3)"
    lib = ctypes.util.find_library("fuse3")
    if lib is None:
        return False, "libfuse3 not found (apt-get install fuse3 libfuse3-dev)"
    try:
        spec = importlib.util.find_spec("mfusepy")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return False, "Python package mfusepy is not installed"
    return True, f"/dev/fuse opens, {fusermount}, {lib}, mfusepy"


def _run_quiet(cmd: list[str], timeout: float = 15.0) -> tuple[int, str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)
    return done.returncode, (done.stderr or done.stdout).strip()


def unmount(path: str) -> bool:
    """Unmount ``path`` (a FUSE mount): plain first, lazily when busy, by any tool that is there.

    Returns:
        True when only a lazy unmount worked (files were still open), else False.
    """
    fusermount = shutil.which("fusermount3")
    attempts: list[tuple[list[str], bool]] = []
    if fusermount:
        attempts += [([fusermount, "-u", "-q", path], False)]
        attempts += [([fusermount, "-u", "-z", "-q", path], True)]
    attempts += [(["umount", path], False), (["umount", "-l", path], True)]
    for cmd, lazy in attempts:
        if not is_mounted(path):
            return False
        rc, message = _run_quiet(cmd)
        log.debug("%s: rc=%d %s", " ".join(cmd), rc, message)
        if rc == 0 and not is_mounted(path):
            if lazy:
                log.info("%s was busy: detached lazily", path)
            return lazy
    if is_mounted(path):
        raise NetFSError(f"could not unmount {path}")
    return False


class ControlClient:
    """Requests (`bench.protocol`) over the server's Unix socket; one at a time.

    Every request is idempotent (read counters, reset them, set a fault), so one that
    times out (a Python server starved of CPU on a busy machine) is sent once more over
    a new connection: a socket file that timed out cannot be read again, and a late
    reply on the old connection must not be taken for the next request's.
    """

    def __init__(self, sock_path: str, timeout: float) -> None:
        self._path, self._timeout = sock_path, timeout
        self._lock = threading.Lock()
        self._connect()

    def _connect(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(self._timeout)
        self._sock.connect(self._path)
        self._stream = self._sock.makefile("rwb")

    def _exchange(self, request: bytes) -> bytes:
        self._stream.write(request)
        self._stream.flush()
        return self._stream.readline()

    def _send(self, request: Any) -> bytes:
        line = proto.encode(request)
        with self._lock:
            try:
                try:
                    return self._exchange(line)
                except TimeoutError:
                    log.warning(
                        "netfs control: %r took over %.0f s; retrying", request, self._timeout
                    )
                    self.close()
                    self._connect()
                    return self._exchange(line)
            except OSError as exc:
                raise NetFSError(f"control channel failed during {request!r}: {exc}") from exc

    def call(self, request: Any) -> Any:
        """Send `request` (a `bench.protocol` control message); return the server's result.

        Raises:
            NetFSError: the channel failed or the server refused the request.
        """
        line = self._send(request)
        if not line:
            raise NetFSError(f"server closed the control channel during {request!r}")
        ok, result = proto.decode_reply(line)
        if not ok:
            raise NetFSError(f"server refused {request!r}: {result}")
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.close()
        with contextlib.suppress(OSError):
            self._sock.close()


class NetFS:
    """A mounted simulated network filesystem; made by :func:`mounted`.

    Attributes:
        path: The mount point.
        backing_dir: The directory it serves.
        profile: The settings it was mounted with (overrides applied).
        shared_bandwidth: The limit it shares with other mounts, or None (its own).
        pid: Process id of the server.
        read_ahead_kb: The mount's readahead window as the kernel reports it after
            mounting (``profile.read_ahead_kb`` only when setting it worked, e.g. as
            root); None when unreadable.
    """

    def __init__(
        self,
        path: Path,
        backing_dir: Path,
        profile: NetFSProfile,
        proc: subprocess.Popen[bytes],
        control: ControlClient,
        shared_bandwidth: SharedBandwidth | None = None,
    ) -> None:
        self.path = path
        self.backing_dir = backing_dir
        self.profile = profile
        self.shared_bandwidth = shared_bandwidth
        self.pid = proc.pid
        self._proc = proc
        self._control: ControlClient | None = control
        self._final: Counters | None = None
        self.read_ahead_kb = read_ahead_kb(path)

    def __repr__(self) -> str:
        state = "mounted" if self._control is not None else "unmounted"
        return f"NetFS({str(self.path)!r}, profile={self.profile.name!r}, {state})"

    # ----------------------------------------------------------------- helpers
    def _call(self, request: Any) -> Any:
        if self._control is None:
            raise NetFSError(f"{self.path} is no longer mounted")
        return self._control.call(request)

    def _relpath(self, path: str | os.PathLike[str]) -> str:
        text = os.fspath(path)
        if os.path.isabs(text):
            for base in (self.path, self.backing_dir):
                rel = os.path.relpath(text, base)
                if rel != ".." and not rel.startswith("../"):
                    return "" if rel == "." else rel
            raise ValueError(f"{text} is neither under {self.path} nor {self.backing_dir}")
        rel = os.path.normpath(text)
        if rel == ".." or rel.startswith("../"):
            raise ValueError(f"{text} leaves the mount")
        return "" if rel == "." else rel

    # ---------------------------------------------------------------- counters
    def counters(self) -> Counters:
        """Bytes and requests served since the mount or the last reset.

        Returns:
            A frozen :class:`Counters`; after unmount, the last values seen.

        Example:
            >>> fs.counters().bytes_served  # doctest: +SKIP
        """
        if self._control is None and self._final is not None:
            return self._final
        return Counters._from_wire(self._call(proto.GetCounters()))

    def reset_counters(self) -> None:
        """Set every counter to zero (``max_inflight`` included)."""
        self._call(proto.ResetCounters())

    def describe(self) -> dict[str, Any]:
        """What was measured, for a results document: ``kind``, ``fstype``, ``profile``
        (a dict), ``read_ahead_kb`` and a ``label`` (`bench.filesystems.Mount`)."""
        return {
            "kind": "netfs",
            "fstype": "fuse",
            "device": None,
            "profile": dataclasses.asdict(self.profile),
            "read_ahead_kb": self.read_ahead_kb,
            "label": f"{self.profile.name}: {self.profile.description}",
        }

    # ------------------------------------------------------------------ faults
    def inject_eio(self, relpath: str | os.PathLike[str], offset: int, length: int) -> None:
        """Make every read request overlapping a byte range of a file fail with EIO.

        The kernel reads whole pages (and readahead windows), so reads near the range
        may fail too; bytes already in the page cache are not affected.

        Args:
            relpath: File relative to the mount (or an absolute path under the mount or
                the backing directory).
            offset: First byte of the range.
            length: Bytes in the range (> 0).

        Example:
            >>> fs.inject_eio("model.safetensors", 1 << 20, 4096)  # doctest: +SKIP
        """
        self._call(proto.InjectEIO(path=self._relpath(relpath), offset=offset, length=length))

    def stall(self, seconds: float | None = None) -> None:
        """Hold every read request until :meth:`unstall` or until ``seconds`` pass.

        Args:
            seconds: Length of the stall; ``None`` stalls until :meth:`unstall`.

        Example:
            >>> fs.stall(2.0)  # doctest: +SKIP
        """
        self._call(proto.Stall(seconds=seconds))

    def unstall(self) -> None:
        """Lift a stall; held reads go on."""
        self._call(proto.Unstall())

    def vanish(self, relpath: str | os.PathLike[str]) -> None:
        """Make a file vanish: later opens and stats fail with ENOENT, reads with EIO.

        The kernel caches attributes and directory entries for a day, so a ``stat`` of
        a file looked up before may still succeed; an ``open`` always reaches the server.

        Args:
            relpath: File relative to the mount (or an absolute path).
        """
        self._call(proto.Vanish(path=self._relpath(relpath)))

    def clear_faults(self) -> None:
        """Remove injected EIO ranges and vanished files, and lift any stall."""
        self._call(proto.ClearFaults())

    def set_bandwidth(self, bps: float | None) -> None:
        """Change the aggregate bandwidth (of every mount sharing it, when shared).

        Args:
            bps: Bytes per second; ``None`` or 0 for no throttle.
        """
        self._call(proto.SetBandwidth(bps=bps))

    def set_latency(self, seconds: float) -> None:
        """Change the latency added to each read request.

        Args:
            seconds: Latency per request, >= 0.
        """
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._call(proto.SetLatency(seconds=seconds))

    # ------------------------------------------------------------------- cache
    def evict(self) -> None:
        """Drop the page cache of every file, through the mount and in the backing dir.

        Uses ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file (drop_caches is not
        writable on every machine). Pages mapped by a process stay cached. Files that
        vanished are skipped through the mount.

        Example:
            >>> fs.evict()  # doctest: +SKIP
        """
        evict_mirrored(self.path, self.backing_dir)

    # ---------------------------------------------------------------- shutdown
    def _close(self) -> None:
        """Lift faults, unmount (lazily if busy) and end the server; idempotent."""
        if self._control is not None:
            with contextlib.suppress(NetFSError, ValueError):
                self._final = Counters._from_wire(self._control.call(proto.GetCounters()))
            with contextlib.suppress(NetFSError, ValueError):
                self._control.call(proto.Shutdown())  # lifts stalls, ignores new ones
            self._control.close()
            self._control = None
        _teardown(self._proc, str(self.path))


def _stop_server(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
        return
    for sig, wait_s, level in (
        (signal.SIGTERM, 3.0, logging.INFO),
        (signal.SIGKILL, 10.0, logging.WARNING),
    ):
        log.log(level, "netfs server %d still running; sending %s", proc.pid, sig.name)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
            return


def _teardown(proc: subprocess.Popen[bytes], mountpoint: str) -> None:
    """Unmount, then make sure the server is gone (killing it if it lingers)."""
    grace_s = 5.0
    try:
        if unmount(mountpoint):
            # Detached, but the connection lives while files are open: end it now.
            grace_s = 0.5
    except NetFSError as exc:
        log.warning("%s; stopping the server first", exc)
        grace_s = 0.5
    _stop_server(proc, grace_s=grace_s if proc.poll() is None else 0.0)
    if is_mounted(mountpoint):  # server gone, mount left: remove what remains
        try:
            unmount(mountpoint)
        except NetFSError as exc:
            log.error("%s; it is left behind", exc)


def _server_log_tail(log_path: Path, limit: int = 4000) -> str:
    try:
        return log_path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def set_read_ahead(mountpoint: str | os.PathLike[str], kb: int) -> None:
    """Set a mount's read-ahead window (KiB); a failure is logged, not raised."""
    try:
        set_read_ahead_kb(mountpoint, kb)
    except OSError as exc:
        log.warning("cannot set read_ahead_kb=%d at %s: %s", kb, mountpoint, exc)


@contextmanager
def mounted(
    backing_dir: str | os.PathLike[str],
    *,
    profile: str | NetFSProfile = "slow-nfs",
    mountpoint: str | os.PathLike[str] | None = None,
    startup_timeout: float = 30.0,
    shared_bandwidth: SharedBandwidth | None = None,
    **overrides: Any,
) -> Iterator[NetFS]:
    """Mount ``backing_dir`` read-only as a simulated network filesystem.

    The server runs in its own process. The mount is ready when the context is entered
    and is always removed on exit, also after an exception, while files are open (lazy
    unmount) or while the server is stalled (stalls are lifted first; the server is
    killed if it does not exit).

    Args:
        backing_dir: Directory to serve.
        profile: A key of :data:`PROFILES` or a :class:`NetFSProfile`.
        mountpoint: Empty directory to mount on (created if missing); default: a new
            temporary directory, removed afterwards.
        startup_timeout: Seconds to wait for the mount to answer.
        shared_bandwidth: A limit this mount shares with every other mount given it
            (one storage serving several nodes), in place of the profile's own
            ``bandwidth_bps``; it must stay open while the mount is. Counters stay per
            mount.
        **overrides: Profile fields to replace: ``bandwidth_bps``, ``latency_s``,
            ``threads``, ``max_read``, ``read_ahead_kb``, ``max_background``,
            ``congestion_threshold``.

    Returns:
        A context manager yielding the :class:`NetFS`.

    Raises:
        NetFSError: The mount did not come up.
        TypeError: ``bandwidth_bps`` given together with `shared_bandwidth`.

    Example:
        >>> with mounted(tmp, profile="local-fuse", latency_s=0.01) as fs:  # doctest: +SKIP
        ...     (fs.path / "a.bin").read_bytes()
    """
    if shared_bandwidth is not None:
        if "bandwidth_bps" in overrides:
            raise TypeError("give the rate to SharedBandwidth, not bandwidth_bps, when sharing")
        overrides = {**overrides, "bandwidth_bps": shared_bandwidth.bps}
    resolved = resolve_profile(profile, overrides)
    backing = Path(os.path.realpath(backing_dir))
    if not backing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "backing_dir is not a directory", str(backing))
    runtime = Path(tempfile.mkdtemp(prefix="netfs-"))
    mp = _make_mountpoint(runtime, mountpoint)
    config = _server_config(resolved, backing, mp, runtime, shared_bandwidth)
    log_path = runtime / "server.log"
    proc = _start_server(config, log_path)
    fs: NetFS | None = None
    try:
        _wait_for_mount(proc, str(mp), startup_timeout, log_path)
        if resolved.read_ahead_kb is not None:
            set_read_ahead(mp, resolved.read_ahead_kb)
        control = ControlClient(config.control, timeout=_CONTROL_TIMEOUT_S)
        fs = NetFS(mp, backing, resolved, proc, control, shared_bandwidth)
        log.info("mounted %s at %s (%s, server pid %d)", backing, mp, resolved.name, proc.pid)
        yield fs
    finally:
        if fs is not None:
            fs._close()
        else:
            _teardown(proc, str(mp))
        _after_unmount(proc, runtime, mp, own_mountpoint=mountpoint is None)


def _after_unmount(
    proc: subprocess.Popen[bytes], runtime: Path, mp: Path, *, own_mountpoint: bool
) -> None:
    """Report a failed server, and remove its files (and our mount point if unmounted)."""
    if proc.returncode not in (0, None):
        log.warning(
            "netfs server exited with %s; log tail:\n%s",
            proc.returncode,
            _server_log_tail(runtime / "server.log"),
        )
    if not (own_mountpoint and is_mounted(str(mp))):
        shutil.rmtree(runtime, ignore_errors=True)
    log.info("unmounted %s", mp)


def _make_mountpoint(runtime: Path, mountpoint: str | os.PathLike[str] | None) -> Path:
    """`mountpoint` (created if missing), or a new one under `runtime`; never a mount."""
    if mountpoint is None:
        mp = runtime / "mnt"
        mp.mkdir()
    else:
        mp = Path(os.path.realpath(mountpoint))
        mp.mkdir(parents=True, exist_ok=True)
    if is_mounted(str(mp)):
        shutil.rmtree(runtime, ignore_errors=True)
        raise NetFSError(f"{mp} is already a mount point")
    return mp


def _server_config(
    resolved: NetFSProfile,
    backing: Path,
    mp: Path,
    runtime: Path,
    shared_bandwidth: SharedBandwidth | None,
) -> proto.ServerConfig:
    return proto.ServerConfig(
        backing=str(backing),
        mountpoint=str(mp),
        control=str(runtime / "control.sock"),
        parent_pid=os.getpid(),
        bandwidth_bps=resolved.bandwidth_bps,
        latency_s=resolved.latency_s,
        threads=resolved.threads,
        max_read=resolved.max_read,
        max_background=resolved.max_background,
        congestion_threshold=resolved.congestion_threshold,
        allow_other=os.geteuid() == 0,
        fsname=f"netfs-{resolved.name}",
        log_level="INFO" if log.isEnabledFor(logging.DEBUG) else "WARNING",
        bandwidth_file=shared_bandwidth.path if shared_bandwidth is not None else None,
    )


def _start_server(config: proto.ServerConfig, log_path: Path) -> subprocess.Popen[bytes]:
    """Start the server process; it imports the bench from this tree (its working
    directory), whatever the installed copy."""
    env = {**os.environ, "FUSE_LIBRARY_NAME": "fuse3"}
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "bench._netfs_server", config.to_json()],
            cwd=_REPO,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a ^C reaches us, and we take the mount down in order
        )


def _wait_for_mount(
    proc: subprocess.Popen[bytes], mountpoint: str, timeout: float, log_path: Path
) -> None:
    """Poll from this (parent) process until the mount answers a stat of its root.

    The stat runs in a daemon thread: a server that never answers it makes this raise
    after ``timeout`` instead of hanging (the teardown then kills the server).
    """
    deadline = time.monotonic() + timeout
    parent_dev = os.stat(os.path.dirname(mountpoint)).st_dev

    def failure(why: str) -> NetFSError:
        return NetFSError(f"{mountpoint}: {why}:\n{_server_log_tail(log_path)}")

    while not is_mounted(mountpoint):
        rc = proc.poll()
        if rc is not None:
            raise failure(f"netfs server exited with {rc} before mounting")
        if time.monotonic() > deadline:
            raise failure(f"not mounted after {timeout:.0f} s")
        time.sleep(0.01)
    result = stat_within(mountpoint, deadline - time.monotonic())
    if result is None:
        raise failure(f"mount root did not answer a stat in {timeout:.0f} s")
    if isinstance(result, OSError):
        raise failure(f"stat of the mount root failed: {result}")
    if result.st_dev == parent_dev:
        raise failure("mount root has the device of its parent directory")
