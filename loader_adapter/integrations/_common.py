"""What the engine plug-ins share: their options, their report line, their log routing.

The options are the keyword options of `loader_adapter.safetensors_weights_iterator` that
make sense in a configuration file or an environment variable (JSON values; sizes may be
written ``"16MiB"``). They are checked here, before any file is opened, with messages
that name the option and its valid values.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from engine import BACKENDS, STRATEGIES, PrefetchReport
from engine.plan import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from engine.units import format_bytes, parse_size
from loader_adapter.discovery import LocalRank

__all__ = [
    "OPTIONS_ENV",
    "OPTION_VALUES",
    "OptionError",
    "describe_report",
    "options_from_env",
    "parse_options",
    "share_log_handlers",
]

log = logging.getLogger(__name__)

#: Environment variable holding the options as a JSON object (SGLang, and vLLM's
#: ``$CKPT_PREFETCH_VLLM_AUTO`` mode, have no other place for them).
OPTIONS_ENV = "CKPT_PREFETCH_OPTIONS"

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
}


class OptionError(ValueError):
    """An invalid plug-in option. The message names the option and its valid values."""


def _bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


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
    if value == "auto":
        return "auto"
    n = _size(value)
    return n if n is not None and n >= 1 else None


_NO_WINDOW = object()

_PARSERS: dict[str, Callable[[object], object]] = {
    "prefetch": _prefetch,
    "strategy": _choice(STRATEGIES),
    "backend": _choice(("auto", *BACKENDS)),
    "concurrency": _concurrency,
    "chunk_bytes": _chunk,
    "window_bytes": lambda v: _NO_WINDOW if v is None or v == "none" else _window(v),
    "skip_cached": _bool,
}


def parse_options(
    config: Mapping[str, object], *, where: str, also_valid: Iterable[str] = ()
) -> dict[str, Any]:
    """Check plug-in options and turn them into `safetensors_weights_iterator` keywords.

    Args:
        config: option name -> value, as JSON gives them (see `OPTION_VALUES`).
        where: where the options came from, for messages (e.g.
            ``"--model-loader-extra-config"``).
        also_valid: keys that the caller handles itself; they are ignored here and
            named among the valid keys in the message about an unknown key.

    Returns:
        Keyword options, only those given: ``prefetch`` (True, False or ``"auto"``) and
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
    options: dict[str, Any] = {}
    for key, value in config.items():
        if key in extra:
            continue
        parsed = _PARSERS[key](value)
        if parsed is None:
            raise OptionError(
                f"ckpt-prefetch: {where}: {key!r} must be {OPTION_VALUES[key]}; got {value!r}"
            )
        options[key] = None if parsed is _NO_WINDOW else parsed
    return options


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The options in ``$CKPT_PREFETCH_OPTIONS`` (a JSON object), checked.

    Args:
        environ: the environment to read; None for ``os.environ``.

    Returns:
        Keyword options as `parse_options` returns them; ``{}`` when the variable is unset
        or empty.

    Raises:
        OptionError: the variable is not a JSON object of valid options.

    Example:
        >>> options_from_env({"CKPT_PREFETCH_OPTIONS": '{"concurrency": 2}'})
        {'concurrency': 2}
    """
    raw = (os.environ if environ is None else environ).get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    where = f"${OPTIONS_ENV}"
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise OptionError(
            f"ckpt-prefetch: {where} is not valid JSON ({exc}); expected an object such as "
            '\'{"window_bytes": "8GiB", "concurrency": 2}\''
        ) from None
    return parse_options(config, where=where)


def describe_report(report: PrefetchReport | None, local: LocalRank, prefetch: object) -> str:
    """One log line that says what the prefetch of one load did.

    Args:
        report: the prefetch's report, or None when no prefetch ran.
        local: the local rank the prefetch used.
        prefetch: the ``prefetch`` mode asked for (True, False or ``"auto"``).

    Returns:
        The line; byte counts are exact (``planned=... warmed=...``) so that tools can read
        them back.

    Example:
        >>> describe_report(None, LocalRank(0, 1, "default"), False)
        'ckpt-prefetch: no prefetch (prefetch=False), local rank 0 of 1 (default)'
    """
    where = f"local rank {local.rank} of {local.world} ({local.source})"
    if report is None:
        return f"ckpt-prefetch: no prefetch (prefetch={prefetch!r}), {where}"
    return (
        f"ckpt-prefetch: {where}: planned={report.planned_bytes} warmed={report.warmed_bytes} "
        f"cached={report.cached_bytes} skipped={report.skipped_bytes} "
        f"failed={report.failed_bytes} bytes ({format_bytes(report.warmed_bytes)} warmed "
        f"in {report.elapsed_s:.2f} s, {report.files} file(s)); strategy={report.strategy} "
        f"backend={report.backend} concurrency={report.concurrency} "
        f"chunk={format_bytes(report.chunk_bytes)}" + (" cancelled" if report.cancelled else "")
    )


def share_log_handlers(host: str) -> None:
    """Send the log records of `engine` and `loader_adapter` to a serving engine's handlers.

    Serving engines put their handlers on their own logger (vLLM: ``"vllm"``, which does
    not propagate) and leave the root logger bare, so our records would reach only
    Python's last-resort handler: warnings only, unformatted. When the root logger has no
    handler, our loggers that have none get the host logger's handlers and level, so the
    user reads our lines in the engine's log, in its format. An application that
    configured logging (a root handler) keeps its own configuration. Idempotent.

    Args:
        host: the serving engine's logger name.
    """
    host_logger = logging.getLogger(host)
    if logging.getLogger().handlers or not host_logger.handlers:
        return
    for name in ("engine", "loader_adapter"):
        ours = logging.getLogger(name)
        if ours.handlers:
            continue
        for handler in host_logger.handlers:
            ours.addHandler(handler)
        if ours.level == logging.NOTSET:
            ours.setLevel(host_logger.getEffectiveLevel())
        ours.propagate = False
