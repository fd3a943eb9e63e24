"""Synthetic safetensors checkpoints shaped like a transformer's, for tests and benchmarks.

`make_checkpoint` writes real safetensors shards (``model-0000X-of-0000N.safetensors``)
and a Hugging Face ``model.safetensors.index.json``. The same arguments always give the
same bytes. Data are random bytes (so NaNs occur in float tensors; compare bytes, not
values), generated at several GB/s and streamed to disk shard by shard, so memory use
stays at a few MiB whatever the checkpoint size.

Shapes:
    ``uniform``     shards of equal size.
    ``skewed``      the first shard `skew` times the size of each other shard.
    ``single``      one file, ``model.safetensors`` (plus the index).
    ``many-small``  64 shards (by default) of a mixture-of-experts model: many small tensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.units import parse_size
from loader_adapter.header import read_header

__all__ = [
    "DTYPES",
    "SHAPES",
    "Checkpoint",
    "TensorSpec",
    "make_checkpoint",
    "plan_tensors",
    "scan_checkpoint",
    "write_safetensors",
]

#: Checkpoint shapes `make_checkpoint` accepts.
SHAPES: tuple[str, ...] = ("uniform", "skewed", "single", "many-small")

#: dtype name -> (safetensors dtype code, bytes per element).
DTYPES: dict[str, tuple[str, int]] = {
    "bf16": ("BF16", 2),
    "fp16": ("F16", 2),
    "fp32": ("F32", 4),
    "fp64": ("F64", 8),
    "fp8_e4m3": ("F8_E4M3", 1),
    "fp8_e5m2": ("F8_E5M2", 1),
    "int8": ("I8", 1),
    "int16": ("I16", 2),
    "int32": ("I32", 4),
    "int64": ("I64", 8),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}

_DEFAULT_SHARDS = {"uniform": 4, "skewed": 4, "single": 1, "many-small": 64}
_MOE_EXPERTS = 32
_CHUNK = 8 << 20  # bytes generated and written per step
_HEADER_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a synthetic checkpoint: name, dtype name (a key of DTYPES), shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class Checkpoint:
    """A synthetic checkpoint on disk, as `make_checkpoint` wrote it.

    Attributes:
        directory: the checkpoint directory.
        files: the safetensors shards, sorted by name.
        total_bytes: the sum of the shards' file sizes (headers included).
        tensor_count: number of tensors over all shards.
        shape: the checkpoint shape (one of SHAPES).
        max_tensor_bytes: the largest tensor's size (what a rank's copy buffer needs).
        params: the arguments it was made with, when the bench's store made it.
    """

    directory: Path
    files: tuple[Path, ...]
    total_bytes: int
    tensor_count: int
    shape: str
    max_tensor_bytes: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def index_path(self) -> Path:
        """The ``model.safetensors.index.json`` of the checkpoint."""
        return self.directory / "model.safetensors.index.json"

    def to_json(self) -> dict[str, Any]:
        """The ``checkpoints`` entry of a results document (its checksum is filled later)."""
        return {
            "shape": self.shape,
            "total_bytes": self.total_bytes,
            "tensor_count": self.tensor_count,
            "max_tensor_bytes": self.max_tensor_bytes,
            "directory": str(self.directory),
            "params": dict(self.params),
            "files": [{"name": f.name, "size": f.stat().st_size} for f in self.files],
            "checksum": None,
        }


def scan_checkpoint(files: Sequence[str | os.PathLike[str]]) -> tuple[int, int]:
    """Read the safetensors headers: (tensor count, largest tensor in bytes).

    Example:
        >>> scan_checkpoint(["model.safetensors"])  # doctest: +SKIP
        (291, 131072000)
    """
    count, largest = 0, 0
    for path in files:
        tensors = read_header(path).tensors
        count += len(tensors)
        largest = max([largest, *(t.nbytes for t in tensors)])
    return count, largest


# --------------------------------------------------------------------------------------
# Model shapes


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def _dims(hidden: int, experts: int) -> tuple[int, int, int]:
    """(attention q/o width, key/value width, MLP intermediate size) for `hidden`."""
    head_dim = min(128, max(8, hidden // 16))
    heads = max(1, hidden // head_dim)
    kv_dim = max(1, heads // 4) * head_dim
    inter = _round_to(hidden / 2 if experts else hidden * 8 / 3, 8)
    return heads * head_dim, kv_dim, inter


def _body_bytes(hidden: int, layers: int, dtypes: Sequence[str], experts: int) -> int:
    """Bytes of `_body_specs(...)` plus the final norm, computed without building them."""
    q_dim, kv_dim, inter = _dims(hidden, experts)
    b0 = DTYPES[dtypes[0]][1]
    base = 2 * hidden + experts * hidden  # two norms (+ the router)
    mat = 2 * q_dim * hidden + 2 * kv_dim * hidden + max(1, experts) * 3 * inter * hidden
    per_cycle = [DTYPES[d][1] for d in dtypes]
    mats = sum(mat * per_cycle[layer % len(per_cycle)] for layer in range(layers))
    return layers * base * b0 + mats + hidden * b0


def _body_specs(hidden: int, layers: int, dtypes: Sequence[str], experts: int) -> list[TensorSpec]:
    """The per-layer tensors of a Llama-like (or, with experts > 0, MoE) decoder."""
    base = dtypes[0]
    q_dim, kv_dim, inter = _dims(hidden, experts)
    out: list[TensorSpec] = []
    for layer in range(layers):
        mat = dtypes[layer % len(dtypes)]
        p = f"model.layers.{layer}."
        out.append(TensorSpec(p + "input_layernorm.weight", base, (hidden,)))
        out.append(TensorSpec(p + "self_attn.q_proj.weight", mat, (q_dim, hidden)))
        out.append(TensorSpec(p + "self_attn.k_proj.weight", mat, (kv_dim, hidden)))
        out.append(TensorSpec(p + "self_attn.v_proj.weight", mat, (kv_dim, hidden)))
        out.append(TensorSpec(p + "self_attn.o_proj.weight", mat, (hidden, q_dim)))
        out.append(TensorSpec(p + "post_attention_layernorm.weight", base, (hidden,)))
        if experts:
            out.append(TensorSpec(p + "mlp.gate.weight", base, (experts, hidden)))
            for e in range(experts):
                q = f"{p}mlp.experts.{e}."
                out.append(TensorSpec(q + "gate_proj.weight", mat, (inter, hidden)))
                out.append(TensorSpec(q + "up_proj.weight", mat, (inter, hidden)))
                out.append(TensorSpec(q + "down_proj.weight", mat, (hidden, inter)))
        else:
            out.append(TensorSpec(p + "mlp.gate_proj.weight", mat, (inter, hidden)))
            out.append(TensorSpec(p + "mlp.up_proj.weight", mat, (inter, hidden)))
            out.append(TensorSpec(p + "mlp.down_proj.weight", mat, (hidden, inter)))
    return out


def _model_specs(
    hidden: int, layers: int, vocab: int, dtypes: Sequence[str], experts: int
) -> list[TensorSpec]:
    base = dtypes[0]
    return [
        TensorSpec("model.embed_tokens.weight", base, (vocab, hidden)),
        *_body_specs(hidden, layers, dtypes, experts),
        TensorSpec("model.norm.weight", base, (hidden,)),
        TensorSpec("lm_head.weight", base, (vocab, hidden)),
    ]


def _largest(fits: Callable[[int], bool], step: int) -> int:
    """The largest multiple of `step` that `fits` (a monotone test), or 0."""
    lo, hi = 0, step
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _layout(
    size_bytes: int, layers0: int, step: int, fixed_bytes: Callable[[int, int], int]
) -> tuple[int, int]:
    """(layers, hidden size) of a model of about `size_bytes`, vocabulary aside.

    For each layer count, the largest hidden size that fits; the vocabulary fills the
    rest. Keep the layer count that leaves the least to the vocabulary (so that the
    embedding stays about the size of a few layers), preferring fewer layers.
    """
    best: tuple[int, int, int] | None = None  # (leftover, layers, hidden)
    for n_layers in range(layers0, layers0 + max(1, layers0 // 2)):
        hidden = _largest(lambda h, n=n_layers: fixed_bytes(h, n) <= size_bytes, step)
        if hidden < step:
            break
        leftover = size_bytes - fixed_bytes(hidden, n_layers)
        if best is None or leftover < best[0]:
            best = (leftover, n_layers, hidden)
    if best is not None:
        return best[1], best[2]
    layers = layers0  # tiny sizes: shrink the model until the smallest hidden size fits
    while layers > 1 and fixed_bytes(step, layers) > size_bytes:
        layers -= 1
    return layers, step


def plan_tensors(
    size_bytes: int,
    *,
    shape: str = "uniform",
    shards: int = 4,
    dtypes: Sequence[str] = ("bf16", "fp16", "fp8_e4m3"),
) -> list[TensorSpec]:
    """Choose a transformer's tensors whose data add up to about `size_bytes`.

    The number of layers grows with the size (and with `shards`, so that every shard
    holds many tensors); the hidden size is the largest that fits, and the vocabulary
    takes up the rest, so the total lands within one embedding row pair of `size_bytes`.

    Args:
        size_bytes: target size of all tensor data.
        shape: one of SHAPES (``many-small`` selects a mixture-of-experts model).
        shards: number of shards the tensors will be spread over.
        dtypes: dtype names (keys of DTYPES); layer i's matrices use ``dtypes[i % n]``,
            embeddings and norms use ``dtypes[0]``.

    Returns:
        The tensors in model order (embeddings, layers, final norm, lm_head).

    Example:
        >>> sum(t.nbytes for t in plan_tensors(64 << 20)) / (64 << 20) > 0.98
        True
    """
    experts = _MOE_EXPERTS if shape == "many-small" else 0
    step = 4 if experts else 16
    min_vocab = 2 if experts else 4  # vocab >= min_vocab * hidden
    b0 = DTYPES[dtypes[0]][1]
    mib = max(1.0, size_bytes / (1 << 20))
    layers0 = max(2, round(2 * math.log2(mib)))
    # Enough layers for many tensors per shard: dense 4 layers per shard, MoE >= 24 layers.
    layers0 = max(layers0, 24, -(-shards // 3)) if experts else max(layers0, 4 * shards)

    def fixed_bytes(h: int, n_layers: int) -> int:
        return _body_bytes(h, n_layers, dtypes, experts) + 2 * min_vocab * h * h * b0

    layers, hidden = _layout(size_bytes, layers0, step, fixed_bytes)
    vocab = max(1, (size_bytes - _body_bytes(hidden, layers, dtypes, experts)) // (2 * hidden * b0))
    return _model_specs(hidden, layers, vocab, dtypes, experts)


# --------------------------------------------------------------------------------------
# Sharding and writing


def _assign_shards(specs: Sequence[TensorSpec], weights: Sequence[float]) -> list[int]:
    """Shard index of each tensor, so that shard sizes follow `weights` (in model order).

    Each shard's target is recomputed from the bytes still unassigned, so one tensor
    larger than a shard makes that shard large without starving the next ones.
    """
    n = len(weights)
    if len(specs) < n:
        raise ValueError(f"{len(specs)} tensors cannot fill {n} shards; use a larger size")
    remaining = sum(s.nbytes for s in specs)
    out: list[int] = []
    k, in_shard, filled = 0, 0, 0
    target = remaining * weights[0] / sum(weights)
    for i, spec in enumerate(specs):
        tensors_left = len(specs) - i
        if (
            k < n - 1
            and in_shard
            and (filled + spec.nbytes / 2 >= target or tensors_left <= n - 1 - k)
        ):
            k, in_shard, filled = k + 1, 0, 0
            target = remaining * weights[k] / sum(weights[k:])
        out.append(k)
        in_shard += 1
        filled += spec.nbytes
        remaining -= spec.nbytes
    return out


def _header_bytes(
    specs: Sequence[TensorSpec], metadata: dict[str, str] | None
) -> tuple[bytes, list[tuple[int, int]]]:
    """The safetensors header (length prefix included) and each tensor's data range."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    ranges: list[tuple[int, int]] = []
    offset = 0
    for s in specs:
        end = offset + s.nbytes
        header[s.name] = {
            "dtype": DTYPES[s.dtype][0],
            "shape": list(s.shape),
            "data_offsets": [offset, end],
        }
        ranges.append((offset, end))
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # as safetensors does: data start 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, ranges


