"""The messages of the bench's two process protocols, defined once for both sides.

**Rank processes.** The orchestrator (`bench.launchers`) starts rank processes through
`bench.worker` in one of two ways:

* the fork server (``python -m bench.worker --fork-server``) reads `Start` and `Release`
  on stdin and answers `ServerReady`, `Ready` or `Failed`, `Released` and `Done` on
  stdout. Each forked rank writes one byte on a pipe when it is ready (`READY`) or has
  failed (`FAILED`), waits for a `GO` byte on another pipe (EOF means stop), and leaves
  its outcome, a `RankResult` or an `Error`, in a file;
* a subprocess per rank (``python -m bench.worker --job JOB --barrier``) writes `Ready`
  on stdout, waits for one byte on stdin (`GO`) and writes a `RankResult` or an `Error`.

**The netfs server.** `bench.netfs` starts the simulated filesystem's server
(`bench._netfs_server`) with a `ServerConfig`, then sends one request at a time
(`Ping`, `GetCounters`, `InjectEIO`, ...) on its control channel; the server answers
`reply_ok(result)` or `reply_error(text)`.

Every message is one JSON line: ``{"op": TAG, ...}`` for commands and requests,
``{"event": TAG, ...}`` for events, then the message's fields. This module imports only
the standard library: the netfs server and the rank processes import it cheaply.

Example:
    >>> decode_rank(encode(Released(t_release=1.5)))
    Released(t_release=1.5)
    >>> encode(GetCounters())
    b'{"op": "counters"}\\n'
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "FAILED",
    "GO",
    "READY",
    "ClearFaults",
    "Done",
    "Error",
    "Failed",
    "GetCounters",
    "InjectEIO",
    "Job",
    "Ping",
    "ProtocolError",
    "RankReport",
    "RankResult",
    "Ready",
    "Release",
    "Released",
    "ResetCounters",
    "ServerConfig",
    "ServerReady",
    "SetBandwidth",
    "SetLatency",
    "Shutdown",
    "Stall",
    "Start",
    "Unstall",
    "Vanish",
    "decode_control",
    "decode_rank",
    "decode_reply",
    "encode",
    "reply_error",
    "reply_ok",
]

#: A forked rank is ready and waits for the release (one byte on its ready pipe).
READY = b"r"
#: A forked rank failed before the release.
FAILED = b"x"
#: The release: one byte per rank (fork server pipe, or a subprocess rank's stdin).
GO = b"g"

M = TypeVar("M")


class ProtocolError(ValueError):
    """A line that is not a message of the protocol it was read with."""


class _Registry:
    """The message types of one protocol, by (key, tag), for `decode`."""

    def __init__(self) -> None:
        self.types: dict[tuple[str, str], type] = {}

    def message(self, key: str, tag: str) -> Callable[[type[M]], type[M]]:
        def register(cls: type[M]) -> type[M]:
            cls.KEY, cls.TAG = key, tag  # type: ignore[attr-defined]
            self.types[(key, tag)] = cls
            return cls

        return register

    def decode(self, line: bytes | str) -> Any:
        try:
            data = json.loads(line)
            key = "op" if "op" in data else "event"
            cls = self.types[(key, data.pop(key))]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ProtocolError(f"not a message: {line[:200]!r}") from exc
        args = {k: _NESTED[k].from_dict(v) if k in _NESTED else v for k, v in data.items()}
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
        except TypeError as exc:
            raise ProtocolError(f"bad {cls.__name__}: {exc}") from exc


def encode(message: Any) -> bytes:
    """One message as a JSON line (bytes, newline included)."""
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    body = {k: v.to_dict() if k in _NESTED else v for k, v in fields.items()}
    return (json.dumps({message.KEY: message.TAG, **body}) + "\n").encode()


_RANK = _Registry()
_CONTROL = _Registry()


# --------------------------------------------------------------------------------------
# Rank processes


@dataclass(frozen=True)
class Job:
    """What every rank of one measurement runs.

    Attributes:
        config: the configuration string (parsed again in the rank process).
        files: the checkpoint files, as the ranks see them (through the mount).
        world: the number of ranks.
        max_tensor_bytes: size of the copy buffer (the largest tensor).
        cgroup: a memory cgroup directory to join once ready, or None.
        checksum: compute the checksum (off only for the raw floor, which has no tensors).
        rendezvous: a file path not yet made, where the ranks meet to form a gloo group
            (configurations that need ``torch.distributed``), or None.
    """

    config: str
    files: list[str]
    world: int
    max_tensor_bytes: int = 0
    cgroup: str | None = None
    checksum: bool = True
    rendezvous: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(**data)

    def to_json(self) -> str:
        """The job as JSON (a subprocess rank's ``--job``)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Job:
        """Rebuild a job from `to_json` output."""
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class RankReport:
    """What one rank measured (the ``ranks`` entries of a results sample).

    Attributes:
        rank: the rank.
        t_release, t_done: ``time.monotonic()`` at the release and at the last tensor
            (comparable across processes on Linux).
        wall_s: t_done - t_release; the orchestrator replaces it with the time from its
            own release, the same origin for every rank.
        cpu_s: CPU seconds of the rank from the release on.
        peak_rss_bytes, peak_anon_bytes: the rank's peak RSS and anonymous memory.
        bytes_consumed: bytes copied (raw floor: bytes read).
        tensors: tensors consumed.
        checksum: the consumer's checksum, or None (raw floor).
        io_read_bytes: storage reads the rank caused (``/proc/self/io``), or None.
        prefetch: what the prefetch reported, or None.
    """

    rank: int
    t_release: float
    t_done: float
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    peak_anon_bytes: int
    bytes_consumed: int
    tensors: int
    checksum: str | None
    io_read_bytes: int | None
    prefetch: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankReport:
        return cls(**data)


_NESTED: dict[str, Any] = {"job": Job, "result": RankReport}


@_RANK.message("op", "start")
@dataclass(frozen=True)
class Start:
    """Fork `world` ranks for `job`; rank r leaves its outcome in ``dir/rank-r.json``."""

    job: Job
    world: int
    dir: str

    def result_path(self, rank: int) -> str:
        return f"{self.dir}/rank-{rank}.json"


@_RANK.message("op", "release")
@dataclass(frozen=True)
class Release:
    """Release the ranks that said ready."""


@_RANK.message("event", "server-ready")
@dataclass(frozen=True)
class ServerReady:
    """The fork server has imported what the ranks need."""

    pid: int


@_RANK.message("event", "ready")
@dataclass(frozen=True)
class Ready:
    """Every rank is ready (fork server), or this rank is (subprocess, with its pid)."""

    pid: int | None = None


@_RANK.message("event", "failed")
@dataclass(frozen=True)
class Failed:
    """A rank failed before the release; the others are stopped."""


@_RANK.message("event", "released")
@dataclass(frozen=True)
class Released:
    """The ranks were released at `t_release` (``time.monotonic()``)."""

    t_release: float


@_RANK.message("event", "done")
@dataclass(frozen=True)
class Done:
    """Every rank has exited; `status` holds their exit codes in rank order."""

    status: tuple[int, ...] = ()


@_RANK.message("event", "result")
@dataclass(frozen=True)
class RankResult:
    """A rank finished its load."""

    result: RankReport


@_RANK.message("event", "error")
@dataclass(frozen=True)
class Error:
    """A rank failed (or the fork server refused a command)."""

    error: str
    traceback: str = ""


def decode_rank(line: bytes | str) -> Any:
    """A message of the rank-process protocol from one JSON line.

    Raises:
        ProtocolError: the line is not one.
    """
    return _RANK.decode(line)


# --------------------------------------------------------------------------------------
# The netfs server: its start-up settings, then the control channel


@dataclass(frozen=True)
class ServerConfig:
    """What the netfs server is started with (its one command-line argument, as JSON).

    Attributes:
        backing: the directory to serve.
        mountpoint: where to mount it.
        control: the control channel's Unix socket.
        parent_pid: the mounting process; the server leaves when it is gone.
        bandwidth_bps, latency_s, threads, max_read, max_background,
            congestion_threshold: the profile (see ``bench.netfs.NetFSProfile``).
        bandwidth_file: a `bench.bandwidth.SharedBandwidth` state file, or None. When
            given, the server's reads draw from that limit, shared with every server
            given the same file, and `bandwidth_bps` is ignored.
        allow_other: let other users read the mount (root only).
        fsname: the mount's source name, as mount tables show it.
        log_level: the server's logging level.
    """

    backing: str
    mountpoint: str
    control: str
    parent_pid: int
    bandwidth_bps: float | None
    latency_s: float
    threads: int
    max_read: int
    max_background: int
    congestion_threshold: int
    allow_other: bool = False
    fsname: str = "netfs"
    log_level: str = "INFO"
    bandwidth_file: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        return cls(**json.loads(text))


@_CONTROL.message("op", "ping")
@dataclass(frozen=True)
class Ping:
    """Answer the server's pid."""


@_CONTROL.message("op", "counters")
@dataclass(frozen=True)
class GetCounters:
    """Answer the counters (bytes and requests served, errors, in flight, ...)."""


@_CONTROL.message("op", "reset_counters")
@dataclass(frozen=True)
class ResetCounters:
    """Set every counter to zero."""


@_CONTROL.message("op", "inject_eio")
@dataclass(frozen=True)
class InjectEIO:
    """Fail every read request overlapping ``[offset, offset + length)`` of `path`."""

    path: str
    offset: int
    length: int


@_CONTROL.message("op", "vanish")
@dataclass(frozen=True)
class Vanish:
    """Make `path` vanish (ENOENT on open and stat, EIO on read)."""

    path: str


@_CONTROL.message("op", "stall")
@dataclass(frozen=True)
class Stall:
    """Hold every read request for `seconds` (None: until `Unstall`)."""

    seconds: float | None = None


@_CONTROL.message("op", "unstall")
@dataclass(frozen=True)
class Unstall:
    """Lift a stall."""


@_CONTROL.message("op", "clear_faults")
@dataclass(frozen=True)
class ClearFaults:
    """Remove injected errors and vanished files, lift any stall."""


@_CONTROL.message("op", "set_bandwidth")
@dataclass(frozen=True)
class SetBandwidth:
    """Cap the aggregate bandwidth at `bps` bytes/s (None or 0: no cap).

    On a server that draws from a shared limit, the cap changes for every server sharing it.
    """

    bps: float | None


@_CONTROL.message("op", "set_latency")
@dataclass(frozen=True)
class SetLatency:
    """Add `seconds` to every read request."""

    seconds: float


@_CONTROL.message("op", "shutdown")
@dataclass(frozen=True)
class Shutdown:
    """Lift stalls and ignore new ones: the mount is going away."""


def decode_control(line: bytes | str) -> Any:
    """A netfs control request from one JSON line.

    Raises:
        ProtocolError: the line is not one.
    """
    return _CONTROL.decode(line)


def reply_ok(result: Any = None) -> bytes:
    """The server's answer to a request it carried out."""
    return (json.dumps({"ok": True, "result": result}) + "\n").encode()


def reply_error(error: str) -> bytes:
    """The server's answer to a request it refused."""
    return (json.dumps({"ok": False, "error": error}) + "\n").encode()


def decode_reply(line: bytes | str) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, error text)`` from a server's answer.

    Raises:
        ProtocolError: the line is not an answer.
    """
    try:
        data = json.loads(line)
        return (True, data["result"]) if data["ok"] else (False, str(data["error"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"not a reply: {line[:200]!r}") from exc
