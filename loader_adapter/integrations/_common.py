"""What the engine plug-ins share: their options, their report line, their log routing.

The options are the keyword options of `loader_adapter.safetensors_weights_iterator` that
make sense in a configuration file or an environment variable (JSON values; sizes may be
written ``"16MiB"``), checked by `loader_adapter.options` before any file is opened; here
they are gathered from the places a plug-in reads and merged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine import PrefetchReport
from engine.units import format_bytes
from loader_adapter.discovery import LocalRank, discover_local_rank, local_rank_in_group
from loader_adapter.iterator import WeightsIterator
from loader_adapter.load import safetensors_weights_iterator
from loader_adapter.options import (
    CLUSTER_ONLY,
    OPTION_VALUES,
    OptionError,
    Scope,
    check_together,
    parse_options,
    parse_values,
)
from loader_adapter.progress_log import ProgressLog, interval_from_env

__all__ = [
    "OPTIONS_ENV",
    "OPTION_VALUES",
    "CLUSTER_ONLY",
    "MergedOptions",
    "OptionError",
    "describe_cluster_report",
    "describe_report",
    "engine_local_rank",
    "env_config",
    "load_with_prefetch",
    "merge_options",
    "options_from_env",
    "parse_options",
    "share_log_handlers",
]

log = logging.getLogger(__name__)

#: Environment variable holding the options as a JSON object (SGLang, and vLLM's
#: ``$CKPT_PREFETCH_VLLM_AUTO`` mode, have no other place for them).
OPTIONS_ENV = "CKPT_PREFETCH_OPTIONS"


@dataclass(frozen=True)
class MergedOptions:
    """Plug-in options gathered from several places, and where each one came from.

    Attributes:
        values: keyword options, as `parse_options` returns them.
        origins: option -> where its value came from (``$CKPT_PREFETCH_OPTIONS``,
            ``--model-loader-extra-config``, a flag of the engine...).
    """

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def with_default(self, key: str, value: Any, origin: str) -> MergedOptions:
        """A copy with `key` set to `value` unless it is already set.

        Example:
            >>> MergedOptions().with_default("prefetch", "auto", "x").values
            {'prefetch': 'auto'}
        """
        if key in self.values:
            return self
        return MergedOptions({key: value, **self.values}, {key: origin, **self.origins})

    def describe(self) -> str:
        """``key=value (origin), ...``, for the start line; empty without options.

        Example:
            >>> MergedOptions({"concurrency": 2}, {"concurrency": "$X"}).describe()
            'concurrency=2 ($X)'
        """
        return ", ".join(
            f"{k}={format_bytes(v) if k.endswith('_bytes') and isinstance(v, int) else v!r}"
            f" ({self.origins.get(k, '?')})"
            for k, v in self.values.items()
        ).replace("'", "")


def merge_options(
    *sources: tuple[str, Mapping[str, object]], also_valid: Iterable[str] = ()
) -> MergedOptions:
    """Check options from several places and merge them; a later source wins per key.

    Each source's keys and values are checked with messages that name that source; the
    rules that tie options together (``replica_dir`` needs ``"scope": "cluster"``) are
    checked on the merged result, so an option may be set in one place and its scope in
    another.

    Args:
        sources: ``(where, config)`` pairs, lowest priority first.
        also_valid: keys the caller handles itself (not in the result).

    Returns:
        The merged options with the origin of each.

    Raises:
        OptionError: an unknown key, an invalid value, or options that do not go together.

    Example:
        >>> m = merge_options(("$ENV", {"concurrency": 2, "window_bytes": "1GiB"}),
        ...                   ("--extra", {"window_bytes": "2GiB"}))
        >>> m.values, m.origins["window_bytes"]
        ({'concurrency': 2, 'window_bytes': 2147483648}, '--extra')
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    extra = tuple(also_valid)
    for where, config in sources:
        parsed = parse_values(config, where, extra)
        values.update(parsed)
        origins.update(dict.fromkeys(parsed, where))
    where = " + ".join(w for w, c in sources if c) or "options"
    check_together(values, where)
    return MergedOptions(values, origins)


