"""`ckpt-prefetch`: warm, inspect and evict checkpoint files in the page cache.

Exit status: 0 when everything asked for was done, 1 when some files failed (they are
listed), 2 for usage errors, 130 when interrupted (a partial summary is printed).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.backends import BACKENDS
from engine.checkpoint_files import expand_checkpoint_files
from engine.errors import Failure
from engine.handle import start_prefetch
from engine.options import MAX_CONCURRENCY
from engine.plan import STRATEGIES, resolve_files
from engine.report import PrefetchReport, Progress
from engine.residency import evict, resident_bytes
from engine.units import format_bytes, parse_size

__all__ = ["build_parser", "main"]

log = logging.getLogger("ckpt_prefetch.cli")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _env_default(name: str, default: str) -> str:
    """The value of environment variable `name` (validated later by argparse), or `default`."""
    return os.environ.get(name) or default


def _auto_or_int(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `ckpt-prefetch` (exposed for documentation and tests).

    Returns:
        The parser with the ``warm``, ``status`` and ``evict`` commands.

    Example:
        >>> build_parser().parse_args(["status", "/etc/hostname"]).command
        'status'
    """
    parser = argparse.ArgumentParser(
        prog="ckpt-prefetch",
        description=(
            "Warm checkpoint files into this node's page cache with large parallel reads, "
            "each local rank reading a different part; show or drop what is cached."
        ),
        epilog="Exit status: 0 done, 1 some files failed, 2 usage error, 130 interrupted.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_warm_parser(sub)
    status = sub.add_parser(
        "status",
        help="show how much of each file is in the page cache",
        description="Show how much of each file is in the page cache.",
    )
    _add_paths_args(status)
    ev = sub.add_parser(
        "evict",
        help="drop the files' pages from the page cache (posix_fadvise DONTNEED)",
        description="Drop the files' clean, unmapped pages from the page cache.",
    )
    _add_paths_args(ev)
    return parser


def _add_paths_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="files, or directories (searched recursively for --pattern)",
    )
    p.add_argument(
        "--pattern",
        default=None,
        help="search directories recursively for this glob (e.g. '*.bin') instead of "
        "taking the safetensors checkpoint in them (its index.json, else *.safetensors)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON document on stdout")


def _add_warm_parser(sub: Any) -> None:
    warm = sub.add_parser(
        "warm",
        help="read this rank's share of the files into the page cache",
        description="Read this rank's share of the files into the page cache.",
    )
    _add_paths_args(warm)
    warm.set_defaults(subparser=warm)
    warm.add_argument(
        "--rank",
        type=int,
        default=_env_default("LOCAL_RANK", "0"),
        help="local rank (default: $LOCAL_RANK, else 0)",
    )
    warm.add_argument(
        "--world",
        type=int,
        default=_env_default("LOCAL_WORLD_SIZE", "1"),
        help="number of local ranks (default: $LOCAL_WORLD_SIZE, else 1)",
    )
    _add_option_args(warm)
    warm.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_option_args(warm: argparse.ArgumentParser) -> None:
    """The flags that set `PrefetchOptions` fields."""
    warm.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="balanced",
        help="balanced: byte stripes dealt round-robin; files: whole files round-robin "
        "(default: %(default)s)",
    )
    warm.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default="auto",
        help="how bytes are read into the cache (default: %(default)s = sendfile)",
    )
    warm.add_argument(
        "--concurrency",
        type=_auto_or_int,
        default="auto",
        help=f"reads in flight per rank, 1..{MAX_CONCURRENCY}, or auto: 8 per node split "
        "among the ranks (default: %(default)s)",
    )
    warm.add_argument(
        "--chunk",
        default="auto",
        help="stripe unit and largest read, at least 4KiB, or auto: 16MiB on network/FUSE "
        "filesystems, 64MiB on local ones (default: %(default)s)",
    )
    warm.add_argument(
        "--no-skip-cached",
        dest="skip_cached",
        action="store_false",
        help="read extents even when they are already resident",
    )
    warm.add_argument(
        "--order",
        choices=("sorted", "given"),
        default="sorted",
        help="consumption order of the files (default: %(default)s)",
    )


def expand_paths(paths: Sequence[str], pattern: str | None) -> tuple[list[str], list[Failure]]:
    """Turn the command line's paths into checkpoint files, as the loader would.

    Args:
        paths: files, directories or ``*.safetensors.index.json`` files.
        pattern: when given, directories are searched recursively for this glob instead
            (for checkpoints that are not safetensors).

    Returns:
        ``(files, failures)``; a directory with no matching file is a failure.

    Example:
        >>> expand_paths(["/etc/hostname"], None)
        (['/etc/hostname'], [])
    """
    files: list[str] = []
    failures: list[Failure] = []
    for raw in paths:
        p = Path(raw)
        try:
            if pattern is not None and p.is_dir():
                found = sorted(str(f) for f in p.rglob(pattern) if f.is_file())
                if not found:
                    raise FileNotFoundError(errno.ENOENT, f"no file matching {pattern!r}")
                files.extend(found)
            else:
                files.extend(expand_checkpoint_files(raw))
        except (OSError, ValueError) as exc:
            code = getattr(exc, "errno", None)
            failures.append(Failure(raw, 0, 0, code, getattr(exc, "strerror", None) or str(exc)))
    return files, failures


