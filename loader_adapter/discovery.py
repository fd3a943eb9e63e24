"""Which local rank this process is, among the processes sharing this node's page cache.

Prefetch is node-local: each node reads the checkpoint once, split among its own ranks.
The order of sources:

1. explicit ``rank`` and ``world`` arguments;
2. the ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` environment variables (set by torchrun);
3. an initialised ``torch.distributed``: every rank publishes its host identity with
   ``all_gather_object``; the local rank is the position among the ranks of the same host
   (in global rank order) and the local world is their count. The host identity is
   ``socket.gethostname()``, or the environment variable ``CKPT_PREFETCH_HOST_ID`` when
   set (to pose as several nodes on one machine, or to group ranks by something other
   than the host name, e.g. containers that share a page cache);
4. otherwise a single process: rank 0 of 1.

Step 3 is a collective: every rank of the default process group must call it.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

__all__ = [
    "HOST_ID_ENV",
    "LocalRank",
    "discover_local_rank",
    "host_identity",
    "local_rank_in_group",
]

log = logging.getLogger(__name__)

#: Environment variable that overrides the host identity used to group ranks by node.
HOST_ID_ENV = "CKPT_PREFETCH_HOST_ID"

_cache: dict[tuple[object, int, int, str], tuple[int, int]] = {}


@dataclass(frozen=True)
class LocalRank:
    """This process's place among the ranks of its node.

    Attributes:
        rank: local rank, ``0 <= rank < world``.
        world: number of ranks on this node.
        source: where it came from: ``"arguments"``, ``"environment"``,
            ``"torch.distributed"``, ``"default"``, or the name a serving-engine
            integration gives its process group (``"vllm world group"``, ...).
    """

    rank: int
    world: int
    source: str


def host_identity() -> str:
    """This node's identity: ``$CKPT_PREFETCH_HOST_ID`` if set and non-empty, else the host name.

    Example:
        >>> isinstance(host_identity(), str)
        True
    """
    return os.environ.get(HOST_ID_ENV) or socket.gethostname()


def _check(rank: int, world: int, source: str) -> LocalRank:
    for name, value in (("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r} (from {source})")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world} (from {source})")
    return LocalRank(rank, world, source)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def local_rank_in_group(
    group: object | None = None, *, source: str = "torch.distributed"
) -> LocalRank:
    """This process's local rank among the members of a torch.distributed group.

    Every member publishes its host identity (`host_identity`) with
    ``all_gather_object`` over `group`; the local rank is the position among the members
    of the same host, in group rank order, and the local world is their count. The answer
    is cached per (group, rank, size, host), so only the first call is a collective: every
    member of `group` must make it.

    Args:
        group: a process group whose backend can gather Python objects on the CPU
            (gloo), e.g. a serving engine's CPU group; None for the default group (then
            a gloo group is made when the default backend is not gloo).
        source: how the result names its origin (`LocalRank.source`).

    Returns:
        The LocalRank.

    Raises:
        RuntimeError: torch.distributed is not initialised.

    Example:
        >>> local_rank_in_group(vllm_world.cpu_group, source="vllm")  # doctest: +SKIP
        LocalRank(rank=1, world=4, source='vllm')
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised")
    me, size = dist.get_rank(group), dist.get_world_size(group)
    host = host_identity()
    key = (group, me, size, host)
    if key not in _cache:
        gather_group = group
        if group is None and dist.get_backend() != "gloo":
            # Under NCCL, all_gather_object would stage the objects on the current CUDA
            # device, which is often cuda:0 on every rank before the server has picked its
            # GPU. new_group is a collective every rank reaches here.
            gather_group = dist.new_group(backend="gloo")
        hosts: list[object] = [None] * size
        dist.all_gather_object(hosts, host, group=gather_group)
        same = [r for r, h in enumerate(hosts) if h == host]
        _cache[key] = (same.index(me), len(same))
        log.debug("%s: rank %d of %d, hosts %s", source, me, size, hosts)
    rank, world = _cache[key]
    return _check(rank, world, source)


def _from_torch_distributed() -> tuple[int, int] | None:
    """(local rank, local world) from an initialised default process group, or None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    found = local_rank_in_group(None)
    return found.rank, found.world


def discover_local_rank(rank: int | None = None, world: int | None = None) -> LocalRank:
    """Find this process's local rank and the number of ranks on its node.

    Args:
        rank: the local rank, or None to discover it.
        world: the number of local ranks, or None to discover it. Give both or neither.

    Returns:
        A LocalRank saying where the answer came from.

    Raises:
        ValueError: only one of rank/world given, values out of range, or a non-integer
            ``LOCAL_RANK``/``LOCAL_WORLD_SIZE``.

    Example:
        >>> discover_local_rank(1, 4)
        LocalRank(rank=1, world=4, source='arguments')
    """
    if rank is not None or world is not None:
        if rank is None or world is None:
            raise ValueError("give both rank and world, or neither (to discover them)")
        return _check(rank, world, "arguments")
    env_rank, env_world = _env_int("LOCAL_RANK"), _env_int("LOCAL_WORLD_SIZE")
    if env_rank is not None and env_world is not None:
        return _check(env_rank, env_world, "environment")
    if (env_rank is None) != (env_world is None):
        log.warning(
            "only one of LOCAL_RANK and LOCAL_WORLD_SIZE is set (%s); ignoring it: set both, "
            "or pass rank= and world=",
            "LOCAL_RANK" if env_world is None else "LOCAL_WORLD_SIZE",
        )
    found = _from_torch_distributed()
    if found is not None:
        return _check(found[0], found[1], "torch.distributed")
    return LocalRank(0, 1, "default")