def env_config(environ: Mapping[str, str] | None = None) -> Mapping[str, object]:
    """The raw JSON object in ``$CKPT_PREFETCH_OPTIONS`` (``{}`` when unset or empty).

    Args:
        environ: the environment to read; None for ``os.environ``.

    Returns:
        The decoded object (checked by `merge_options` or `parse_options`).

    Raises:
        OptionError: the variable is not valid JSON.

    Example:
        >>> env_config({"CKPT_PREFETCH_OPTIONS": '{"concurrency": 2}'})
        {'concurrency': 2}
    """
    raw = (os.environ if environ is None else environ).get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise OptionError(
            f"ckpt-prefetch: ${OPTIONS_ENV} is not valid JSON ({exc}); expected an object such "
            'as \'{"window_bytes": "8GiB", "concurrency": 2}\''
        ) from None


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The options in ``$CKPT_PREFETCH_OPTIONS`` (a JSON object), checked.

    Args:
        environ: the environment to read; None for ``os.environ``.

    Returns:
        Keyword options as `parse_options` returns them; ``{}`` when the variable is unset
        or empty.

    Raises:
        OptionError: the variable is not a JSON object of valid options.

    Example:
        >>> options_from_env({"CKPT_PREFETCH_OPTIONS": '{"concurrency": 2}'})
        {'concurrency': 2}
    """
    return parse_options(env_config(environ), where=f"${OPTIONS_ENV}")


def engine_local_rank(world_group: Callable[[], Any], source: str) -> LocalRank:
    """This process's node-local rank and world, from a serving engine's world group.

    vLLM and SGLang keep a ``GroupCoordinator`` for all their ranks, with a gloo
    ``cpu_group``: its members gather their host identities over it
    (`loader_adapter.local_rank_in_group`), a collective on the first call. Without
    torch.distributed, or when the engine has no world group in this process,
    `loader_adapter.discover_local_rank` answers.

    Args:
        world_group: returns the engine's world group (may raise when it has none).
        source: the name the result gives its origin.

    Returns:
        The LocalRank.

    Example:
        >>> engine_local_rank(lambda: None, "x")  # no torch.distributed here
        LocalRank(rank=0, world=1, source='default')
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            world = world_group()
        except Exception as exc:  # the engine's groups are not built in this process
            log.debug("no %s (%r); discovering the local rank", source, exc)
            world = None
        if world is not None:
            if world.world_size == 1:
                return LocalRank(0, 1, source)
            return local_rank_in_group(world.cpu_group, source=source)
    return discover_local_rank()


def describe_report(report: PrefetchReport | None, local: LocalRank, prefetch: object) -> str:
    """One log line that says what the prefetch of one load did.

    Args:
        report: the prefetch's report, or None when no prefetch ran.
        local: the local rank the prefetch used.
        prefetch: the ``prefetch`` mode asked for (True, False or ``"auto"``).

    Returns:
        The line; byte counts are exact (``planned=... warmed=...``) so that tools can read
        them back.

    Example:
        >>> describe_report(None, LocalRank(0, 1, "default"), False)
        'ckpt-prefetch: no prefetch (prefetch=False), local rank 0 of 1 (default)'
    """
    where = f"local rank {local.rank} of {local.world} ({local.source})"
    if report is None:
        return f"ckpt-prefetch: no prefetch (prefetch={prefetch!r}), {where}"
    line = (
        f"ckpt-prefetch: {where}: planned={report.planned_bytes} warmed={report.warmed_bytes} "
        f"cached={report.cached_bytes} skipped={report.skipped_bytes} "
        f"failed={report.failed_bytes} unfinished={report.unfinished_bytes} bytes "
        f"({format_bytes(report.warmed_bytes)} read from "
        f"storage in {report.elapsed_s:.2f} s, {report.throughput_bps / 1e9:.2f} GB/s mean, "
        f"{report.files} file(s)); strategy={report.strategy} "
        f"backend={report.backend} concurrency={report.concurrency} "
        f"chunk={format_bytes(report.chunk_bytes)}" + (" cancelled" if report.cancelled else "")
    )
    reasons = [*report.notes, *(str(f) for f in report.failures)]
    if "fallback" in report.backend:
        reasons.insert(0, f"backend {report.backend}")
    if reasons:
        line += "; fallbacks: " + "; ".join(reasons)
    return line


