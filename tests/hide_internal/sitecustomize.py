"""Hides one name of an installed package, to test a release where it is missing.

Put this directory on ``PYTHONPATH`` with ``CKPT_TEST_HIDE=MODULE:NAME@AFTER``: once module
``AFTER`` has been imported (so that the package's own users of the name already hold it),
``NAME`` is deleted from ``MODULE``. Every Python process started with that environment
(vLLM's engine core and workers are spawned) does the same, as an installed release
without that name would. Used by tests/test_vllm_compat.py.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_spec = os.environ.get("CKPT_TEST_HIDE", "")


class _HideAfter(importlib.abc.MetaPathFinder):
    def __init__(self, module: str, name: str, after: str) -> None:
        self.module, self.name, self.after = module, name, after

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != self.after:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        hide = self

        def exec_then_hide(module):  # type: ignore[no-untyped-def]
            exec_module(module)
            target_module = sys.modules.get(hide.module)
            if target_module is not None and hasattr(target_module, hide.name):
                delattr(target_module, hide.name)
            sys.meta_path.remove(hide)

        spec.loader.exec_module = exec_then_hide  # type: ignore[method-assign]
        return spec


if _spec:
    _target, _after = _spec.split("@")
    _module, _name = _target.split(":")
    sys.meta_path.insert(0, _HideAfter(_module, _name, _after))
