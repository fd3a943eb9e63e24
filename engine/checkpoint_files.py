"""Which files make up a checkpoint: a list of paths, a directory, or an HF index."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["CheckpointFiles", "expand_checkpoint_files"]

#: What `expand_checkpoint_files` accepts: one path, or several.
CheckpointFiles = str | os.PathLike | Iterable[str | os.PathLike]

_INDEX_NAME = "model.safetensors.index.json"


def _from_index(index: Path) -> list[str]:
    """The shard files named by a Hugging Face ``*.safetensors.index.json``, first seen first."""
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{index} is not a safetensors index (no valid weight_map): {exc}"
        ) from exc
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"{index}: weight_map values must be file names")
    return [str(index.parent / n) for n in names]


def _from_directory(directory: Path) -> list[str]:
    """The checkpoint files of a directory: its index's shards, else every ``*.safetensors``."""
    index = directory / _INDEX_NAME
    if not index.is_file():
        candidates = sorted(directory.glob("*.safetensors.index.json"))
        index = candidates[0] if len(candidates) == 1 else index
    if index.is_file():
        return _from_index(index)
    found = sorted(str(p) for p in directory.glob("*.safetensors") if not p.is_dir())
    if not found:
        raise FileNotFoundError(errno.ENOENT, "no .safetensors files in directory", str(directory))
    return found


def expand_checkpoint_files(files: CheckpointFiles) -> list[str]:
    """Turn what a user passes as "the checkpoint" into a list of safetensors paths.

    A directory gives the shards listed by its ``model.safetensors.index.json`` (or by
    its only ``*.safetensors.index.json``) and otherwise all its ``*.safetensors`` files;
    a ``.json`` file is read as such an index; any other path is kept as given (a missing
    file is reported later, when the files are resolved). Lists may mix all three.

    Args:
        files: a path, or an iterable of paths.

    Returns:
        The paths, in the order found, duplicates included (the engine de-duplicates).

    Raises:
        FileNotFoundError: a directory holds no safetensors file, or an index is missing.
        ValueError: an index has no valid ``weight_map``, or `files` is empty.

    Example:
        >>> expand_checkpoint_files(["/ckpt/a.safetensors", "/ckpt/b.safetensors"])
        ['/ckpt/a.safetensors', '/ckpt/b.safetensors']
    """
    items = [files] if isinstance(files, (str, bytes, os.PathLike)) else list(files)
    out: list[str] = []
    for item in items:
        path = Path(os.fsdecode(item))
        if path.is_dir():
            out.extend(_from_directory(path))
        elif path.suffix == ".json":
            if not path.is_file():
                raise FileNotFoundError(errno.ENOENT, "index file not found", str(path))
            out.extend(_from_index(path))
        else:
            out.append(str(path))
    if not out:
        raise ValueError("no checkpoint files given")
    return out