def load_with_prefetch(
    files: list[str],
    options: MergedOptions | Mapping[str, Any],
    local_rank: Callable[[], LocalRank],
    *,
    engine: str,
    skip: Callable[[str], bool] | None = None,
) -> Generator[tuple[str, Any], None, None]:
    """A serving engine's safetensors weights, read by `safetensors_weights_iterator`.

    Starts the prefetch at once (so that every rank makes the rank-discovery collective
    as it starts loading) and logs one line saying so, with each option and where it came
    from; while the load runs, local rank 0 logs a progress line every 10 s
    (`loader_adapter.progress_log`); when the iteration ends, one line with the report
    (`describe_report`, or `describe_cluster_report` in the cluster scope). The iterator is
    closed (its prefetch cancelled and joined) when the caller has taken every tensor,
    stops early or lets the generator go.

    Args:
        files: the safetensors files the engine chose.
        options: `merge_options` output (or plain `parse_options` keywords); ``prefetch``
            defaults to True. With ``scope`` ``"cluster"`` every rank of the default
            process group must be loading the same files (as the ranks of one tensor- or
            pipeline-parallel model do).
        local_rank: returns this process's local rank (called only when prefetching in
            the node scope; the cluster scope finds its own from the default group).
        engine: the engine's name, for the log.
        skip: names of tensors not to yield (e.g. other ranks' experts). They are not
            read either: in the node scope the node warms only what its ranks load (every
            local rank must then pass one); in the cluster scope each node brings in only
            what its ranks load.

    Returns:
        A generator of ``(name, tensor)``, the tensors of ``safe_open(...).get_tensor``.

    Raises:
        ValueError: an option the engine refuses (before any file is read).
        OSError: a file is missing or unreadable.
    """
    merged = options if isinstance(options, MergedOptions) else MergedOptions(dict(options))
    interval_s = interval_from_env()  # checked before anything starts
    engine_options = dict(merged.values)
    given = f", options {merged.describe()}" if merged.values else ", default options"
    prefetch = engine_options.pop("prefetch", True)
    scope = engine_options.pop("scope", "node")
    wanted = None if skip is None else (lambda name: not skip(name))
    if scope == Scope.CLUSTER and prefetch is not False:
        it = safetensors_weights_iterator(
            files, prefetch=prefetch, scope="cluster", tensors=wanted, **engine_options
        )
        log.info(
            "ckpt-prefetch: %s loads %d safetensors file(s) through loader_adapter in the "
            "cluster scope: prefetch=%s%s",
            engine, len(files), prefetch, given,
        )  # fmt: skip
        return _yield_then_report(it, skip, lambda: describe_cluster_report(it.report), None)
    for key in CLUSTER_ONLY:
        engine_options.pop(key, None)
    local = local_rank() if prefetch is not False else LocalRank(0, 1, "unused")
    # Another rank's tensors are neither read nor warmed here: the local ranks gather
    # what each loads and the node warms only the union (`engine.needs`).
    it = safetensors_weights_iterator(
        files, prefetch=prefetch, rank=local.rank, world=local.world, tensors=wanted,
        **engine_options,
    )  # fmt: skip
    log.info(
        "ckpt-prefetch: %s loads %d safetensors file(s) through loader_adapter: prefetch=%s "
        "(%s), local rank %d of %d (%s)%s",
        engine,
        len(files),
        prefetch,
        "started" if it.prefetching else "not started",
        local.rank,
        local.world,
        local.source,
        given,
    )
    progress = ProgressLog(
        it.progress,
        label=f"local rank {local.rank} of {local.world}",
        interval_s=interval_s,
        enabled=it.prefetching and local.rank == 0,
    )
    return _yield_then_report(
        it, skip, lambda: describe_report(it.report, local, prefetch), progress
    )


def describe_cluster_report(report: Any) -> str:
    """One log line that says what a cluster-scope load did.

    Args:
        report: the load's `loader_adapter.cluster.ClusterReport` (None: it never ended).

    Returns:
        The line; byte counts are exact so that tools can read them back.

    Example:
        >>> from loader_adapter.cluster import ClusterReport
        >>> describe_cluster_report(ClusterReport(scope="node", reason="one node"))
        'ckpt-prefetch: cluster scope fell back to node-local mode: one node'
    """
    if report is None:
        return "ckpt-prefetch: cluster scope: the load did not end"
    if report.scope != Scope.CLUSTER:
        return f"ckpt-prefetch: cluster scope fell back to node-local mode: {report.reason}"
    line = (
        f"ckpt-prefetch: cluster scope, rank {report.rank} of {report.world}, node "
        f"{report.node} of {report.nodes}, local rank {report.local_rank} of "
        f"{report.local_world}: read={report.read_bytes} received={report.received_bytes} "
        f"sent={report.sent_bytes} fallback={report.fallback_bytes} bytes "
        f"({format_bytes(report.read_bytes)} read from storage in {report.elapsed_s:.2f} s)"
        + (f"; {report.tuning}" if report.tuning else "")
    )
    if report.failures:
        line += f"; {len(report.failures)} problem(s): " + "; ".join(report.failures)
    return line


def _yield_then_report(
    it: WeightsIterator,
    skip: Callable[[str], bool] | None,
    describe: Callable[[], str],
    progress: ProgressLog | None,
) -> Generator[tuple[str, Any], None, None]:
    if progress is not None:
        progress.start()
    try:
        for name, tensor in it:
            if skip is None or not skip(name):
                yield name, tensor
    finally:
        if progress is not None:
            progress.stop()
        it.close()
        log.info("%s", describe())


def share_log_handlers(host: str) -> None:
    """Send the log records of `engine` and `loader_adapter` to a serving engine's handlers.

    Serving engines put their handlers on their own logger (vLLM: ``"vllm"``, which does
    not propagate) and leave the root logger bare, so our records would reach only
    Python's last-resort handler: warnings only, unformatted. When the root logger has no
    handler, our loggers that have none get the host logger's handlers and level, so the
    user reads our lines in the engine's log, in its format. An application that
    configured logging (a root handler) keeps its own configuration. Idempotent.

    Args:
        host: the serving engine's logger name.
    """
    host_logger = logging.getLogger(host)
    if logging.getLogger().handlers or not host_logger.handlers:
        return
    for name in ("engine", "loader_adapter"):
        ours = logging.getLogger(name)
        if ours.handlers:
            continue
        for handler in host_logger.handlers:
            ours.addHandler(handler)
        if ours.level == logging.NOTSET:
            ours.setLevel(host_logger.getEffectiveLevel())
        ours.propagate = False
