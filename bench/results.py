"""Versioned JSON results: host metadata, summaries, schema validation, comparison.

A results document keeps every sample of every measurement, so that the table and the
plot can be redrawn (and two runs compared) without running anything again. Its layout
is described by ``bench/schema.json`` (JSON Schema 2020-12); `SCHEMA_VERSION` changes
whenever a field changes meaning or a required field is added.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Defined with the result types; readers of stored documents find them here too.
from bench.models import UNSTABLE_SPREAD, ResultKey, summarize

__all__ = [
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "UNSTABLE_SPREAD",
    "CompareRow",
    "ResultsError",
    "compare",
    "host_metadata",
    "load",
    "new_document",
    "save",
    "summarize",
    "validate",
]

log = logging.getLogger(__name__)

#: Version of the results layout; bumped when a field changes meaning.
SCHEMA_VERSION = 1
#: The JSON Schema of a results document.
SCHEMA_PATH = Path(__file__).with_name("schema.json")

_PACKAGES = (
    "ckpt-prefetch",
    "torch",
    "safetensors",
    "numpy",
    "psutil",
    "rich",
    "matplotlib",
    "jsonschema",
    "mfusepy",
    "aiofiles",
    "uvloop",
)


class ResultsError(Exception):
    """A results file that cannot be read, is of another version, or is invalid."""


# --------------------------------------------------------------------------------------
# Host metadata


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _mem_total() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # psutil missing or unusable: fall back to sysconf
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _git(args: Sequence[str], cwd: Path) -> str | None:
    """Run a read-only git command; None when git or the repository is missing."""
    if shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _fio_version() -> str | None:
    if shutil.which("fio") is None:
        return None
    try:
        out = subprocess.run(["fio", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def host_metadata(*, fuse: tuple[bool, str] | None = None) -> dict[str, Any]:
    """Describe this host: kernel, CPUs, memory, Python and package versions, git commit.

    Args:
        fuse: the result of ``netfs.fuse_available()``, recorded when given.

    Returns:
        A JSON-serialisable dict (the ``host`` member of a results document).

    Example:
        >>> host_metadata()["cpu_count"] >= 1
        True
    """
    repo = Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], repo)
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo) if commit else None
    meta: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count() or 1,
        "cpu_model": _cpu_model(),
        "mem_total_bytes": _mem_total(),
        "python": platform.python_version(),
        "packages": {name: _package_version(name) for name in _PACKAGES},
        "fio": _fio_version(),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
    }
    if fuse is not None:
        meta["fuse"] = {"available": bool(fuse[0]), "reason": str(fuse[1])}
    return meta


def new_document(
    *, settings: Mapping[str, Any], host: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """An empty results document with the current schema version and the host metadata.

    Args:
        settings: how the suite was run (must hold suite, repeats, warmup, launcher).
        host: host metadata; `host_metadata()` when None.

    Returns:
        A dict with empty ``checkpoints``, ``filesystems``, ``results`` and ``warnings``.

    Example:
        >>> doc = new_document(settings={"suite": "quick", "repeats": 3, "warmup": 1,
        ...                              "launcher": "forkserver"})
        >>> doc["schema_version"]
        1
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {
            "name": "ckpt-prefetch-bench",
            "version": _package_version("ckpt-prefetch") or "0+unknown",
        },
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": dict(host) if host is not None else host_metadata(),
        "settings": dict(settings),
        "checkpoints": {},
        "filesystems": {},
        "results": [],
        "warnings": [],
    }


# --------------------------------------------------------------------------------------
# Files


def _schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


def validate(doc: Mapping[str, Any]) -> None:
    """Check a results document against ``bench/schema.json``.

    Args:
        doc: the document.

    Raises:
        ResultsError: naming the first invalid field, or when the version differs.

    Example:
        >>> validate({"schema_version": 1})  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ResultsError: invalid results document: ...
    """
    version = doc.get("schema_version") if isinstance(doc, Mapping) else None
    if version != SCHEMA_VERSION:
        raise ResultsError(
            f"results schema_version {version!r} is not supported (this bench reads "
            f"version {SCHEMA_VERSION})"
        )
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ResultsError(
            f"invalid results document: {where}: {err.message}"
            + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else "")
        )


def save(doc: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate `doc` and write it as indented JSON (atomically).

    Args:
        doc: the results document.
        path: where to write; parent directories are created.

    Returns:
        The path written.

    Example:
        >>> save(doc, "bench-results/quick.json")  # doctest: +SKIP
    """
    validate(doc)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a results document.

    Args:
        path: a JSON file written by `save`.

    Returns:
        The document.

    Raises:
        ResultsError: when the file cannot be read, is not JSON, or is invalid.

    Example:
        >>> doc = load("bench-results/quick.json")  # doctest: +SKIP
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as exc:
        raise ResultsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not JSON: {exc}") from exc
    validate(doc)
    return doc


# --------------------------------------------------------------------------------------
# Comparison


@dataclass(frozen=True)
class CompareRow:
    """One measurement present in both runs.

    Attributes:
        key: (scenario, fs, checkpoint, ranks, config).
        kind: the result kind (load, floor-raw, floor-fio, hot).
        a_s: median seconds in the first run.
        b_s: median seconds in the second run.
        ratio: b_s / a_s (below 1: the second run is faster).
        significant: True when the change exceeds both runs' spreads.
        a_served: bytes-served ratio in the first run (None when unknown).
        b_served: bytes-served ratio in the second run.
    """

    key: ResultKey
    kind: str
    a_s: float
    b_s: float
    ratio: float
    significant: bool
    a_served: float | None
    b_served: float | None


def compare(
    a: Mapping[str, Any], b: Mapping[str, Any]
) -> tuple[list[CompareRow], list[ResultKey], list[ResultKey]]:
    """Ratios of run `b` to run `a` for every measurement present in both.

    Args:
        a: the reference results document.
        b: the results document to compare with it.

    Returns:
        (rows, only_in_a, only_in_b): the matched rows in `a`'s order, and the keys
        found in only one of the runs.

    Example:
        >>> rows, _, _ = compare(load("old.json"), load("new.json"))  # doctest: +SKIP
    """
    index_b = {ResultKey.of(r): r for r in b["results"]}
    keys_a = [ResultKey.of(r) for r in a["results"]]
    rows: list[CompareRow] = []
    for ra in a["results"]:
        rb = index_b.get(ResultKey.of(ra))
        if rb is None:
            continue
        sa, sb = ra["summary"], rb["summary"]
        ratio = sb["median_s"] / sa["median_s"] if sa["median_s"] > 0 else math.inf
        noise = max(sa["spread"], sb["spread"])
        rows.append(
            CompareRow(
                key=ResultKey.of(ra),
                kind=ra["kind"],
                a_s=sa["median_s"],
                b_s=sb["median_s"],
                ratio=ratio,
                significant=abs(ratio - 1.0) > noise,
                a_served=sa.get("bytes_served_ratio"),
                b_served=sb.get("bytes_served_ratio"),
            )
        )
    set_a = set(keys_a)
    only_a = [k for k in keys_a if k not in index_b]
    only_b = [ResultKey.of(r) for r in b["results"] if ResultKey.of(r) not in set_a]
    return rows, only_a, only_b
