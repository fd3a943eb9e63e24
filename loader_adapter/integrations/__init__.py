"""Plug-ins that make serving engines load checkpoints through `loader_adapter`.

One module per engine, each an entry point of this distribution, so that installing
``ckpt-prefetch`` is enough: no change to the engine's code.

- `loader_adapter.integrations.vllm`: a vLLM load format, ``--load-format ckpt-prefetch``
  (entry point group ``vllm.general_plugins``).
- `loader_adapter.integrations.sglang`: AROUND hooks on SGLang's safetensors iterators,
  driven by SGLang's ``--weight-loader-prefetch-checkpoints`` (entry point group
  ``sglang.srt.plugins``).

Importing this package, or `loader_adapter`, never imports vLLM or SGLang: each module
imports its engine inside the functions that the engine calls.
"""

__all__: list[str] = []
