"""The checks of scripts/vllm_source_check.sh: the plug-in on a vLLM release's Python source.

Usage: PYTHONPATH=SOURCE:.:tests python scripts/vllm_source_check.py VERSION

Prints one line per check (PASS or FAIL and what it saw) and exits 1 when one failed:
vLLM's plug-in loader registers ckpt-prefetch once with no warning; vLLM's default path is
untouched; the ckpt-prefetch loader and vLLM's ``auto`` read the same tensors as
safetensors itself; ``shuffle_safetensors_files`` is refused; vLLM's EPLB expert filter
(``compute_eplb_local_expert_ids``) is honoured (the same names as vLLM's own iterator).
"""

from __future__ import annotations

import atexit
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _engine_checks import _digest as digests
from _engine_checks import _Lines as Lines
from safetensors.torch import load_file, save_file

failed: list[str] = []


def check(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
    try:
        ok, seen = fn()
    except Exception as exc:
        ok, seen = False, f"{type(exc).__name__}: {exc}"
    print(f"{'PASS' if ok else 'FAIL'} {name}: {seen}", flush=True)
    if not ok:
        failed.append(name)


def main() -> None:
    version = sys.argv[1]
    import vllm
    from serving_support import make_tiny_llama
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import (
        DefaultModelLoader,
        default_loader,
        get_model_loader,
        weight_utils,
    )
    from vllm.plugins import load_general_plugins

    lines = Lines()
    for name in ("vllm", "loader_adapter", "engine"):
        logging.getLogger(name).addHandler(lines)
        logging.getLogger(name).setLevel(logging.INFO)
    print(f"vLLM {vllm.__version__} from {Path(vllm.__file__).parent}", flush=True)
    check("source version", lambda: (vllm.__version__.startswith(version), vllm.__version__))

    def plugins() -> tuple[bool, str]:
        load_general_plugins()
        import vllm.plugins as p

        p.plugins_loaded = False
        load_general_plugins()
        ours = [m for m in lines.lines if "ckpt-prefetch" in m]
        registered = [m for m in ours if "Registered model loader" in m]
        warned = [m for m in ours if "cannot hook" in m or "outside" in m]
        return len(registered) == 1 and not warned, f"{registered + warned}"

    check("plug-in registers once, no warning", plugins)

    def untouched() -> tuple[bool, str]:
        same = (
            default_loader.safetensors_weights_iterator is weight_utils.safetensors_weights_iterator
        )
        return same, f"default_loader.safetensors_weights_iterator is vLLM's own: {same}"

    check("default path untouched after registration", untouched)
    work = Path(tempfile.mkdtemp(prefix="vllm-source-check-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    model = work / "tiny"
    make_tiny_llama(model)
    reference: dict[str, Any] = {}
    for f in sorted(model.glob("*.safetensors")):
        reference.update(load_file(str(f)))
    want = digests(sorted(reference.items()))

    def load(config: LoadConfig, expert_ids: set[int] | None = None, path: Path = model) -> Any:
        loader = get_model_loader(config)
        loader.local_expert_ids = expert_ids
        return loader, dict(
            sorted(
                digests(
                    loader._get_weights_iterator(DefaultModelLoader.Source(str(path), None))
                ).items()
            )
        )

    def ours() -> tuple[bool, str]:
        lines.lines.clear()
        loader, got = load(LoadConfig(load_format="ckpt-prefetch"))
        started = any(m.startswith("ckpt-prefetch: vLLM loads") for m in lines.lines)
        return (
            type(loader).__name__ == "CkptPrefetchModelLoader" and got == want and started,
            f"{type(loader).__name__}, {len(got)} tensors identical: {got == want}, "
            f"ours: {started}",
        )

    check("ckpt-prefetch loader reads the same tensors", ours)
    check("default path untouched after a ckpt-prefetch load", untouched)

    def auto() -> tuple[bool, str]:
        _, got = load(LoadConfig(load_format="auto"))
        return got == want, f"{len(got)} tensors identical: {got == want}"

    check("auto reads the same tensors", auto)

    def shuffle() -> tuple[bool, str]:
        try:
            get_model_loader(
                LoadConfig(load_format="ckpt-prefetch", shuffle_safetensors_files=True)
            )
        except ValueError as exc:
            return "shuffle_safetensors_files" in str(exc), f"{type(exc).__name__}: {exc}"
        return False, "accepted"

    check("shuffle_safetensors_files is refused", shuffle)

    def eplb() -> tuple[bool, str]:
        from vllm.model_executor.model_loader.ep_weight_filter import compute_eplb_local_expert_ids

        experts = work / "experts"
        experts.mkdir()
        tensors = {f"model.layers.0.mlp.experts.{e}.w1.weight": torch.full((4, 4), float(e))
                   for e in range(8)}  # fmt: skip
        tensors["model.layers.0.mlp.gate.weight"] = torch.ones(8, 4)
        save_file(tensors, str(experts / "model.safetensors"))
        ids = compute_eplb_local_expert_ids(8, 2, 2, 0)
        _, theirs = load(LoadConfig(load_format="auto"), ids, experts)
        _, got = load(LoadConfig(load_format="ckpt-prefetch"), ids, experts)
        return (
            got == theirs and 0 < len(got) < len(tensors),
            f"EPLB ids {sorted(ids or ())}: ours {len(got)} tensors, vLLM's {len(theirs)}, "
            f"of {len(tensors)}; identical: {got == theirs}",
        )

    check("EPLB expert filter honoured", eplb)
    print(f"{'ALL PASSED' if not failed else 'FAILED: ' + ', '.join(failed)}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
