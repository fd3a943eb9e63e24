"""Checks of the vLLM plug-in against the real vLLM that need no engine; run as a subprocess.

Usage: python tests/_vllm_checks.py loader CHECKPOINT_DIR EXPERTS_DIR
       python tests/_vllm_checks.py ranks HOST_ID[,HOST_ID...] PORT

``loader`` loads the plug-in through vLLM's own plug-in loader (the entry point), then
drives vLLM's real model-loader classes on a checkpoint; ``ranks`` starts one process per
host id, joins them in vLLM's distributed state (gloo) and asks each for its local rank.
Each prints one line ``RESULT {json}``; a check that raised reports its error there, so
that the test names what failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any


class _Lines(logging.Handler):
    """Keeps the messages of the records it sees."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _digest(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    out = {}
    for name, tensor in pairs:
        data = tensor.contiguous().reshape(-1).view(dtype=__import__("torch").uint8)
        out[name] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    return out


def _check(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    try:
        results[name] = fn()
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}


def loader_checks(checkpoint: str, experts: str) -> dict[str, Any]:
    from safetensors.torch import load_file
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import DefaultModelLoader, get_model_loader, weight_utils
    from vllm.plugins import load_general_plugins

    lines = _Lines()
    for name in ("vllm", "loader_adapter", "engine"):
        logging.getLogger(name).addHandler(lines)
        logging.getLogger(name).setLevel(logging.INFO)

    results: dict[str, Any] = {}
    load_general_plugins()
    import vllm.plugins

    vllm.plugins.plugins_loaded = False  # a second load in the same process, as vLLM may do
    load_general_plugins()
    from loader_adapter.integrations import vllm as plugin

    plugin.register()
    results["registered_lines"] = [
        m for m in lines.lines if "ckpt-prefetch" in m and "egister" in m
    ]

    reference: dict[str, Any] = {}
    for f in sorted(os.listdir(checkpoint)):
        if f.endswith(".safetensors"):
            reference.update(load_file(os.path.join(checkpoint, f)))
    results["reference"] = _digest(sorted(reference.items()))

    def load(load_config: LoadConfig) -> dict[str, Any]:
        lines.lines.clear()
        loader = get_model_loader(load_config)
        source = DefaultModelLoader.Source(checkpoint, None)
        got = _digest(loader._get_weights_iterator(source))
        return {
            "class": type(loader).__name__,
            "digests": got,
            "ours": any(m.startswith("ckpt-prefetch: loading") for m in lines.lines),
            "vllm_prefetch": any(
                "Prefetching checkpoint files into page cache started" in m for m in lines.lines
            ),
            "report": [m for m in lines.lines if "planned=" in m],
        }

    _check(
        results,
        "ckpt_prefetch",
        lambda: load(
            LoadConfig(
                load_format="ckpt-prefetch",
                safetensors_load_strategy="prefetch",  # vLLM would start its own prefetch
                model_loader_extra_config={"window_bytes": "1GiB", "chunk_bytes": "1MiB"},
            )
        ),
    )
    _check(
        results,
        "auto",
        lambda: load(LoadConfig(load_format="auto", safetensors_load_strategy="prefetch")),
    )

    def replaced() -> dict[str, Any]:
        os.environ["CKPT_PREFETCH_VLLM_AUTO"] = "1"
        os.environ["CKPT_PREFETCH_OPTIONS"] = '{"concurrency": 2}'
        from loader_adapter.integrations import _vllm_loader

        _vllm_loader.install(replace_default=True)
        try:
            return {
                "prefetch": load(
                    LoadConfig(load_format="auto", safetensors_load_strategy="prefetch")
                ),
                "lazy": load(LoadConfig(load_format="auto", safetensors_load_strategy="lazy")),
            }
        finally:
            _vllm_loader.install(replace_default=False)

    _check(results, "replaced", replaced)

    def bad(extra: dict[str, Any], **config: Any) -> str:
        try:
            get_model_loader(
                LoadConfig(load_format="ckpt-prefetch", model_loader_extra_config=extra, **config)
            )
        except ValueError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "accepted"

    results["bad"] = {
        "unknown": bad({"windw": "1GiB"}),
        "type": bad({"concurrency": "many"}),
        "size": bad({"window_bytes": "lots"}),
        "multithread": bad({"enable_multithread_load": True}),
        "eager": bad({}, safetensors_load_strategy="eager"),
    }

    def experts_filter() -> dict[str, Any]:
        from loader_adapter.integrations._vllm_loader import load_safetensors

        files = sorted(os.path.join(experts, f) for f in os.listdir(experts))
        ours = sorted(n for n, _ in load_safetensors(files, {}, local_expert_ids={0, 2}))
        theirs = sorted(
            n
            for n, _ in weight_utils.safetensors_weights_iterator(
                files, False, "lazy", local_expert_ids={0, 2}
            )
        )
        return {"ours": ours, "vllm": theirs}

    _check(results, "experts", experts_filter)
    return results


def _rank_worker(rank: int, world: int, port: int, host: str, queue: Any) -> None:
    os.environ["CKPT_PREFETCH_HOST_ID"] = host
    from vllm.distributed import init_distributed_environment
    from vllm.distributed.parallel_state import destroy_distributed_environment

    from loader_adapter.integrations.vllm import vllm_local_rank

    init_distributed_environment(
        world_size=world,
        rank=rank,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        local_rank=rank,
        backend="gloo",
    )
    try:
        local = vllm_local_rank()
        queue.put((rank, local.rank, local.world, local.source))
    finally:
        destroy_distributed_environment()


def rank_checks(hosts: list[str], port: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_worker, args=(r, len(hosts), port, h, queue))
        for r, h in enumerate(hosts)
    ]
    for p in procs:
        p.start()
    found = {}
    for _ in procs:
        rank, local, world, source = queue.get(timeout=240)
        found[rank] = {"rank": local, "world": world, "source": source}
    for p in procs:
        p.join(60)
    return {
        "ranks": [found[r] for r in range(len(hosts))],
        "exitcodes": [p.exitcode for p in procs],
    }


def main() -> None:
    if sys.argv[1] == "loader":
        result = loader_checks(sys.argv[2], sys.argv[3])
    else:
        result = rank_checks(sys.argv[2].split(","), int(sys.argv[3]))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
