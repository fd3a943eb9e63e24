"""What a prefetch reports: live `Progress` snapshots, the final `PrefetchReport`, and the
`Tally` the scheduler keeps them in (with the `Outcome` of each extent it warmed).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.errors import Failure
from engine.plan import Extent

__all__ = ["Outcome", "OutcomeKind", "PrefetchReport", "Progress", "Tally"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of a running prefetch (immutable; cheap to take).

    Attributes:
        done_bytes: planned bytes dealt with so far (warmed, already cached, skipped or failed).
        total_bytes: bytes this rank planned to warm.
        warmed_bytes: bytes read into the page cache.
        cached_bytes: bytes found already resident and not read.
        skipped_bytes: bytes whose turn had passed (the consumer was already beyond them).
        failed_bytes: bytes that could not be read.
        in_flight: extents being read now.
        dropped_bytes: bytes behind the consumer dropped from the page cache (window only).
        window_bytes: the window in effect (None: no window, or not resolved yet).
        elapsed_s: seconds since the prefetch started.
        rate_bps: warmed bytes per second so far.
    """

    done_bytes: int = 0
    total_bytes: int = 0
    warmed_bytes: int = 0
    cached_bytes: int = 0
    skipped_bytes: int = 0
    failed_bytes: int = 0
    in_flight: int = 0
    elapsed_s: float = 0.0
    rate_bps: float = 0.0
    dropped_bytes: int = 0
    window_bytes: int | None = None

    @property
    def fraction(self) -> float:
        """Share of the planned bytes dealt with, 0..1 (1 when nothing was planned)."""
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0


@dataclass(frozen=True, slots=True)
class PrefetchReport:
    """What one rank's prefetch did.

    Attributes:
        rank: the local rank.
        world: the number of local ranks.
        strategy: the partition strategy used.
        backend: the read backend really used (a fallback says so).
        concurrency: extents in flight at most (resolved when ``"auto"``).
        chunk_bytes: the stripe unit (resolved when ``"auto"``).
        files: regular files in the plan (after de-duplication).
        planned_bytes: bytes of this rank's share.
        warmed_bytes: bytes read into the page cache by this rank.
        cached_bytes: bytes skipped because they were already resident.
        skipped_bytes: bytes skipped because the consumer had passed them (or had
            finished, when the prefetch was cancelled then).
        failed_bytes: bytes of planned extents that could not be read.
        unfinished_bytes: bytes whose reads were still running when the prefetch was
            cancelled (they finish on their own and may be cached; 0 unless cancelled).
            With the four counts above they add up to `planned_bytes`, except for extents
            that a prefetch cancelled before its loader finished never reached.
        failures: one entry per failed file range (path, range, errno, message).
        notes: things worth knowing that are not failures (a file that grew, ...).
        elapsed_s: wall seconds from start to end.
        cpu_s: CPU seconds spent by the prefetch's threads.
        cancelled: whether the prefetch was cancelled before it finished.
        dropped_bytes: bytes (all ranks' stripes, on the checkpoint's axis) that this rank
            asked the kernel to drop because the consumer was a trail past them (with a
            window only; pages some process still maps stay cached).
        read_bytes: the read size at the end when adapted at run time (0: each extent
            read whole).
        tuning: how the stripe size and the reads in flight were chosen: "given", the
            filesystem's default, or where run-time adaptation converged and why.
        reader_cpu_s: the part of `cpu_s` spent in the reader process (another process:
            not in this process's own CPU time).
        adaptation: each change run-time adaptation made, in order: (seconds since it
            started, reads in flight, read size, why); empty when nothing changed or the
            concurrency was given.
    """

    rank: int
    world: int
    strategy: str
    backend: str
    concurrency: int
    chunk_bytes: int
    files: int
    planned_bytes: int
    warmed_bytes: int
    cached_bytes: int
    skipped_bytes: int
    failed_bytes: int
    failures: tuple[Failure, ...]
    notes: tuple[str, ...]
    elapsed_s: float
    cpu_s: float
    cancelled: bool = False
    dropped_bytes: int = 0
    read_bytes: int = 0
    tuning: str = ""
    reader_cpu_s: float = 0.0
    adaptation: tuple[tuple[float, int, int, str], ...] = ()
    unfinished_bytes: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing failed and the prefetch ran to its end."""
        return not self.failures and not self.cancelled

    @property
    def throughput_bps(self) -> float:
        """Warmed bytes per wall second."""
        return self.warmed_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (failures as dicts, with the errno's name)."""
        d = asdict(self)
        d["failures"] = [f.to_dict() for f in self.failures]
        d["notes"] = list(self.notes)
        d["throughput_bps"] = self.throughput_bps
        return d


