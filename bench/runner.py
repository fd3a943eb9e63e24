"""The suite runner: a suite becomes a list of steps, and the steps become a results document.

`plan` lays the suite out once, as a list of steps; the progress totals and ``run
--dry-run`` count that list, and `run_suite` carries it out. For each (filesystem,
shape, rank count) the steps are: untimed warm-ups (a cold raw read of the whole
checkpoint, which pays this VM's first-touch cost of the page-cache memory), then
`repeats` rounds, each measuring the raw-read floor and every configuration once in an
order rotated by one each round, then the hot-cache load; ``fio`` runs once per
(filesystem, shape), and each checkpoint is made (or reused) before its first use.
Consecutive steps on the same filesystem share one mount (and memory cgroup).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import cluster_scenario, fault_scenario
from bench import results as res
from bench.checkpoint import Checkpoint
from bench.cluster_scenario import ClusterRound
from bench.configs import Config, parse_config
from bench.errors import BenchError, BenchInterrupted, ChecksumMismatch
from bench.fault_scenario import FaultRound
from bench.filesystems import FileSystem, effective_fs, open_fs
from bench.launchers import Launcher, make_launcher
from bench.measure import measure, measure_fio
from bench.models import UNSTABLE_SPREAD, Result, ResultSet, Sample
from bench.store import checkpoint_id, ensure_checkpoint
from bench.suites import Matrix, Suite, validate_suite

__all__ = [
    "FioFloor",
    "Group",
    "MakeCheckpoint",
    "ProgressEvent",
    "Sampling",
    "Step",
    "fio_available",
    "plan",
    "run_suite",
]

log = logging.getLogger(__name__)

_FLOOR_DEFINITION = (
    "floor:raw = cold read of every byte by W processes x 4 "
    "threads (preadv, 16 MiB pieces, no parsing), W = ranks"
)


@dataclass(frozen=True)
class ProgressEvent:
    """Where a running suite is.

    Attributes:
        done: steps finished.
        total: steps in the suite.
        description: the step now running.
        finished: a one-line summary of the step that just finished, or None.
    """

    done: int
    total: int
    description: str
    finished: str | None = None


# --------------------------------------------------------------------------------------
# Steps


@dataclass(frozen=True)
class Group:
    """One checkpoint of a matrix on one filesystem: the steps that share a mount."""

    matrix: Matrix
    shape: str
    fs: str

    @property
    def checkpoint_key(self) -> tuple[str, int]:
        return (self.shape, self.matrix.size_bytes)

    @property
    def checkpoint_id(self) -> str:
        return checkpoint_id(self.shape, self.matrix.size_bytes)

    @property
    def where(self) -> str:
        return f"{self.fs} {self.shape}"


@dataclass(frozen=True)
class MakeCheckpoint:
    """Make (or reuse) the checkpoint of `shape` and `size_bytes`."""

    shape: str
    size_bytes: int

    @property
    def label(self) -> str:
        return f"checkpoint {checkpoint_id(self.shape, self.size_bytes)}"


@dataclass(frozen=True)
class FioFloor:
    """fio's cold read of the group's checkpoint."""

    group: Group

    @property
    def label(self) -> str:
        return f"{self.group.where}: fio floor"


@dataclass(frozen=True)
class Sampling:
    """One sample with fresh rank processes: a warm-up, the raw floor, a load, or hot.

    Attributes:
        group: where.
        kind: the result kind it is recorded under (``floor-raw``, ``load``, ``hot``).
        config: what the ranks run.
        ranks: how many ranks.
        label: the progress line.
        hot: start with every byte cached.
        keep: record the sample (warm-ups are not recorded).
    """

    group: Group
    kind: str
    config: Config
    ranks: int
    label: str
    hot: bool = False
    keep: bool = True


Step = MakeCheckpoint | FioFloor | Sampling | ClusterRound | FaultRound


def fio_available() -> bool:
    """Whether fio is installed (its floor is planned only then)."""
    from bench.floor import FIO_AVAILABLE

    return FIO_AVAILABLE


def _floor_config(fs: str) -> Config:
    """The raw floor's readers: 4 threads per rank, or as many as the profile needs.

    Example:
        >>> _floor_config("slow-nfs").spec, _floor_config("many-streams").spec
        ('raw', 'raw:threads=32')
    """
    from bench.filesystems import split_fs
    from bench.netfs import PROFILES

    base, overrides = split_fs(fs)
    default = PROFILES[base].floor_threads if base in PROFILES else 4
    threads = overrides.get("floor_threads", default)
    return parse_config("raw" if threads == 4 else f"raw:threads={threads}")


def _rank_steps(suite: Suite, group: Group, ranks: int) -> list[Sampling]:
    """Warm-ups, the rotated rounds of floor and configurations, then the hot loads."""
    prefix = f"{group.where} {ranks}r"
    raw = _floor_config(group.fs)
    steps = [
        Sampling(group, "floor-raw", raw, ranks, f"{prefix}: warm-up {i + 1}", keep=False)
        for i in range(suite.warmup)
    ]
    order = [("floor-raw", Config(name="floor:raw", kind="raw", options=raw.options))]
    order += [("load", parse_config(c)) for c in group.matrix.configs]
    for rep in range(suite.repeats):
        k = rep % len(order)
        for kind, cfg in order[k:] + order[:k]:
            steps.append(Sampling(group, kind, cfg, ranks, f"{prefix}: {cfg.name} #{rep + 1}"))
    if group.matrix.hot:
        hot = Config(name="hot", kind="none")
        for rep in range(suite.repeats):
            steps.append(Sampling(group, "hot", hot, ranks, f"{prefix}: hot #{rep + 1}", hot=True))
    return steps


def plan(suite: Suite, *, fuse_ok: bool, fio_ok: bool | None = None) -> list[Step]:
    """Every step of `suite`, in the order `run_suite` carries them out.

    Args:
        suite: the suite.
        fuse_ok: whether FUSE works (without it the netfs profiles run on local disk).
        fio_ok: whether fio is installed; default: look.

    Returns:
        The steps; their number is the progress total.

    Example:
        >>> from bench.suites import quick_suite
        >>> len(plan(quick_suite(), fuse_ok=True, fio_ok=False))
        89
    """
    fio = fio_available() if fio_ok is None else fio_ok
    steps: list[Step] = []
    made: set[tuple[str, int]] = set()
    for m in suite.matrices:
        for shape in m.shapes:
            if (shape, m.size_bytes) not in made:
                made.add((shape, m.size_bytes))
                steps.append(MakeCheckpoint(shape, m.size_bytes))
            if m.simulated_cluster:  # FUSE is not optional here: the nodes are mounts
                for fs in m.fs:
                    group = Group(m, shape, fs)
                    steps += [
                        ClusterRound(group, r, rep, f"{group.where} {m.nodes}x{r}r #{rep + 1}")
                        for r in m.ranks
                        for rep in range(suite.repeats)
                    ]
                continue
            if m.faults:  # injected through the simulated filesystem: FUSE is needed
                for fs in m.fs:
                    group = Group(m, shape, fs)
                    labels = (f"{group.where}: faults #{rep + 1}" for rep in range(suite.repeats))
                    steps += [FaultRound(group, rep, lab) for rep, lab in enumerate(labels)]
                continue
            for fs in effective_fs(m.fs, fuse_ok):
                group = Group(m, shape, fs)
                if m.fio and fio:
                    steps.append(FioFloor(group))
                for ranks in m.ranks:
                    steps += _rank_steps(suite, group, ranks)
    return steps


# --------------------------------------------------------------------------------------
# Carrying the steps out


class _Run:
    """The state of one run: the document, the results, the mount now in use."""

    def __init__(
        self,
        suite: Suite,
        steps: list[Step],
        launcher: Launcher,
        doc: dict[str, Any],
        progress: Callable[[ProgressEvent], None] | None,
    ) -> None:
        self.suite, self.steps, self.launcher, self.doc = suite, steps, launcher, doc
        self.progress = progress
        self.done = 0
        self.results = ResultSet()
        self.checkpoints: dict[tuple[str, int], Checkpoint] = {}
        self.reference: dict[str, tuple[str, str]] = {}  # checkpoint id -> (checksum, by)
        self.mount = contextlib.ExitStack()
        self.group: Group | None = None
        self.fs: FileSystem | None = None
        self.cgroup: Any = None

    def tick(self, description: str, finished: str | None = None) -> None:
        if finished is not None:
            self.done += 1
        if self.progress is not None:
            self.progress(ProgressEvent(self.done, len(self.steps), description, finished))

    def run(self) -> None:
        handlers: dict[type, Callable[[Any], None]] = {
            MakeCheckpoint: self._make_checkpoint,
            FioFloor: self._fio,
            Sampling: self._sample,
            ClusterRound: self._cluster,
            FaultRound: self._faults,
        }
        with self.mount:
            for step in self.steps:
                if not isinstance(step, MakeCheckpoint | ClusterRound | FaultRound):
                    self._enter(step.group)
                handlers[type(step)](step)

    def _enter(self, group: Group) -> None:
        """Mount the group's filesystem (and make its memory cgroup) unless already done."""
        if group == self.group:
            return
        self.mount.close()
        self.group = None
        self.tick(f"mount {group.where}")
        ckpt = self.checkpoints[group.checkpoint_key]
        self.fs = self.mount.enter_context(open_fs(group.fs, ckpt))
        self.cgroup = None
        if group.matrix.memory_limit_bytes is not None:
            from bench.cgroup import memory_cgroup

            self.cgroup = self.mount.enter_context(memory_cgroup(group.matrix.memory_limit_bytes))
        self.doc["filesystems"].setdefault(group.fs, {**self.fs.describe(), "requested": group.fs})
        self.group = group

    def _make_checkpoint(self, step: MakeCheckpoint) -> None:
        self.tick(step.label)
        t0 = time.monotonic()
        s = self.suite
        ckpt, made = ensure_checkpoint(
            s.workdir,
            shape=step.shape,
            size_bytes=step.size_bytes,
            shards=s.shards,
            skew=s.skew,
            dtypes=s.dtypes,
            seed=s.seed,
        )
        self.checkpoints[(step.shape, step.size_bytes)] = ckpt
        self.doc["checkpoints"][checkpoint_id(step.shape, step.size_bytes)] = ckpt.to_json()
        how = "made" if made else "reused"
        dt = time.monotonic() - t0
        self.tick(step.label, f"{step.label}: {how} in {dt:.1f} s ({len(ckpt.files)} files)")

    def _record(
        self, group: Group, kind: str, config: str, spec: str, ranks: int, sample: Sample
    ) -> None:
        ckpt = self.checkpoints[group.checkpoint_key]
        self.results.add(
            Result(
                scenario=group.matrix.scenario,
                kind=kind,
                fs=group.fs,
                shape=group.shape,
                checkpoint=group.checkpoint_id,
                ranks=ranks,
                config=config,
                spec=spec,
                memory_limit_bytes=group.matrix.memory_limit_bytes,
                total_bytes=ckpt.total_bytes,
                samples=(sample,),
            )
        )

    def _fio(self, step: FioFloor) -> None:
        from bench.netfs import NetFSError

        self.tick(step.label)
        group = step.group
        assert self.fs is not None
        try:
            sample = measure_fio(self.fs, self.checkpoints[group.checkpoint_key])
        except NetFSError:
            raise  # the mount failed, not fio
        except RuntimeError as exc:
            self.doc["warnings"].append(f"fio on {group.where}: {exc}")
            self.tick(step.label, f"{step.label}: failed ({exc})")
            return
        self._record(group, "floor-fio", "floor:fio", "raw:fio", 1, sample)
        self.tick(step.label, f"{step.label}: {sample.wall_s:.2f} s")

    def _sample(self, step: Sampling) -> None:
        self.tick(step.label)
        group, cfg = step.group, step.config
        ckpt = self.checkpoints[group.checkpoint_key]
        assert self.fs is not None
        sample = measure(
            self.launcher,
            self.fs,
            ckpt,
            cfg,
            step.ranks,
            hot=step.hot,
            timeout=self.suite.timeout_s,
            cgroup=self.cgroup,
        )
        if cfg.kind in ("raw", "engine"):
            _check_raw(step, sample, ckpt)
        else:
            self._check_checksum(step, sample, ckpt)
        if step.keep:
            self._record(group, step.kind, cfg.name, cfg.spec, step.ranks, sample)
        ratio = sample.bytes_served_ratio
        served = f", served {ratio:.2f}x" if ratio is not None else ""
        self.tick(step.label, f"{step.label}: {sample.wall_s:.2f} s{served}")

    def _cluster(self, step: ClusterRound) -> None:
        """One round across simulated nodes (they mount the checkpoint themselves)."""
        self._leave_mount()
        self.tick(step.label)
        group, m = step.group, step.group.matrix
        ckpt = self.checkpoints[group.checkpoint_key]
        workdir = self.suite.workdir / "cluster-sim" / f"{group.checkpoint_id}-{step.repeat}"
        results = cluster_scenario.measure_round(step, ckpt, workdir=workdir)
        fs_key, fs_doc = f"{group.fs}x{m.nodes}", cluster_scenario.describe(group.fs, m.nodes)
        self.doc["filesystems"].setdefault(fs_key, fs_doc)
        ranks = m.nodes * step.ranks_per_node
        for r in results:
            spec = f"cluster_sim:{r.mode}" + (f",split={m.split}" if m.split else "")
            self._record(group, "load", r.mode, spec, ranks, cluster_scenario.to_sample(r))
        done = ", ".join(f"{r.mode} {r.load_s:.2f} s ({r.served_ratio:.2f}x)" for r in results)
        self.tick(step.label, f"{step.label}: {done}")

    def _faults(self, step: FaultRound) -> None:
        """One run of every injected fault (a child process mounts the filesystem)."""
        self._leave_mount()
        self.tick(step.label)
        group = step.group
        ckpt = self.checkpoints[group.checkpoint_key]
        outcomes = fault_scenario.measure_round(step, ckpt, timeout_s=self.suite.timeout_s)
        for o in outcomes:
            name = fault_scenario.slug(o["fault"])
            sample = fault_scenario.to_sample(o, ckpt.total_bytes)
            self._record(group, "load", name, f"fault:{name}", 1, sample)
            if o["lost"] or o["wrong"]:
                raise ChecksumMismatch(
                    f"{step.label}: {o['fault']}: {o['lost']} tensors lost, {o['wrong']} wrong"
                )
            if o["survived"] < o["runs"]:
                self.doc["warnings"].append(f"{step.label}: {o['fault']}: not survived")
        bad = sum(o["survived"] < o["runs"] for o in outcomes)
        self.tick(step.label, f"{step.label}: {len(outcomes) - bad} of {len(outcomes)} survived")

    def _leave_mount(self) -> None:
        """Unmount the group's filesystem: these steps mount their own."""
        self.mount.close()
        self.group = None

    def _check_checksum(self, step: Sampling, sample: Sample, ckpt: Checkpoint) -> None:
        """Every rank, and every configuration before, loaded the same bytes."""
        name, where, ranks = step.config.name, step.group.where, step.ranks
        got = {r.checksum for r in sample.ranks}
        if len(got) != 1:
            per = ", ".join(f"rank {r.rank}: {r.checksum}" for r in sample.ranks)
            raise ChecksumMismatch(
                f"{name} on {where} with {ranks} ranks: ranks loaded different bytes ({per})"
            )
        tensors = {r.tensors for r in sample.ranks}
        if tensors != {ckpt.tensor_count}:
            raise ChecksumMismatch(
                f"{name} on {where}: loaded {sorted(tensors)} "
                f"tensors, the checkpoint has {ckpt.tensor_count}"
            )
        value, cid, fs = got.pop(), step.group.checkpoint_id, step.group.fs
        ref = self.reference.get(cid)
        if ref is None:
            self.reference[cid] = (value, f"{name} on {fs} with {ranks} ranks")
            self.doc["checkpoints"][cid]["checksum"] = value
        elif ref[0] != value:
            raise ChecksumMismatch(
                f"CHECKSUM MISMATCH on checkpoint {cid}: {name} on {fs} "
                f"with {ranks} ranks loaded {value}, but {ref[1]} loaded {ref[0]}. "
                "The tensors differ between configurations: this is a bug."
            )


