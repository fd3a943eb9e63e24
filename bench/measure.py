"""One measurement, one sample: cold (or hot) cache, fresh ranks, release, collect.

1. make the checkpoint cold (`bench.filesystems.make_cold`: every cache layer evicted and
   checked under 1% resident; the run stops otherwise), or hot for the hot-cache load;
2. start W fresh rank processes (`bench.launchers`); each prepares and says ready;
3. release them together and wait until the last rank has copied every tensor;
4. record the wall time (release to the last rank done, on the shared monotonic clock),
   each rank's time, CPU seconds, peak RSS, the checksum, and the bytes the storage
   served (the netfs counters, or the ranks' own storage reads on local disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import uuid
from typing import Any

from bench.checkpoint import Checkpoint
from bench.configs import NEEDS_GROUP, Config
from bench.filesystems import HOT_RESIDENT_MIN, FileSystem, make_cold, make_hot
from bench.launchers import Launcher
from bench.models import Sample
from bench.procstat import NodeCPU
from bench.protocol import Job

__all__ = ["measure", "measure_fio"]

log = logging.getLogger(__name__)

_CPU_DEFINITION = "CPU seconds of all ranks / GB consumed by all ranks"


def _start(fs: FileSystem, ckpt: Checkpoint, *, hot: bool, cgroup: Any | None) -> float:
    """Bring the cache to the state the sample starts from; return the fraction cached."""
    resident = make_hot(fs, ckpt.total_bytes) if hot else make_cold(fs, ckpt.total_bytes)
    if hot and resident < HOT_RESIDENT_MIN:
        log.warning("hot-cache run on %s: only %.1f%% cached", fs.name, 100 * resident)
    if cgroup is not None:
        cgroup.reset_peak()
    return resident


def measure(
    launcher: Launcher,
    fs: FileSystem,
    ckpt: Checkpoint,
    cfg: Config,
    ranks: int,
    *,
    hot: bool,
    timeout: float,
    cgroup: Any | None,
) -> Sample:
    """One sample of configuration `cfg` with `ranks` fresh rank processes.

    Args:
        launcher: starts the ranks.
        fs: the filesystem holding `ckpt`.
        ckpt: the checkpoint.
        cfg: the configuration.
        ranks: how many rank processes.
        hot: start with every byte cached instead of none.
        timeout: longest the ranks may take.
        cgroup: a memory cgroup the ranks join once ready, or None.

    Returns:
        The Sample.

    Raises:
        BenchError: the cache cannot be made cold, or a rank failed or timed out.
    """
    resident = _start(fs, ckpt, hot=hot, cgroup=cgroup)
    rdzv = None
    if cfg.kind in NEEDS_GROUP:  # the ranks form a gloo group: a fresh meeting place each time
        rdzv = os.path.join(tempfile.gettempdir(), f"ckpt-prefetch-bench-{uuid.uuid4().hex}")
    job = Job(
        config=cfg.spec,
        files=list(fs.files),
        world=ranks,
        max_tensor_bytes=ckpt.max_tensor_bytes,
        cgroup=str(cgroup.path) if cgroup is not None else None,
        checksum=cfg.kind != "raw",
        rendezvous=rdzv,
    )
    fs.start_count()
    try:
        with NodeCPU() as node:
            t_release, reports = launcher.run(job, ranks, timeout)
    finally:
        if rdzv is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rdzv)
    served, fs_detail = fs.account(fs.served(), [r.io_read_bytes for r in reports])
    detail: dict[str, Any] = {"hot": hot, "cpu_s_per_gb_definition": _CPU_DEFINITION}
    detail["node_cpu_s"] = node.busy_s(t_release, max(r.t_done for r in reports))
    detail.update(fs_detail)
    if cgroup is not None:
        detail["cgroup"] = cgroup.stats()
    # Every rank's time from the orchestrator's release: one origin for all of them.
    reports = [dataclasses.replace(r, wall_s=r.t_done - t_release) for r in reports]
    return Sample.of(
        wall_s=max(r.t_done for r in reports) - t_release,
        ranks=reports,
        served=served,
        total_bytes=ckpt.total_bytes,
        resident=resident,
        detail=detail,
    )


def measure_fio(fs: FileSystem, ckpt: Checkpoint) -> Sample:
    """One cold sequential read of the checkpoint by fio (io_uring, QD32): a second floor.

    Raises:
        RuntimeError: fio failed or read fewer bytes than the files hold.
    """
    from bench.floor import fio_read

    resident = make_cold(fs, ckpt.total_bytes)
    fs.start_count()
    out = fio_read(fs.files)
    served, fs_detail = fs.account(fs.served(), None)
    out.update(fs_detail)
    if out["bytes"] != out["whole_block_bytes"]:
        raise RuntimeError(f"fio read {out['bytes']} bytes of {out['whole_block_bytes']}")
    return Sample.of(
        wall_s=out["seconds"],
        ranks=[],
        served=served,
        total_bytes=ckpt.total_bytes,
        resident=resident,
        detail=out,
        cpu_s=0.0,
        consumed=0,
        rank_s=[out["seconds"]],
    )
