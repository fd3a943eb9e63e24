"""Checks of the engine plug-ins against the real vLLM and SGLang; run as a subprocess.

Usage: python tests/_engine_checks.py vllm-loader CHECKPOINT_DIR EXPERTS_DIR [MOE_DIR]
       python tests/_engine_checks.py vllm-hidden   (with CKPT_TEST_HIDE set)
       python tests/_engine_checks.py sglang-hooks CHECKPOINT_DIR
       python tests/_engine_checks.py {vllm,sglang}-ranks HOST_ID[,HOST_ID...] PORT

``vllm-loader`` loads the plug-in through vLLM's own plug-in loader (the entry point),
then drives vLLM's real model-loader classes on a checkpoint. ``sglang-hooks`` loads it
through SGLang's ``load_plugins`` and calls SGLang's iterators, hooked. ``*-ranks`` starts
one process per host id, joins them in the engine's distributed state (gloo) and asks each
for its local rank. Each prints one line ``RESULT {json}``; a check that raised reports
its error there, so that the test names what failed. No engine is started: vLLM's and
SGLang's imports change process-wide state, hence the subprocess.
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


def vllm_loader_checks(checkpoint: str, experts: str, moe: str | None = None) -> dict[str, Any]:
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
    from loader_adapter.integrations import _vllm_loader

    _vllm_loader.install(replace_default=False)  # the layer below register(): idempotent too
    results["registered_lines"] = [
        m for m in lines.lines if "ckpt-prefetch" in m and "egister" in m
    ]
    results["warnings"] = [m for m in lines.lines if "cannot hook" in m or "outside" in m]
    from vllm.model_executor.model_loader import default_loader

    def untouched() -> bool:
        return (
            default_loader.safetensors_weights_iterator is weight_utils.safetensors_weights_iterator
        )

    results["untouched_after_register"] = untouched()

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
            "ours": any(m.startswith("ckpt-prefetch: vLLM loads") for m in lines.lines),
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
    results["untouched_after_ours"] = untouched()
    _check(
        results,
        "auto",
        lambda: load(LoadConfig(load_format="auto", safetensors_load_strategy="prefetch")),
    )

    def env_merged() -> dict[str, Any]:
        os.environ["CKPT_PREFETCH_OPTIONS"] = '{"concurrency": 2, "skip_cached": false}'
        try:
            config = LoadConfig(
                load_format="ckpt-prefetch", model_loader_extra_config={"concurrency": 3}
            )
            out = load(config)
        finally:
            del os.environ["CKPT_PREFETCH_OPTIONS"]
        out["start"] = [m for m in lines.lines if m.startswith("ckpt-prefetch: vLLM loads")]
        return out

    _check(results, "env_merged", env_merged)

    def cluster() -> dict[str, Any]:
        config = {"scope": "cluster", "replica_dir": "/tmp", "exchange_timeout_s": 30}
        out = load(LoadConfig(load_format="ckpt-prefetch", model_loader_extra_config=config))
        out["cluster_lines"] = [m for m in lines.lines if "cluster scope" in m]
        return out

    _check(results, "cluster", cluster)

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
            del os.environ["CKPT_PREFETCH_VLLM_AUTO"], os.environ["CKPT_PREFETCH_OPTIONS"]

    _check(results, "replaced", replaced)
    results["untouched_after_replace_off"] = untouched()

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

    def experts_on_two_nodes() -> dict[str, Any]:
        # Expert parallelism across two nodes of one rank each: every node mounts the
        # store itself (its own page cache); vLLM's own filter chooses the experts.
        from bench.netfs import mounted
        from loader_adapter.integrations._vllm_loader import load_safetensors

        if moe is None:
            return {}
        out: dict[str, Any] = {"total": 0, "nodes": []}
        for ids in ({0, 1}, {2, 3}):
            with mounted(moe, profile="local-fuse", read_ahead_kb=128) as fs:
                files = sorted(str(p) for p in fs.path.glob("*.safetensors"))
                out["total"] = sum(os.path.getsize(f) for f in files)
                fs.evict()
                fs.reset_counters()
                # Every tensor is used (summed), as a loader copies it to the GPU.
                ours = {
                    n: float(t.double().sum())
                    for n, t in load_safetensors(files, {}, local_expert_ids=ids)
                }
                served = fs.counters().bytes_served
                theirs = {
                    n: float(t.double().sum())
                    for n, t in weight_utils.safetensors_weights_iterator(
                        files, False, "lazy", local_expert_ids=ids
                    )
                }
            out["nodes"].append({"ours": ours, "vllm": theirs, "served": served})
        return out

    _check(results, "experts_two_nodes", experts_on_two_nodes)

    def pipeline_stage() -> dict[str, Any]:
        # The second of two pipeline stages, built as vLLM builds it: its first layer and
        # the embedding are vLLM's PPMissingLayer. vLLM's real loader path (get_all_weights).
        import types

        import torch
        from vllm.model_executor.models.utils import PPMissingLayer, is_pp_missing_parameter

        model = torch.nn.Module()
        model.model = torch.nn.Module()
        model.model.embed_tokens = PPMissingLayer()
        model.model.layers = torch.nn.ModuleList([PPMissingLayer(), torch.nn.Linear(1, 1)])
        loader = get_model_loader(LoadConfig(load_format="ckpt-prefetch"))
        config = types.SimpleNamespace(model=checkpoint, revision=None)
        ours = sorted(n for n, _ in loader.get_all_weights(config, model))
        every = sorted(n for n, _ in loader.get_all_weights(config, torch.nn.Module()))
        return {
            "ours": ours,
            "vllm": [n for n in every if not is_pp_missing_parameter(n, model)],
            "every": every,
        }

    _check(results, "pipeline_stage", pipeline_stage)
    return results


def vllm_hidden_checks() -> dict[str, Any]:
    """With one of vLLM's internals hidden (``CKPT_TEST_HIDE``): the plug-in's entry point
    must not raise, must warn once, must leave ``auto`` working and make
    ``ckpt-prefetch`` fail with the reason."""
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.plugins import load_general_plugins

    lines = _Lines()
    for name in ("vllm", "loader_adapter", "engine"):
        logging.getLogger(name).addHandler(lines)
        logging.getLogger(name).setLevel(logging.INFO)
    results: dict[str, Any] = {}
    _check(results, "plugins", load_general_plugins)
    import vllm.plugins

    vllm.plugins.plugins_loaded = False
    _check(results, "plugins_again", load_general_plugins)
    results["warnings"] = [m for m in lines.lines if "cannot hook" in m]
    results["auto"] = type(get_model_loader(LoadConfig(load_format="auto"))).__name__
    try:
        get_model_loader(LoadConfig(load_format="ckpt-prefetch"))
        results["ours"] = "accepted"
    except Exception as exc:
        results["ours"] = f"{type(exc).__name__}: {exc}"
    return results


def _local_rank(engine: str) -> Any:
    if engine == "vllm":
        from loader_adapter.integrations.vllm import vllm_local_rank

        return vllm_local_rank()
    from loader_adapter.integrations.sglang import sglang_local_rank

    return sglang_local_rank()


def _rank_worker(engine: str, rank: int, world: int, port: int, host: str, queue: Any) -> None:
    os.environ["CKPT_PREFETCH_HOST_ID"] = host
    if engine == "vllm":
        from vllm.distributed import init_distributed_environment
        from vllm.distributed.parallel_state import destroy_distributed_environment as done
    else:
        from sglang.srt.distributed.parallel_state import init_distributed_environment
        from torch.distributed import destroy_process_group as done
    init_distributed_environment(
        world_size=world,
        rank=rank,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        local_rank=rank,
        backend="gloo",
    )
    try:
        local = _local_rank(engine)
        queue.put((rank, local.rank, local.world, local.source))
    finally:
        done()


def rank_checks(engine: str, hosts: list[str], port: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_worker, args=(engine, r, len(hosts), port, h, queue))
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
    ranks = [found[r] for r in range(len(hosts))]
    return {"ranks": ranks, "exitcodes": [p.exitcode for p in procs]}


def _sglang_weight_utils() -> tuple[Any, str | None, list[str]]:
    """SGLang's ``weight_utils``: imported, or else executed statement by statement.

    On a CPU-only machine the import fails (its package imports multimodal configs that
    need a torchvision matching torch, see the README). Its source is then run one
    top-level statement at a time, skipping those that raise (imports of the GPU-only
    chain and the definitions that name them), and put in ``sys.modules`` under its name
    (with its package, not imported, pointing at the real directory), so that SGLang's
    ``HookRegistry`` resolves and patches it as it would the imported module.

    Returns:
        (module, the import error or None, the skipped statements).
    """
    import ast
    import importlib
    import importlib.util
    import types

    name = "sglang.srt.model_loader.weight_utils"
    try:
        return importlib.import_module(name), None, []
    except ImportError as exc:
        error = f"{type(exc).__name__}: {exc}"
    srt = importlib.util.find_spec("sglang.srt")
    assert srt is not None and srt.submodule_search_locations
    package_dir = os.path.join(next(iter(srt.submodule_search_locations)), "model_loader")
    package = types.ModuleType("sglang.srt.model_loader")
    package.__path__ = [package_dir]
    sys.modules[package.__name__] = package
    path = os.path.join(package_dir, "weight_utils.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    module = types.ModuleType(name)
    module.__file__ = path
    sys.modules[name] = module
    package.weight_utils = module  # type: ignore[attr-defined]
    skipped = []
    for node in tree.body:
        try:
            exec(compile(ast.Module([node], []), path, "exec"), module.__dict__)
        except Exception as exc:
            skipped.append(f"line {node.lineno}: {type(exc).__name__}: {exc}")
    return module, error, skipped


def sglang_hook_checks(checkpoint: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    wu, import_error, skipped = _sglang_weight_utils()
    results: dict[str, Any] = {"import_error": import_error, "skipped": skipped}
    lines = _Lines()
    for name in ("loader_adapter", "engine"):
        logging.getLogger(name).addHandler(lines)
        logging.getLogger(name).setLevel(logging.INFO)
    sglang_prefetches: list[int] = []
    real_prefetch = wu._prefetch_all_checkpoints

    def spy(*args: Any, **kwargs: Any) -> Any:
        sglang_prefetches.append(1)
        return real_prefetch(*args, **kwargs)

    wu._prefetch_all_checkpoints = spy

    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    load_plugins()  # our entry point registers, then SGLang applies the hooks
    from loader_adapter.integrations import sglang as plugin

    plugin.register()  # again: nothing more

    def hooks() -> dict[str, Any]:
        return {
            target: [(t.value, h.__qualname__) for t, h, _ in HookRegistry._hooks.get(target, [])]
            for target in plugin.HOOKS
        }

    results["hooks"] = hooks()
    results["patched"] = sorted(t for t in plugin.HOOKS if t in HookRegistry._patched)
    results["wrapped"] = {
        fn: getattr(getattr(wu, fn), "__wrapped__", None) is not None
        for fn in (
            "safetensors_weights_iterator",
            "buffered_multi_thread_safetensors_weights_iterator",
        )
    }

    files = sorted(
        os.path.join(checkpoint, f) for f in os.listdir(checkpoint) if f.endswith(".safetensors")
    )
    reference: dict[str, Any] = {}
    for f in files:
        reference.update(load_file(f))
    results["reference"] = _digest(sorted(reference.items()))

    def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        lines.lines.clear()
        sglang_prefetches.clear()
        digests = _digest(fn(files, *args, **kwargs))
        return {
            "digests": digests,
            "sglang_prefetch": len(sglang_prefetches),
            "lines": [m for m in lines.lines if m.startswith("ckpt-prefetch")],
        }

    plain, buffered = (
        wu.safetensors_weights_iterator,
        wu.buffered_multi_thread_safetensors_weights_iterator,
    )
    _check(results, "plain_off", lambda: run(plain))
    _check(results, "plain_on", lambda: run(plain, prefetch=True, prefetch_num_threads=2))
    _check(
        results,
        "plain_drop",
        lambda: run(plain, prefetch=True, prefetch_num_threads=2, drop_cache_after_load=True),
    )
    _check(results, "buffered_on", lambda: run(buffered, 2, prefetch=True, prefetch_num_threads=3))
    os.environ["CKPT_PREFETCH_OPTIONS"] = json.dumps({"scope": "cluster", "replica_dir": "/tmp"})
    try:  # no torch.distributed here: the cluster scope falls back to node-local, and says so
        _check(results, "plain_cluster", lambda: run(plain, prefetch=True))
        _check(results, "buffered_cluster", lambda: run(buffered, 2, prefetch=True))
    finally:
        del os.environ["CKPT_PREFETCH_OPTIONS"]
    # SGLang's own, unhooked: shows that the spy sees SGLang's prefetch when it runs.
    _check(results, "sglang_own", lambda: run(plain.__wrapped__, prefetch=True))
    return results


def main() -> None:
    command = sys.argv[1]
    if command == "vllm-hidden":
        result = vllm_hidden_checks()
    elif command == "vllm-loader":
        result = vllm_loader_checks(sys.argv[2], sys.argv[3], *sys.argv[4:5])
    elif command == "sglang-hooks":
        result = sglang_hook_checks(sys.argv[2])
    else:
        engine = command.removesuffix("-ranks")
        result = rank_checks(engine, sys.argv[2].split(","), int(sys.argv[3]))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
