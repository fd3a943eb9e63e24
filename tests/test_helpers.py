"""The helpers engine and loader share: mount table, read-ahead, sizes, safetensors header."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from engine.mounts import (
    Mount,
    mount_of,
    mount_points,
    parse_mountinfo,
    read_ahead_bytes,
    read_ahead_kb,
    read_ahead_path,
    read_mountinfo,
    unescape_mount_field,
)
from engine.units import format_bytes, format_size, parse_size
from loader_adapter.header import read_header

LINES = (
    b"22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    b"30 22 0:40 / /mnt/my\\040disk rw - tmpfs none rw,size=1k\n"
    b"31 22 0:41 / /mnt/caf\\351 rw - fuse.sshfs user@host:/x rw\n"
    b"32 22 0:42 / /mnt/caf\xc3\xa9/tab\\011and\\134back rw shared:7 master:2 - nfs4 srv:/e rw\n"
    b"33 22 0:43 /sub /mnt/raw\xe9 ro - xfs /dev/vdb rw\n"
    b"garbage line without separator\n"
    b"34 22 0:44 / /mnt/my\\040disk rw - ramfs again rw\n"
)


def test_mountinfo_fields_are_unescaped_byte_by_byte() -> None:
    mounts = parse_mountinfo(LINES)
    assert [m.mount_point for m in mounts] == [
        "/",
        "/mnt/my disk",
        os.fsdecode(b"/mnt/caf\xe9"),  # \351 is the byte 0xE9, not the code point U+00E9
        "/mnt/café/tab\tand\\back",
        os.fsdecode(b"/mnt/raw\xe9"),  # the kernel leaves non-ASCII bytes unescaped
        "/mnt/my disk",
    ]
    assert os.fsencode(mounts[2].mount_point) == b"/mnt/caf\xe9"
    assert mounts[2].fstype == "fuse.sshfs" and mounts[2].source == "user@host:/x"
    assert mounts[3].fstype == "nfs4" and mounts[3].options == "rw"
    assert mounts[4].root == "/sub" and mounts[4].device == os.makedev(0, 43)
    assert unescape_mount_field(b"a\\040b\\134c") == "a b\\c"


def test_mount_of_takes_the_longest_and_the_last_mount_point() -> None:
    mounts = parse_mountinfo(LINES)
    assert mount_of("/mnt/my disk/x/y", mounts).fstype == "ramfs"  # mounted over tmpfs
    assert mount_of("/mnt/my diskette", mounts).fstype == "ext4"  # not under "/mnt/my disk"
    assert mount_of(os.fsdecode(b"/mnt/caf\xe9/model.safetensors"), mounts).fstype == "fuse.sshfs"
    assert mount_of("/mnt/café/tab\tand\\back/f", mounts).fstype == "nfs4"
    assert mount_of("/etc", [Mount("/mnt", "x", "y")]) is None


def test_the_real_mount_table(tmp_path: Path) -> None:
    mounts = read_mountinfo()
    assert "/" in mount_points() and any(m.mount_point == "/proc" for m in mounts)
    assert mount_of("/proc/self/status").fstype == "proc"
    assert mount_of("/dev/shm").fstype == "tmpfs"
    assert mount_of(tmp_path) is not None


def test_read_ahead(tmp_path: Path) -> None:
    dev = os.stat(tmp_path).st_dev
    assert read_ahead_bytes(dev) >= 4096
    kb = read_ahead_kb(dev)
    assert kb is None or read_ahead_bytes(dev) == (kb << 10 or 128 << 10)
    assert read_ahead_path(os.makedev(259, 3)) == "/sys/class/bdi/259:3/read_ahead_kb"
    assert read_ahead_kb(os.makedev(4095, 1048575)) is None  # no such device
    assert read_ahead_bytes(os.makedev(4095, 1048575)) == 128 << 10


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_is_parsed_back_to_four_digits(n: int) -> None:
    text = format_size(n)
    assert " " not in text
    back = parse_size(text)
    assert abs(back - n) <= n * 5e-4 + 1
    if n < 1024:
        assert back == n


def test_format_bytes_and_format_size() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 << 30) == "3.00 GiB"
    assert format_size(0) == "0B"
    assert format_size(1 << 40) == "1TiB"
    assert format_size(1536 << 20) == "1.5GiB"


def _write(path: Path, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def test_header_matches_safetensors(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    tensors = {
        "z": torch.zeros(3, 5, dtype=torch.bfloat16),
        "a": torch.ones(7, dtype=torch.int8),
        "empty": torch.zeros(0),
    }
    save_file(tensors, p, metadata={"format": "pt"})
    h = read_header(p)
    assert h.metadata == {"format": "pt"}
    assert [t.start for t in h.tensors] == sorted(t.start for t in h.tensors)
    with safe_open(p, framework="pt") as f:
        assert {t.name for t in h.tensors} == set(f.keys())
    by_name = {t.name: t for t in h.tensors}
    assert by_name["z"].dtype == "BF16" and by_name["z"].shape == (3, 5)
    assert by_name["z"].nbytes == 30 and by_name["empty"].nbytes == 0
    raw = p.read_bytes()
    a = by_name["a"]
    assert raw[a.start : a.end] == bytes([1] * 7)
    assert h.data_start == 8 + struct.unpack("<Q", raw[:8])[0]


@pytest.mark.parametrize(
    "content",
    [
        b"\x01\x02",  # shorter than the length prefix
        struct.pack("<Q", 100) + b"{}",  # truncated
        struct.pack("<Q", 1 << 40),  # absurd length
        struct.pack("<Q", 5) + b"{oops",  # not JSON
        struct.pack("<Q", 2) + b"[]",  # not an object
        b'{"t": {"dtype": "F32", "shape": [1]}}',  # no data_offsets
    ],
)
def test_bad_headers_raise_value_error(tmp_path: Path, content: bytes) -> None:
    if content.startswith(b"{"):
        content = struct.pack("<Q", len(content)) + content
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(ValueError):
        read_header(p)


def test_header_of_a_hand_written_file(tmp_path: Path) -> None:
    doc = {"b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]},
           "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}  # fmt: skip
    p = _write(tmp_path / "h.safetensors", json.dumps(doc).encode())
    h = read_header(p)
    assert [(t.name, t.start - h.data_start, t.end - h.data_start) for t in h.tensors] == [
        ("a", 0, 2),
        ("b", 2, 4),
    ]
    assert h.metadata == {}
