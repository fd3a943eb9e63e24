"""SGLang plug-in: our prefetch behind SGLang's ``--weight-loader-prefetch-checkpoints``.

Installing ``ckpt-prefetch`` next to SGLang is enough: SGLang calls `register` in each of
its processes through the entry point group ``sglang.srt.plugins``, which wraps (AROUND
hooks of ``sglang.srt.plugins.hook_registry.HookRegistry``) the two safetensors iterators
of ``sglang.srt.model_loader.weight_utils``. They already take ``prefetch=`` and
``prefetch_num_threads=`` from SGLang's flags ``--weight-loader-prefetch-checkpoints`` and
``--weight-loader-prefetch-num-threads``; with the flag on, our engine warms the
checkpoint instead of SGLang's whole-file round-robin:

- ``safetensors_weights_iterator``: replaced by `loader_adapter.safetensors_weights_iterator`
  (byte-balanced stripes in load order, a window that follows the loader, mapped pages
  released behind it). With ``drop_cache_after_load`` SGLang's iterator keeps the files
  and drops their cache; our engine warms them beside it.
- ``buffered_multi_thread_safetensors_weights_iterator``: SGLang keeps its threads and
  order; our engine warms the files beside it, in that order, without a window (nothing
  tells it where the threads are).
- Without the flag, or with ``disable_mmap``, both iterators run untouched.

The node-local rank and world come from SGLang's world group (host identities gathered
over its CPU group). ``--weight-loader-prefetch-num-threads`` sets the reads in flight per
rank; ``$SGLANG_PREFETCH_BLOCK_SIZE_MB`` the stripe unit; ``$CKPT_PREFETCH_OPTIONS`` (a JSON
object) any option of `loader_adapter.integrations._common.OPTION_VALUES`, and wins.

Importing this module does not import SGLang; `register` does.

Example (shell)::

    python -m sglang.launch_server --model-path /models/llama \\
        --weight-loader-prefetch-checkpoints --weight-loader-prefetch-num-threads 2
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Generator, Iterator
from typing import Any

from engine import PrefetchHandle, start_prefetch
from loader_adapter.args import CHUNK_ENV
from loader_adapter.discovery import LocalRank
from loader_adapter.fsdetect import decide_auto
from loader_adapter.integrations._common import (
    CLUSTER_ONLY,
    OPTIONS_ENV,
    MergedOptions,
    OptionError,
    describe_report,
    engine_local_rank,
    env_config,
    load_with_prefetch,
    merge_options,
    share_log_handlers,
)
from loader_adapter.options import Scope

__all__ = ["HOOKS", "WEIGHT_UTILS", "register", "sglang_local_rank"]

log = logging.getLogger(__name__)

#: The SGLang module whose iterators are wrapped.
WEIGHT_UTILS = "sglang.srt.model_loader.weight_utils"
WORLD_GROUP = "sglang world group"

Pairs = Iterator[tuple[str, Any]]


def sglang_local_rank() -> LocalRank:
    """This process's node-local rank and world, from SGLang's world group.

    The members of SGLang's world group (``get_parallel().world_group``) gather their host
    identities over its CPU group; the local rank is this process's position among those
    on its host. SGLang's own prefetch takes the group's ``local_rank`` (the GPU index,
    which need not start at 0) and ``LOCAL_SIZE`` instead. A collective on the first
    call. Without SGLang's distributed state, `loader_adapter.discover_local_rank`
    answers.

    Returns:
        The LocalRank (``source`` ``"sglang world group"`` when SGLang answered).

    Example:
        >>> sglang_local_rank()  # in a scheduler of a TP=8 server on one node  # doctest: +SKIP
        LocalRank(rank=3, world=8, source='sglang world group')
    """

    def world_group() -> Any:
        from sglang.srt.runtime_context import get_parallel

        return get_parallel().world_group

    return engine_local_rank(world_group, WORLD_GROUP)


def _options(threads: int) -> MergedOptions:
    """Our options for one load: SGLang's flags, its block size, then ``$CKPT_PREFETCH_OPTIONS``.

    SGLang's thread count always has a value (its default when not given), so the JSON,
    which the user writes only to say something, wins per key.
    """
    block: dict[str, object] = {}
    block_mb = os.environ.get(CHUNK_ENV, "").strip()
    if block_mb:
        if not block_mb.isdigit() or int(block_mb) < 1:
            raise OptionError(
                f"ckpt-prefetch: ${CHUNK_ENV} must be a positive integer (MiB), got {block_mb!r}"
            )
        block["chunk_bytes"] = int(block_mb) << 20
    return merge_options(
        ("--weight-loader-prefetch-checkpoints", {"prefetch": True}),
        ("--weight-loader-prefetch-num-threads", {"concurrency": threads}),
        (f"${CHUNK_ENV}", block),
        (f"${OPTIONS_ENV}", env_config()),
    )


_warned: set[str] = set()


def _bind(original: Callable[..., Pairs], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """SGLang's call, bound to its signature; None (SGLang's own path) when it cannot be read.

    The hooks wrap SGLang's functions in every SGLang process: a signature this release
    does not understand must leave SGLang's own iterator running, with one warning.
    """
    try:
        call = inspect.signature(original).bind(*args, **kwargs)
        call.apply_defaults()
        needed = ("hf_weights_files", "prefetch", "prefetch_num_threads")
        missing = [name for name in needed if name not in call.arguments]
        if missing:
            raise KeyError(", ".join(missing))
    except (TypeError, KeyError, ValueError) as exc:
        message = (
            f"ckpt-prefetch: SGLang's {getattr(original, '__name__', original)} takes arguments "
            f"this release does not understand ({exc!r}); SGLang loads as usual"
        )
        if message not in _warned:
            _warned.add(message)
            log.warning("%s", message)
        return None
    return call


def _plain(original: Callable[..., Pairs], *args: Any, **kwargs: Any) -> Pairs:
    """AROUND hook of SGLang's ``safetensors_weights_iterator``."""
    call = _bind(original, args, kwargs)
    if call is None:
        return original(*args, **kwargs)
    a = call.arguments
    if not a.get("prefetch") or a.get("disable_mmap"):
        return original(*args, **kwargs)
    if a.get("drop_cache_after_load"):
        return _beside(original, call)
    options = _options(a["prefetch_num_threads"])
    files = [os.fspath(f) for f in a["hf_weights_files"]]
    return load_with_prefetch(files, options, sglang_local_rank, engine="SGLang")


