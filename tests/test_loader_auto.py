"""prefetch="auto": on for network/FUSE filesystems, off for local disks and tmpfs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

import loader_adapter.iterator as iterator_mod
from bench.checkpoint import make_checkpoint
from loader_adapter import (
    decide_auto,
    filesystem_type,
    load_state_dict,
    safetensors_weights_iterator,
)
from loader_adapter.fsdetect import (
    LOCAL_FILESYSTEMS,
    NETWORK_FILESYSTEMS,
    mem_available_bytes,
    mount_fstype,
)

MiB = 1 << 20


def _auto_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "loader_adapter.fsdetect" and r.levelno == logging.INFO
    ]


def test_known_magic_numbers() -> None:
    expected = {
        0x6969: "nfs",
        0x0BD00BD0: "lustre",
        0x47504653: "gpfs",
        0xFF534D42: "cifs",
        0xFE534D42: "smb2",
        0x00C36400: "ceph",
        0x01021997: "9p",
        0x19830326: "beegfs",
        0x65735546: "fuse",
    }
    for magic, name in expected.items():
        assert NETWORK_FILESYSTEMS[magic] == name
    assert not set(NETWORK_FILESYSTEMS) & set(LOCAL_FILESYSTEMS)


def test_statfs_of_this_machine(tmp_path: Path) -> None:
    assert filesystem_type("/proc") == 0x9FA0
    assert filesystem_type("/dev/shm") == 0x01021994
    assert filesystem_type(tmp_path) in LOCAL_FILESYSTEMS
    with pytest.raises(FileNotFoundError):
        filesystem_type(tmp_path / "missing")
    assert mount_fstype("/dev/shm") == "tmpfs"


def test_auto_off_on_local_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        decision = decide_auto([str(tmp_path / "x.safetensors")], 3 << 30)
    assert not decision.enabled
    (line,) = _auto_lines(caplog)
    assert line.startswith("prefetch=auto -> off")
    assert "checkpoint 3.0 GiB" in line and "MemAvailable" in line
    assert decision.filesystem in line


def test_auto_off_on_tmpfs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        decision = decide_auto(["/dev/shm/model.safetensors"], 1 << 20)
    assert not decision.enabled
    assert decision.filesystem == "tmpfs"
    assert decision.f_type == 0x01021994
    assert "tmpfs" in _auto_lines(caplog)[0]


@pytest.mark.parametrize("magic", sorted(NETWORK_FILESYSTEMS))
def test_auto_on_for_network_filesystems(magic: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        decision = decide_auto(
            ["/mnt/ckpt/a.safetensors", "/mnt/ckpt/b.safetensors"],
            42 << 30,
            statfs=lambda _: magic,
            fstype=lambda _: None,
            mem_available=lambda: 100 << 30,
        )
    assert decision.enabled
    assert decision.filesystem == NETWORK_FILESYSTEMS[magic]
    (line,) = _auto_lines(caplog)
    assert line.startswith("prefetch=auto -> on")
    assert "checkpoint 42.0 GiB" in line and "MemAvailable 100.0 GiB" in line
    assert f"0x{magic:x}" in line


def test_auto_on_when_any_directory_is_remote() -> None:
    types = {"/local": 0xEF53, "/remote": 0x6969}
    decision = decide_auto(
        ["/local/a.safetensors", "/remote/b.safetensors"],
        1,
        statfs=lambda d: types[d],
        fstype=lambda d: "nfs4" if d == "/remote" else "ext4",
    )
    assert decision.enabled and decision.filesystem == "nfs4"


def test_auto_unknown_filesystem_is_off() -> None:
    def failing(_: str) -> int:
        raise PermissionError(13, "denied")

    assert not decide_auto(["/x/a"], 1, statfs=lambda _: 0x12345678, fstype=lambda _: None).enabled
    assert not decide_auto(["/x/a"], 1, statfs=failing, fstype=lambda _: None).enabled


def _run_auto(files: list[Path], monkeypatch: pytest.MonkeyPatch, magic: int | None) -> list:
    started: list = []
    real = iterator_mod.start_prefetch

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(iterator_mod, "start_prefetch", spy)
    if magic is not None:
        real_decide = iterator_mod.decide_auto
        monkeypatch.setattr(
            iterator_mod,
            "decide_auto",
            lambda paths, total: real_decide(paths, total, statfs=lambda _: magic),
        )
    got = [(n, t.clone()) for n, t in safetensors_weights_iterator(files, prefetch="auto")]
    ref = {}
    for p in files:
        ref.update(load_file(p))
    assert [n for n, _ in got] and {n for n, _ in got} == set(ref)
    return started


def test_iterator_auto_local_disk_no_prefetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = make_checkpoint(tmp_path, size_bytes=MiB, shards=2)
    assert _run_auto(info.files, monkeypatch, None) == []


def test_iterator_auto_tmpfs_no_prefetch(monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("/dev/shm not writable")
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        info = make_checkpoint(d, size_bytes=MiB, shards=2)
        assert _run_auto(info.files, monkeypatch, None) == []


def test_iterator_auto_network_prefetches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    info = make_checkpoint(tmp_path, size_bytes=MiB, shards=2)
    with caplog.at_level(logging.INFO):
        started = _run_auto(info.files, monkeypatch, 0x6969)
    assert len(started) == 1 and started[0].done
    assert any("prefetch=auto -> on" in line for line in _auto_lines(caplog))


def test_window_auto_is_passed_to_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = make_checkpoint(tmp_path, size_bytes=MiB, shards=2)
    calls: list[dict] = []
    real = iterator_mod.start_prefetch

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(iterator_mod, "start_prefetch", spy)
    list(safetensors_weights_iterator(info.files, prefetch=True))
    list(safetensors_weights_iterator(info.files, prefetch=True, window_bytes=None))
    list(safetensors_weights_iterator(info.files, prefetch=True, window_bytes=4 * MiB))
    load_state_dict(info.files, prefetch=True)
    assert [c["options"].window_bytes for c in calls] == ["auto", None, 4 * MiB, None]


def test_mem_available_is_this_machine_s_available_memory() -> None:
    # /proc/meminfo exists here: the answer is known, and it is MemAvailable (in bytes, not
    # KiB), never more than the machine's memory.
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
    got = mem_available_bytes()
    assert got is not None
    assert 0 < got <= fields["MemTotal"]
    assert abs(got - fields["MemAvailable"]) < 0.25 * fields["MemTotal"]  # moments apart