def _check_raw(step: Sampling, sample: Sample, ckpt: Checkpoint) -> None:
    """The raw readers (or the engine alone) read every byte: a short read would make the
    floor (or the engine) look fast."""
    read = sum(r.bytes_consumed for r in sample.ranks)
    if read != ckpt.total_bytes:
        raise BenchError(
            f"{step.label}: the {step.config.kind} readers read {read} bytes of "
            f"{ckpt.total_bytes} (a short read would make them look faster than they are)"
        )


# --------------------------------------------------------------------------------------
# The document


def _settings(suite: Suite) -> dict[str, Any]:
    return {
        "suite": suite.name,
        "argv": list(suite.argv) if suite.argv is not None else None,
        "repeats": suite.repeats,
        "warmup": suite.warmup,
        "launcher": suite.launcher,
        "workdir": str(suite.workdir),
        "shards": suite.shards,
        "skew": suite.skew,
        "dtypes": list(suite.dtypes),
        "seed": suite.seed,
        "timeout_s": suite.timeout_s,
        "matrices": [dataclasses.asdict(m) for m in suite.matrices],
        "floor_definition": _FLOOR_DEFINITION,
    }


def _finish(run: _Run, t_start: float, *, validate: bool = True) -> dict[str, Any]:
    """The results document as it stands; validated unless the run stopped early."""
    doc = run.doc
    doc["duration_s"] = time.monotonic() - t_start
    doc["results"] = run.results.to_json()
    for r in doc["results"]:
        if r["summary"]["unstable"]:
            msg = (
                f"unstable: {r['config']} on {r['fs']}/{r['shape']}/{r['ranks']} ranks "
                f"spread {r['summary']['spread']:.0%} > "
                f"{UNSTABLE_SPREAD:.0%} (add --repeats)"
            )
            if msg not in doc["warnings"]:
                doc["warnings"].append(msg)
    if validate:
        res.validate(doc)
    return doc


