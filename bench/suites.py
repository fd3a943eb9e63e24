"""Suites: what to measure, as matrices of filesystems x rank counts x shapes x configs.

A suite is data only; `bench.runner` turns it into a list of steps and runs them.
`validate_suite` checks every name in it before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.configs import parse_config
from bench.store import default_workdir
from engine.backends import BACKENDS
from engine.units import format_size

__all__ = [
    "FULL_CONFIGS",
    "QUICK_CONFIGS",
    "SCENARIOS",
    "SWEEP_CONFIGS",
    "Matrix",
    "Suite",
    "full_suite",
    "quick_suite",
    "validate_suite",
]

#: Read buffers a rank may hold inside the memory cgroup (4 threads x 16 MiB).
READ_BUFFERS_PER_RANK = 64 << 20


@dataclass(frozen=True)
class Matrix:
    """One block of measurements: every combination of its lists.

    Attributes:
        scenario: label (``cold``, ``sweep``, ``bigger-than-memory``, ...).
        fs: filesystems: ``local`` or a netfs profile name.
        ranks: rank counts.
        shapes: checkpoint shapes.
        configs: configuration strings (see ``bench.worker``).
        size_bytes: checkpoint size.
        memory_limit_bytes: run the ranks in a memory cgroup with this limit, or None.
        hot: also measure the hot-cache load.
        fio: also run fio.
        nodes: simulated nodes (`bench.cluster_sim`): with more than one, each
            filesystem is a netfs profile that the nodes share, `ranks` are ranks per
            node and `configs` are the simulation's modes (``node``, ``cluster``, or with
            `split` ``vllm``, ``vllm-prefetch``, ``ours-whole``, ``ours``).
        split: ``"ep"`` or ``"pp"``: each rank of the simulated job loads its part.
        faults: run `bench.reliability`'s injected faults on each filesystem (a netfs
            profile) instead of `configs`.
    """

    scenario: str
    fs: tuple[str, ...]
    ranks: tuple[int, ...]
    shapes: tuple[str, ...]
    configs: tuple[str, ...]
    size_bytes: int
    memory_limit_bytes: int | None = None
    hot: bool = True
    fio: bool = True
    nodes: int = 1
    split: str | None = None
    faults: bool = False

    @property
    def simulated_cluster(self) -> bool:
        """Whether it runs across simulated nodes (`bench.cluster_sim`)."""
        return self.nodes > 1


@dataclass(frozen=True)
class Suite:
    """Everything `run_suite` needs.

    Attributes:
        name: ``quick``, ``full`` or ``custom``.
        matrices: the blocks of measurements.
        repeats: samples per measurement.
        warmup: untimed cold raw reads per (filesystem, shape, ranks) before sampling.
        workdir: where checkpoints are made (and reused).
        shards: shards of ``uniform`` and ``skewed`` checkpoints.
        skew: size ratio of the first shard of a ``skewed`` checkpoint.
        dtypes: tensor dtypes.
        seed: data seed.
        launcher: ``forkserver`` or ``subprocess``.
        timeout_s: longest a single measurement may take.
        argv: the command line, recorded in the results.
    """

    name: str
    matrices: tuple[Matrix, ...]
    repeats: int = 3
    warmup: int = 1
    workdir: Path = field(default_factory=lambda: default_workdir())
    shards: int = 8
    skew: float = 4.0
    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp8_e4m3")
    seed: int = 0
    launcher: str = "forkserver"
    timeout_s: float = 600.0
    argv: tuple[str, ...] | None = None


#: The scenarios of the full suite, by name (``--scenario``).
SCENARIOS = (
    "cold", "sweep", "backends", "bigger-than-memory", "engine", "cluster", "cluster-ep",
    "faults",
)  # fmt: skip
QUICK_CONFIGS = ("none", "sglang", "ours")
#: On the real client the quick suite also runs plain striping, the yardstick to beat.
QUICK_REAL_CONFIGS = ("none", "sglang", "stripe", "ours")
FULL_CONFIGS = ("none", "sglang", "ours", "ours-files")
#: The engine alone (no torch, nothing parsed) with each in-process read backend.
ENGINE_CONFIGS = ("engine", *(f"engine:backend={b}" for b in ("sendfile", "pread", "fadvise")))
SWEEP_CONFIGS = tuple(f"ours-c{c}-{m}m" for c in (1, 2, 4, 8) for m in (16, 64))


def quick_suite(**overrides: Any) -> Suite:
    """The default suite: 512 MiB, 4 ranks, on the simulated and on a real network client.

    ``slow-nfs`` (simulated): uniform, skewed and single x none, sglang, ours. ``sshfs``
    (the real client, `bench.sshfs`): skewed and single x none, sglang, stripe, ours. It
    takes about 5 minutes on the project's 2-core machine, making the checkpoints included
    (they are reused afterwards).

    Args:
        **overrides: Suite fields to replace.

    Returns:
        The Suite.

    Example:
        >>> quick_suite().matrices[0].fs
        ('slow-nfs',)
    """
    simulated = Matrix(
        scenario="cold",
        fs=("slow-nfs",),
        ranks=(4,),
        shapes=("uniform", "skewed", "single"),
        configs=QUICK_CONFIGS,
        size_bytes=512 << 20,
    )
    real = Matrix(
        scenario="cold",
        fs=("sshfs",),
        ranks=(4,),
        shapes=("skewed", "single"),
        configs=QUICK_REAL_CONFIGS,
        size_bytes=512 << 20,
    )
    base = {"name": "quick", "matrices": (simulated, real), "repeats": 3, "warmup": 1}
    base.update(overrides)
    return Suite(**base)


def _full_matrices() -> tuple[Matrix, ...]:
    from bench import netfs

    only_load = {"hot": False, "fio": False}
    shapes = ("uniform", "skewed", "single", "many-small")
    backends = (*(f"ours-{b}" for b in BACKENDS), "ours-files")
    btm = ("none", "sglang", "ours-window", "ours-nowindow")
    return (
        Matrix("cold", ("local", *netfs.PROFILES), (1, 2, 4, 8), shapes, FULL_CONFIGS, 2 << 30),
        Matrix(
            "sweep", ("slow-nfs",), (4,), ("uniform",), ("sglang", "ours", *SWEEP_CONFIGS), 2 << 30,
            **only_load,
        ),
        Matrix(
            "backends", ("local", "slow-nfs"), (4,), ("uniform",), backends, 2 << 30, **only_load
        ),
        Matrix(
            "bigger-than-memory", ("slow-nfs",), (4,), ("uniform",), btm, 3 << 30,
            memory_limit_bytes=1 << 30, **only_load,
        ),
        Matrix("engine", ("local",), (1, 4), ("uniform",), ENGINE_CONFIGS, 4 << 30),
        Matrix(
            "cluster", ("slow-nfs",), (2,), ("uniform",), ("node", "cluster"), 2 << 30,
            nodes=2, **only_load,
        ),
        Matrix(
            "cluster-ep", ("slow-nfs",), (2,), ("many-small",),
            ("vllm", "vllm-prefetch", "ours-whole", "ours"), 2 << 30, nodes=2, split="ep",
            **only_load,
        ),
        Matrix(
            "faults", ("fast-nfs",), (1,), ("uniform",), (), 48 << 20, faults=True, **only_load
        ),
    )  # fmt: skip


def full_suite(**overrides: Any) -> Suite:
    """The full suite: every filesystem, rank count and shape; about 2 hours on 2 cores.

    ``cold``: local disk and every netfs profile x ranks 1, 2, 4, 8 x shapes uniform,
    skewed, single, many-small x none, sglang, ours, ours-files, 2 GiB.
    ``sweep``: slow-nfs, 4 ranks, uniform, concurrency 1/2/4/8 x chunk 16/64 MiB.
    ``backends``: local and slow-nfs, 4 ranks, uniform: every read backend and the
    ``files`` strategy through the loader.
    ``bigger-than-memory``: slow-nfs, 4 ranks, a 3 GiB uniform checkpoint in a memory
    cgroup limited to 1 GiB: none, sglang, ours (window auto), ours-nowindow.
    ``engine``: local disk, 1 and 4 ranks, a 4 GiB uniform checkpoint: the engine alone
    (``prefetch_async`` in each rank, no consumer, nothing parsed) with its default and
    three backends, beside the raw floor, fio and the hot run.
    ``cluster``: 2 simulated nodes x 2 ranks sharing one slow-nfs storage limit
    (`bench.cluster_sim`), uniform: node-local against cluster mode.
    ``cluster-ep``: the same nodes in an expert-parallel job, many-small: vLLM's own
    loader, vLLM's prefetch, ours before ``tensors=``, ours.
    ``faults``: fast-nfs, a 48 MiB checkpoint loaded with prefetch under each injected
    fault of `bench.reliability` (survived? tensors lost or wrong?).

    Args:
        **overrides: Suite fields to replace.

    Returns:
        The Suite.
    """
    mats = _full_matrices()
    base = {"name": "full", "matrices": mats, "repeats": 3, "warmup": 1}
    base.update(overrides)
    return Suite(**base)


def _validate_cluster(m: Matrix) -> None:
    from bench.cluster_sim import MODES, SPLIT_MODES
    from bench.netfs import PROFILES

    for name in m.fs:
        if name not in PROFILES:
            raise ValueError(f"simulated nodes share a netfs profile, not {name!r}")
    if m.split not in (None, "ep", "pp"):
        raise ValueError(f"unknown split {m.split!r}: use ep or pp")
    modes = SPLIT_MODES if m.split else MODES
    for c in m.configs:
        if c not in modes:
            raise ValueError(f"unknown mode {c!r} of simulated nodes: use {', '.join(modes)}")


def _validate_matrix(m: Matrix) -> None:
    from bench.checkpoint import SHAPES
    from bench.filesystems import check_fs

    if m.simulated_cluster:
        _validate_cluster(m)
    elif m.faults:
        from bench.netfs import PROFILES

        bad = [name for name in m.fs if name not in PROFILES]
        if bad:
            raise ValueError(f"faults are injected in a netfs profile, not {bad[0]!r}")
    else:
        for name in m.fs:
            check_fs(name)
        for c in m.configs:
            parse_config(c)
    for shape in m.shapes:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}: use {', '.join(SHAPES)}")
    for r in m.ranks:
        if r < 1:
            raise ValueError(f"rank counts must be >= 1, got {r}")
    if m.memory_limit_bytes is not None:
        need = max(m.ranks) * READ_BUFFERS_PER_RANK + (32 << 20)
        if m.memory_limit_bytes < need:
            raise ValueError(
                f"memory limit {format_size(m.memory_limit_bytes)} is too small for "
                f"{max(m.ranks)} ranks: the SGLang-style prefetch and the raw floor "
                f"hold up to 4 x 16 MiB of read buffers per rank; use at least "
                f"{format_size(need)}"
            )


def validate_suite(suite: Suite) -> None:
    """Check every name and number in `suite` before anything runs.

    Raises:
        ValueError: an unknown filesystem, shape or configuration, a rank count or
            repeat count out of range, or a memory limit too small for the ranks.

    Example:
        >>> validate_suite(quick_suite(repeats=0))
        Traceback (most recent call last):
        ValueError: repeats must be >= 1
    """
    if suite.repeats < 1:
        raise ValueError("repeats must be >= 1")
    if suite.warmup < 0:
        raise ValueError("warmup must be >= 0")
    for m in suite.matrices:
        _validate_matrix(m)
