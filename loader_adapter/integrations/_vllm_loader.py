"""The vLLM side of the plug-in: the model loader class and the iterator switch.

Imported only by `loader_adapter.integrations.vllm` once vLLM runs (it imports vLLM).

``DefaultModelLoader._get_weights_iterator`` decides which files to read and how
(index filtering, multimodal and unused-shard filters, the expert filter, the weight-name
prefix of each source) and calls ``safetensors_weights_iterator`` by its name in
``vllm.model_executor.model_loader.default_loader``. Rather than copy that function, the
loader subclass keeps it and `install` puts a switch under that name: while a
``ckpt-prefetch`` loader is asking (a context variable says which), the switch answers
with our iterator; otherwise it calls vLLM's own iterator, unless
``$CKPT_PREFETCH_VLLM_AUTO`` asked for ours there too.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Generator, Iterator
from typing import Any

import torch
from vllm.config.load import LoadConfig
from vllm.distributed import parallel_state
from vllm.model_executor.model_loader import DefaultModelLoader, register_model_loader
from vllm.model_executor.model_loader import default_loader as default_loader
from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight

from loader_adapter.discovery import LocalRank
from loader_adapter.integrations._common import (
    OptionError,
    engine_local_rank,
    load_with_prefetch,
    options_from_env,
    parse_options,
    share_log_handlers,
)
from loader_adapter.integrations.vllm import LOAD_FORMAT, REPLACE_ENV, VLLM_KEYS

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
_replace_options: dict[str, Any] | None = None
#: Whether the load format is registered in this process (vLLM warns on a second time).
_format_registered = False


def vllm_local_rank() -> LocalRank:
    """See `loader_adapter.integrations.vllm.vllm_local_rank`."""
    return engine_local_rank(parallel_state.get_world_group, WORLD_GROUP)


def load_safetensors(
    files: list[str],
    options: dict[str, Any],
    *,
    local_expert_ids: set[int] | None = None,
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """vLLM's safetensors weights, read through `loader_adapter` with the node's prefetch.

    Starts the prefetch at once (rank discovery is a collective over vLLM's world group,
    made by every rank as it starts loading) and logs one line when it starts and one
    with the report when the iteration ends.

    Args:
        files: the safetensors files vLLM chose.
        options: `parse_options` output; ``prefetch`` defaults to True.
        local_expert_ids: vLLM's expert filter: expert tensors of other experts are not
            yielded (None: all tensors).

    Returns:
        A generator of ``(name, tensor)``, tensors as ``safe_open(...).get_tensor``.

    Raises:
        ValueError: an option the engine refuses (checked before any file is read).
        OSError: a file is missing or unreadable.
    """
    skip = None
    if local_expert_ids is not None:
        log.info("ckpt-prefetch: this rank loads %d experts", len(local_expert_ids))
        skip = functools.partial(should_skip_weight, local_expert_ids=local_expert_ids)
    return load_with_prefetch(files, options, vllm_local_rank, engine="vLLM", skip=skip)


def _switch(*args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Stands for vLLM's ``safetensors_weights_iterator`` in ``default_loader``."""
    assert _original is not None, "install() sets _original before the switch goes in"
    call = inspect.signature(_original).bind(*args, **kwargs)
    call.apply_defaults()
    files = list(call.arguments["hf_weights_files"])
    strategy = call.arguments.get("safetensors_load_strategy")
    expert_ids = call.arguments.get("local_expert_ids")
    loader = _active.get()
    if loader is not None:
        loader._saw_safetensors = True
        if strategy == "torchao":
            log.warning(
                "ckpt-prefetch: a torchao checkpoint is rebuilt by vLLM's own iterator; "
                "loading it without ckpt-prefetch"
            )
            return _original(*call.args, **call.kwargs)
        return load_safetensors(files, loader.prefetch_options, local_expert_ids=expert_ids)
    if _replace_options is not None and strategy in (None, "prefetch"):
        options = {"prefetch": "auto" if strategy is None else True, **_replace_options}
        return load_safetensors(files, options, local_expert_ids=expert_ids)
    return _original(*call.args, **call.kwargs)


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
        #: Keyword options of `load_safetensors`, checked.
        self.prefetch_options: dict[str, Any] = parse_options(
            extra, where=_WHERE, also_valid=VLLM_KEYS
        )
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

    def _get_weights_iterator(
        self, source: DefaultModelLoader.Source
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        self._saw_safetensors = False
        token = _active.set(self)
        try:
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
    """Register the load format and put the iterator switch in place (idempotent).

    Args:
        replace_default: also answer vLLM's other safetensors load formats with our
            iterator (``$CKPT_PREFETCH_VLLM_AUTO``); its options are read and checked
            now from ``$CKPT_PREFETCH_OPTIONS``.

    Raises:
        OptionError: `replace_default` and ``$CKPT_PREFETCH_OPTIONS`` is invalid.
    """
    global _original, _replace_options, _format_registered
    _replace_options = options_from_env() if replace_default else None
    current = default_loader.safetensors_weights_iterator
    if current is not _switch:
        _original = current
        default_loader.safetensors_weights_iterator = _switch
    if not _format_registered:
        register_model_loader(LOAD_FORMAT)(CkptPrefetchModelLoader)
        _format_registered = True
    share_log_handlers("vllm")
    if replace_default:
        log.info(
            "ckpt-prefetch: $%s is on: vLLM's safetensors prefetch is replaced by ours "
            "under every load format%s",
            REPLACE_ENV,
            f" (options {_replace_options})" if _replace_options else "",
        )
