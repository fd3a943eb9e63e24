"""The ``ckpt-prefetch-bench`` command line's flags, and the suite they choose.

`build_parser` builds the parser of every command; `build_suite` turns the flags of
``run`` into a `bench.suites.Suite` (a quick or full suite with the chosen filesystems,
ranks, shapes, configurations and scenarios). `bench.cli` runs the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.suites import Matrix, Suite

__all__ = ["DEFAULT_SKEW", "UsageError", "build_parser", "build_suite"]

log = logging.getLogger(__name__)

_EPILOG_RUN = """\
suites:
  --quick (default)  512 MiB checkpoints, 4 ranks, 3 repeats, on the simulated slow-nfs
                     (uniform, skewed, single; none / sglang / ours) and on the real
                     sshfs client (skewed, single; none / sglang / stripe / ours), plus
                     the floor (raw cold read), fio and the hot-cache load. About 5
                     minutes on a 2-core machine, making the checkpoints included (they
                     are reused from --workdir afterwards). A flag that chooses
                     filesystems, ranks, shapes or configurations keeps one matrix.
  --full             over 2 hours on a 2-core machine (7145 s for the first four scenarios
                     when they had 1639 steps; --dry-run counts today's):
                     'cold' = local disk and every netfs profile x ranks 1,2,4,8 x
                     shapes uniform, skewed, single, many-small x none, sglang, ours,
                     ours-files (2 GiB); 'sweep' = slow-nfs, 4 ranks, uniform,
                     concurrency 1/2/4/8 x chunk 16/64 MiB; 'backends' = local and
                     slow-nfs, 4 ranks, uniform, every read backend + ours-files;
                     'bigger-than-memory' =
                     slow-nfs, 4 ranks, 3 GiB in a 1 GiB memory cgroup, none / sglang /
                     ours-window / ours-nowindow; 'engine' = local disk, 1 and 4
                     ranks, 4 GiB: the engine alone, default and 3 backends;
                     'cluster' = 2 simulated nodes x 2
                     ranks sharing one slow-nfs storage limit, node-local / cluster
                     mode (2 GiB); 'cluster-ep' = the same nodes in an expert-parallel
                     job (many-small): vllm / vllm-prefetch / ours-whole / ours;
                     'faults' = fast-nfs, 48 MiB, every injected fault of
                     bench.reliability (survived, tensors lost or wrong).
  Flags given explicitly replace the suite's values: --fs, --ranks, --shapes in every
  scenario; --configs in the 'cold' scenario; --size in 'cold', 'sweep', 'backends',
  'cluster' and 'cluster-ep' (--btm-size in 'bigger-than-memory').

configurations (--configs, comma separated):
  none          safe_open + get_tensor in keys() order: mmap page faults, no prefetch
  sglang        SGLang-style: sorted(files)[rank::world], 4 threads of 16 MiB read()
                in a daemon thread, loading at once beside it
  stripe        plain striping: 64 MiB stripes dealt round-robin, one sendfile thread
                per rank, no residency check, loading at once beside it
  vllm          vLLM's own safetensors_weights_iterator with its prefetch (strategy
                "prefetch": sorted(files)[rank::world], 8 threads of 16 MiB read()),
                ranks in a gloo group; skipped with a warning when vllm is missing
  ours          loader_adapter.safetensors_weights_iterator(prefetch=True), defaults
  ours-files    ours with strategy=files (file round-robin, for comparison)
  ours-c1-64m   ours with concurrency=1, chunk 64 MiB (any ours-c<N>-<MB>m)
  ours-fixed    ours without run-time adaptation: 8 reads per node split among the
                ranks, in this process (the defaults before adaptation)
  ours-<backend>, ours-window, ours-nowindow, ours-noprefetch
  ours:backend=pread,concurrency=2,chunk_mb=32,window=auto   (any options)
  engine        the engine alone: prefetch_async(files, rank, world), no consumer, in each
                rank, nothing parsed (engine:backend=pread,concurrency=2,chunk_mb=32)
  sglang:threads=8,block_mb=32                                (any options)

