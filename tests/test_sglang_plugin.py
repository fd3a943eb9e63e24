"""The SGLang plug-in against the real SGLang package.

SGLang (0.5.23) does not install on this CPU-only machine with its dependencies (it pins
torch==2.14.1 and CUDA wheels), so scripts/setup.sh installs the package alone
(``--no-deps``). Its plug-in loader and hook registry import; its ``weight_utils`` module
does not (its package imports multimodal configs that need a torchvision built for our
torch). `tests/_engine_checks.py` then runs that module's real source statement by
statement, skipping the statements of that import chain, and SGLang's own
``load_plugins`` and ``HookRegistry`` patch it: the iterators called below are SGLang's
code, hooked by SGLang's registry. Everything runs in a subprocess.
"""

from __future__ import annotations

from typing import Any

import pytest
from serving_support import (
    free_port,
    make_tiny_llama,
    plugin_env,
    require_module,
    run_script,
)

pytestmark = pytest.mark.sglang

TARGET = "sglang.srt.model_loader.weight_utils."


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    require_module("sglang")
    return plugin_env(tmp_path_factory.mktemp("plugin-metadata"))


@pytest.fixture(scope="module")
def checks(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    checkpoint = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(checkpoint)
    result, log = run_script(["tests/_engine_checks.py", "sglang-hooks", str(checkpoint)], env)
    for key, value in result.items():
        if isinstance(value, dict) and "error" in value:
            pytest.fail(f"check {key!r} raised {value['error']}\n{value['trace']}\n{log[-3000:]}")
    return result


def test_entry_point_registers_around_hooks_once(checks: dict[str, Any]) -> None:
    assert checks["hooks"] == {
        TARGET + "safetensors_weights_iterator": [["around", "_plain"]],
        TARGET + "buffered_multi_thread_safetensors_weights_iterator": [["around", "_buffered"]],
    }
    assert checks["patched"] == sorted(checks["hooks"])
    assert all(checks["wrapped"].values())


def test_weight_utils_import_failure_is_the_known_one(checks: dict[str, Any]) -> None:
    # Where SGLang's weight_utils imports (a GPU machine), the hooks patch the real module;
    # here the import fails only for the reason the README gives.
    if checks["import_error"] is None:
        assert checks["skipped"] == []
    else:
        assert "torchvision" in checks["import_error"]


def test_without_the_flag_sglang_iterates_untouched(checks: dict[str, Any]) -> None:
    off = checks["plain_off"]
    assert off["digests"] == checks["reference"]
    assert off["lines"] == [] and off["sglang_prefetch"] == 0


def test_with_the_flag_our_iterator_replaces_sglangs_prefetch(checks: dict[str, Any]) -> None:
    on = checks["plain_on"]
    assert on["digests"] == checks["reference"]
    assert on["sglang_prefetch"] == 0
    assert on["lines"][0].startswith("ckpt-prefetch: SGLang loads 2 safetensors file(s)")
    assert "concurrency=2 (--weight-loader-prefetch-num-threads)" in on["lines"][0]
    assert "planned=" in on["lines"][-1] and "concurrency=2" in on["lines"][-1]
    # The spy sees SGLang's own prefetch when SGLang's unhooked iterator runs.
    assert checks["sglang_own"]["sglang_prefetch"] == 1
    assert checks["sglang_own"]["digests"] == checks["reference"]


@pytest.mark.parametrize("case", ["buffered_on", "plain_drop"])
def test_sglangs_other_paths_get_our_prefetch_beside_them(
    checks: dict[str, Any], case: str
) -> None:
    run = checks[case]
    assert run["digests"] == checks["reference"]
    assert run["sglang_prefetch"] == 0
    assert run["lines"][0].startswith("ckpt-prefetch: warming 2 file(s) beside SGLang's")
    assert "planned=" in run["lines"][-1]


def test_cluster_scope_in_the_options_reaches_each_iterator(checks: dict[str, Any]) -> None:
    plain, buffered = checks["plain_cluster"], checks["buffered_cluster"]
    for run in (plain, buffered):
        assert run["digests"] == checks["reference"] and run["sglang_prefetch"] == 0
    # No torch.distributed in this process: the cluster scope falls back, and says why.
    assert any("loads 2 safetensors file(s) through loader_adapter in the cluster scope" in x
               for x in plain["lines"]), plain["lines"]  # fmt: skip
    assert plain["lines"][-1].startswith("ckpt-prefetch: cluster scope fell back to node-local")
    # SGLang's buffered iterator reads the files itself: the node scope, with a warning.
    assert buffered["lines"][0].startswith("ckpt-prefetch: the cluster scope needs our iterator")
    assert "planned=" in buffered["lines"][-1]


@pytest.mark.slow
def test_local_rank_comes_from_sglangs_world_group(env: dict[str, str]) -> None:
    result, log = run_script(
        ["tests/_engine_checks.py", "sglang-ranks", "a,a,b", str(free_port())], env
    )
    assert result["exitcodes"] == [0, 0, 0], log[-3000:]
    source = "sglang world group"
    assert result["ranks"] == [
        {"rank": 0, "world": 2, "source": source},
        {"rank": 1, "world": 2, "source": source},
        {"rank": 0, "world": 1, "source": source},
    ]
