"""A real network filesystem client for the bench: sshfs to an sshd over a limited link.

:mod:`bench.netfs` simulates a network filesystem and charges nothing for the client's
CPU; a real client pays for encryption, RPC and FUSE round trips on the node itself, and
that changes which prefetch settings win. This module serves a backing directory through
a real client on one machine, with the same shape as :func:`bench.netfs.mounted`:

* a network namespace made for the run (unique name) holds the "server"; a veth pair
  joins it to the root namespace, with a private link-local /30 (``169.254.x.y``) whose
  two addresses are the only ones that carry traffic;
* ``tc tbf`` limits the link in both directions to the profile's bandwidth;
* this kernel has no ``netem``, so the round trip is added in user space, on the way in
  only (a request waits one round trip; the answers, the bulk of the bytes, pass at once).
  By default (``latency_at="server"``) the SFTP wrapper described below holds each request
  for the round trip before the sftp-server sees it: no cost per byte of data. With
  ``latency_at="link"`` a TCP relay in the namespace (``bench/_relay.py``) holds the bytes
  instead, so that TCP and ssh see the round trip too; that relay moves every byte through
  a Python process and costs about 3 CPU-s/GB here, more than the ssh client itself, all
  of it taken from the 2 cores the client under test runs on;
* ``sshd`` runs in the namespace on a high port with a host key, a client key, an
  ``authorized_keys`` and an ``sshd_config`` all made for the run in a temporary directory
  (nothing in ``/root/.ssh`` or ``/etc/ssh`` is read or changed; ``/run/sshd``, sshd's
  compiled-in privilege-separation directory, is created when missing);
* ``sshfs`` mounts it from the root namespace, read-only, with the page cache kept across
  opens (``kernel_cache``, ``auto_cache`` off, day-long attribute and entry timeouts),
  64 KiB SFTP reads (sshfs's largest), no reconnect, and ``ServerAliveInterval`` so that a
  link that goes silent becomes an error within about 15 s instead of a hang.

**How bytes served are counted, and why it is exact.** sshd's ``sftp`` subsystem is
``bench/_sftp_counter.py``, a wrapper that starts the real ``sftp-server`` on a pair of
pipes and reads the SFTP framing that passes through it. Every ``DATA`` answer to a
``READ`` request adds its payload length to ``bytes_served``; that payload is exactly the
file data the server puts on the link for the client, no more (no SSH, TCP or SFTP
headers, no requests, no directory listings) and no less (a short read at the end of a
file counts what was sent). The payload moves with ``splice(2)`` and is never copied into
the wrapper. Alternatives were weighed and rejected: ``rchar`` of the sftp-server also
counts its requests read from stdin; ``read_bytes`` counts storage reads, so it is zero
when the server's page cache is hot and includes its readahead; the qdisc's byte counts
include ssh and TCP framing; an extra FUSE pass-through under sshd would count storage
reads, add a page cache of its own between server and link, and cost CPU on the data
path. The wrapper also knows exactly which reads are outstanding (``inflight``), which the
bench uses to wait for a quiet server before it evicts.

**Cold** means evicted on both sides: :meth:`SSHFS.evict` drops each file's pages through
the sshfs mount and in the backing directory (:func:`engine.residency.evict`, which writes
dirty pages first).

The processes and the link are made and removed by ``bench/sshfs_stack.py`` (`Stack`);
:class:`SSHFS` is what the bench sees of them: counters, CPU, faults, eviction.

**Teardown** happens on exit, on an exception and on Ctrl-C: stalled processes are
continued first, the mount is removed (lazily while files are open), then sshfs, ssh, the
relay and every sshd process are stopped, the veth pair and the namespace are deleted and
the temporary directory (keys included) is removed. A missing piece (``sshfs``, ``ssh``,
``sshd``, ``sftp-server``, ``ip``, ``tc``, ``fusermount3``, ``/dev/fuse``) is an
:class:`SSHFSMissingError` naming it; every wait has a timeout.

Needs root (network namespaces, veth, tc, mounts) and ``apt-get install sshfs
openssh-server iproute2`` (``scripts/setup.sh`` does it).

Example:
    >>> with mounted("/data/ckpt", profile="sshfs") as fs:         # doctest: +SKIP
    ...     data = (fs.path / "model.safetensors").read_bytes()
    ...     fs.counters().bytes_served
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import mmap
import os
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench import _sftp_counter as wire
from bench.mounts import evict_mirrored
from bench.netfs_profiles import profile_with_overrides
from bench.procs import (
    cpu_seconds,
    descendants,
    signal_all,
)
from bench.sshfs_env import (
    SSHFSError,
    SSHFSMissingError,
    find_tools,
    sshfs_available,
)
from bench.sshfs_stack import Stack
from engine.cursor import pid_alive

__all__ = [
    "PROFILES",
    "CPUTimes",
    "Counters",
    "SSHFS",
    "SSHFSError",
    "SSHFSMissingError",
    "SSHFSProfile",
    "mounted",
    "sshfs_available",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSHFSProfile:
    """Settings of one real-client link.

    Attributes:
        name: Short label, a key of :data:`PROFILES`.
        bandwidth_bps: Link rate in bytes/s in each direction (``tc tbf`` on both veth
            ends; it counts bytes on the wire, ssh and TCP framing included); ``None``
            for no limit.
        latency_s: Round trip added to every request (all of it on the way to the
            server); 0 for none.
        latency_at: Where the round trip is added: ``"server"`` (the SFTP wrapper holds
            each request; nothing per byte) or ``"link"`` (a TCP relay holds every byte
            the client sends: TCP and ssh see the latency too; costs CPU per byte).
        description: What it stands for, in words.
        max_read: Bytes per SFTP read request (sshfs ``-o max_read``; at most 65536).
        read_ahead_kb: Kernel readahead window of the mount; ``None`` keeps the kernel's
            default (128 KiB), as a user who just mounts it gets.
        max_background: Most asynchronous FUSE requests in flight
            (``/sys/fs/fuse/connections/*/max_background``); ``None`` keeps the default.
        max_conns: SSH connections sshfs opens (``-o max_conns``); 1 is sshfs's default.
        ciphers: ssh ``Ciphers`` for the client; ``None`` keeps OpenSSH's preference.
    """

    name: str
    bandwidth_bps: float | None
    latency_s: float
    description: str
    latency_at: Literal["server", "link"] = "server"
    max_read: int = 65536
    read_ahead_kb: int | None = None
    max_background: int | None = None
    max_conns: int = 1
    ciphers: str | None = None


PROFILES: dict[str, SSHFSProfile] = {
    p.name: p
    for p in (
        SSHFSProfile(
            name="sshfs",
            bandwidth_bps=200e6,
            latency_s=0.001,
            description="real client: sshfs 3 (kernel FUSE + ssh) to sshd in a network "
            "namespace, veth limited to 200 MB/s each way by tc tbf, 1 ms round trip added "
            "to each request, sshfs defaults otherwise",
        ),
        SSHFSProfile(
            name="sshfs-quick",
            bandwidth_bps=400e6,
            latency_s=0.0005,
            description="real client, link faster than the client: sshfs 3 to sshd in a "
            "network namespace, veth limited to 400 MB/s by tc tbf, 0.5 ms round trip; the "
            "client's CPU is the bottleneck",
        ),
    )
}

_PROFILE_FIELDS = {f.name for f in dataclasses.fields(SSHFSProfile)} - {"name", "description"}


@dataclass(frozen=True)
class Counters:
    """What the server answered since the mount (or the last reset).

    Attributes:
        bytes_served: File bytes the server sent in answers to read requests.
        requests: Read requests answered with data.
        errors: Read requests answered with an error status (EOF is not an error).
        eofs: Read requests answered with end of file.
        opens: Files opened successfully.
        inflight: Read requests sent by the client and not answered yet.
        stalled: Read requests outstanding while the server is stalled (else 0).
        max_request_bytes: Largest data answer since the mount (not reset).
        connections: SFTP sessions since the mount (one per ssh connection).
    """

    bytes_served: int
    requests: int
    errors: int = 0
    eofs: int = 0
    opens: int = 0
    inflight: int = 0
    stalled: int = 0
    max_request_bytes: int = 0
    connections: int = 0


@dataclass(frozen=True)
class CPUTimes:
    """CPU seconds (user + system, exited children included) of each side.

    Attributes:
        client_s: sshfs and the ssh processes it runs: what the node pays.
        server_s: sshd, the SFTP wrappers and servers, and the relay: what the file
            server would pay (on this machine it shares the CPUs with the client).
    """

    client_s: float
    server_s: float


# ------------------------------------------------------------------- the mount
class SSHFS:
    """A mounted real network filesystem (sshfs over a limited veth); made by :func:`mounted`.

    Attributes:
        path: The mount point.
        backing_dir: The directory the server serves.
        profile: The settings it was mounted with (overrides applied).
        netns: Name of the network namespace made for the run.
        client_addr: The root namespace's end of the veth pair.
        server_addr: The namespace's end, where sshfs connects.
        read_ahead_kb: The mount's readahead window as the kernel reports it; None when
            unreadable.
        versions: ``{"sshfs": ..., "ssh": ...}`` version lines.
    """

    def __init__(self, backing_dir: Path, profile: SSHFSProfile, runtime: Path) -> None:
        self.stack = Stack(backing_dir, profile, runtime)
        self.backing_dir = backing_dir
        self.profile = profile
        self.path = self.stack.path
        self.netns = self.stack.netns
        self._maps: dict[str, mmap.mmap] = {}
        self._baseline: dict[str, tuple[int, ...]] = {}
        self._stopped: list[int] = []
        self._final: Counters | None = None
        self._closed = False

    @property
    def client_addr(self) -> str:
        """The root namespace's end of the veth pair."""
        return self.stack.client_addr

    @property
    def server_addr(self) -> str:
        """The namespace's end, where sshfs connects."""
        return self.stack.server_addr

    @property
    def read_ahead_kb(self) -> int | None:
        """The mount's read-ahead as the kernel reports it; None when unreadable."""
        return self.stack.read_ahead_kb

    @property
    def versions(self) -> dict[str, str]:
        """``{"sshfs": ..., "ssh": ...}`` version lines."""
        return self.stack.versions

    def __repr__(self) -> str:
        state = "closed" if self._closed else "mounted"
        return f"SSHFS({str(self.path)!r}, profile={self.profile.name!r}, {state})"

    # ---------------------------------------------------------------- counters
    def _slots(self) -> dict[str, tuple[int, ...]]:
        """Each SFTP session's counter slots, by counter file name."""
        out: dict[str, tuple[int, ...]] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.stack.counter_dir):
                if not entry.name.endswith(".ctr"):
                    continue
                mapped = self._maps.get(entry.name)
                if mapped is None:
                    try:
                        with open(entry.path, "rb") as f:
                            mapped = mmap.mmap(f.fileno(), 8 * wire.SLOTS, prot=mmap.PROT_READ)
                    except (OSError, ValueError):
                        continue  # still being created
                    self._maps[entry.name] = mapped
                values = struct.unpack_from(f"<{wire.SLOTS}q", mapped)
                if values[wire.S_MAGIC] == wire.MAGIC:
                    out[entry.name] = values
        return out

    def counters(self) -> Counters:
        """What the server answered since the mount or the last reset.

        Returns:
            A frozen :class:`Counters`; after unmount, the last values seen.

        Raises:
            SSHFSError: A wrapper lost the SFTP framing, so counts would be wrong.

        Example:
            >>> fs.counters().bytes_served  # doctest: +SKIP
        """
        if self._closed and self._final is not None:
            return self._final
        slots = self._slots()
        if any(v[wire.S_DESYNC] for v in slots.values()):
            raise SSHFSError("an SFTP counter lost the protocol framing; counts are unknown")
        zero = (0,) * wire.SLOTS

        def total(slot: int) -> int:
            return sum(v[slot] - self._baseline.get(k, zero)[slot] for k, v in slots.items())

        inflight = sum(
            v[wire.S_READS_SENT] - v[wire.S_DATA] - v[wire.S_EOF] - v[wire.S_ERRORS]
            for v in slots.values()
            if not v[wire.S_DONE]
        )
        return Counters(
            bytes_served=total(wire.S_BYTES),
            requests=total(wire.S_DATA),
            errors=total(wire.S_ERRORS),
            eofs=total(wire.S_EOF),
            opens=total(wire.S_OPENS_OK),
            inflight=inflight,
            stalled=inflight if self._stopped else 0,
            max_request_bytes=max((v[wire.S_MAX_DATA] for v in slots.values()), default=0),
            connections=len(slots),
        )

    def reset_counters(self) -> None:
        """Count from zero again (``max_request_bytes`` and ``inflight`` excepted)."""
        self._baseline = self._slots()

    def cpu_times(self) -> CPUTimes:
        """CPU seconds used so far by the client and by the server side.

        Returns:
            A :class:`CPUTimes`; take two and subtract to charge one read.

        Example:
            >>> before = fs.cpu_times()  # doctest: +SKIP
        """
        client = self.stack.client_pids()
        server = [pid for pids in self.stack.server_pids().values() for pid in pids]
        return CPUTimes(client_s=cpu_seconds(client), server_s=cpu_seconds(server))

    def pids(self) -> dict[str, list[int]]:
        """Processes running for this mount now, by role.

        Returns:
            ``{"client": [sshfs, ssh...], "server": [sshd..., wrappers, sftp-servers],
            "relay": [...]}``; roles with no process are left out.
        """
        client = self.stack.client_pids()
        return {**({"client": client} if client else {}), **self.stack.server_pids()}

    # ------------------------------------------------------------------- faults
    def _sftp_server_pids(self) -> list[int]:
        pids = [v[wire.S_SERVER_PID] for v in self._slots().values() if not v[wire.S_DONE]]
        return [p for p in pids if pid_alive(p)]

    def stall(self, target: Literal["server", "link"] = "server") -> None:
        """Make the server stop answering until :meth:`unstall` (SIGSTOP).

        Args:
            target: ``"server"`` stops every sftp-server: ssh stays connected and
                answers keepalives, so a read waits for as long as the stall lasts (a
                hung file server). ``"link"`` stops the relay: nothing crosses the link,
                and ssh gives up after about 15 s of silence (``ServerAliveInterval``),
                which ends the mount (needs ``latency_at="link"``, hence a relay).

        Raises:
            SSHFSError: Nothing to stop (no SFTP session yet, or no relay).

        Example:
            >>> fs.stall(); time.sleep(2); fs.unstall()  # doctest: +SKIP
        """
        if target == "link":
            relay = self.stack.relay
            if relay is None or not pid_alive(relay.pid):
                raise SSHFSError('no relay to stop: it runs only with latency_at="link"')
            pids = [relay.pid]
        else:
            pids = self._sftp_server_pids()
            if not pids:
                raise SSHFSError("no sftp-server is running")
        signal_all(pids, signal.SIGSTOP)
        self._stopped += [p for p in pids if p not in self._stopped]
        log.info("stalled the %s (%s)", target, pids)

    def unstall(self) -> None:
        """Let stopped server processes go on (SIGCONT); no-op when none is stopped."""
        if self._stopped:
            signal_all(self._stopped, signal.SIGCONT)
            log.info("continued %s", self._stopped)
        self._stopped = []

    def kill_server(self) -> None:
        """Kill sshd, its sessions and the relay at once (SIGKILL): a server that died.

        The client sees the connection drop: reads fail (ECONNABORTED) and sshfs, which
        does not reconnect, ends and removes its mount.
        """
        self.unstall()
        for proc in (self.stack.relay, self.stack.sshd):
            if proc is not None and pid_alive(proc.pid):
                signal_all([*descendants(proc.pid), proc.pid], signal.SIGKILL)
        log.info("killed the server of %s", self.path)

    # ------------------------------------------------------------------- cache
    def evict(self) -> None:
        """Drop the page cache of every file, through the mount and in the backing dir.

        ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file (pages mapped by a process
        stay). Opening a file through the mount is a request to the server: call it when
        the server is not stalled.

        Raises:
            SSHFSError: The server is stalled (the opens would wait for it).

        Example:
            >>> fs.evict()  # doctest: +SKIP
        """
        if self._stopped:
            raise SSHFSError("cannot evict through the mount while the server is stalled")
        evict_mirrored(self.path, self.backing_dir)

    def describe(self) -> dict[str, Any]:
        """What was measured, for a results document.

        Returns:
            ``kind``, ``fstype``, ``profile`` (a dict), ``read_ahead_kb``, ``versions``,
            ``link`` (namespace, addresses, qdisc, latency source) and a ``label``.
        """
        prof = dataclasses.asdict(self.profile)
        return {
            "kind": "sshfs",
            "fstype": "fuse.sshfs",
            "device": None,
            "profile": prof,
            "read_ahead_kb": self.read_ahead_kb,
            "versions": dict(self.versions),
            "link": {
                "netns": self.netns,
                "client_addr": self.client_addr,
                "server_addr": self.server_addr,
                "qdisc": "tbf" if self.profile.bandwidth_bps else None,
                "latency": (
                    ("tcp relay" if self.stack.uses_relay else "sftp request delay")
                    if self.profile.latency_s > 0
                    else None
                ),
            },
            "label": f"{self.profile.name}: {self.profile.description}; bytes served = "
            "SFTP DATA payload counted at the server",
        }

    def _close(self) -> None:
        """Undo everything that was made, in order; every step runs even if one fails."""
        if self._closed:
            return
        steps: list[tuple[str, Callable[[], None]]] = [
            ("continue stopped processes", self.unstall),
            ("read the last counters", self._keep_final_counters),
            ("close the counters", self._close_maps),
            *self.stack.teardown(),
        ]
        interrupted: BaseException | None = None
        for what, step in steps:
            try:
                step()
            except KeyboardInterrupt as exc:  # finish the teardown, then stop
                interrupted = exc
            except Exception as exc:
                log.error("sshfs teardown: %s failed: %s", what, exc)
        self._closed = True
        if interrupted is not None:
            raise interrupted

    def _keep_final_counters(self) -> None:
        self._final = self.counters()

    def _close_maps(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()


def _resolve_profile(profile: str | SSHFSProfile, overrides: dict[str, Any]) -> SSHFSProfile:
    resolved = profile_with_overrides(PROFILES, profile, overrides, _PROFILE_FIELDS)
    if (
        resolved.latency_s < 0
        or resolved.latency_at not in ("server", "link")
        or (resolved.bandwidth_bps is not None and resolved.bandwidth_bps <= 0)
        or not 4096 <= resolved.max_read <= 65536
        or resolved.max_conns < 1
        or (resolved.read_ahead_kb is not None and resolved.read_ahead_kb < 0)
        or (resolved.max_background is not None and resolved.max_background < 1)
    ):
        raise ValueError(f"invalid profile settings: {resolved}")
    return resolved


@contextmanager
def mounted(
    backing_dir: str | os.PathLike[str],
    *,
    profile: str | SSHFSProfile = "sshfs",
    startup_timeout: float = 30.0,
    **overrides: Any,
) -> Iterator[SSHFS]:
    """Serve ``backing_dir`` through sshfs over a limited link, read-only.

    Everything is made when the context is entered and removed on exit, also after an
    exception, on Ctrl-C, while files are open (lazy unmount) or while the server is
    stalled (it is continued first).

    Args:
        backing_dir: Directory to serve.
        profile: A key of :data:`PROFILES` or an :class:`SSHFSProfile`.
        startup_timeout: Seconds for the whole set-up (namespace, sshd, relay, mount).
        **overrides: Profile fields to replace: ``bandwidth_bps``, ``latency_s``,
            ``latency_at``, ``max_read``, ``read_ahead_kb``, ``max_background``,
            ``max_conns``, ``ciphers``.

    Returns:
        A context manager yielding the :class:`SSHFS`.

    Raises:
        SSHFSMissingError: A program, ``/dev/fuse`` or root is missing.
        SSHFSError: The set-up failed (the message holds the failing step's output).

    Example:
        >>> with mounted(tmp, profile="sshfs-quick", latency_s=0.002) as fs:  # doctest: +SKIP
        ...     (fs.path / "a.bin").read_bytes()
    """
    resolved = _resolve_profile(profile, overrides)
    backing = Path(os.path.realpath(backing_dir))
    if not backing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "backing_dir is not a directory", str(backing))
    tools = find_tools()
    fs = SSHFS(backing, resolved, Path(tempfile.mkdtemp(prefix="sshfs-")))
    try:
        fs.stack.start(tools, startup_timeout)
        log.info(
            "mounted %s at %s over sshfs (%s, %s <-> %s in %s)",
            backing, fs.path, resolved.name, fs.client_addr, fs.server_addr, fs.netns,
        )  # fmt: skip
        yield fs
    finally:
        fs._close()
        log.info("unmounted %s and removed %s", fs.path, fs.netns)
