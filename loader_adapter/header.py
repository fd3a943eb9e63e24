"""The safetensors header: which tensors a file holds and where their bytes lie.

A safetensors file starts with an 8-byte little-endian header length, then that many bytes
of JSON: ``{"name": {"dtype": ..., "shape": [...], "data_offsets": [start, end]}, ...}``
with offsets relative to the end of the header, and an optional ``"__metadata__"`` map.
Only the header is read; no torch, no safetensors package.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

__all__ = ["MAX_HEADER_BYTES", "SafetensorsHeader", "TensorSpan", "read_header"]

#: The largest header accepted (safetensors itself refuses more than 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True, slots=True)
class TensorSpan:
    """One tensor of a safetensors file.

    Attributes:
        name: the tensor's name.
        dtype: its safetensors dtype (``"F32"``, ``"BF16"``, ...).
        shape: its shape.
        start: absolute file offset of its first byte.
        end: absolute file offset just past its last byte.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file.

    Attributes:
        data_start: file offset of the data section (8 + the header's length).
        tensors: every tensor, by data offset (then end, then name).
        metadata: the ``"__metadata__"`` map (empty when absent).
    """

    data_start: int
    tensors: tuple[TensorSpan, ...]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and parse the header of the safetensors file at `path`.

    Args:
        path: a safetensors file.

    Returns:
        The header, with the tensors in the order of their bytes in the file.

    Raises:
        OSError: the file cannot be read.
        ValueError: the header is truncated, too large, not JSON, or malformed.

    Example:
        >>> import tempfile, torch, safetensors.torch as st
        >>> p = tempfile.mkdtemp() + "/x.safetensors"
        >>> st.save_file({"b": torch.zeros(2), "a": torch.zeros(1, dtype=torch.int8)}, p)
        >>> [(t.name, t.nbytes) for t in read_header(p).tensors]
        [('b', 8), ('a', 1)]
    """
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{os.fspath(path)}: too short for a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{os.fspath(path)}: header length {n} is too large")
        raw = f.read(n)
    if len(raw) != n:
        raise ValueError(f"{os.fspath(path)}: header truncated ({len(raw)} of {n} bytes)")
    try:
        return _parse(json.loads(raw), 8 + n)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{os.fspath(path)}: malformed safetensors header: {exc}") from exc


def _parse(doc: dict[str, object], base: int) -> SafetensorsHeader:
    metadata = doc.get("__metadata__") or {}
    tensors = []
    for name, info in doc.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]  # type: ignore[index]
        tensors.append(
            TensorSpan(
                name,
                str(info["dtype"]),  # type: ignore[index]
                tuple(int(d) for d in info["shape"]),  # type: ignore[index]
                base + int(start),
                base + int(end),
            )
        )
    tensors.sort(key=lambda t: (t.start, t.end, t.name))
    return SafetensorsHeader(base, tuple(tensors), dict(metadata))  # type: ignore[arg-type]
