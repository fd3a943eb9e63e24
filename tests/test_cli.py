"""`ckpt-prefetch warm|status|evict`: exit codes, JSON, usage errors, interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engine import evict, resident_bytes
from engine.cli import main

MiB = 1 << 20


def test_warm_directory_then_status_then_evict(make_file, tmp_path, capsys):
    a = make_file("ckpt/model-00001-of-00002.safetensors", 3 * MiB)
    b = make_file("ckpt/model-00002-of-00002.safetensors", 2 * MiB)
    make_file("ckpt/README.bin", MiB)  # not matched by the default pattern
    assert main(["warm", str(tmp_path / "ckpt"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["planned_bytes"] == 5 * MiB and doc["files"] == 2 and doc["failures"] == []
    assert resident_bytes(a) == 3 * MiB and resident_bytes(b) == 2 * MiB

    assert main(["status", str(tmp_path / "ckpt"), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["total_bytes"] == st["resident_bytes"] == 5 * MiB

    assert main(["evict", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert resident_bytes(a) == 0 and resident_bytes(b) == 0


def test_warm_with_failures_exits_1_and_lists_them(make_file, tmp_path, capsys):
    good = make_file("g.safetensors", MiB)
    assert main(["warm", str(good), str(tmp_path / "missing.safetensors")]) == 1
    captured = capsys.readouterr()
    assert "warmed" in captured.out
    assert "missing.safetensors" in captured.err and "ENOENT" in captured.err


def test_rank_world_from_environment(make_file, monkeypatch, capsys):
    path = make_file("r.safetensors", 4 * MiB)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main(["warm", str(path), "--chunk", "1MiB", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["rank"], doc["world"], doc["planned_bytes"]) == (1, 2, 2 * MiB)


@pytest.mark.parametrize(
    "argv",
    [
        ["warm", "x", "--rank", "2", "--world", "2"],
        ["warm", "x", "--world", "0"],
        ["warm", "x", "--concurrency", "0"],
        ["warm", "x", "--chunk", "12"],
        ["warm", "x", "--chunk", "lots"],
        ["warm", "x", "--backend", "magic"],
        ["warm", "x", "--strategy", "magic"],
        ["warm"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_help_lists_every_flag(capsys):
    assert main(["warm", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--rank", "--world", "--strategy", "--backend", "--concurrency", "--chunk",
                 "--no-skip-cached", "--order", "--pattern", "--json", "--quiet"):  # fmt: skip
        assert flag in out


def test_ctrl_c_exits_130_with_a_partial_summary(tmp_path):
    """SIGINT while warming: exit 130 promptly, with the summary of what was done."""
    files = []
    for i in range(8):
        p = tmp_path / f"s{i}.safetensors"
        p.write_bytes(os.urandom(4 * MiB))
        files.append(str(p))
    for p in files:
        evict(p)
    # One slow stream: 8 x 4 MiB at 64 KiB per read with fadvise off keeps it busy.
    # A shell that starts a command in the background (`cmd &`) has it ignore SIGINT, and
    # Python then installs no KeyboardInterrupt: restore the default, as a terminal has it.
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import sys, time, engine.backends as b\n"
        "orig = b.PreadBackend.read_into_cache\n"
        "def slow(self, fd, off, n):\n"
        "    time.sleep(0.2)\n"
        "    return orig(self, fd, off, n)\n"
        "b.PreadBackend.read_into_cache = slow\n"
        "from engine.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "warm", "--backend", "pread", "--concurrency", "1",
         "--chunk", "1MiB", "--quiet", "--no-skip-cached", *files],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )  # fmt: skip
    time.sleep(1.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < 5
    assert "interrupted" in out
    assert "MiB still being read" in out  # the read running at the interrupt, not lost


def test_bad_rank_in_environment_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "abc")
    assert main(["warm", "/etc/hostname"]) == 2
    assert "invalid int value" in capsys.readouterr().err


def test_directory_follows_its_index_like_the_loader(make_file, tmp_path, capsys):
    import json as _json

    make_file("d/model-00001-of-00002.safetensors", MiB)
    make_file("d/model-00002-of-00002.safetensors", MiB)
    make_file("d/consolidated.safetensors", 3 * MiB)  # not in the index: not loaded
    (tmp_path / "d" / "model.safetensors.index.json").write_text(
        _json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                    "b": "model-00002-of-00002.safetensors"}})
    )  # fmt: skip
    assert main(["warm", str(tmp_path / "d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["planned_bytes"] == 2 * MiB
    make_file("d/sub/extra.bin", MiB)
    assert main(["warm", str(tmp_path / "d"), "--pattern", "*.bin", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["planned_bytes"] == MiB


def test_concurrency_auto_and_explicit(make_file, capsys):
    path = make_file("c.safetensors", MiB)
    assert main(["warm", str(path), "--concurrency", "auto", "--world", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["concurrency"] == 2
    assert main(["warm", str(path), "--concurrency", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["concurrency"] == 3
    assert main(["warm", str(path), "--concurrency", "many"]) == 2