def _stopped(exc: BaseException, run: _Run, t_start: float) -> BenchError:
    """The BenchError to raise for `exc`, holding the results measured so far.

    Raises:
        BaseException: `exc` itself when it is not the run's to wrap (SystemExit, ...).
    """
    if isinstance(exc, KeyboardInterrupt):
        stop: BenchError = BenchInterrupted("interrupted: the results so far are kept")
        verb, why = "interrupted", ""
    elif isinstance(exc, BenchError):
        stop, verb, why = exc, "stopped", f": {exc}"
    elif isinstance(exc, Exception):
        stop = BenchError(f"{type(exc).__name__}: {exc}")
        verb, why = "stopped", f": {stop}"
    else:
        raise exc
    total = len(run.steps)
    run.doc["warnings"].append(f"partial: {verb} after {run.done} of {total} steps{why}")
    stop.document = _finish(run, t_start, validate=False)
    return stop


def _new_document(suite: Suite) -> tuple[dict[str, Any], bool]:
    """An empty results document for `suite`, and whether FUSE works on this host."""
    from bench import netfs

    fuse_ok, fuse_why = netfs.fuse_available()
    doc = res.new_document(
        settings=_settings(suite), host=res.host_metadata(fuse=(fuse_ok, fuse_why))
    )
    if not fuse_ok and any(n != "local" for m in suite.matrices for n in m.fs):
        msg = (
            f"FUSE is unavailable ({fuse_why}): the simulated network filesystems are "
            "replaced by local disk"
        )
        log.warning("%s", msg)
        doc["warnings"].append(msg)
    return doc, fuse_ok