def _buffered(original: Callable[..., Pairs], *args: Any, **kwargs: Any) -> Pairs:
    """AROUND hook of SGLang's ``buffered_multi_thread_safetensors_weights_iterator``."""
    call = _bind(original, args, kwargs)
    if call is None or not call.arguments.get("prefetch") or call.arguments.get("disable_mmap"):
        return original(*args, **kwargs)
    return _beside(original, call)


def _beside(original: Callable[..., Pairs], call: Any) -> Pairs:
    """SGLang's iterator without its prefetch, our engine warming the files beside it."""
    merged = _options(call.arguments["prefetch_num_threads"])
    options = dict(merged.values)
    prefetch = options.pop("prefetch")
    if options.pop("window_bytes", None) is not None:
        log.warning(
            "ckpt-prefetch: window_bytes is ignored for SGLang's %s: its reads cannot "
            "be followed, so the whole checkpoint is warmed",
            original.__name__,
        )
    if options.pop("scope", Scope.NODE) == Scope.CLUSTER:
        log.warning(
            "ckpt-prefetch: the cluster scope needs our iterator, and SGLang's %s reads the "
            "original files itself: this load warms them in the node scope",
            original.__name__,
        )
    for key in CLUSTER_ONLY:
        options.pop(key, None)
    call.arguments["prefetch"] = False
    files = [os.fspath(f) for f in call.arguments["hf_weights_files"]]
    if prefetch == "auto":
        total = sum(os.path.getsize(f) for f in files)
        prefetch = decide_auto(files, total).enabled
    if not prefetch:
        return original(*call.args, **call.kwargs)
    local = sglang_local_rank()
    handle = start_prefetch(files, local.rank, local.world, order="given", **options)
    log.info(
        "ckpt-prefetch: warming %d file(s) beside SGLang's %s: local rank %d of %d (%s), "
        "options %s",
        len(files),
        original.__name__,
        local.rank,
        local.world,
        local.source,
        merged.describe(),
    )
    return _alongside(original(*call.args, **call.kwargs), handle, local)


def _alongside(
    pairs: Pairs, handle: PrefetchHandle, local: LocalRank
) -> Generator[Any, None, None]:
    try:
        yield from pairs
    finally:
        report = handle.cancel()
        log.info("%s", describe_report(report, local, True))


#: SGLang function -> our AROUND hook.
HOOKS: dict[str, Callable[..., Pairs]] = {
    f"{WEIGHT_UTILS}.safetensors_weights_iterator": _plain,
    f"{WEIGHT_UTILS}.buffered_multi_thread_safetensors_weights_iterator": _buffered,
}


def register() -> None:
    """Register our AROUND hooks with SGLang's hook registry (the plug-in's entry point).

    SGLang applies the hooks after all plug-ins registered theirs. Calling this again
    registers nothing more. Where SGLang's hook registry is missing or changed (a release
    this one does not support), one WARNING says so and SGLang runs as it would without
    ckpt-prefetch. ``$CKPT_PREFETCH_OPTIONS`` is checked now, so that a bad value stops
    SGLang's start rather than a load (an option the user set is never ignored).

    Raises:
        OptionError: ``$CKPT_PREFETCH_OPTIONS`` is invalid.

    Example:
        >>> register()  # doctest: +SKIP
        >>> HookRegistry.apply_hooks()  # doctest: +SKIP
    """
    from loader_adapter.integrations._guard import SGLANG, guarded

    merge_options((f"${OPTIONS_ENV}", env_config()))

    def hook() -> None:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        for target, fn in HOOKS.items():
            if any(h is fn for _, h, _ in HookRegistry._hooks.get(target, ())):
                continue
            HookRegistry.register(target, fn, HookType.AROUND)
        share_log_handlers("sglang")

    guarded(SGLANG, hook, on_failure=lambda why: None)
