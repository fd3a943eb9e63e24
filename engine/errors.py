"""Errors and failure records: the one place that maps OS errors into the project's terms."""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass

__all__ = ["Failure", "InvalidOptionError", "PrefetchError", "ResidencyUnknownError"]


class PrefetchError(Exception):
    """Base class of the exceptions this package raises on purpose."""


class InvalidOptionError(PrefetchError, ValueError):
    """An option or argument is invalid (a programmer error, raised before any I/O).

    A `ValueError`, so ``except ValueError`` works; the message names the valid values.
    """


class ResidencyUnknownError(PrefetchError, OSError):
    """The kernel will not say which pages of this file are cached (``EPERM``).

    Linux answers `cachestat` and `mincore` truthfully only for a file the caller owns
    or may write; for others `cachestat` fails with EPERM and `mincore` claims every page
    is cached. A shared read-only checkpoint owned by another user is such a file.
    An `OSError` with errno EPERM, so ``except OSError`` works.
    """


@dataclass(frozen=True, slots=True)
class Failure:
    """One byte range of one file that could not be warmed.

    Prefetch is an optimisation: failures are recorded here, never raised.

    Attributes:
        path: the file as given (or resolved, once resolution succeeded).
        offset: first byte of the range that failed (0 for a whole-file failure).
        length: bytes in the range (0 when the file could not be opened or stat'ed).
        errno: the OS error number, or None when the failure is not an OS error
            (for example a file that shrank after planning).
        message: a short human-readable description.
    """

    path: str
    offset: int
    length: int
    errno: int | None
    message: str

    @classmethod
    def from_os_error(cls, path: str, offset: int, length: int, exc: OSError) -> Failure:
        """Build a failure from an OSError, keeping its errno and its strerror."""
        code = exc.errno
        text = exc.strerror or (os.strerror(code) if code else str(exc))
        return cls(path, offset, length, code, text)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict of the fields, with the errno's symbolic name."""
        return {
            "path": self.path, "offset": self.offset, "length": self.length,
            "errno": self.errno, "errno_name": self.errno_name, "message": self.message,
        }  # fmt: skip

    @property
    def errno_name(self) -> str:
        """The symbolic errno (``"EIO"``), or ``""``."""
        return _errno.errorcode.get(self.errno, "") if self.errno else ""

    def __str__(self) -> str:
        where = f"[{self.offset}, {self.offset + self.length})" if self.length else ""
        code = f" {self.errno_name}" if self.errno_name else ""
        return f"{self.path}{where}:{code} {self.message}"
