"""One rank of a measurement: prepare, wait for the release, load, report.

A rank imports what it needs, allocates its copy buffer and says it is ready; released
together with the other ranks, it loads the whole checkpoint with its configuration and
copies every tensor's bytes into its own buffer (`bench.consumer`), then reports wall
time, CPU seconds, peak memory and the checksum. How it is started and released is the
launcher's business (`bench.worker`, `bench.launchers`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

from bench.configs import Config, parse_config
from bench.consumer import Consumer
from bench.procstat import AnonSampler, cpu_seconds, io_read_bytes
from bench.protocol import Job, RankReport

__all__ = ["load", "run_rank"]

Consume = Callable[[str, Any], None]


def _load_none(cfg: Config, files: list[str], rank: int, world: int, consume: Consume) -> None:
    from bench.baselines import load_plain

    load_plain(files, consume)


def _load_sglang(
    cfg: Config, files: list[str], rank: int, world: int, consume: Consume
) -> dict[str, Any]:
    from bench.baselines import SGLANG_BLOCK_BYTES, SGLANG_THREADS, load_sglang

    threads = cfg.count("threads", SGLANG_THREADS)
    block = cfg.mib("block_mb", SGLANG_BLOCK_BYTES)
    return load_sglang(files, rank, world, consume, threads=threads, block_bytes=block).stats()


def _load_stripe(
    cfg: Config, files: list[str], rank: int, world: int, consume: Consume
) -> dict[str, Any]:
    from bench.baselines import STRIPE_BYTES, load_stripe

    stripe = cfg.mib("chunk_mb", STRIPE_BYTES)
    return load_stripe(files, rank, world, consume, stripe_bytes=stripe)


def _load_vllm(
    cfg: Config, files: list[str], rank: int, world: int, consume: Consume
) -> dict[str, Any]:
    """vLLM's own iterator with its prefetch: sorted whole files by global rank, 16 MiB
    ``read()`` calls on a daemon thread (vLLM's defaults), the gloo group made in
    `_prepare`. Strategy ``"prefetch"`` explicitly: vLLM turns it on by itself only for
    mounts it names nfs or lustre, and the simulated mounts are FUSE."""
    import torch.distributed as dist
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    it = safetensors_weights_iterator(
        sorted(files), False, "prefetch",
        safetensors_prefetch_num_threads=cfg.count("threads", 8),
        safetensors_prefetch_block_size=cfg.mib("block_mb", 16 << 20),
    )  # fmt: skip
    for name, tensor in it:
        consume(name, tensor)
    dist.barrier()
    dist.destroy_process_group()
    return {"files": len(files)}


def _load_ours(
    cfg: Config, files: list[str], rank: int, world: int, consume: Consume
) -> dict[str, Any] | None:
    from loader_adapter import safetensors_weights_iterator

    kwargs = cfg.loader_options()
    prefetch = kwargs.pop("prefetch")
    if kwargs.get("concurrency") == "fixed":
        from engine.tuning import NODE_STREAMS

        kwargs["concurrency"] = max(1, -(-NODE_STREAMS // world))
    it = safetensors_weights_iterator(files, prefetch=prefetch, rank=rank, world=world, **kwargs)
    with it:
        for name, tensor in it:
            consume(name, tensor)
    return it.report.to_dict() if it.report is not None else None


def _load_raw(
    cfg: Config, files: list[str], rank: int, world: int, consume: Consume
) -> dict[str, Any]:
    from bench.floor import raw_read_share

    threads, chunk = cfg.count("threads", 4), cfg.mib("chunk_mb", 16 << 20)
    return {"bytes_read": raw_read_share(files, rank, world, threads=threads, chunk_bytes=chunk)}


def _load_engine(
    cfg: Config, files: list[str], rank: int, world: int, consume: Consume
) -> dict[str, Any]:
    """The engine alone: this rank's share warmed into the page cache, nothing parsed.

    `engine.prefetch_async` with no consumer: nobody loads, so the controller is not told
    that a loader lags (a `start_prefetch` handle holds a consumer at position 0).
    """
    import asyncio

    from engine import prefetch_async

    kwargs = cfg.loader_options()
    kwargs.pop("prefetch")
    report = asyncio.run(prefetch_async(files, rank, world, **kwargs))
    if not report.ok:
        raise RuntimeError(f"the engine's prefetch failed: {report.failures[:3]}")
    return {**report.to_dict(), "bytes_read": report.warmed_bytes + report.cached_bytes}


_LOADERS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "none": _load_none,
    "sglang": _load_sglang,
    "stripe": _load_stripe,
    "vllm": _load_vllm,
    "ours": _load_ours,
    "raw": _load_raw,
    "engine": _load_engine,
}


def load(
    cfg: Config, files: list[str], rank: int, world: int, consume: Consume
) -> dict[str, Any] | None:
    """Load `files` with configuration `cfg`; return what the prefetch reported, if anything.

    Raises:
        ValueError: `cfg.kind` is not one of ``bench.configs.KINDS``.
    """
    try:
        loader = _LOADERS[cfg.kind]
    except KeyError:
        raise ValueError(f"unknown kind {cfg.kind!r}") from None
    return loader(cfg, files, rank, world, consume)


def _join_vllm_group(job: Job, rank: int) -> None:
    """Import vLLM's loader (seconds) and form the job's gloo group, before the release."""
    import os

    import torch.distributed as dist

    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM would log to stdout
    import vllm.model_executor.model_loader.weight_utils  # noqa: F401

    if job.rendezvous is None:
        raise ValueError("the vllm configuration needs a rendezvous for its gloo group")
    dist.init_process_group(
        "gloo", init_method=f"file://{job.rendezvous}", rank=rank, world_size=job.world
    )


def _prepare(cfg: Config, job: Job, rank: int) -> Consumer | None:
    """Imports and the copy buffer, paid before the release; None for the raw floor and
    the engine alone (they parse nothing and import no torch)."""
    if cfg.kind == "raw":
        import bench.floor  # noqa: F401

        return None
    if cfg.kind == "engine":
        import engine  # noqa: F401

        return None
    import torch

    torch.set_num_threads(1)  # 4 ranks on 2 cores must not oversubscribe
    import safetensors.torch  # noqa: F401  (import cost stays outside the timing)

    if cfg.kind == "ours":
        import loader_adapter  # noqa: F401
    if cfg.kind == "vllm":
        _join_vllm_group(job, rank)
    buf = torch.empty(max(1, job.max_tensor_bytes), dtype=torch.uint8)
    buf.fill_(0)  # pay first-touch page faults before the release
    return Consumer(buf, with_checksum=job.checksum)


def run_rank(job: Job, rank: int, wait_release: Callable[[], None]) -> RankReport:
    """Prepare, wait for the release, load, and return this rank's report.

    Before the release: import torch (and the loader for ``ours``), limit torch to one
    intra-op thread, allocate and touch the copy buffer, join the memory cgroup when the
    job has one. The timed part runs from the return of `wait_release` to the last
    tensor copied.

    Args:
        job: the job shared by all ranks.
        rank: this rank.
        wait_release: blocks until every rank is ready and the orchestrator releases them.

    Returns:
        The rank's `RankReport`.

    Example:
        >>> run_rank(Job("none", files, 1), 0, lambda: None).checksum  # doctest: +SKIP
    """
    cfg = parse_config(job.config)
    consumer = _prepare(cfg, job, rank)
    if job.cgroup:
        from bench.cgroup import join

        join(job.cgroup)
    sampler = AnonSampler()
    io0 = io_read_bytes()
    wait_release()
    t_release, cpu0 = time.monotonic(), cpu_seconds()
    sampler.start()
    consume = consumer if consumer is not None else (lambda n, t: None)
    prefetch = load(cfg, list(job.files), rank, job.world, consume)
    t_done, cpu = time.monotonic(), cpu_seconds() - cpu0
    cpu += (prefetch or {}).get("reader_cpu_s", 0.0)  # a reader process reads for ours
    peak_anon, io1 = sampler.stop(), io_read_bytes()
    return RankReport(
        rank=rank,
        t_release=t_release,
        t_done=t_done,
        wall_s=t_done - t_release,
        cpu_s=cpu,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_anon_bytes=int(peak_anon),
        bytes_consumed=consumer.nbytes if consumer else int((prefetch or {}).get("bytes_read", 0)),
        tensors=consumer.tensors if consumer else 0,
        checksum=consumer.checksum if consumer else None,
        io_read_bytes=(io1 - io0) if io0 is not None and io1 is not None else None,
        prefetch=prefetch,
    )
