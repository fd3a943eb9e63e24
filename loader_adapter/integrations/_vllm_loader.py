"""The vLLM side of the plug-in: the model loader class and the iterator switch.

Imported only by `loader_adapter.integrations.vllm` once vLLM runs (it imports vLLM).

``DefaultModelLoader._get_weights_iterator`` decides which files to read and how
(index filtering, multimodal and unused-shard filters, the expert filter, the weight-name
prefix of each source) and calls ``safetensors_weights_iterator`` by its name in
``vllm.model_executor.model_loader.default_loader``. Rather than copy that function, the
loader subclass keeps it and puts a switch under that name only while its own
``_get_weights_iterator`` runs: there (a context variable says which loader asks) the
switch answers with our iterator, and anyone else gets vLLM's own function, untouched.
vLLM's name is given back when the last ckpt-prefetch loader returns. Only
``$CKPT_PREFETCH_VLLM_AUTO`` leaves the switch in for vLLM's other load formats.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, NamedTuple

import torch
from vllm.config.load import LoadConfig
from vllm.distributed import parallel_state
from vllm.model_executor.model_loader import DefaultModelLoader, register_model_loader
from vllm.model_executor.model_loader import default_loader as default_loader
from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight

from loader_adapter.discovery import LocalRank
from loader_adapter.integrations._common import (
    OPTIONS_ENV,
    MergedOptions,
    OptionError,
    engine_local_rank,
    env_config,
    load_with_prefetch,
    merge_options,
    share_log_handlers,
)
from loader_adapter.integrations._vllm_names import LOAD_FORMAT, REPLACE_ENV, VLLM_KEYS

__all__ = ["CkptPrefetchModelLoader", "install", "load_safetensors", "vllm_local_rank"]

log = logging.getLogger(__name__)

WORLD_GROUP = "vllm world group"
_WHERE = "--model-loader-extra-config"

#: The ckpt-prefetch loader whose ``_get_weights_iterator`` is running in this context.
_active: contextvars.ContextVar[CkptPrefetchModelLoader | None] = contextvars.ContextVar(
    "ckpt_prefetch_vllm_loader", default=None
)
#: vLLM's iterator, as found in ``default_loader`` when the switch went in.
_original: Callable[..., Iterator[tuple[str, torch.Tensor]]] | None = None
#: Options for the default load formats when ``$CKPT_PREFETCH_VLLM_AUTO`` is on, else None.
_replace_options: MergedOptions | None = None
#: Whether the load format is registered in this process (vLLM warns on a second time).
_format_registered = False
#: Guards the name in ``default_loader`` and the count of loaders using the switch.
_swap_lock = threading.Lock()
_swap_depth = 0
_warned: set[str] = set()

#: The arguments of vLLM's ``safetensors_weights_iterator`` that the switch understands
#: (0.28 to 0.34); any other one with a value other than its default is refused.
_KNOWN = frozenset(
    {
        "hf_weights_files",
        "use_tqdm_on_load",
        "safetensors_load_strategy",
        "local_expert_ids",
        "safetensors_prefetch_num_threads",  # vLLM's own prefetch, which ours replaces
        "safetensors_prefetch_block_size",
        "shuffle_safetensors_files",
    }
)
_SHUFFLE = (
    "shuffle_safetensors_files makes each rank read the files in its own order, and "
    "ckpt-prefetch warms them once for the node in one order: leave "
    "--shuffle-safetensors-files off with --load-format ckpt-prefetch"
)


def vllm_local_rank() -> LocalRank:
    """See `loader_adapter.integrations.vllm.vllm_local_rank`."""
    return engine_local_rank(parallel_state.get_world_group, WORLD_GROUP)


def stage_filter(model: torch.nn.Module) -> Callable[[str], bool] | None:
    """vLLM's pipeline-parallel split of `model`: True for the names of tensors whose
    layers live on another stage (vLLM's ``get_pp_missing_layer_names``), None when this
    stage has every layer (or this vLLM cannot tell)."""
    try:
        from vllm.model_executor.models.utils import get_pp_missing_layer_names
    except ImportError:
        return None
    prefixes = tuple(get_pp_missing_layer_names(model))
    if not prefixes:
        return None
    log.info("ckpt-prefetch: this pipeline stage leaves out %d layers", len(prefixes))
    return lambda name: name.startswith(prefixes)


def load_safetensors(
    files: list[str],
    options: MergedOptions | dict[str, Any],
    *,
    local_expert_ids: set[int] | None = None,
    stage_skip: Callable[[str], bool] | None = None,
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """vLLM's safetensors weights, read through `loader_adapter` with the node's prefetch.

    Starts the prefetch at once (rank discovery is a collective over vLLM's world group,
    made by every rank as it starts loading), logs one line when it starts (with where
    each option came from), a progress line every 10 s on local rank 0 while it runs,
    and one with the report when the iteration ends.

    Args:
        files: the safetensors files vLLM chose.
        options: `merge_options` output (or plain `parse_options` keywords);
            ``prefetch`` defaults to True.
        local_expert_ids: vLLM's expert filter: expert tensors of other experts are not
            yielded (None: all tensors).
        stage_skip: True for tensors of layers on other pipeline stages (`stage_filter`).

    Returns:
        A generator of ``(name, tensor)``, tensors as ``safe_open(...).get_tensor``.

    Raises:
        ValueError: an option the engine refuses (checked before any file is read).
        OSError: a file is missing or unreadable.
    """
    skips: list[Callable[[str], bool]] = []
    if local_expert_ids is not None:
        log.info("ckpt-prefetch: this rank loads %d experts", len(local_expert_ids))
        skips.append(functools.partial(should_skip_weight, local_expert_ids=local_expert_ids))
    if stage_skip is not None:
        skips.append(stage_skip)
    skip = None if not skips else (lambda name: any(s(name) for s in skips))
    return load_with_prefetch(files, options, vllm_local_rank, engine="vLLM", skip=skip)


class _Call(NamedTuple):
    files: list[str]
    strategy: str | None
    expert_ids: set[int] | None
    shuffle: bool
    strange: tuple[str, ...]  # arguments this release does not know, given non-default


def _read_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
    """What vLLM asked its iterator for (raises TypeError/KeyError if it cannot tell)."""
    assert _original is not None
    call = inspect.signature(_original).bind(*args, **kwargs)
    given = call.arguments
    strange = tuple(
        name
        for name, param in inspect.signature(_original).parameters.items()
        if name in given and name not in _KNOWN and given[name] != param.default
    )
    return _Call(
        files=list(given["hf_weights_files"]),
        strategy=given.get("safetensors_load_strategy"),
        expert_ids=given.get("local_expert_ids"),
        shuffle=bool(given.get("shuffle_safetensors_files", False)),
        strange=strange,
    )


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _switch(*args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Stands for vLLM's ``safetensors_weights_iterator`` while ours may be asked for."""
    assert _original is not None, "the switch goes in only after _original is set"
    loader = _active.get()
    if loader is None and _replace_options is None:
        return _original(*args, **kwargs)  # not ours to answer: vLLM's, as called
    try:
        call = _read_call(args, kwargs)
    except (TypeError, KeyError) as exc:
        if loader is not None:
            raise RuntimeError(
                f"ckpt-prefetch: vLLM called its safetensors iterator in a way this release "
                f"does not understand ({exc!r}); --load-format ckpt-prefetch cannot run on "
                "this vLLM"
            ) from exc
        _warn_once(
            f"ckpt-prefetch: vLLM's safetensors iterator takes arguments this release does "
            f"not understand ({exc!r}); ${REPLACE_ENV} is ignored and vLLM loads as usual"
        )
        return _original(*args, **kwargs)
    if loader is not None:
        loader._saw_safetensors = True
        if call.strategy == "torchao":
            log.warning(
                "ckpt-prefetch: a torchao checkpoint is rebuilt by vLLM's own iterator; "
                "loading it without ckpt-prefetch"
            )
            return _original(*args, **kwargs)
        if call.shuffle:
            raise OptionError(f"ckpt-prefetch: {_SHUFFLE}")
        if call.strange:
            raise OptionError(
                f"ckpt-prefetch: vLLM asked its safetensors iterator for {call.strange}, "
                "which this release does not know; --load-format ckpt-prefetch cannot honour "
                "it: use another load format"
            )
        return load_safetensors(
            call.files, loader.prefetch_options, local_expert_ids=call.expert_ids,
            stage_skip=loader.stage_skip,
        )  # fmt: skip
    assert _replace_options is not None
    if call.strategy not in (None, "prefetch") or call.shuffle or call.strange:
        if call.shuffle or call.strange:
            _warn_once(
                f"ckpt-prefetch: ${REPLACE_ENV}: vLLM's iterator was asked for "
                f"{'shuffled files' if call.shuffle else call.strange}; vLLM loads as usual"
            )
        return _original(*args, **kwargs)
    options = _replace_options.with_default(
        "prefetch", "auto" if call.strategy is None else True, f"${REPLACE_ENV}"
    )
    return load_safetensors(call.files, options, local_expert_ids=call.expert_ids)


@contextlib.contextmanager
def _switched() -> Iterator[None]:
    """The switch under vLLM's name while the body runs (nested and threads counted)."""
    global _swap_depth
    with _swap_lock:
        if _swap_depth == 0 and default_loader.safetensors_weights_iterator is not _switch:
            default_loader.safetensors_weights_iterator = _switch
        _swap_depth += 1
    try:
        yield
    finally:
        with _swap_lock:
            _swap_depth -= 1
            if _swap_depth == 0 and _replace_options is None:
                default_loader.safetensors_weights_iterator = _original


class CkptPrefetchModelLoader(DefaultModelLoader):
    """vLLM's default loader, reading safetensors files through `loader_adapter`.

    Registered as ``--load-format ckpt-prefetch``. Options come from
    ``--model-loader-extra-config`` (see the module `loader_adapter.integrations.vllm`).

    Args:
        load_config: vLLM's load configuration (``load_format="ckpt-prefetch"``).

    Raises:
        OptionError: an unknown key or an invalid value in the extra config, or
            ``--safetensors-load-strategy eager``.

    Example:
        >>> from vllm.config.load import LoadConfig  # doctest: +SKIP
        >>> CkptPrefetchModelLoader(LoadConfig(load_format="ckpt-prefetch",
        ...     model_loader_extra_config={"window_bytes": "4GiB"}))  # doctest: +SKIP
    """

    def __init__(self, load_config: LoadConfig) -> None:
        extra = load_config.model_loader_extra_config
        if not isinstance(extra, dict):
            raise OptionError(
                f"ckpt-prefetch: {_WHERE} must be a JSON object, got {type(extra).__name__}"
            )
        #: Keyword options of `load_safetensors`, checked: ``$CKPT_PREFETCH_OPTIONS``
        #: merged with the extra config, which wins per key.
        self.prefetch_options: MergedOptions = merge_options(
            (f"${OPTIONS_ENV}", env_config()), (_WHERE, extra), also_valid=VLLM_KEYS
        )
        if getattr(load_config, "shuffle_safetensors_files", False):
            raise OptionError(f"ckpt-prefetch: {_SHUFFLE}")
        if load_config.safetensors_load_strategy == "eager":
            raise OptionError(
                "ckpt-prefetch: --safetensors-load-strategy eager reads every file into "
                "memory; --load-format ckpt-prefetch maps the files and warms the page "
                "cache: leave --safetensors-load-strategy unset (or use lazy or prefetch)"
            )
        self._saw_safetensors = False
        # vLLM's default loader refuses unknown load formats and extra-config keys: it
        # sees "auto" (safetensors first, .bin/.pt otherwise) and its own keys only.
        inner = dataclasses.replace(
            load_config,
            load_format="auto",
            model_loader_extra_config={k: extra[k] for k in VLLM_KEYS if k in extra},
        )
        super().__init__(inner)

    #: Tensors of layers on other pipeline stages, from the model being loaded (None: none).
    stage_skip: Callable[[str], bool] | None = None

    def get_all_weights(
        self, model_config: Any, model: torch.nn.Module
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        """vLLM's, after learning which layers this pipeline stage leaves out: those
        tensors are neither read nor warmed on this rank."""
        self.stage_skip = stage_filter(model)
        return super().get_all_weights(model_config, model)

    def _get_weights_iterator(
        self, source: DefaultModelLoader.Source
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        self._saw_safetensors = False
        token = _active.set(self)
        try:
            with _switched():
                weights = super()._get_weights_iterator(source)
        finally:
            _active.reset(token)
        if not self._saw_safetensors:
            log.warning(
                "ckpt-prefetch: %s has no safetensors weights; vLLM's default iterator "
                "loads it, without prefetch",
                source.model_or_path,
            )
        return weights


def install(*, replace_default: bool) -> None:
    """Register the load format; with `replace_default`, leave the switch in (idempotent).

    Without `replace_default` nothing of vLLM's changes: the switch goes under vLLM's name
    only while a ckpt-prefetch loader asks for weights.

    Args:
        replace_default: also answer vLLM's other safetensors load formats with our
            iterator (``$CKPT_PREFETCH_VLLM_AUTO``); its options are read and checked
            now from ``$CKPT_PREFETCH_OPTIONS``.

    Raises:
        OptionError: `replace_default` and ``$CKPT_PREFETCH_OPTIONS`` is invalid.
    """
    global _original, _replace_options, _format_registered
    options = merge_options((f"${OPTIONS_ENV}", env_config())) if replace_default else None
    with _swap_lock:
        current = default_loader.safetensors_weights_iterator
        if current is not _switch:
            _original = current
        _replace_options = options
        if replace_default:
            default_loader.safetensors_weights_iterator = _switch
        elif _swap_depth == 0:
            default_loader.safetensors_weights_iterator = _original
    if not _format_registered:
        register_model_loader(LOAD_FORMAT)(CkptPrefetchModelLoader)
        _format_registered = True
    share_log_handlers("vllm")
    if options is not None:
        log.info(
            "ckpt-prefetch: $%s is on: vLLM's safetensors prefetch is replaced by ours "
            "under every load format%s",
            REPLACE_ENV,
            f" (options {options.describe()})" if options.values else "",
        )
