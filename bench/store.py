"""The checkpoint store: synthetic checkpoints made once under the work directory, reused.

Making a 2 GiB checkpoint takes longer than measuring it, so each is kept in a directory
named after its parameters, with a marker file that records them and the files' sizes;
a later run with the same parameters finds it there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.checkpoint import Checkpoint, make_checkpoint
from engine.units import format_size

__all__ = ["checkpoint_id", "default_workdir", "ensure_checkpoint"]

_MARKER = ".bench-checkpoint.json"


def default_workdir() -> Path:
    """``$XDG_CACHE_HOME/ckpt-prefetch-bench`` (``~/.cache/ckpt-prefetch-bench``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckpt-prefetch-bench"


def checkpoint_id(shape: str, size_bytes: int) -> str:
    """The key of a checkpoint in a results document, e.g. ``uniform-512MiB``."""
    return f"{shape}-{format_size(size_bytes)}"


def _shards_for(shape: str, shards: int) -> int | None:
    if shape == "single":
        return 1
    if shape == "many-small":
        return None  # the checkpoint maker's default (64)
    return shards


def _params(
    shape: str, size_bytes: int, shards: int, skew: float, dtypes: Sequence[str], seed: int
) -> dict[str, Any]:
    return {
        "shape": shape,
        "size_bytes": int(size_bytes),
        "shards": _shards_for(shape, shards),
        "skew": float(skew) if shape == "skewed" else None,
        "dtypes": list(dtypes),
        "seed": int(seed),
    }


def _directory(workdir: str | os.PathLike[str], params: dict[str, Any]) -> Path:
    n, skewed = params["shards"], params["shape"] == "skewed"
    tag = "-".join(
        [
            params["shape"],
            f"{params['size_bytes']}",
            f"s{n if n is not None else 'd'}",
            f"k{params['skew']:g}" if skewed else "k-",
            "+".join(params["dtypes"]),
            f"seed{params['seed']}",
        ]
    )
    return Path(workdir) / "checkpoints" / tag


def _reuse(directory: Path, params: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint the marker in `directory` describes, if it matches and is intact."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads((directory / _MARKER).read_text())
        files = tuple(directory / name for name in saved["files"])
        sizes = saved["sizes"]
        intact = len(files) == len(sizes) and all(
            f.is_file() and f.stat().st_size == s for f, s in zip(files, sizes, strict=True)
        )
        if saved["params"] == params and intact:
            return Checkpoint(
                directory=directory,
                files=files,
                total_bytes=int(saved["total_bytes"]),
                tensor_count=int(saved["tensor_count"]),
                shape=params["shape"],
                max_tensor_bytes=int(saved["max_tensor_bytes"]),
                params=params,
            )
    return None


def _write_marker(ckpt: Checkpoint) -> None:
    marker = {
        "params": dict(ckpt.params),
        "files": [f.name for f in ckpt.files],
        "sizes": [f.stat().st_size for f in ckpt.files],
        "total_bytes": ckpt.total_bytes,
        "tensor_count": ckpt.tensor_count,
        "max_tensor_bytes": ckpt.max_tensor_bytes,
    }
    (ckpt.directory / _MARKER).write_text(json.dumps(marker, indent=1))


def ensure_checkpoint(
    workdir: str | os.PathLike[str],
    *,
    shape: str,
    size_bytes: int,
    shards: int = 8,
    skew: float = 4.0,
    dtypes: Sequence[str] = ("bf16", "fp16", "fp8_e4m3"),
    seed: int = 0,
) -> tuple[Checkpoint, bool]:
    """Make a checkpoint under `workdir`, or reuse the one made with the same parameters.

    Args:
        workdir: the bench's work directory.
        shape: checkpoint shape (``bench.checkpoint.SHAPES``).
        size_bytes: tensor data size.
        shards: shards for ``uniform``/``skewed`` (``single`` has 1, ``many-small`` 64).
        skew: first-shard ratio for ``skewed``.
        dtypes: tensor dtypes.
        seed: data seed.

    Returns:
        (checkpoint, made): made is False when an existing one was reused.

    Example:
        >>> import tempfile
        >>> ckpt, made = ensure_checkpoint(tempfile.mkdtemp(), shape="single", size_bytes=64 << 20)
    """
    params = _params(shape, size_bytes, shards, skew, dtypes, seed)
    directory = _directory(workdir, params)
    found = _reuse(directory, params)
    if found is not None:
        return found, False
    (directory / _MARKER).unlink(missing_ok=True)
    made = make_checkpoint(
        directory,
        size_bytes=size_bytes,
        shards=params["shards"],
        shape=shape,
        dtypes=tuple(dtypes),
        seed=seed,
        **({"skew": skew} if shape == "skewed" else {}),
    )
    ckpt = dataclasses.replace(made, params=params)
    _write_marker(ckpt)
    return ckpt, True