def run_suite(
    suite: Suite,
    *,
    progress: Callable[[ProgressEvent], None] | None = None,
    launcher: Launcher | None = None,
) -> dict[str, Any]:
    """Run every measurement of `suite` and return the results document.

    Args:
        suite: what to run.
        progress: called before and after every step.
        launcher: starts the rank processes; default: the suite's launcher (closed at the
            end). One given here is the caller's to close.

    Returns:
        The results document (validated against ``bench/schema.json``).

    Raises:
        ChecksumMismatch: two loads gave different bytes (the run stops at once).
        BenchError: a rank failed or timed out, or the cache could not be made cold;
            ``exc.document`` holds the results gathered so far.
        BenchInterrupted: Ctrl-C (SIGINT) stopped the run; ``exc.document`` holds
            the results gathered so far.

    Example:
        >>> doc = run_suite(quick_suite(repeats=1))  # doctest: +SKIP
    """
    validate_suite(suite)
    doc, fuse_ok = _new_document(suite)
    t_start = time.monotonic()
    own = launcher is None
    run = _Run(
        suite,
        plan(suite, fuse_ok=fuse_ok),
        launcher or make_launcher(suite.launcher),
        doc,
        progress,
    )
    try:
        run.run()
    except BaseException as exc:
        # Keep what was measured: a rank failed (BenchError), a mount or an eviction
        # failed (anything else), or Ctrl-C.
        stop = _stopped(exc, run, t_start)
        if stop is exc:
            raise
        raise stop from exc
    finally:
        if own:
            run.launcher.close()
    return _finish(run, t_start)
