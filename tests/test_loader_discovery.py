"""Rank discovery: arguments, torchrun's environment, torch.distributed grouped by host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.checkpoint import make_checkpoint
from loader_adapter import HOST_ID_ENV, LocalRank, discover_local_rank, host_identity

ROOT = Path(__file__).resolve().parent.parent
_ENV_VARS = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", HOST_ID_ENV)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def test_arguments_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert discover_local_rank(1, 2) == LocalRank(1, 2, "arguments")


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert discover_local_rank() == LocalRank(3, 8, "environment")


def test_environment_needs_both(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    with caplog.at_level("WARNING"):
        assert discover_local_rank() == LocalRank(0, 1, "default")
    assert "only one of LOCAL_RANK and LOCAL_WORLD_SIZE is set (LOCAL_RANK)" in caplog.text


@pytest.mark.parametrize("prefetch", [True, "auto"])
def test_an_unusable_launcher_environment_loads_without_prefetch(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, prefetch
) -> None:
    """LOCAL_RANK=2 of LOCAL_WORLD_SIZE=2 is the launcher's mistake, not a reason to fail."""
    import torch
    from safetensors.torch import save_file

    from loader_adapter import safetensors_weights_iterator

    f = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(4.0), "b": torch.ones(2, 2)}, str(f))
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with caplog.at_level("WARNING"):
        got = dict(safetensors_weights_iterator([f], prefetch=prefetch))
    assert sorted(got) == ["a", "b"] and torch.equal(got["a"], torch.arange(4.0))
    assert "loading without prefetch" in caplog.text
    with pytest.raises(ValueError, match="rank"):  # the caller's own arguments still raise
        dict(safetensors_weights_iterator([f], prefetch=True, rank=2, world=2))


def test_default_single_process() -> None:
    assert discover_local_rank() == LocalRank(0, 1, "default")


@pytest.mark.parametrize(
    ("rank", "world", "match"),
    [(1, None, "both"), (None, 2, "both"), (2, 2, "rank"), (0, 0, "rank"), (-1, 2, "rank"),
     (True, 2, "integer"), (0, 1.5, "integer")],
)  # fmt: skip
def test_invalid_arguments(rank: object, world: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        discover_local_rank(rank, world)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rank", "world"), [("x", "4"), ("5", "4"), ("1", "zero")])
def test_invalid_environment(monkeypatch: pytest.MonkeyPatch, rank: str, world: str) -> None:
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", world)
    with pytest.raises(ValueError, match=r"LOCAL_|rank"):
        discover_local_rank()


def test_host_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    assert host_identity() == socket.gethostname()
    monkeypatch.setenv(HOST_ID_ENV, "nodeA")
    assert host_identity() == "nodeA"
    monkeypatch.setenv(HOST_ID_ENV, "")
    assert host_identity() == socket.gethostname()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_torch_distributed_gloo_two_fake_nodes(tmp_path: Path) -> None:
    """4 gloo processes posing as 2 nodes: global ranks 0,2 on nodeA and 1,3 on nodeB."""
    info = make_checkpoint(tmp_path / "ck", size_bytes=2 << 20, shards=3)
    hosts = ["nodeA", "nodeB", "nodeA", "nodeB"]
    port = _free_port()
    procs = []
    for rank, host in enumerate(hosts):
        env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS}
        env.update(
            {
                HOST_ID_ENV: host,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "GLOO_SOCKET_IFNAME": "lo",
                "OMP_NUM_THREADS": "1",
            }
        )
        cmd = [
            sys.executable,
            str(ROOT / "tests" / "_dist_worker.py"),
            str(rank),
            str(len(hosts)),
            str(port),
            str(info.directory),
            str(tmp_path / f"rank{rank}.json"),
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=150)
            outputs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(len(hosts))]
    expected = [(0, 2), (0, 2), (1, 2), (1, 2)]  # position among the same host's ranks
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["source"]) == (*expected[r], "torch.distributed")
        assert (res["report_rank"], res["report_world"]) == expected[r]
        assert res["tensors"] == info.tensor_count
    assert len({res["digest"] for res in results}) == 1
