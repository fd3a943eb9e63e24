"""The simulated network filesystems' profiles: what each one imitates, and its settings.

`PROFILES` names them (``slow-nfs``, ``many-streams``, ...); `resolve_profile` gives one
with a user's overrides (``slow-nfs:latency_s=0.005``) applied and checked.
`bench.netfs.mounted` mounts one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["PROFILES", "NetFSProfile", "profile_with_overrides", "resolve_profile"]

_MiB = 1 << 20


@dataclass(frozen=True)
class NetFSProfile:
    """Settings of one simulated network filesystem.

    Attributes:
        name: Short label, a key of :data:`PROFILES`.
        bandwidth_bps: Aggregate bandwidth in bytes/s shared by all server threads;
            ``None`` for no throttle. A mount given a `SharedBandwidth` reports that
            limit's rate here (it shares it with the other mounts).
        latency_s: Seconds added to each read request (requests in flight overlap).
        threads: Most server threads (libfuse ``max_threads``); 1 = single-threaded.
        max_read: Largest read request in bytes (mount option ``max_read``; libfuse3
            caps requests at 1 MiB).
        description: What it imitates, in words.
        read_ahead_kb: Kernel readahead window of the mount (``/sys/class/bdi/*/
            read_ahead_kb``); ``None`` keeps the kernel default (128 KiB, which is also
            what NFS uses since Linux 5.4). Buffered reads are cut into requests of at
            most ``min(read_ahead_kb, max_read)``.
        max_background: Most asynchronous (readahead) requests the kernel keeps in
            flight; the kernel default is 12.
        congestion_threshold: In-flight asynchronous requests at which the kernel
            reports the mount congested.
        floor_threads: Reader threads per rank process of the raw floor (`bench.floor`):
            as many as reach the profile's aggregate.
    """

    name: str
    bandwidth_bps: float | None
    latency_s: float
    threads: int
    max_read: int
    description: str
    read_ahead_kb: int | None = None
    max_background: int = 256
    congestion_threshold: int = 192
    floor_threads: int = 4


PROFILES: dict[str, NetFSProfile] = {
    p.name: p
    for p in (
        NetFSProfile(
            name="fast-nfs",
            bandwidth_bps=1.2e9,
            latency_s=0.0005,
            threads=16,
            max_read=_MiB,
            description="simulated NFS on a fast link: ~1.2 GB/s aggregate, 0.5 ms per "
            "request, 1 MiB rsize, default 128 KiB readahead",
        ),
        NetFSProfile(
            name="slow-nfs",
            bandwidth_bps=300e6,
            latency_s=0.002,
            threads=8,
            max_read=_MiB,
            description="simulated NFS on a busy or slow link: ~300 MB/s aggregate, 2 ms "
            "per request, 1 MiB rsize, default 128 KiB readahead",
        ),
        NetFSProfile(
            name="lustre-like",
            bandwidth_bps=2e9,
            latency_s=0.001,
            threads=32,
            max_read=_MiB,
            read_ahead_kb=4096,
            description="simulated parallel filesystem: ~2 GB/s aggregate, 1 ms per "
            "request, many server threads, 1 MiB requests, 4 MiB readahead",
        ),
        NetFSProfile(
            name="many-streams",
            bandwidth_bps=1.0e9,
            latency_s=0.16,
            threads=512,
            max_read=_MiB,
            read_ahead_kb=1024,
            max_background=512,
            congestion_threshold=384,
            floor_threads=32,
            description="simulated object store or busy parallel filesystem: one stream is "
            "slow (160 ms per 1 MiB request, 1 MiB readahead), the aggregate high (1 GB/s; "
            "the 2 cores of this project's VM bind near 0.5 GB/s, reached with ~128 streams)",
        ),
        NetFSProfile(
            name="local-fuse",
            bandwidth_bps=None,
            latency_s=0.0,
            threads=8,
            max_read=_MiB,
            description="FUSE pass-through with no throttle and no added latency: the "
            "cost of FUSE itself",
        ),
    )
}


_PROFILE_FIELDS = {f.name for f in dataclasses.fields(NetFSProfile)} - {"name", "description"}


P = TypeVar("P")


def profile_with_overrides(
    profiles: dict[str, P], profile: str | P, overrides: dict[str, Any], fields: set[str]
) -> P:
    """A named (or given) profile dataclass with `overrides` applied.

    Raises:
        ValueError: an unknown profile name.
        TypeError: an override that is not one of `fields`.
    """
    if isinstance(profile, str):
        try:
            profile = profiles[profile]
        except KeyError:
            raise ValueError(f"unknown profile {profile!r}; known: {sorted(profiles)}") from None
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; valid: {sorted(fields)}")
    if not overrides:
        return profile
    changed = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    described = {"description": f"{profile.description} (overridden: {changed})"}  # type: ignore[attr-defined]
    return dataclasses.replace(profile, **overrides, **described)  # type: ignore[type-var]


def resolve_profile(profile: str | NetFSProfile, overrides: dict[str, Any]) -> NetFSProfile:
    """A named (or given) profile with `overrides` applied, checked.

    Raises:
        ValueError: an unknown profile name or settings that cannot work.
        TypeError: an override that is not a profile field.
    """
    resolved = profile_with_overrides(PROFILES, profile, overrides, _PROFILE_FIELDS)
    if (
        resolved.threads < 1
        or resolved.max_read < 4096
        or resolved.latency_s < 0
        or (resolved.bandwidth_bps is not None and resolved.bandwidth_bps <= 0)
        or (resolved.read_ahead_kb is not None and resolved.read_ahead_kb < 0)
    ):
        raise ValueError(f"invalid profile settings: {resolved}")
    return resolved