class OutcomeKind(enum.Enum):
    """What became of one extent."""

    WARMED = "warmed"  # read into the page cache (maybe fewer bytes: the file ended early)
    CACHED = "cached"  # already resident: not read
    FAILED = "failed"  # could not be read
    FILE_FAILED = "file failed"  # its file failed to open before: counted, not recorded again


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of warming one extent, as a worker returns it.

    Attributes:
        kind: what happened.
        nbytes: bytes warmed or found cached.
        failure: what went wrong, if anything (a warmed extent may still miss its end).
    """

    kind: OutcomeKind
    nbytes: int = 0
    failure: Failure | None = None


@dataclass(slots=True)
class Tally:
    """The counters of one running prefetch.

    Written on the event loop's thread only; `snapshot` may be called from any thread (it
    reads plain integers, so a snapshot taken mid-update is at worst one extent behind).
    """

    started: float = 0.0
    files: int = 0
    total: int = 0
    warmed: int = 0
    cached: int = 0
    skipped: int = 0
    failed: int = 0
    dropped: int = 0
    in_flight: int = 0
    #: bytes of extents submitted whose outcome is not counted yet
    reading: int = 0
    window: int | None = None
    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def start(self) -> None:
        """Start the clock."""
        self.started = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        """Seconds since `start` (0 before)."""
        return time.monotonic() - self.started if self.started else 0.0

    def add(self, ext: Extent, outcome: Outcome) -> None:
        """Count the outcome of `ext`; record its failure, if it is a new one."""
        kind, failure = outcome.kind, outcome.failure
        if kind is OutcomeKind.WARMED:
            self.warmed += outcome.nbytes
            if failure is not None:  # the file ended inside the extent
                self.failed += failure.length
        elif kind is OutcomeKind.CACHED:
            self.cached += outcome.nbytes
        else:
            self.failed += ext.length
        if failure is not None and kind is not OutcomeKind.FILE_FAILED:
            self.record(failure)

    def record(self, failure: Failure) -> None:
        """Record a failure; ranges of one file and errno that touch merge into one entry.

        Extents finish out of order, so any earlier entry may be the neighbour. Ranges
        that do not touch (other ranks' stripes lie between) stay separate and exact.
        """
        for i, prev in enumerate(self.failures):
            if prev.path != failure.path or prev.errno != failure.errno:
                continue
            if not (prev.length and failure.length):
                return  # the whole file failed already (or now): one entry is enough
            lo, hi = prev.offset, prev.offset + prev.length
            if failure.offset <= hi and lo <= failure.offset + failure.length:
                lo = min(lo, failure.offset)
                hi = max(hi, failure.offset + failure.length)
                self.failures[i] = Failure(prev.path, lo, hi - lo, prev.errno, prev.message)
                return
        if not any(f.path == failure.path for f in self.failures):
            log.warning("prefetch could not warm %s", failure)
        self.failures.append(failure)

    def byte_counts(self) -> dict[str, int]:
        """The byte counters, by the names `Progress` and `PrefetchReport` give them."""
        return {
            "warmed_bytes": self.warmed, "cached_bytes": self.cached,
            "skipped_bytes": self.skipped, "failed_bytes": self.failed,
            "dropped_bytes": self.dropped,
        }  # fmt: skip

    def snapshot(self) -> Progress:
        """The counters as a frozen `Progress`."""
        elapsed = self.elapsed_s
        return Progress(
            done_bytes=self.warmed + self.cached + self.skipped + self.failed,
            total_bytes=self.total,
            in_flight=self.in_flight,
            elapsed_s=elapsed,
            rate_bps=self.warmed / elapsed if elapsed > 0 else 0.0,
            window_bytes=self.window,
            **self.byte_counts(),
        )
