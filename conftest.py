"""pytest, whole checkout: modules whose doctests are not collected.

`loader_adapter.integrations._vllm_loader` imports vLLM, which changes process-wide state
(logging, multiprocessing, environment) when imported, and may not be installed: the
tests of tests/test_vllm_plugin.py run it in subprocesses instead. Its docstrings hold no
runnable examples.
"""

collect_ignore = ["loader_adapter/integrations/_vllm_loader.py"]
