"""The bench's results as types: one sample, one result, and the set of a run's results.

A `Result` is one measurement (a configuration on a filesystem, checkpoint and rank
count) with all its samples; its identity is its `ResultKey`, the one definition used to
merge samples within a run, to match results across runs (``compare``) and to group the
table's rows. `Result.add` refuses a sample that does not belong (another rank count,
other bytes), and `ResultSet.add` a result whose description disagrees with the one
already recorded under its key, as pyperf's ``Benchmark.add_run`` refuses a run whose
metadata differ. `to_json` gives exactly the layout of ``bench/schema.json``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from bench.protocol import RankReport

__all__ = [
    "KINDS",
    "UNSTABLE_SPREAD",
    "InconsistentResult",
    "Result",
    "ResultKey",
    "ResultSet",
    "Sample",
    "summarize",
]

#: A measurement whose spread (max - min) / median exceeds this is flagged unstable.
UNSTABLE_SPREAD = 0.10
#: What a result measures: a load, the raw or fio floor, the load with a hot cache.
KINDS = ("load", "floor-raw", "floor-fio", "hot")


class InconsistentResult(ValueError):
    """A sample or result that contradicts what is already recorded under its key."""


class ResultKey(NamedTuple):
    """What identifies a measurement, within a run and across runs."""

    scenario: str
    fs: str
    checkpoint: str
    ranks: int
    config: str

    @classmethod
    def of(cls, result: Mapping[str, Any]) -> ResultKey:
        """The key of a stored result (documents without ``checkpoint`` use the shape)."""
        return cls(
            result["scenario"],
            result["fs"],
            result.get("checkpoint", result["shape"]),
            int(result["ranks"]),
            result["config"],
        )

    @property
    def group(self) -> tuple[str, str, str, int]:
        """The table's group: (scenario, fs, checkpoint, ranks), every configuration."""
        return (self.scenario, self.fs, self.checkpoint, self.ranks)


