"""What the real client (`bench.sshfs`) needs from the machine: its programs, and the link.

`find_tools` names the first missing program, file or privilege (`SSHFSMissingError`,
with the package that provides it); `pick_subnet` and `limit_link` make the private veth
link of the namespace and limit its rate with ``tc tbf``; `run_command` runs one set-up
step with a timeout and turns its failure into an `SSHFSError` that quotes its output.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from bench.netfs import NetFSError

__all__ = [
    "DEV_FUSE",
    "SFTP_SERVERS",
    "SSHFSError",
    "SSHFSMissingError",
    "Tools",
    "find_tools",
    "limit_link",
    "pick_subnet",
    "run_command",
    "sshfs_available",
    "version",
]

DEV_FUSE = "/dev/fuse"
SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
)
CMD_TIMEOUT_S = 15.0
_KiB = 1 << 10


class SSHFSError(NetFSError):
    """The sshfs mount, its link or its server could not be set up, used or removed.

    A subclass of :class:`bench.netfs.NetFSError`, so the bench handles both kinds of
    network filesystem with one ``except``.
    """


class SSHFSMissingError(SSHFSError):
    """A program, file or privilege that the real client needs is not there.

    Attributes:
        piece: What is missing (``"sshfs"``, ``"/dev/fuse"``, ...).
    """

    def __init__(self, piece: str, hint: str) -> None:
        super().__init__(f"{piece} is missing: {hint}")
        self.piece = piece


def run_command(cmd: list[str], what: str, timeout: float = CMD_TIMEOUT_S) -> str:
    """Run a command; return its stdout, or raise SSHFSError with its stderr."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SSHFSError(f"{what}: `{shlex.join(cmd)}` took over {timeout:.0f} s") from exc
    except OSError as exc:
        raise SSHFSError(f"{what}: `{shlex.join(cmd)}` failed: {exc}") from exc
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise SSHFSError(f"{what}: `{shlex.join(cmd)}` exited {done.returncode}: {message}")
    return done.stdout


def version(cmd: list[str], prefix: str) -> str:
    """The first line of ``cmd``'s output that starts with ``prefix``, or "?"."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout + done.stderr).splitlines()
    return next((line.strip() for line in lines if line.startswith(prefix)), "?")


# --------------------------------------------------------------- what is needed
@dataclass(frozen=True)
class Tools:
    sshfs: str
    ssh: str
    ssh_keygen: str
    sshd: str
    sftp_server: str
    ip: str
    tc: str
    fusermount: str


def find_tools() -> Tools:
    """Every program the real client needs, or SSHFSMissingError naming the first gap."""
    found: dict[str, str] = {}
    for attr, prog, package in (
        ("sshfs", "sshfs", "sshfs"),
        ("ssh", "ssh", "openssh-client"),
        ("ssh_keygen", "ssh-keygen", "openssh-client"),
        ("sshd", "sshd", "openssh-server"),
        ("ip", "ip", "iproute2"),
        ("tc", "tc", "iproute2"),
        ("fusermount", "fusermount3", "fuse3"),
    ):
        path = shutil.which(prog)
        if path is None:
            raise SSHFSMissingError(prog, f"not found on PATH (apt-get install {package})")
        found[attr] = path
    server = next((p for p in SFTP_SERVERS if os.access(p, os.X_OK)), None)
    if server is None:
        raise SSHFSMissingError(
            "sftp-server", f"none of {', '.join(SFTP_SERVERS)} (apt-get install openssh-server)"
        )
    try:
        fd = os.open(DEV_FUSE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise SSHFSMissingError(DEV_FUSE, f"cannot be opened: {exc.strerror}") from exc
    os.close(fd)
    if os.geteuid() != 0:
        raise SSHFSMissingError(
            "root", "network namespaces, veth pairs, tc and sshd need root (CAP_NET_ADMIN)"
        )
    if not os.path.exists("/proc/self/ns/net"):
        raise SSHFSMissingError("network namespaces", "the kernel has no CONFIG_NET_NS")
    return Tools(sftp_server=server, **found)


def sshfs_available() -> tuple[bool, str]:
    """Tell whether :func:`mounted` can work here (programs, /dev/fuse, root).

    Returns:
        ``(True, description)`` or ``(False, what is missing and how to install it)``.

    Example:
        >>> ok, why = sshfs_available()
    """
    try:
        tools = find_tools()
    except SSHFSMissingError as exc:
        return False, str(exc)
    return True, f"{tools.sshfs}, {tools.sshd}, {tools.sftp_server}, {DEV_FUSE}, root"


# ----------------------------------------------------------------------- the link
def pick_subnet(ip: str) -> ipaddress.IPv4Network:
    """A link-local /30 that no address or route of the root namespace overlaps."""
    used: list[ipaddress.IPv4Network] = []
    for line in run_command([ip, "-4", "-o", "addr", "show"], "list addresses").splitlines():
        parts = line.split()
        if "inet" in parts:
            used.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    routes = run_command([ip, "-4", "route", "show", "table", "all"], "list routes")
    for line in routes.splitlines():
        with contextlib.suppress(ValueError, IndexError):
            first = line.split()[0]
            if first not in ("default", "broadcast", "local", "unreachable"):
                used.append(ipaddress.ip_network(first, strict=False))
    rng = random.Random(secrets.randbits(64))
    for _ in range(1000):
        third = rng.choice([x for x in range(1, 254) if x != 169])  # .169: cloud metadata
        net = ipaddress.ip_network(f"169.254.{third}.{4 * rng.randrange(64)}/30")
        if not any(net.overlaps(u) for u in used):
            return net
    raise SSHFSError("no free /30 in 169.254.0.0/16")


def limit_link(tc: str, dev: str, bps: float, netns: list[str]) -> None:
    rate_bit = int(bps * 8)
    burst = max(256 * _KiB, int(bps / 100))  # 10 ms of traffic, and room for GSO packets
    run_command(
        [*netns, tc, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bit}bit",
         "burst", str(burst), "latency", "50ms"],
        f"limit {dev} to {bps / 1e6:.0f} MB/s",
    )  # fmt: skip