measurement: cold cache (evicted and checked < 1% resident), rank processes started
fresh and released together, done when the last rank has copied every tensor into its
own memory; a checksum of all tensors must agree across configurations and ranks.

filesystems (--fs): local, fast-nfs, slow-nfs, lustre-like, many-streams, local-fuse (the netfs
profiles are simulations through FUSE), sshfs, sshfs-quick (a real network filesystem
client: sshfs to an sshd in a network namespace over a tc-limited veth, made and removed
by the run; needs root, sshfs, openssh-server and iproute2, which setup.sh installs).
Without FUSE the netfs and sshfs profiles fall back to local disk with a warning.

exit status: 0 ok, 1 error, 2 usage, 3 checksum mismatch (different tensors), 130 Ctrl-C,
143 SIGTERM (both keep the results so far in <suite>-partial.json).
"""


DEFAULT_SKEW = 4.0


class UsageError(ValueError):
    """Arguments that cannot work together or name unknown things: exit status 2."""


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _ints(text: str) -> list[int]:
    try:
        out = [int(p) for p in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return out


def _size(text: str) -> int:
    from engine.units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _configs(text: str) -> list[str]:
    from bench.configs import parse_config

    out = _csv(text)
    for c in out:
        try:
            parse_config(c)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return out


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    """The flags that shape a synthetic checkpoint's data (shared by `run` and `make`)."""
    parser.add_argument(
        "--skew",
        type=float,
        default=None,
        metavar="X",
        help=f"first shard of a skewed checkpoint is X times the others (default "
        f"{DEFAULT_SKEW:g}; for make, --skew alone means --shape skewed)",
    )
    parser.add_argument(
        "--dtypes",
        type=_csv,
        default=["bf16", "fp16", "fp8_e4m3"],
        metavar="LIST",
        help="tensor dtypes (default bf16,fp16,fp8_e4m3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="checkpoint data seed (default 0)")


def _add_matrix_args(r: argparse.ArgumentParser) -> None:
    """What to measure: filesystems, ranks, checkpoints, configurations, scenarios."""
    r.add_argument(
        "--fs",
        type=_csv,
        metavar="LIST",
        help="filesystems: local, netfs profiles (fast-nfs, slow-nfs, lustre-like, many-streams, "
        "local-fuse) and/or sshfs profiles (sshfs, sshfs-quick), each with optional profile "
        "fields, e.g. 'sshfs:max_conns=4;latency_at=link;latency_s=0.005'; quick: slow-nfs "
        "and sshfs",
    )
    r.add_argument("--ranks", type=_ints, metavar="LIST", help="rank counts, e.g. 1,4 (quick: 4)")
    r.add_argument(
        "--shapes",
        type=_csv,
        metavar="LIST",
        help="checkpoint shapes: uniform, skewed, single, many-small "
        "(quick: uniform,skewed,single)",
    )
    r.add_argument(
        "--size",
        type=_size,
        metavar="SIZE",
        help="checkpoint size, e.g. 1GiB (quick: 512MiB, full: 2GiB)",
    )
    r.add_argument(
        "--shards",
        type=int,
        default=8,
        metavar="N",
        help="shards of uniform and skewed checkpoints (default 8; single has 1, many-small 64)",
    )
    _add_data_args(r)
    r.add_argument(
        "--configs",
        type=_configs,
        metavar="LIST",
        help="configurations (see below; quick: none,sglang,ours)",
    )
    r.add_argument(
        "--scenario",
        type=_csv,
        metavar="LIST",
        help="scenarios: cold, sweep, backends, bigger-than-memory, engine, cluster, "
        "cluster-ep, faults (quick: cold; full: all)",
    )
    r.add_argument(
        "--memory-limit",
        type=_size,
        default=1 << 30,
        metavar="SIZE",
        help="memory cgroup limit of the bigger-than-memory scenario (default 1GiB)",
    )
    r.add_argument(
        "--btm-size",
        type=_size,
        default=3 << 30,
        metavar="SIZE",
        help="checkpoint size of the bigger-than-memory scenario (default 3GiB)",
    )


def _add_sampling_args(r: argparse.ArgumentParser) -> None:
    """How to measure: repeats, warm-ups, floors, rank processes, where checkpoints live."""
    r.add_argument(
        "--repeats",
        type=int,
        default=3,
        metavar="N",
        help="samples per measurement; median and spread (default 3)",
    )
    r.add_argument(
        "--warmup",
        type=int,
        default=1,
        metavar="N",
        help="untimed cold raw reads before each group (default 1)",
    )
    r.add_argument("--no-fio", action="store_true", help="skip the fio floor")
    r.add_argument("--no-hot", action="store_true", help="skip the hot-cache load")
    r.add_argument(
        "--launcher",
        choices=("forkserver", "subprocess"),
        default="forkserver",
        help="how rank processes start: forked from a server that imported torch "
        "once (default), or a new interpreter each (slower to start; the "
        "timing starts after imports either way)",
    )
    r.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="longest one measurement may take (default 600 s)",
    )
    r.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="where checkpoints are made and reused (default ~/.cache/ckpt-prefetch-bench)",
    )


