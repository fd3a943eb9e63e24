"""pytest, whole checkout: modules whose doctests are not collected, and where doctests
make their files.

`loader_adapter.integrations._vllm_loader` imports vLLM, which changes process-wide state
(logging, multiprocessing, environment) when imported, and may not be installed: the
tests of tests/test_vllm_plugin.py run it in subprocesses instead. Its docstrings hold no
runnable examples.

Doctests show ``tempfile.mkdtemp()`` as a user would write it; under pytest its
directories go to the test's own temporary directory, which pytest removes, not to /tmp
(every CI run on one machine left them behind).
"""

from __future__ import annotations

import tempfile

import pytest

collect_ignore = ["loader_adapter/integrations/_vllm_loader.py"]


@pytest.fixture(autouse=True)
def _doctest_tempdir(request: pytest.FixtureRequest) -> None:
    if isinstance(request.node, pytest.DoctestItem):
        request.getfixturevalue("monkeypatch").setattr(
            tempfile, "tempdir", str(request.getfixturevalue("tmp_path"))
        )
