"""vLLM plug-in: ``vllm serve MODEL --load-format ckpt-prefetch``.

Installing ``ckpt-prefetch`` next to vLLM (>=0.28,<0.35) is enough: vLLM calls `register`
in each of its processes through the entry point group ``vllm.general_plugins``. It never
raises into vLLM for a failure of its own (`loader_adapter.integrations._guard`: one
warning, vLLM left as it is) and replaces nothing of vLLM's default path unless asked. It
registers the load format ``ckpt-prefetch``, a subclass of vLLM's ``DefaultModelLoader`` that finds,
filters and feeds the weights as vLLM's default loader does, but reads the safetensors
files through `loader_adapter.safetensors_weights_iterator`, with the node's ranks
warming the checkpoint together (byte-balanced, in load order, within a window).

- **Options** go in ``--model-loader-extra-config`` as JSON, and in ``$CKPT_PREFETCH_OPTIONS``
  (the extra config wins per key), with the keys of
  `loader_adapter.integrations._common.OPTION_VALUES` (``prefetch`` defaults to true);
  vLLM's ``enable_weights_track`` is passed on. Any other key, or a bad value, fails the
  load before a weight is read, with a message naming the option, where it was set and its
  valid values. ``shuffle_safetensors_files`` (vLLM 0.34) is refused.
- **Progress**: local rank 0 logs a line every 10 s during the load
  (`loader_adapter.progress_log`).
- **Ranks**: the node-local rank and world come from vLLM's world group (the host
  identities of its members, gathered over its CPU group), not from the global rank.
- **vLLM's own prefetch** (whole files by global rank) is not started for this load.
- **Expert parallelism**: tensors of experts that vLLM's filter gives to other ranks
  (``local_expert_ids``) are skipped, as vLLM skips them; the node's prefetch still
  warms the whole checkpoint, which the node's ranks share.
- Checkpoints without safetensors files (``.bin``, ``.pt``) load through vLLM's own
  iterators, without prefetch, with a warning; ``--safetensors-load-strategy eager`` is
  refused; a torchao checkpoint is rebuilt by vLLM's own iterator, without prefetch.
- ``$CKPT_PREFETCH_VLLM_AUTO=1`` (opt-in) also replaces vLLM's prefetch under the other
  load formats that use its plain safetensors iterator (``auto``, ``hf``,
  ``safetensors``): ``prefetch="auto"`` when vLLM would decide for itself, on with
  ``--safetensors-load-strategy prefetch``, untouched for ``lazy``, ``eager`` and
  ``torchao``. Its options come from ``$CKPT_PREFETCH_OPTIONS`` (a JSON object).

Importing this module does not import vLLM; `register` does.

Example:
    >>> from vllm import LLM  # doctest: +SKIP
    >>> llm = LLM("/models/llama", load_format="ckpt-prefetch",  # doctest: +SKIP
    ...           model_loader_extra_config={"window_bytes": "8GiB"})
"""

from __future__ import annotations

import logging

from loader_adapter.discovery import LocalRank
from loader_adapter.integrations._vllm_names import (
    LOAD_FORMAT,
    REPLACE_ENV,
    VLLM_KEYS,
    replace_requested,
)

__all__ = [
    "LOAD_FORMAT",
    "REPLACE_ENV",
    "VLLM_KEYS",
    "register",
    "replace_requested",
    "vllm_local_rank",
]

log = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Register the ``ckpt-prefetch`` load format with vLLM (the plug-in's entry point).

    vLLM calls this in every process, with no ``try``, and may call it more than once: the
    second and later calls in a process do nothing. Nothing of vLLM's default path is
    replaced unless ``$CKPT_PREFETCH_VLLM_AUTO`` asks for it. Where vLLM's internals that
    the plug-in needs are missing (a release this one does not support), one WARNING says
    so and vLLM runs as it would without ckpt-prefetch; ``--load-format ckpt-prefetch``
    then fails at start with that message. Raises (failing vLLM's start) only when
    ``$CKPT_PREFETCH_VLLM_AUTO`` is on and ``$CKPT_PREFETCH_OPTIONS`` is invalid: an
    option the user set is never silently ignored.

    Raises:
        OptionError: ``$CKPT_PREFETCH_OPTIONS`` is invalid while the replacement is on.

    Example:
        >>> register()  # doctest: +SKIP
        >>> LLM(model, load_format="ckpt-prefetch")  # doctest: +SKIP
    """
    global _registered
    if _registered:
        return
    _registered = True
    from loader_adapter.integrations._common import OptionError
    from loader_adapter.integrations._guard import VLLM, guarded

    def hook() -> None:
        from loader_adapter.integrations import _vllm_loader

        _vllm_loader.install(replace_default=replace_requested())

    guarded(VLLM, hook, on_failure=_register_refusal, user_errors=(OptionError,))


def _register_refusal(message: str) -> None:
    """Register a ``ckpt-prefetch`` load format that fails with `message` when used.

    So that ``--load-format ckpt-prefetch`` on an unsupported vLLM stops at start saying
    why, rather than with vLLM's "load format is not supported". Where even vLLM's
    loader registry is missing, vLLM's own error stands (the warning was logged).
    """
    from vllm.model_executor.model_loader import BaseModelLoader, register_model_loader

    class UnsupportedVllm(BaseModelLoader):  # type: ignore[misc]
        def __init__(self, load_config: object) -> None:
            raise RuntimeError(f"--load-format {LOAD_FORMAT} cannot run here: {message}")

        def download_model(self, model_config: object) -> None:  # pragma: no cover
            raise NotImplementedError

        def load_weights(self, model: object, model_config: object) -> None:  # pragma: no cover
            raise NotImplementedError

    register_model_loader(LOAD_FORMAT)(UnsupportedVllm)


def vllm_local_rank() -> LocalRank:
    """This process's node-local rank and world, from vLLM's world group.

    The members of vLLM's world group gather their host identities
    (`loader_adapter.host_identity`, ``$CKPT_PREFETCH_HOST_ID`` when set) over its CPU
    group: the local rank is this process's position among the members on its host. A
    collective on the first call: every rank of vLLM's world must make it (every rank
    loads the model, so every rank does). Without vLLM's distributed state (a loader used
    outside a vLLM worker), `loader_adapter.discover_local_rank` answers.

    Returns:
        The LocalRank (``source`` ``"vllm world group"`` when vLLM answered).

    Example:
        >>> vllm_local_rank()  # in a worker of a TP=4 server on one node  # doctest: +SKIP
        LocalRank(rank=2, world=4, source='vllm world group')
    """
    from loader_adapter.integrations import _vllm_loader

    return _vllm_loader.vllm_local_rank()
