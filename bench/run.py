"""The bench's programmatic API in one import: build a suite, run it, get the document.

Scripts and tests outside the bench import from here; the implementation lives in the
modules named for what they hold: `bench.suites` (what to measure), `bench.store` (the
checkpoints), `bench.filesystems` (where, and the cache state), `bench.launchers` (the
rank processes), `bench.measure` (one sample), `bench.runner` (the steps of a suite).

Example:
    >>> from bench.run import quick_suite, run_suite
    >>> doc = run_suite(quick_suite(repeats=1))  # doctest: +SKIP
"""

from __future__ import annotations

from bench.blockdev import block_device
from bench.checkpoint import scan_checkpoint
from bench.errors import BenchError, BenchInterrupted, ChecksumMismatch
from bench.runner import ProgressEvent, run_suite
from bench.store import default_workdir, ensure_checkpoint
from bench.suites import Matrix, Suite, full_suite, quick_suite

__all__ = [
    # suites
    "Matrix",
    "Suite",
    "full_suite",
    "quick_suite",
    # running them
    "ProgressEvent",
    "run_suite",
    # errors
    "BenchError",
    "BenchInterrupted",
    "ChecksumMismatch",
    # checkpoints and disks
    "block_device",
    "default_workdir",
    "ensure_checkpoint",
    "scan_checkpoint",
]
