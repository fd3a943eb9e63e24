"""The names the vLLM plug-in and its loader share: the load format, the opt-in, the keys.

Apart from `loader_adapter.integrations.vllm` (the entry point, which imports vLLM only
when it hooks in) and `loader_adapter.integrations._vllm_loader` (which imports vLLM at
once), so that neither imports the other to learn a name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["LOAD_FORMAT", "REPLACE_ENV", "VLLM_KEYS", "replace_requested"]

#: The ``--load-format`` this plug-in registers.
LOAD_FORMAT = "ckpt-prefetch"
#: Set to 1 to replace vLLM's own prefetch under its other safetensors load formats too.
REPLACE_ENV = "CKPT_PREFETCH_VLLM_AUTO"
#: Keys of ``--model-loader-extra-config`` that are vLLM's and passed on to it.
VLLM_KEYS: tuple[str, ...] = ("enable_weights_track",)


def replace_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``$CKPT_PREFETCH_VLLM_AUTO`` asks to replace vLLM's prefetch everywhere.

    Args:
        environ: the environment to read; None for ``os.environ``.

    Returns:
        True for ``1``, ``true``, ``yes`` or ``on`` (any case); False when unset, empty or
        anything else.

    Example:
        >>> replace_requested({"CKPT_PREFETCH_VLLM_AUTO": "1"}), replace_requested({})
        (True, False)
    """
    value = (os.environ if environ is None else environ).get(REPLACE_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")