def _add_output_args(r: argparse.ArgumentParser) -> None:
    """Where the results go, or a dry run."""
    r.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        metavar="DIR",
        help="directory for the JSON and PNG (default ./bench-results)",
    )
    r.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="results JSON (default DIR/<suite>.json, e.g. bench-results/quick.json;"
        " an earlier run of the same suite is replaced: give --json to keep "
        "both for compare)",
    )
    r.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="plot PNG (default: the JSON's path with .png, e.g. bench-results/quick.png)",
    )
    r.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="print the suite's scenarios and number of measurements, run nothing",
    )


def _add_run_parser(sub: Any) -> None:
    r = sub.add_parser(
        "run",
        help="run a benchmark suite (default: --quick)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG_RUN,
        description="Run a benchmark suite and print a table; write JSON and a PNG plot.",
    )
    mode = r.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="the quick suite (default): under 3 minutes"
    )
    mode.add_argument(
        "--full", action="store_true", help="the full suite (2 hours on 2 cores, see below)"
    )
    _add_matrix_args(r)
    _add_sampling_args(r)
    _add_output_args(r)


def _add_make_parser(sub: Any) -> None:
    m = sub.add_parser(
        "make",
        help="write a synthetic safetensors checkpoint",
        description="Write a deterministic synthetic checkpoint (shards plus "
        "model.safetensors.index.json).",
    )
    m.add_argument("dir", type=Path, help="output directory")
    m.add_argument(
        "--size",
        type=_size,
        default=4 << 30,
        metavar="SIZE",
        help="tensor data size (default 4GiB)",
    )
    m.add_argument(
        "--shards",
        type=int,
        default=None,
        metavar="N",
        help="number of shards (default 8; single: 1; many-small: 64)",
    )
    _add_data_args(m)
    m.add_argument(
        "--shape",
        default=None,
        choices=("uniform", "skewed", "single", "many-small"),
        help="checkpoint shape (default uniform, or skewed when --skew is given)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``ckpt-prefetch-bench`` command."""
    p = argparse.ArgumentParser(
        prog="ckpt-prefetch-bench",
        description="Measure how fast N rank processes load a safetensors checkpoint from a "
        "(simulated) network filesystem: no prefetch, the SGLang-style prefetch, "
        "and ckpt-prefetch, against the physical floor.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with:  ckpt-prefetch-bench run     (the quick suite, < 3 minutes)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more (-v: INFO, -vv: DEBUG) to stderr",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    _add_run_parser(sub)
    _add_make_parser(sub)
    s = sub.add_parser("show", help="print the table (and plot) of a stored results JSON")
    s.add_argument("json", type=Path, help="a results JSON")
    s.add_argument("--plot", type=Path, metavar="PATH", help="also draw the plot to PATH")

    c = sub.add_parser("compare", help="compare two results JSON files (ratios B / A)")
    c.add_argument("a", type=Path, help="reference results JSON")
    c.add_argument("b", type=Path, help="results JSON to compare with it")
    return p


# --------------------------------------------------------------------------------------


def _matrix_overrides(args: argparse.Namespace, scenario: str) -> dict[str, Any]:
    """The Matrix fields that flags given explicitly replace in `scenario`."""
    repl: dict[str, Any] = {}
    for flag in ("fs", "ranks", "shapes"):
        if getattr(args, flag):
            repl[flag] = tuple(getattr(args, flag))
    if scenario == "cold" and args.configs:
        repl["configs"] = tuple(args.configs)
    if scenario in ("cold", "sweep", "backends", "cluster", "cluster-ep") and args.size:
        repl["size_bytes"] = args.size
    if scenario == "bigger-than-memory":
        repl["memory_limit_bytes"] = args.memory_limit
        repl["size_bytes"] = args.btm_size
    if args.no_fio:
        repl["fio"] = False
    if args.no_hot:
        repl["hot"] = False
    return repl


def _chosen_matrices(
    args: argparse.Namespace, catalogue: dict[str, list[Matrix]], scenarios: Sequence[str]
) -> Iterator[Matrix]:
    """Each scenario's matrices with the flags applied. Where a flag chooses what a matrix
    holds (filesystems, ranks, shapes, configurations), a scenario of several matrices
    (the quick suite's simulated and real clients) becomes its first one, so chosen."""
    chooses = any(getattr(args, k) for k in ("fs", "ranks", "shapes", "configs"))
    for name in scenarios:
        mats = catalogue[name][:1] if chooses else catalogue[name]
        for m in mats:
            yield dataclasses.replace(m, **_matrix_overrides(args, name))


def _without_missing_engines(mats: Iterable[Matrix]) -> Iterator[Matrix]:
    """Drop configurations of a serving engine that is not installed, with a warning."""
    import importlib.util

    from bench.configs import parse_config

    missing = importlib.util.find_spec("vllm") is None

    def needs_vllm(m: Matrix, c: str) -> bool:
        if m.simulated_cluster:
            return c.startswith("vllm")
        return parse_config(c).kind == "vllm"

    for m in mats:
        keep = tuple(c for c in m.configs if not (missing and needs_vllm(m, c)))
        if keep != m.configs:
            log.warning("vllm is not installed: configuration vllm skipped (pip install '.[vllm]')")
        yield dataclasses.replace(m, configs=keep)


def build_suite(args: argparse.Namespace, argv: Sequence[str]) -> Suite:
    """The suite that the flags of ``run`` choose (`argv` is kept in the results).

    Raises:
        ValueError: an unknown scenario.
    """
    from bench.store import default_workdir
    from bench.suites import SCENARIOS, full_suite, quick_suite

    base = full_suite() if args.full else quick_suite()
    scenarios = args.scenario or (list(SCENARIOS) if args.full else ["cold"])
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        raise ValueError(
            f"unknown scenario(s) {', '.join(bad)}: use {', '.join(sorted(SCENARIOS))}"
        )
    catalogue: dict[str, list[Matrix]] = {}
    for m in full_suite().matrices:
        catalogue.setdefault(m.scenario, []).append(m)
    for scenario in {m.scenario for m in base.matrices}:
        catalogue[scenario] = [m for m in base.matrices if m.scenario == scenario]
    mats = tuple(_without_missing_engines(_chosen_matrices(args, catalogue, scenarios)))
    name = base.name
    if any(getattr(args, k) for k in ("fs", "ranks", "shapes", "size", "configs", "scenario")):
        name = f"{name}-custom"
    return dataclasses.replace(
        base,
        name=name,
        matrices=mats,
        repeats=args.repeats,
        warmup=args.warmup,
        workdir=args.workdir or default_workdir(),
        shards=args.shards,
        skew=args.skew if args.skew is not None else DEFAULT_SKEW,
        dtypes=tuple(args.dtypes),
        seed=args.seed,
        launcher=args.launcher,
        timeout_s=args.timeout,
        argv=tuple(argv),
    )
