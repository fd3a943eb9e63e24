"""The rank's consumer: copy every tensor into the rank's own memory and checksum the copy.

A serving engine copies each tensor to GPU memory as soon as it has it; ``get_tensor``
alone returns lazy, file-backed tensors whose bytes are read only when touched, so a
load that does not copy measures nothing. The checksum proves every configuration and
every rank loaded the same bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Consumer"]

_MASK64 = (1 << 64) - 1


@dataclass
class Consumer:
    """Copies each tensor's bytes into one preallocated buffer and checksums the copy.

    The checksum does not depend on the order tensors arrive in: it is the sum modulo
    2**64 of one 64-bit BLAKE2b digest per tensor, over its name, dtype, shape, size and
    the wrapping sum of its bytes read as int64 words (plus the last n % 8 bytes). It
    is computed on the copy, by torch at about 10 GB/s (CRC-32 would cost 4 times more
    CPU, which would crowd the 2 cores the ranks share). It catches a missing, truncated,
    zeroed or foreign byte range; not a permutation of 8-byte words inside one tensor.

    Attributes:
        buffer: the destination buffer (uint8, at least as large as the largest tensor).
        tensors: tensors consumed.
        nbytes: bytes copied.
    """

    buffer: Any
    with_checksum: bool = True
    tensors: int = 0
    nbytes: int = 0
    _acc: int = 0
    _np: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._np = self.buffer.numpy()

    def __call__(self, name: str, tensor: Any) -> None:
        import torch

        flat = tensor.reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
        n = flat.numel()
        if n > self.buffer.numel():
            self.buffer = torch.empty(n, dtype=torch.uint8)
            self._np = self.buffer.numpy()
        if n:
            self.buffer[:n].copy_(flat)
        self.tensors += 1
        self.nbytes += n
        if self.with_checksum:
            n8 = n - n % 8
            words = int(self.buffer[:n8].view(torch.int64).sum()) & _MASK64 if n8 else 0
            tail = bytes(self._np[n8:n]).hex()
            key = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{n}|{words}|{tail}".encode()
            digest = hashlib.blake2b(key, digest_size=8).digest()
            self._acc = (self._acc + int.from_bytes(digest, "little")) % (1 << 64)

    @property
    def checksum(self) -> str | None:
        """The checksum as 16 hex digits plus the tensor count, or None when off."""
        if not self.with_checksum:
            return None
        return f"{self._acc:016x}-{self.tensors}"
