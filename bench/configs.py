"""The configuration mini-language: what a rank runs, as a short string.

A configuration is a kind and options, ``kind[:key=value,...]``, or an alias::

    none                      safe_open + get_tensor, mmap faults (bench.baselines)
    sglang[:threads=4,block_mb=16]
                              the SGLang-style prefetch, then a plain load
    stripe[:chunk_mb=64]      plain byte striping: one sendfile thread per rank, no checks
    vllm[:threads=8,block_mb=16]
                              vLLM's own safetensors_weights_iterator with its prefetch
                              (strategy "prefetch"), ranks in a gloo group (needs vllm)
    ours[:strategy=,backend=,concurrency=,chunk_mb=,window=,skip_cached=,order=,prefetch=]
                              loader_adapter.safetensors_weights_iterator(prefetch=True)
    raw[:threads=4,chunk_mb=16]
                              the floor: raw parallel reads, no parsing (bench.floor)

    ours-files = ours:strategy=files     ours-c1-64m = ours:concurrency=1,chunk_mb=64
    ours-window = ours:window=auto       ours-nowindow = ours:window=off
    ours-fixed = ours:concurrency=fixed,backend=sendfile  (the defaults before run-time
                 adaptation: 8 reads per node split among the ranks, read in-process)
    ours-<backend> = ours:backend=<backend>   (sendfile, pread, populate, fadvise, ...)

Strings travel to the rank processes and into the results; `parse_config` checks them
in the orchestrator, so a typo fails before any process starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from loader_adapter.options import parse_options

__all__ = ["ALIASES", "KINDS", "NEEDS_GROUP", "Config", "parse_config"]

#: The kinds of configuration a rank can run.
KINDS: tuple[str, ...] = ("none", "sglang", "stripe", "vllm", "ours", "raw", "engine")
#: Kinds whose ranks form a ``torch.distributed`` group (the job gets a rendezvous).
NEEDS_GROUP: frozenset[str] = frozenset({"vllm"})

_OPTIONS: dict[str, tuple[str, ...]] = {
    "none": (),
    "sglang": ("threads", "block_mb"),
    "stripe": ("chunk_mb",),
    "vllm": ("threads", "block_mb"),
    "ours": (
        "strategy",
        "backend",
        "concurrency",
        "chunk_mb",
        "window",
        "skip_cached",
        "order",
        "prefetch",
    ),
    "raw": ("threads", "chunk_mb"),
    "engine": ("backend", "concurrency", "chunk_mb"),
}

#: Aliases accepted besides ``kind:options`` (patterns are handled in `parse_config`).
ALIASES: dict[str, str] = {
    "ours-files": "ours:strategy=files",
    "ours-balanced": "ours:strategy=balanced",
    "ours-window": "ours:window=auto",
    "ours-nowindow": "ours:window=off",
    "ours-noprefetch": "ours:prefetch=off",
    "ours-fixed": "ours:concurrency=fixed,backend=sendfile",
}
_SWEEP_RE = re.compile(r"^ours-c(\d+)-(\d+(?:\.\d+)?)m$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class Config:
    """A parsed configuration.

    Attributes:
        name: the label shown in tables (the text the user gave, e.g. ``ours-c1-64m``).
        kind: one of KINDS.
        options: sorted (key, value) pairs, values as text.
    """

    name: str
    kind: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def spec(self) -> str:
        """The canonical string, ``kind:key=value,...`` (just ``kind`` without options)."""
        if not self.options:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={v}" for k, v in self.options)

    def opts(self) -> dict[str, str]:
        """The options as a dict."""
        return dict(self.options)

    def count(self, key: str, default: int) -> int:
        """An integer option (``threads``, ``concurrency``), or `default`."""
        return int(self.opts().get(key, default))

    def mib(self, key: str, default_bytes: int) -> int:
        """A size option given in MiB (``chunk_mb``, ``block_mb``) in bytes, or the default.

        Example:
            >>> parse_config("raw:chunk_mb=0.5").mib("chunk_mb", 16 << 20)
            524288
        """
        value = self.opts().get(key)
        return default_bytes if value is None else int(float(value) * (1 << 20))

    def loader_options(self) -> dict[str, Any]:
        """Keyword options for ``safetensors_weights_iterator`` (kind ``ours``), or for
        ``engine.prefetch_async`` (kind ``engine``: drop ``prefetch``).

        ``chunk_mb`` becomes ``chunk_bytes``; ``concurrency=fixed`` stays ``"fixed"`` (the
        rank resolves it: `engine.tuning.NODE_STREAMS` split among the ranks, without
        run-time adaptation); ``window=off`` means no window
        (``window_bytes=None``), ``window=auto`` leaves the engine's default, a size
        (``512MiB``) sets ``window_bytes``; ``prefetch`` (on/off/auto) is returned under
        the key ``prefetch``.
        """
        given: dict[str, Any] = {}
        for key, value in self.options:
            if key == "chunk_mb":
                given["chunk_bytes"] = self.mib(key, 0)
            elif key == "window":
                if value != "auto":  # auto: the loader's default, left to it
                    given["window_bytes"] = value
            else:
                given[key] = value
        order = given.pop("order", None)  # an engine option the plug-ins do not take
        fixed = given.get("concurrency") == "fixed"
        if fixed:
            del given["concurrency"]
        # Checked and converted as every other entry point does (`loader_adapter.options`).
        out: dict[str, Any] = {"prefetch": True}
        out.update(parse_options(given, where=f"configuration {self.name!r}", text=True))
        if fixed:
            out["concurrency"] = "fixed"
        if order is not None:
            out["order"] = order
        return out


def _expand_alias(name: str) -> str:
    """``kind:options`` for an alias or pattern (``ours-c1-64m``, ``ours-pread``), else `name`."""
    m = _SWEEP_RE.match(name)
    if m:
        return f"ours:concurrency={m.group(1)},chunk_mb={m.group(2)}"
    if name in ALIASES:
        return ALIASES[name]
    if name.startswith("ours-") and ":" not in name and _NAME_RE.match(name):
        return f"ours:backend={name[len('ours-') :]}"
    return name


def _check_option(name: str, kind: str, key: str, value: str) -> None:
    """Raise ValueError when `key` is not an option of `kind` or `value` is malformed."""
    if key not in _OPTIONS[kind]:
        valid = ", ".join(_OPTIONS[kind]) or "none"
        raise ValueError(
            f"configuration {name!r}: unknown option {key!r} for {kind} (valid: {valid})"
        )
    if key == "concurrency" and value == "fixed":
        return
    if key in ("threads", "concurrency") and (not value.isdigit() or int(value) < 1):
        raise ValueError(f"configuration {name!r}: {key} must be an integer >= 1")
    if key in ("chunk_mb", "block_mb"):
        try:
            if float(value) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"configuration {name!r}: {key} must be a number > 0") from None


def parse_config(text: str) -> Config:
    """Parse a configuration string (see the module docstring for the syntax).

    Args:
        text: ``kind``, ``kind:key=value,...`` or an alias such as ``ours-c1-64m``.

    Returns:
        The Config, named `text`.

    Raises:
        ValueError: unknown kind, alias or option, or a malformed value.

    Example:
        >>> parse_config("ours-c1-64m").spec
        'ours:chunk_mb=64,concurrency=1'
        >>> parse_config("sglang").kind
        'sglang'
    """
    name = text.strip()
    if not name:
        raise ValueError("empty configuration")
    kind, _, rest = _expand_alias(name).partition(":")
    if kind not in KINDS:
        raise ValueError(
            f"unknown configuration {name!r}: kind must be one of {', '.join(KINDS)} "
            f"(or an alias: {', '.join(ALIASES)}, ours-c<N>-<MB>m, ours-<backend>)"
        )
    opts: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not value:
            raise ValueError(f"configuration {name!r}: option {item!r} is not key=value")
        _check_option(name, kind, key, value)
        opts[key] = value
    cfg = Config(name=name, kind=kind, options=tuple(sorted(opts.items())))
    if kind in ("ours", "engine"):
        cfg.loader_options()  # validate sizes and booleans now, not in the rank process
    return cfg
