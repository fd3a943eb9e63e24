"""The one collective of a cluster load: gather every rank's view, decide alike.

Every rank of the default process group calls `join` with the same files and options;
one ``all_gather_object`` on a fresh gloo group (with a timeout) brings every rank's
`MemberInfo` to every rank, and `loader_adapter.cluster.join.decide` turns the same
gathered list into the same decision everywhere. After that only point-to-point messages
run (`loader_adapter.cluster.transport`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import secrets
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from engine import ResolvedFile
from loader_adapter.cluster.join import Joined, MemberInfo, decide
from loader_adapter.discovery import host_identity
from loader_adapter.fsdetect import decide_auto
from loader_adapter.header import read_header

__all__ = ["join"]


def _max_tensor_bytes(paths: Sequence[str]) -> int:
    """The largest tensor of the checkpoint, from the headers."""
    return max((t.nbytes for p in paths for t in read_header(p).tensors), default=0)


def _member_error(
    files: Sequence[ResolvedFile], replica_base: str, need_bytes: int, prefetch: Any
) -> str | None:
    """Why this rank cannot take part in cluster mode, or None."""
    if prefetch == "auto":
        decision = decide_auto([f.path for f in files], sum(f.size for f in files))
        if not decision.enabled:
            return f"prefetch='auto' says no here ({decision.reason})"
    if not os.path.isdir(replica_base) or not os.access(replica_base, os.W_OK | os.X_OK):
        return f"replica directory {replica_base} is not a writable directory"
    try:
        st = os.statvfs(replica_base)
    except OSError as exc:
        return f"cannot stat {replica_base}: {exc}"
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        return f"{replica_base} has {free >> 20} MiB free, the replica needs {need_bytes >> 20} MiB"
    return None


def join(
    files: Sequence[ResolvedFile],
    *,
    chunk_bytes: int,
    replica_base: str,
    need_bytes: int,
    windowed: bool,
    timeout_s: float,
    prefetch: Any,
    needs: tuple[tuple[int, int, int], ...] | None = None,
    header_ends: Sequence[int] = (),
) -> Joined:
    """Every rank of the default group: gather each rank's view, decide the same way.

    Args:
        files: the checkpoint's files, in consumption order.
        chunk_bytes: the stripe unit (rank 0's is used).
        replica_base: where this rank's node keeps its replica.
        need_bytes: room the replica needs there.
        windowed: whether a window applies (rank 0 then reads the largest tensor).
        timeout_s: how long the collective waits for every rank.
        prefetch: the caller's ``prefetch`` (``"auto"`` asks the filesystem).
        needs: what this rank loads (``tensors=``), ``(file index, start, end)``; None: all.
        header_ends: where each file's tensor data starts (with `needs`).

    Returns:
        The `Joined` decision, with the gloo group in cluster mode.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return Joined("torch.distributed is not initialized")
    world = dist.get_world_size()
    try:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # no gloo: nobody can make the group, so every rank is here
        return Joined(f"cannot make a gloo group: {exc!r}")
    info = MemberInfo(
        host_identity(),
        tuple(os.path.basename(f.path) for f in files),
        tuple(f.size for f in files),
        _member_error(files, replica_base, need_bytes, prefetch),
        needs,
    )
    extra: dict[str, Any] = {"header_ends": tuple(header_ends)} if needs is not None else {}
    if dist.get_rank() == 0:
        extra["nonce"] = secrets.token_hex(6)
        extra["chunk_bytes"] = chunk_bytes
        if windowed and info.error is None:
            try:
                extra["max_tensor_bytes"] = _max_tensor_bytes([f.path for f in files])
            except (OSError, ValueError) as exc:  # read_header's errors
                info = dataclasses.replace(info, error=f"bad header: {exc!r}")
    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, (info, extra), group=group)
    except Exception as exc:  # timed out: a rank never came, or died
        return Joined(f"gathering the ranks' views failed: {exc!r}")
    joined = decide(gathered)
    return dataclasses.replace(joined, group=group) if joined.plan is not None else joined