def _random_chunks(rng: np.random.Generator, nbytes: int) -> Iterator[np.ndarray]:
    """Yield uint8 arrays of random bytes, `_CHUNK` at a time, `nbytes` in all."""
    done = 0
    while done < nbytes:
        n = min(_CHUNK, nbytes - done)
        words = rng.bit_generator.random_raw(-(-n // 8))
        yield words.view(np.uint8)[:n]
        done += n


def write_safetensors(
    path: str | os.PathLike[str],
    specs: Sequence[TensorSpec],
    *,
    seed: int | Sequence[int] = 0,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write one safetensors file of random data for `specs`, streaming; return its size.

    Tensors are stored in the order given. Bool tensors hold only 0 and 1.

    Args:
        path: the file to write (replaced atomically).
        specs: the tensors, names unique.
        seed: seed of the random data (an int or a sequence of ints).
        metadata: the header's ``__metadata__`` string map, or None for none.

    Returns:
        The size of the written file in bytes.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        >>> write_safetensors(p, [TensorSpec("w", "bf16", (4, 4))]) > 32
        True
    """
    header, ranges = _header_bytes(specs, metadata)
    data_len = ranges[-1][1] if ranges else 0
    bool_ranges = [
        r for s, r in zip(specs, ranges, strict=True) if s.dtype == "bool" and r[1] > r[0]
    ]
    rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence(seed)))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        pos = 0
        for chunk in _random_chunks(rng, data_len):
            end = pos + len(chunk)
            for lo, hi in bool_ranges:
                a, b = max(lo, pos), min(hi, end)
                if a < b:
                    chunk[a - pos : b - pos] &= 1
            f.write(chunk)
            pos = end
        # Durable now: a file whose pages are still dirty cannot be evicted, and the bench
        # must make it cold right after making it (the disk may still be busy with an
        # install's writes).
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return len(header) + data_len


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_args(
    shape: str, dtypes: tuple[str, ...], size_bytes: int, shards: int | None, skew: float
) -> int:
    """Raise ValueError for an argument `make_checkpoint` cannot use; return the shards."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")
    if not dtypes:
        raise ValueError("dtypes must name at least one dtype")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; valid dtypes: {', '.join(DTYPES)}")
    if size_bytes < 1:
        raise ValueError(f"size_bytes must be >= 1, got {size_bytes}")
    n = 1 if shape == "single" else (shards if shards is not None else _DEFAULT_SHARDS[shape])
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"shards must be an integer >= 1, got {shards!r}")
    if shape == "skewed" and not skew > 0:
        raise ValueError(f"skew must be > 0, got {skew!r}")
    return n


def _write_shards(
    directory: Path, names: list[str], specs: list[TensorSpec], owner: list[int], seed: int
) -> int:
    """Write shard k's tensors (``owner[i] == k``) to ``names[k]``, then the index.

    Returns:
        The bytes written in shards.
    """
    shards = [[s for s, o in zip(specs, owner, strict=True) if o == k] for k in range(len(names))]
    total = sum(
        write_safetensors(directory / name, mine, seed=(seed, k), metadata=_HEADER_METADATA)
        for k, (name, mine) in enumerate(zip(names, shards, strict=True))
    )
    weight_map = {s.name: name for name, mine in zip(names, shards, strict=True) for s in mine}
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    index_tmp = directory / "model.safetensors.index.json.tmp"
    index_tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(index_tmp, directory / "model.safetensors.index.json")
    return total


def make_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    size_bytes: int = 256 << 20,
    shards: int | None = None,
    shape: str = "uniform",
    dtypes: Sequence[str] = ("bf16", "fp16", "fp8_e4m3"),
    seed: int = 0,
    skew: float = 4.0,
) -> Checkpoint:
    """Write a deterministic synthetic safetensors checkpoint shaped like a transformer.

    Args:
        out_dir: directory to write into (created if missing; existing shard files of
            the same names are replaced).
        size_bytes: target total size of tensor data; the result is within a fraction
            of a percent of it for sizes of a few MiB and more.
        shards: number of shard files; default 4 (``uniform``/``skewed``),
            64 (``many-small``); ``single`` always writes one file.
        shape: ``uniform``, ``skewed``, ``single`` or ``many-small`` (see module doc).
        dtypes: dtype names for the tensors (keys of DTYPES).
        seed: seed of the tensor data; same arguments, same bytes.
        skew: for ``skewed``, how many times larger the first shard is than the others.

    Returns:
        The Checkpoint written.

    Example:
        >>> import tempfile
        >>> info = make_checkpoint(tempfile.mkdtemp(), size_bytes=8 << 20, shards=2)
        >>> [p.name for p in info.files]
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    dtypes = tuple(dtypes)
    size_bytes = parse_size(size_bytes)
    n = _check_args(shape, dtypes, size_bytes, shards, skew)
    specs = plan_tensors(size_bytes, shape=shape, shards=n, dtypes=dtypes)
    weights = [float(skew)] + [1.0] * (n - 1) if shape == "skewed" else [1.0] * n
    owner = _assign_shards(specs, weights)
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    names = (
        ["model.safetensors"]
        if shape == "single"
        else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )
    total = _write_shards(directory, names, specs, owner, seed)
    files = [directory / name for name in names]
    return Checkpoint(
        directory=directory,
        files=tuple(sorted(files)),
        total_bytes=total,
        tensor_count=len(specs),
        shape=shape,
        max_tensor_bytes=max((s.nbytes for s in specs), default=0),
    )
