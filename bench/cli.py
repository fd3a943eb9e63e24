"""``ckpt-prefetch-bench``: measure checkpoint loading with and without prefetch.

Commands::

    ckpt-prefetch-bench run [--quick | --full] [options]   run a suite (default: --quick)
    ckpt-prefetch-bench make DIR --size 4GiB --shards 8     write a synthetic checkpoint
    ckpt-prefetch-bench show RESULTS.json [--plot PNG]      print a stored run again
    ckpt-prefetch-bench compare A.json B.json               ratios of B to A

The CLI owns the terminal: the progress bar goes to stderr (plain lines when stderr is
not a terminal, as in CI), the table to stdout, library modules only log.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bench.cli_args import DEFAULT_SKEW, UsageError, build_parser, build_suite

if TYPE_CHECKING:
    from bench.suites import Suite

__all__ = ["main"]

log = logging.getLogger("bench.cli")


class _Progress:
    """A rich progress bar on a terminal, plain lines otherwise (CI logs)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.bar: Any = None
        self.task: Any = None
        self.t0 = time.monotonic()

    def __enter__(self) -> _Progress:
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, ev: Any) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task, total=ev.total, completed=ev.done, description=ev.description
            )
            if ev.finished:
                self.bar.console.print(f"  {ev.finished}", highlight=False)
        elif ev.finished:
            elapsed = time.monotonic() - self.t0
            self.stream.write(f"[{ev.done}/{ev.total} {elapsed:5.0f}s] {ev.finished}\n")
            self.stream.flush()


def _stdout_console() -> Any:
    """A console on stdout; wide when stdout is not a terminal (CI logs, files)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from rich.console import Console

    from bench import report, results
    from bench.errors import BenchError, BenchInterrupted, ChecksumMismatch
    from bench.runner import run_suite
    from bench.suites import validate_suite

    try:
        suite = build_suite(args, argv)
        validate_suite(suite)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.dry_run:
        return _dry_run(suite)
    json_path = args.json or args.out / f"{suite.name}.json"
    plot_path = args.plot or json_path.with_suffix(".png")
    err = Console(stderr=True)
    code = 0
    try:
        with _Progress(sys.stderr) as progress:
            doc = run_suite(suite, progress=progress)
    except ChecksumMismatch as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        doc, code = exc.document, 3
    except BenchInterrupted as exc:
        err.print(f"{exc}", highlight=False)
        doc, code = exc.document, 130
    except BenchError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        doc, code = exc.document, 1
    if doc is None:
        return code or 1
    if code:
        partial = json_path.with_name(json_path.stem + "-partial.json")
        partial.parent.mkdir(parents=True, exist_ok=True)
        import json

        partial.write_text(json.dumps(doc, indent=1))
        err.print(f"partial results in {partial}")
        return code
    # Files first: a closed stdout (``| head``) must not lose a run of minutes.
    results.save(doc, json_path)
    plotted = False
    if not args.no_plot:
        try:
            report.plot(doc, plot_path)
            plotted = True
        except Exception as exc:  # a plot failure must not lose the results
            err.print(f"[yellow]warning:[/] plot failed: {exc}", highlight=False)
    report.print_report(doc, _stdout_console())
    err.print(f"results: {json_path}", highlight=False)
    if plotted:
        err.print(f"plot:    {plot_path}", highlight=False)
    return 0


def _dry_run(suite: Suite) -> int:
    from bench import netfs
    from bench.runner import plan

    fuse_ok, why = netfs.fuse_available()
    print(
        f"suite {suite.name}: repeats {suite.repeats}, warm-up {suite.warmup}, "
        f"workdir {suite.workdir}, launcher {suite.launcher}"
    )
    for m in suite.matrices:
        limit = f", memory limit {m.memory_limit_bytes >> 20} MiB" if m.memory_limit_bytes else ""
        print(
            f"  {m.scenario}: fs {','.join(m.fs)} x ranks {','.join(map(str, m.ranks))} x "
            f"shapes {','.join(m.shapes)} x configs {','.join(m.configs)}, "
            f"{m.size_bytes >> 20} MiB{limit}"
        )
    print(
        f"{len(plan(suite, fuse_ok=fuse_ok))} steps (loads, floors, warm-ups, checkpoints)"
        + ("" if fuse_ok else f"; FUSE unavailable ({why}): netfs runs on local disk")
    )
    return 0


def _cmd_make(args: argparse.Namespace) -> int:
    from bench.checkpoint import make_checkpoint

    shape = args.shape or ("skewed" if args.skew is not None else "uniform")
    if args.skew is not None and shape != "skewed":
        raise UsageError(f"--skew applies to --shape skewed, not {shape}")
    t0 = time.monotonic()
    shards = args.shards
    if shards is None and shape != "many-small":
        shards = 8
    info = make_checkpoint(
        args.dir,
        size_bytes=args.size,
        shards=shards,
        shape=shape,
        dtypes=tuple(args.dtypes),
        seed=args.seed,
        skew=args.skew if args.skew is not None else DEFAULT_SKEW,
    )
    dt = time.monotonic() - t0
    print(
        f"{info.directory}: {len(info.files)} files, {info.total_bytes / (1 << 20):.1f} MiB, "
        f"{info.tensor_count} tensors ({info.shape}), written in {dt:.1f} s"
    )
    for f in info.files:
        print(f"  {f.name}  {os.path.getsize(f) / (1 << 20):.1f} MiB")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:

    from bench import report, results

    doc = results.load(args.json)
    report.print_report(doc, _stdout_console())
    if args.plot:
        report.plot(doc, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:

    from bench import report, results

    a, b = results.load(args.a), results.load(args.b)
    _stdout_console().print(report.compare_table(a, b, names=(args.a.stem, args.b.stem)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ckpt-prefetch-bench``.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 ok, 1 error, 2 usage, 3 checksum mismatch, 130 Ctrl-C, 143
        SIGTERM (both tear down what the run started and keep its results so far).

    Example:
        >>> main(["compare", "a.json", "b.json"])  # doctest: +SKIP
        0
    """
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    terminated: list[int] = []

    def on_sigterm(signum: int, frame: object) -> None:
        terminated.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the teardown
        raise KeyboardInterrupt  # unwinds like Ctrl-C: mounts, namespaces, servers go

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 128 + signal.SIGTERM if terminated else code


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or (
        argv[0].startswith("-") and argv[0] not in ("-h", "--help", "-v", "-vv", "--verbose")
    ):
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args([*argv, "run"])
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(2, args.verbose)],
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    commands: dict[str, Callable[[], int]] = {
        "run": lambda: _cmd_run(args, argv),
        "make": lambda: _cmd_make(args),
        "show": lambda: _cmd_show(args),
        "compare": lambda: _cmd_compare(args),
    }
    try:
        return commands[args.command]()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from bench.results import ResultsError

        if isinstance(exc, ResultsError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
