"""Every option a user gives ckpt-prefetch, checked and converted in one place.

The plug-ins' JSON (``--model-loader-extra-config``, ``$CKPT_PREFETCH_OPTIONS``), the
server flags of `loader_adapter.args` and the bench's configurations all pass their values
through `parse_option` (one value) or `parse_options` (a whole set, with the checks of
keys together), so a value means the same and is refused with the same message wherever
it is given. The result is the keyword options of
`loader_adapter.safetensors_weights_iterator`, whose engine options `engine.PrefetchOptions`
checks once more as types.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from engine.backends import BACKENDS
from engine.errors import InvalidOptionError
from engine.plan import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, STRATEGIES
from engine.units import format_bytes, parse_size

__all__ = [
    "CLUSTER_ONLY",
    "SCOPES",
    "Scope",
    "OPTION_VALUES",
    "OptionError",
    "check_together",
    "parse_option",
    "parse_options",
    "parse_values",
]


class Scope(str, enum.Enum):
    """Where a load reads from storage once: ``node`` (each node reads the checkpoint) or
    ``cluster`` (each byte once for the whole job). Equal to its string value."""

    NODE = "node"
    CLUSTER = "cluster"


#: The values of ``scope=``.
SCOPES: tuple[str, ...] = tuple(s.value for s in Scope)


#: Each option and its valid values, in words (error messages and the README use these).
OPTION_VALUES: dict[str, str] = {
    "prefetch": "true, false or 'auto' (on for network and FUSE filesystems only)",
    "strategy": " or ".join(repr(s) for s in STRATEGIES),
    "backend": ", ".join(repr(b) for b in ("auto", *BACKENDS)),
    "concurrency": "'auto' or an integer >= 1 (reads in flight per rank)",
    "chunk_bytes": (
        f"'auto', or a size from {format_bytes(MIN_CHUNK_BYTES)} to "
        f"{format_bytes(MAX_CHUNK_BYTES)} (bytes, or a string such as '16MiB')"
    ),
    "window_bytes": (
        "'auto', null or 'none' (no limit), or a size >= 1 byte (bytes, or a string such as '8GiB')"
    ),
    "skip_cached": "true or false",
    "scope": (
        "'node' (each node reads the checkpoint once) or 'cluster' (each byte read from "
        "storage once for the whole job, the rest sent between nodes)"
    ),
    "replica_dir": "a directory on a local disk or tmpfs (scope 'cluster' only)",
    "exchange_timeout_s": "a number of seconds > 0 (scope 'cluster' only)",
}
#: Options that only the cluster scope takes.
CLUSTER_ONLY = ("replica_dir", "exchange_timeout_s")


class OptionError(InvalidOptionError):
    """An invalid plug-in option. The message names the option and its valid values.

    An `engine.InvalidOptionError` (so a `PrefetchError` and a `ValueError`): one family
    for every option the project refuses, wherever it was given.
    """


def _bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


#: Text for true and false, where options come as text (a flag, a bench configuration).
_WORDS = {"true": True, "on": True, "yes": True, "1": True,
          "false": False, "off": False, "no": False, "0": False}  # fmt: skip


def _from_text(key: str, value: str) -> object:
    """A text value as JSON would give it: counts as integers, booleans as booleans."""
    word = value.strip()
    if key in ("skip_cached", "prefetch") and word.lower() in _WORDS:
        return _WORDS[word.lower()]
    if key == "concurrency" and word.isdigit():
        return int(word)
    if key == "exchange_timeout_s":
        try:
            return float(word)
        except ValueError:
            return word
    return word


def _prefetch(value: object) -> bool | str | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return {"on": True, "true": True, "off": False, "false": False, "auto": "auto"}.get(
            value.strip().lower()
        )
    return None


def _choice(valid: Iterable[str]) -> Callable[[object], str | None]:
    names = tuple(valid)
    return lambda value: value if isinstance(value, str) and value in names else None


def _size(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        return parse_size(value)
    except ValueError:
        return None


def _concurrency(value: object) -> int | str | None:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


def _chunk(value: object) -> int | str | None:
    if value == "auto":
        return "auto"
    n = _size(value)
    return n if n is not None and MIN_CHUNK_BYTES <= n <= MAX_CHUNK_BYTES else None


def _window(value: object) -> int | str | None:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    n = _size(value)
    return n if n is not None and n >= 1 else None


def _directory(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value > 0 else None


_NO_WINDOW = object()
_NO_LIMIT = ("none", "off", "unlimited")


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


_PARSERS: dict[str, Callable[[object], object]] = {
    "prefetch": _prefetch,
    "strategy": _choice(STRATEGIES),
    "backend": _choice(("auto", *BACKENDS)),
    "concurrency": _concurrency,
    "chunk_bytes": _chunk,
    "window_bytes": lambda v: _NO_WINDOW if v is None or _lower(v) in _NO_LIMIT else _window(v),
    "skip_cached": _bool,
    "scope": _choice(SCOPES),
    "replica_dir": _directory,
    "exchange_timeout_s": _seconds,
}


def parse_options(
    config: Mapping[str, object],
    *,
    where: str,
    also_valid: Iterable[str] = (),
    text: bool = False,
) -> dict[str, Any]:
    """Check plug-in options and turn them into `safetensors_weights_iterator` keywords.

    Args:
        config: option name -> value, as JSON gives them (see `OPTION_VALUES`).
        where: where the options came from, for messages (e.g.
            ``"--model-loader-extra-config"``).
        also_valid: keys that the caller handles itself; they are ignored here and
            named among the valid keys in the message about an unknown key.
        text: the values are text (see `parse_option`).

    Returns:
        Keyword options, only those given: ``prefetch`` (True, False or ``"auto"``),
        ``scope`` with the cluster scope's ``replica_dir`` and ``exchange_timeout_s``, and
        the `engine.start_prefetch` options (``window_bytes`` None means no limit).

    Raises:
        OptionError: an unknown key, or a value that is not valid for its key.

    Example:
        >>> parse_options({"window_bytes": "1GiB", "prefetch": "auto"}, where="test")
        {'window_bytes': 1073741824, 'prefetch': 'auto'}
        >>> parse_options({"windw": 1}, where="test")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        OptionError: ckpt-prefetch: test: unknown key 'windw'; valid keys: backend, ...
    """
    options = parse_values(config, where, also_valid, text=text)
    check_together(options, where)
    return options


def parse_values(
    config: Mapping[str, object], where: str, also_valid: Iterable[str], *, text: bool = False
) -> dict[str, Any]:
    """Each key and value checked (`parse_options` without the checks of keys together)."""
    if not isinstance(config, Mapping):
        raise OptionError(
            f"ckpt-prefetch: {where} must be a JSON object (a dict), got {type(config).__name__}"
        )
    extra = set(also_valid)
    unknown = sorted(k for k in config if k not in _PARSERS and k not in extra)
    if unknown:
        valid = ", ".join(sorted({*_PARSERS, *extra}))
        keys = ", ".join(repr(k) for k in unknown)
        raise OptionError(
            f"ckpt-prefetch: {where}: unknown key{'s' if len(unknown) > 1 else ''} {keys}; "
            f"valid keys: {valid}"
        )
    return {key: parse_option(key, value, where=where, text=text) for key, value in config.items()
            if key not in extra}  # fmt: skip


def parse_option(key: str, value: object, *, where: str, text: bool = False) -> Any:
    """One option's value, checked and converted: what every entry point calls.

    Values come as JSON gives them (sizes as bytes or ``"16MiB"``), or with `text` as a
    command line or a bench configuration writes them (counts in digits, booleans as
    on/off, true/false, yes/no or 1/0).

    Args:
        key: the option's name (a key of `OPTION_VALUES`).
        value: its value as given.
        where: where it was given, for the message (``"--prefetch-window"``).
        text: `value` is text.

    Returns:
        The value the loader takes (``window_bytes``: None for no limit).

    Raises:
        OptionError: an unknown key, or a value not valid for it; the message names the
            valid values.

    Example:
        >>> parse_option("chunk_bytes", "16MiB", where="test"), parse_option(
        ...     "concurrency", "4", where="test", text=True)
        (16777216, 4)
        >>> parse_option("window_bytes", "none", where="test") is None
        True
    """
    parser = _PARSERS.get(key)
    if parser is None:
        raise OptionError(f"ckpt-prefetch: {where}: unknown option {key!r}")
    parsed = parser(_from_text(key, value) if text and isinstance(value, str) else value)
    if parsed is None:
        raise OptionError(
            f"ckpt-prefetch: {where}: {key!r} must be {OPTION_VALUES[key]}; got {value!r}"
        )
    return None if parsed is _NO_WINDOW else parsed


def check_together(options: Mapping[str, Any], where: str) -> None:
    """Refuse options that only apply together with another (the cluster scope's)."""
    stray = [k for k in CLUSTER_ONLY if k in options]
    if stray and options.get("scope") != Scope.CLUSTER:
        raise OptionError(
            f"ckpt-prefetch: {where}: {', '.join(repr(k) for k in stray)} only apply with "
            '"scope": "cluster"'
        )