def _summary(r: PrefetchReport) -> str:
    rate = r.throughput_bps / 1e9
    line = (
        f"rank {r.rank}/{r.world}: warmed {format_bytes(r.warmed_bytes)}, "
        f"already cached {format_bytes(r.cached_bytes)}, failed {format_bytes(r.failed_bytes)} "
        f"of {format_bytes(r.planned_bytes)} planned in {r.files} files; "
        f"{r.elapsed_s:.2f} s, {rate:.2f} GB/s, {r.cpu_s:.2f} CPU-s, "
        f"backend={r.backend}, strategy={r.strategy}"
    )
    if not r.cancelled:
        return line
    return line + f" (interrupted; {format_bytes(r.unfinished_bytes)} still being read)"


def _print_failures(failures: Sequence[Failure]) -> None:
    for f in failures:
        print(f"failed: {f}", file=sys.stderr)


def _cmd_warm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        chunk = "auto" if args.chunk == "auto" else parse_size(args.chunk)
    except ValueError as exc:
        parser.error(str(exc))
    files, failures = expand_paths(args.paths, args.pattern)
    try:
        handle = start_prefetch(
            files,
            args.rank,
            args.world,
            strategy=args.strategy,
            backend=args.backend,
            concurrency=args.concurrency,
            chunk_bytes=chunk,
            skip_cached=args.skip_cached,
            order=args.order,
        )
    except ValueError as exc:
        parser.error(str(exc))
    interrupted = False
    try:
        _wait_with_progress(handle, show=not args.quiet and not args.json and sys.stderr.isatty())
    except KeyboardInterrupt:
        interrupted = True
        handle.cancel()
    report = handle.report or handle.wait(1.0)
    if report is None:  # the loop thread did not stop in time: summarise what we know
        print("interrupted; prefetch still stopping", file=sys.stderr)
        return EXIT_INTERRUPTED
    all_failures = [*failures, *report.failures]
    if args.json:
        doc = report.to_dict()
        doc["failures"] = [f.to_dict() for f in all_failures]
        doc["interrupted"] = interrupted
        print(json.dumps(doc, indent=2))
    else:
        print(_summary(report))
    _print_failures(all_failures)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if all_failures else EXIT_OK


def _wait_with_progress(handle: Any, *, show: bool) -> None:
    if not show:
        while handle.wait(0.2) is None:
            pass
        return
    import rich.progress as rp

    with rp.Progress(
        "[bold]warming", rp.BarColumn(), rp.DownloadColumn(), rp.TransferSpeedColumn(),
        rp.TimeRemainingColumn(), transient=True, refresh_per_second=8,
    ) as bar:  # fmt: skip
        task = bar.add_task("warm", total=None)
        while handle.wait(0.1) is None:
            p: Progress = handle.progress()
            bar.update(task, total=p.total_bytes or None, completed=p.done_bytes)


def _cmd_status(args: argparse.Namespace) -> int:
    files, failures = expand_paths(args.paths, args.pattern)
    resolved, more = resolve_files(files, order="given")
    failures += more
    rows = []
    for f in resolved:
        try:
            rows.append((f.path, f.size, resident_bytes(f.path)))
        except OSError as exc:
            failures.append(Failure.from_os_error(f.path, 0, 0, exc))
    total = sum(r[1] for r in rows)
    cached = sum(r[2] for r in rows)
    if args.json:
        print(json.dumps({
            "files": [{"path": p, "size": s, "resident_bytes": c} for p, s, c in rows],
            "total_bytes": total, "resident_bytes": cached,
            "failures": [str(f) for f in failures],
        }, indent=2))  # fmt: skip
    else:
        for path, size, res in rows:
            pct = 100.0 * res / size if size else 100.0
            print(f"{pct:6.1f}%  {format_bytes(res):>11} / {format_bytes(size):>11}  {path}")
        pct = 100.0 * cached / total if total else 100.0
        print(f"{pct:6.1f}%  {format_bytes(cached):>11} / {format_bytes(total):>11}  total")
    _print_failures(failures)
    return EXIT_FAILED if failures else EXIT_OK


def _cmd_evict(args: argparse.Namespace) -> int:
    files, failures = expand_paths(args.paths, args.pattern)
    resolved, more = resolve_files(files, order="given")
    failures += more
    done = []
    for f in resolved:
        try:
            evict(f.path)
            done.append(f.path)
        except OSError as exc:
            failures.append(Failure.from_os_error(f.path, 0, 0, exc))
    if args.json:
        print(json.dumps({"evicted": done, "failures": [str(f) for f in failures]}, indent=2))
    else:
        print(f"evicted {len(done)} files")
    _print_failures(failures)
    return EXIT_FAILED if failures else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        0 done, 1 some files failed, 2 usage error, 130 interrupted.

    Example:
        >>> main(["status", "/etc/hostname", "--json"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    try:
        if args.command == "warm":
            return _cmd_warm(args, args.subparser)
        if args.command == "status":
            return _cmd_status(args)
        return _cmd_evict(args)
    except SystemExit as exc:  # parser.error inside a command
        return int(exc.code or 0)
    except KeyboardInterrupt:
        print(f"interrupted after {time.monotonic() - started:.1f} s", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
