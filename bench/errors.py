"""Why a suite stops: the bench's own exceptions."""

from __future__ import annotations

from typing import Any

__all__ = ["BenchError", "BenchInterrupted", "ChecksumMismatch"]


class BenchError(Exception):
    """The bench cannot go on (a rank failed, the cache is not cold, ...).

    Attributes:
        document: the results gathered so far, when there are any.
    """

    document: dict[str, Any] | None = None


class ChecksumMismatch(BenchError):
    """Two configurations or ranks loaded different bytes: a correctness bug."""


class BenchInterrupted(BenchError):
    """The run was interrupted (Ctrl-C, SIGINT); ``document`` holds what was measured."""