@dataclass(frozen=True)
class Sample:
    """One timed run of a measurement (an entry of a result's ``samples``).

    Build it with `Sample.of`, which derives the ratios and the common checksum.
    """

    wall_s: float
    rank_s: tuple[float, ...]
    cpu_s: float
    cpu_s_per_gb: float | None
    prefetch_cpu_s_per_gb: float | None
    bytes_served: int | None
    bytes_served_ratio: float | None
    resident_before: float
    checksum: str | None
    ranks: tuple[RankReport, ...]
    detail: dict[str, Any] | None

    @classmethod
    def of(
        cls,
        *,
        wall_s: float,
        ranks: Sequence[RankReport],
        served: int | None,
        total_bytes: int,
        resident: float,
        detail: dict[str, Any] | None,
        cpu_s: float | None = None,
        consumed: int | None = None,
        rank_s: Sequence[float] | None = None,
    ) -> Sample:
        """A sample from the rank reports; `cpu_s`, `consumed` and `rank_s` default to
        the ranks' sums and times.

        Example:
            >>> Sample.of(wall_s=2.0, ranks=[], served=512, total_bytes=1024, resident=0.0,
            ...           detail=None).bytes_served_ratio
            0.5
        """
        cpu = sum(r.cpu_s for r in ranks) if cpu_s is None else cpu_s
        used = sum(r.bytes_consumed for r in ranks) if consumed is None else consumed
        pf = [r.prefetch.get("cpu_s") for r in ranks if r.prefetch]
        pf_cpu = sum(pf) if pf and None not in pf else None
        checksums = {r.checksum for r in ranks}
        return cls(
            wall_s=wall_s,
            rank_s=tuple(r.wall_s for r in ranks) if rank_s is None else tuple(rank_s),
            cpu_s=cpu,
            cpu_s_per_gb=cpu / (used / 1e9) if used else None,
            prefetch_cpu_s_per_gb=(
                pf_cpu / (total_bytes / 1e9) if pf_cpu is not None and total_bytes else None
            ),
            bytes_served=served,
            bytes_served_ratio=served / total_bytes if served is not None else None,
            resident_before=min(1.0, max(0.0, resident)),
            checksum=checksums.pop() if len(checksums) == 1 else None,
            ranks=tuple(ranks),
            detail=detail,
        )

    def to_json(self) -> dict[str, Any]:
        """The sample as stored in a results document."""
        return {
            "wall_s": self.wall_s,
            "rank_s": list(self.rank_s),
            "cpu_s": self.cpu_s,
            "cpu_s_per_gb": self.cpu_s_per_gb,
            "prefetch_cpu_s_per_gb": self.prefetch_cpu_s_per_gb,
            "bytes_served": self.bytes_served,
            "bytes_served_ratio": self.bytes_served_ratio,
            "resident_before": self.resident_before,
            "checksum": self.checksum,
            "ranks": [r.to_dict() for r in self.ranks],
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Result:
    """One measurement and its samples.

    Attributes:
        scenario, fs, checkpoint, ranks, config: the identity (see `key`).
        kind: one of KINDS.
        shape: the checkpoint's shape.
        spec: the configuration's canonical string.
        memory_limit_bytes: the memory cgroup's limit, or None.
        total_bytes: the checkpoint's size (for the bytes-served ratio).
        samples: the samples, in the order they were taken.
    """

    scenario: str
    kind: str
    fs: str
    shape: str
    checkpoint: str
    ranks: int
    config: str
    spec: str
    memory_limit_bytes: int | None
    total_bytes: int
    samples: tuple[Sample, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown result kind {self.kind!r}: use {', '.join(KINDS)}")
        if self.ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")

    @property
    def key(self) -> ResultKey:
        """The result's identity."""
        return ResultKey(self.scenario, self.fs, self.checkpoint, self.ranks, self.config)

    def _description(self) -> tuple[Any, ...]:
        return (self.kind, self.shape, self.spec, self.memory_limit_bytes, self.total_bytes)

    def add(self, sample: Sample) -> Result:
        """This result with `sample` appended.

        Raises:
            InconsistentResult: the sample has another number of rank reports, or loaded
                other bytes (checksum) than the samples already recorded.
        """
        if sample.ranks and len(sample.ranks) != self.ranks:
            raise InconsistentResult(
                f"{self.key}: a sample of {len(sample.ranks)} ranks in a result of {self.ranks}"
            )
        known = {s.checksum for s in self.samples} - {None}
        if sample.checksum is not None and known and sample.checksum not in known:
            raise InconsistentResult(
                f"{self.key}: a sample with checksum {sample.checksum}, the others have "
                f"{known.pop()}"
            )
        return replace(self, samples=(*self.samples, sample))

    def merge(self, other: Result) -> Result:
        """This result with the samples of `other`, the same measurement.

        Raises:
            InconsistentResult: `other` has another key or description (kind, shape,
                spec, memory limit, checkpoint size), or a sample that does not belong.
        """
        if other.key != self.key or other._description() != self._description():
            raise InconsistentResult(
                f"{self.key}: recorded as {self._description()}, now {other._description()}"
            )
        merged = self
        for s in other.samples:
            merged = merged.add(s)
        return merged

    def summary(self) -> dict[str, Any]:
        """Median, spread and the other figures of the samples (`summarize`)."""
        return summarize([s.to_json() for s in self.samples], total_bytes=self.total_bytes)

    def to_json(self) -> dict[str, Any]:
        """The result as stored in a results document."""
        samples = [s.to_json() for s in self.samples]
        return {
            "scenario": self.scenario,
            "kind": self.kind,
            "fs": self.fs,
            "shape": self.shape,
            "checkpoint": self.checkpoint,
            "ranks": self.ranks,
            "config": self.config,
            "spec": self.spec,
            "memory_limit_bytes": self.memory_limit_bytes,
            "samples": samples,
            "summary": summarize(samples, total_bytes=self.total_bytes),
        }


class ResultSet:
    """The results of one run, in the order they were first recorded, one per key."""

    def __init__(self) -> None:
        self._by_key: dict[ResultKey, Result] = {}

    def add(self, result: Result) -> Result:
        """Record `result`, merged into the one of the same key if there is one.

        Returns:
            The result now recorded under its key.

        Raises:
            InconsistentResult: see `Result.merge`.
        """
        known = self._by_key.get(result.key)
        merged = result if known is None else known.merge(result)
        self._by_key[result.key] = merged
        return merged

    def __iter__(self) -> Iterator[Result]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def to_json(self) -> list[dict[str, Any]]:
        """The ``results`` list of a results document."""
        return [r.to_json() for r in self]


def summarize(samples: Sequence[Mapping[str, Any]], *, total_bytes: int) -> dict[str, Any]:
    """Median, spread and the per-sample figures of one measurement, reduced to one row.

    ``spread`` is (max - min) / median of the wall times; ``unstable`` is True when it
    exceeds `UNSTABLE_SPREAD`. CPU s/GB is the median over samples of all ranks' CPU
    seconds divided by the gigabytes all ranks consumed (ranks x checkpoint size).

    Args:
        samples: the samples (dicts as stored in the ``samples`` list of a result).
        total_bytes: the checkpoint size in bytes.

    Returns:
        The ``summary`` dict of a result.

    Example:
        >>> s = summarize([{"wall_s": 1.0, "ranks": []}, {"wall_s": 1.2, "ranks": []}],
        ...               total_bytes=1 << 30)
        >>> round(s["median_s"], 2), round(s["spread"], 3), s["unstable"]
        (1.1, 0.182, True)
    """
    if not samples:
        raise ValueError("summarize() needs at least one sample")
    walls = [float(s["wall_s"]) for s in samples]
    median = statistics.median(walls)
    spread = (max(walls) - min(walls)) / median if median > 0 else 0.0

    def med(values: Iterable[float | None]) -> float | None:
        vals = [v for v in values if v is not None and not math.isnan(v)]
        return statistics.median(vals) if vals else None

    served = med(
        s.get("bytes_served") / total_bytes
        if s.get("bytes_served") is not None and total_bytes
        else None
        for s in samples
    )
    rss = [
        max((r.get("peak_rss_bytes") or 0) for r in s["ranks"]) for s in samples if s.get("ranks")
    ]
    anon = [
        max((r.get("peak_anon_bytes") or 0) for r in s["ranks"])
        for s in samples
        if s.get("ranks") and any(r.get("peak_anon_bytes") is not None for r in s["ranks"])
    ]
    return {
        "median_s": median,
        "min_s": min(walls),
        "max_s": max(walls),
        "spread": spread,
        "unstable": len(walls) > 1 and spread > UNSTABLE_SPREAD,
        "bytes_served_ratio": served,
        "cpu_s_per_gb": med(s.get("cpu_s_per_gb") for s in samples),
        "prefetch_cpu_s_per_gb": med(s.get("prefetch_cpu_s_per_gb") for s in samples),
        "node_cpu_s_per_gb": med(
            (s.get("detail") or {}).get("node_cpu_s") / (total_bytes / 1e9)
            if (s.get("detail") or {}).get("node_cpu_s") is not None and total_bytes
            else None
            for s in samples
        ),
        "peak_rss_mib": max(rss) / (1 << 20) if rss else None,
        "peak_anon_mib": max(anon) / (1 << 20) if anon else None,
    }
