"""The processes and the link behind one sshfs mount: made in order, removed in reverse.

`Stack` makes what `bench.sshfs.SSHFS` measures and stalls: SSH keys in a temporary
directory, a network namespace joined to this one by a veth pair (rate-limited with
``tc``), sshd in the namespace with every SFTP session wrapped by a byte counter
(`bench._sftp_counter`), a latency relay when the latency is on the link
(`bench._relay`), and the sshfs client mount. `Stack.teardown` lists the steps that
undo it, each of which runs even if an earlier one failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bench.mounts import is_mounted, read_ahead_kb, stat_within
from bench.netfs import set_read_ahead, unmount
from bench.procs import descendants, pids_with_arg, reap, stop_processes, tail
from bench.sshfs_env import SSHFSError, Tools, limit_link, pick_subnet, run_command, version
from engine.cursor import pid_alive

if TYPE_CHECKING:
    from bench.sshfs import SSHFSProfile

__all__ = ["Stack", "stop"]

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_COUNTER_SCRIPT = _HERE / "_sftp_counter.py"
_RELAY_SCRIPT = _HERE / "_relay.py"
_SSHD_PRIVSEP_DIR = "/run/sshd"
#: Ports in the namespace: sshd, and the relay in front of it when latency is on the link.
# (nothing else listens in the namespace made for the run)
_SSHD_PORT = 22022
_RELAY_PORT = 22023
_SERVER_ALIVE_S = 5  # x ServerAliveCountMax 3: a silent link is an error after ~15 s


def stop(pids: list[int], what: str) -> None:
    """Stop `pids` (SIGTERM, then SIGKILL); an SSHFSError names any that survive."""
    left = stop_processes(pids, what)
    if left:
        raise SSHFSError(f"{what}: processes {left} survive SIGKILL")


class Stack:
    """Everything behind one sshfs mount, made by `start` and removed by `teardown`.

    Attributes:
        path: the mount point; backing_dir: what the server serves; profile: the settings.
        runtime: the temporary directory (keys, configs, logs, counters).
        counter_dir: where the SFTP sessions' counters are.
        netns: the network namespace; veth_client, veth_server: its veth pair.
        client_addr, server_addr: the pair's addresses (set by `start`).
        uses_relay: the latency is added on the link by a relay.
        sshd, relay, sshfs: the processes (None until started).
        read_ahead_kb: the mount's read-ahead as the kernel reports it.
        versions: ``{"sshfs": ..., "ssh": ...}`` version lines.
    """

    def __init__(self, backing_dir: Path, profile: SSHFSProfile, runtime: Path) -> None:
        self.backing_dir = backing_dir
        self.profile = profile
        self.runtime = runtime
        self.path = runtime / "mnt"
        self.counter_dir = runtime / "counters"
        self.netns = f"ckpt-sshfs-{secrets.token_hex(4)}"
        token = self.netns.rsplit("-", 1)[1][:6]
        self.veth_client, self.veth_server = f"csf{token}c", f"csf{token}s"
        self.client_addr = ""
        self.server_addr = ""
        self.uses_relay = profile.latency_s > 0 and profile.latency_at == "link"
        self.tools: Tools | None = None
        self.made_netns = False
        self.sshd: subprocess.Popen[bytes] | None = None
        self.relay: subprocess.Popen[bytes] | None = None
        self.sshfs: subprocess.Popen[bytes] | None = None
        self.read_ahead_kb: int | None = None
        self.versions: dict[str, str] = {}
        self.detached_busy = False

    def client_pids(self) -> list[int]:
        """sshfs and its ssh processes (sshfs double-forks ssh: found by the key's path)."""
        pids = pids_with_arg(f"-oIdentityFile={self.runtime / 'client_key'}")
        if self.sshfs is not None and pid_alive(self.sshfs.pid):
            pids = [self.sshfs.pid, *(p for p in pids if p != self.sshfs.pid)]
        return pids

    def server_pids(self) -> dict[str, list[int]]:
        """sshd (with its sessions) and the relay, each with its descendants, when running."""
        out: dict[str, list[int]] = {}
        for role, proc in (("server", self.sshd), ("relay", self.relay)):
            if proc is not None and pid_alive(proc.pid):
                out[role] = [proc.pid, *descendants(proc.pid)]
        return out

    def teardown(self) -> list[tuple[str, Callable[[], None]]]:
        """The steps that undo `start`, in order (each to run even if one fails)."""
        return [
            ("unmount", self._unmount),
            ("stop sshfs", self._stop_client),
            ("stop the relay", lambda: self._stop_server_proc(self.relay, "relay")),
            ("stop sshd", lambda: self._stop_server_proc(self.sshd, "sshd")),
            ("remove the network namespace", self._remove_link),
            ("unmount what is left", self._unmount),
            ("remove the temporary directory", self._remove_runtime),
        ]

    def start(self, tools: Tools, timeout: float) -> None:
        """Make everything, in order: keys, link, sshd, relay (with latency on the link),
        the mount. Raises `SSHFSError` naming the failing step."""
        deadline = time.monotonic() + timeout
        self.tools = tools
        self._make_keys(tools)
        self._make_link(tools)
        self._start_sshd(tools, deadline)
        port = _SSHD_PORT
        if self.uses_relay:
            self._start_relay(tools, deadline)
            port = _RELAY_PORT
        _probe_ssh(self.server_addr, port, deadline)
        self._mount(tools, port, deadline)
        self.versions = {
            "sshfs": version([tools.sshfs, "--version"], "SSHFS"),
            "ssh": version([tools.ssh, "-V"], "OpenSSH"),
        }

    def _make_keys(self, tools: Tools) -> None:
        for name in ("host_key", "client_key"):
            run_command(
                [tools.ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", "ckpt-sshfs", "-f",
                 str(self.runtime / name)],
                f"make {name}",
            )  # fmt: skip
        shutil.copy(self.runtime / "client_key.pub", self.runtime / "authorized_keys")
        self.counter_dir.mkdir(mode=0o700)

    def _make_link(self, tools: Tools) -> None:
        ip, ns = tools.ip, self.netns
        in_ns = [ip, "netns", "exec", ns]
        net = pick_subnet(ip)
        hosts = list(net.hosts())
        self.client_addr, self.server_addr = str(hosts[0]), str(hosts[1])
        run_command([ip, "netns", "add", ns], "make the network namespace")
        self.made_netns = True
        run_command([ip, "link", "add", self.veth_client, "type", "veth", "peer", "name",
                     self.veth_server, "netns", ns], "make the veth pair")  # fmt: skip
        run_command(
            [ip, "addr", "add", f"{self.client_addr}/30", "dev", self.veth_client], "address"
        )
        run_command([ip, "link", "set", self.veth_client, "up"], "link up")
        run_command([*in_ns, ip, "addr", "add", f"{self.server_addr}/30", "dev", self.veth_server],
                    "address in the namespace")  # fmt: skip
        run_command([*in_ns, ip, "link", "set", self.veth_server, "up"], "link up in the namespace")
        run_command([*in_ns, ip, "link", "set", "lo", "up"], "loopback up in the namespace")
        if self.profile.bandwidth_bps:
            limit_link(tools.tc, self.veth_client, self.profile.bandwidth_bps, [])
            limit_link(tools.tc, self.veth_server, self.profile.bandwidth_bps, in_ns)
        log.debug("link %s <-> %s in %s", self.client_addr, self.server_addr, ns)

    def _start_sshd(self, tools: Tools, deadline: float) -> None:
        rt = self.runtime
        subsystem = rt / "sftp-subsystem.sh"
        request_delay = 0.0 if self.uses_relay else self.profile.latency_s
        subsystem.write_text(
            "#!/bin/sh\nexec "
            + shlex.join([sys.executable, "-I", "-S", str(_COUNTER_SCRIPT),
                          str(self.counter_dir), repr(request_delay), tools.sftp_server,
                          "-R"])
            + "\n"
        )  # fmt: skip
        subsystem.chmod(0o700)
        listen = "127.0.0.1" if self.uses_relay else self.server_addr
        config = rt / "sshd_config"
        config.write_text(
            "\n".join([
                f"Port {_SSHD_PORT}",
                f"ListenAddress {listen}",
                f"HostKey {rt / 'host_key'}",
                f"AuthorizedKeysFile {rt / 'authorized_keys'}",
                f"PidFile {rt / 'sshd.pid'}",
                f"Subsystem sftp {subsystem}",
                "AuthenticationMethods publickey",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",  # the keys live under /tmp, which is world-writable
                "UseDNS no",
                "PrintMotd no",
                "PermitTTY no",
                "AllowTcpForwarding no",
                "AllowAgentForwarding no",
                "X11Forwarding no",
                "MaxStartups 100",
                "MaxSessions 64",
                "LogLevel INFO",
                "",
            ])
        )  # fmt: skip
        if not os.path.isdir(_SSHD_PRIVSEP_DIR):
            os.makedirs(_SSHD_PRIVSEP_DIR, mode=0o755, exist_ok=True)
        log_path = rt / "sshd.log"
        with open(log_path, "wb") as out:
            self.sshd = subprocess.Popen(
                [tools.ip, "netns", "exec", self.netns, tools.sshd, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C reaches us only; we stop it in order
            )
        while b"Server listening on" not in log_path.read_bytes():
            if self.sshd.poll() is not None:
                raise SSHFSError(f"sshd exited with {self.sshd.returncode}:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                raise SSHFSError(f"sshd did not listen in time:\n{tail(log_path)}")
            time.sleep(0.02)

    def _start_relay(self, tools: Tools, deadline: float) -> None:
        log_path = self.runtime / "relay.log"
        with open(log_path, "wb") as err:
            self.relay = subprocess.Popen(
                [tools.ip, "netns", "exec", self.netns, sys.executable, "-I", "-S",
                 str(_RELAY_SCRIPT), self.server_addr, str(_RELAY_PORT), "127.0.0.1",
                 str(_SSHD_PORT), repr(self.profile.latency_s)],
                stdin=subprocess.PIPE,  # closed by us or at our exit: the relay then ends
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )  # fmt: skip
        assert self.relay.stdout is not None
        ready, _, _ = select.select([self.relay.stdout], [], [], deadline - time.monotonic())
        if not ready or self.relay.stdout.readline().strip() != b"ready":
            raise SSHFSError(f"the latency relay did not start:\n{tail(log_path)}")

    def _mount(self, tools: Tools, port: int, deadline: float) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if is_mounted(str(self.path)):
            raise SSHFSError(f"{self.path} is already a mount point")
        user = pwd.getpwuid(os.geteuid()).pw_name
        ssh_options = {
            "IdentityFile": str(self.runtime / "client_key"),
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
            "StrictHostKeyChecking": "no",
            "UserKnownHostsFile": "/dev/null",
            "GlobalKnownHostsFile": "/dev/null",
            "BatchMode": "yes",
            "ConnectTimeout": "10",
            "ServerAliveInterval": str(_SERVER_ALIVE_S),
            "ServerAliveCountMax": "3",
            "ControlMaster": "no",
            "ControlPath": "none",
            "LogLevel": "ERROR",
            **({"Ciphers": self.profile.ciphers} if self.profile.ciphers else {}),
        }
        options = [
            "ro",
            "kernel_cache",
            "noauto_cache",
            f"max_read={self.profile.max_read}",
            f"max_conns={self.profile.max_conns}",
            "entry_timeout=86400",
            "attr_timeout=86400",
            "dcache_timeout=86400",
            f"ssh_command={tools.ssh}",
            *(["allow_other"] if os.geteuid() == 0 else []),
            *(f"{k}={v}" for k, v in ssh_options.items()),
        ]
        empty_config = self.runtime / "ssh_config"
        empty_config.write_text("")  # -F: ignore ~/.ssh/config and /etc/ssh/ssh_config
        cmd = [
            tools.sshfs, "-f", f"{user}@{self.server_addr}:{self.backing_dir}", str(self.path),
            "-p", str(port), "-F", str(empty_config), "-o", ",".join(options),
        ]  # fmt: skip
        log_path = self.runtime / "sshfs.log"
        with open(log_path, "wb") as out:
            self.sshfs = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            _wait_for_mount(self.sshfs, self.path, deadline, log_path)
        except SSHFSError as exc:  # the server's side of a refused login is in sshd's log
            raise SSHFSError(f"{exc}\nsshd log:\n{tail(self.runtime / 'sshd.log')}") from None
        if self.profile.read_ahead_kb is not None:
            set_read_ahead(str(self.path), self.profile.read_ahead_kb)
        if self.profile.max_background is not None:
            _set_fuse_connection(self.path, "max_background", self.profile.max_background)
        self.read_ahead_kb = read_ahead_kb(str(self.path))

    def _unmount(self) -> None:
        if unmount(str(self.path)):
            self.detached_busy = True  # sshfs keeps serving the open files: stop it

    def _stop_client(self) -> None:
        proc = self.sshfs
        if proc is None:
            return
        ssh = [p for p in self.client_pids() if p != proc.pid]
        with contextlib.suppress(subprocess.TimeoutExpired):  # it ends once unmounted
            proc.wait(timeout=0.2 if self.detached_busy else 5.0)
        stop([*ssh, proc.pid], "sshfs")
        reap(proc)
        if proc.returncode not in (0, None, -signal.SIGTERM):
            log.debug(
                "sshfs exited with %s:\n%s", proc.returncode, tail(self.runtime / "sshfs.log")
            )

    def _stop_server_proc(self, proc: subprocess.Popen[bytes] | None, what: str) -> None:
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        stop([*descendants(proc.pid), proc.pid], what)
        reap(proc)
        if proc.stdout is not None:
            proc.stdout.close()

    def _remove_link(self) -> None:
        ip = self.tools.ip if self.tools is not None else "ip"
        if self.made_netns:
            with contextlib.suppress(SSHFSError):
                pids = run_command([ip, "netns", "pids", self.netns], "pids")
                left = [int(p) for p in pids.split()]
                if left:
                    log.warning("processes %s still in %s: killing them", left, self.netns)
                    stop(left, self.netns)
            run_command([ip, "netns", "delete", self.netns], "remove the network namespace")
            self.made_netns = False
        with contextlib.suppress(SSHFSError):  # gone with the namespace, normally
            run_command([ip, "link", "delete", self.veth_client], "remove the veth pair")

    def _remove_runtime(self) -> None:
        if is_mounted(str(self.path)):
            log.error("%s is still mounted: %s is left behind", self.path, self.runtime)
            return
        shutil.rmtree(self.runtime, ignore_errors=True)


def _set_fuse_connection(mountpoint: Path, name: str, value: int) -> None:
    dev = os.stat(mountpoint).st_dev
    knob = f"/sys/fs/fuse/connections/{os.minor(dev)}/{name}"
    try:
        with open(knob, "w", encoding="ascii") as f:
            f.write(str(int(value)))
    except OSError as exc:
        log.warning("cannot set %s=%d at %s: %s", name, value, knob, exc)


def _probe_ssh(addr: str, port: int, deadline: float) -> None:
    """Wait until an SSH banner comes back through the link (relay included)."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=2.0) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise SSHFSError(f"no SSH banner from {addr}:{port} in time (last error: {last})")


def _wait_for_mount(
    proc: subprocess.Popen[bytes], mountpoint: Path, deadline: float, log_path: Path
) -> None:
    """Wait until sshfs has mounted and its root answers a stat (from a daemon thread,
    so that a server that never answers makes this raise instead of hang)."""
    while not is_mounted(str(mountpoint)):
        if proc.poll() is not None:
            raise SSHFSError(f"sshfs exited with {proc.returncode}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise SSHFSError(f"sshfs did not mount in time:\n{tail(log_path)}")
        time.sleep(0.02)
    answer = stat_within(mountpoint, max(0.1, deadline - time.monotonic()))
    if answer is not None and not isinstance(answer, OSError):
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)  # sshfs mounts before it connects: did the connection fail?
    if proc.returncode is not None:
        raise SSHFSError(f"sshfs exited with {proc.returncode}:\n{tail(log_path)}")
    why = f"failed: {answer[0]}" if answer else "did not answer"
    raise SSHFSError(f"a stat of the sshfs mount root {why}:\n{tail(log_path)}")
