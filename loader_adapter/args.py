"""Command-line flags for serving engines: the names SGLang uses, plus our own options.

Example:
    >>> import argparse
    >>> parser = add_prefetch_args(argparse.ArgumentParser())
    >>> ns = parser.parse_args(["--weight-loader-prefetch-checkpoints",
    ...                         "--weight-loader-prefetch-num-threads", "2"])
    >>> prefetch_options_from_args(ns)
    {'prefetch': True, 'concurrency': 2}
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from engine import BACKENDS, STRATEGIES
from loader_adapter.options import SCOPES, OptionError, parse_option

__all__ = [
    "CHUNK_ENV",
    "PREFETCH_MODES",
    "add_prefetch_args",
    "parse_window",
    "prefetch_options_from_args",
]

#: Environment variable giving the chunk size in MiB when ``--prefetch-chunk-mb`` is absent.
CHUNK_ENV = "SGLANG_PREFETCH_BLOCK_SIZE_MB"
#: Values of ``--prefetch-mode``.
PREFETCH_MODES: tuple[str, ...] = ("off", "on", "auto")


def parse_window(text: str) -> int | str:
    """Parse a ``--prefetch-window`` value: a size (``"8GiB"``), ``"auto"`` or ``"none"``.

    Args:
        text: the flag's value.

    Returns:
        Bytes (int >= 1), ``"auto"``, or ``"none"`` (no limit).

    Raises:
        argparse.ArgumentTypeError: the value is none of these.

    Example:
        >>> parse_window("8GiB"), parse_window("auto"), parse_window("unlimited")
        (8589934592, 'auto', 'none')
    """
    value = _checked("window_bytes", text.strip(), "--prefetch-window")
    return "none" if value is None else value


def _checked(key: str, value: object, flag: str) -> Any:
    """`loader_adapter.options.parse_option`, its refusal as argparse's usage error."""
    try:
        return parse_option(key, value, where=flag, text=True)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid {what} {text!r}: expected a positive integer"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: must be >= 1")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _chunk_mb(text: str) -> int:
    mb = _positive_int("chunk size in MiB")(text)
    _checked("chunk_bytes", mb << 20, "--prefetch-chunk-mb")  # within the stripe's range
    return mb


def _threads(text: str) -> int | str:
    return _checked("concurrency", text.strip(), "--weight-loader-prefetch-num-threads")


def add_prefetch_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the checkpoint-prefetch flags to `parser`, in a group of their own.

    Flags: ``--weight-loader-prefetch-checkpoints`` (turn prefetch on, as in SGLang),
    ``--weight-loader-prefetch-num-threads N`` (reads in flight per rank, as in SGLang),
    ``--prefetch-mode {off,on,auto}``, ``--prefetch-strategy``, ``--prefetch-backend``,
    ``--prefetch-chunk-mb`` (default ``$SGLANG_PREFETCH_BLOCK_SIZE_MB`` when set) and
    ``--prefetch-window`` (a size, ``auto`` or ``none``), ``--prefetch-scope`` (``node`` or
    ``cluster``) and ``--prefetch-replica-dir``. Invalid values make argparse
    exit with a usage error that names the valid values.

    Args:
        parser: the serving engine's parser.

    Returns:
        The same parser.

    Example:
        >>> p = add_prefetch_args(argparse.ArgumentParser())
        >>> p.parse_args(["--prefetch-window", "4GiB"]).prefetch_window
        4294967296
    """
    group = parser.add_argument_group(
        "checkpoint prefetch",
        "Warm the checkpoint into the node's page cache with large parallel reads, "
        "split among the node's ranks.",
    )
    group.add_argument(
        "--weight-loader-prefetch-checkpoints",
        action="store_true",
        help="prefetch the checkpoint files into the page cache while loading",
    )
    group.add_argument(
        "--weight-loader-prefetch-num-threads",
        type=_threads,
        default=None,
        metavar="N|auto",
        help="reads in flight per rank, or auto: adapted while it runs (default: auto)",
    )
    group.add_argument(
        "--prefetch-mode",
        choices=PREFETCH_MODES,
        default=None,
        help="off, on, or auto (on for network and FUSE filesystems); overrides "
        "--weight-loader-prefetch-checkpoints",
    )
    group.add_argument(
        "--prefetch-strategy",
        choices=STRATEGIES,
        default=None,
        help="how the node's ranks share the bytes (default: balanced)",
    )
    group.add_argument(
        "--prefetch-backend",
        choices=("auto", *BACKENDS),
        default=None,
        help="how bytes are read into the page cache (default: auto)",
    )
    env_chunk = os.environ.get(CHUNK_ENV)
    group.add_argument(
        "--prefetch-chunk-mb",
        type=_chunk_mb,
        default=env_chunk if env_chunk else None,  # a string default goes through `type`
        metavar="MB",
        help=f"stripe unit and largest read in MiB (default: ${CHUNK_ENV} or the engine's)",
    )
    group.add_argument(
        "--prefetch-window",
        type=parse_window,
        default=None,
        metavar="SIZE|auto|none",
        help="most bytes warmed ahead of the loader, e.g. 8GiB; auto bounds it by the "
        "available memory; none for no limit (default: auto)",
    )
    group.add_argument(
        "--prefetch-scope",
        choices=SCOPES,
        default=None,
        help="node: each node reads the checkpoint once (default); cluster: each byte is "
        "read from storage once for the whole job, the rest sent between nodes through "
        "torch.distributed",
    )
    group.add_argument(
        "--prefetch-replica-dir",
        default=None,
        metavar="DIR",
        help="cluster scope: where each node keeps its replica of the checkpoint "
        "(default: $CKPT_PREFETCH_REPLICA_DIR or /dev/shm)",
    )
    return parser


def prefetch_options_from_args(namespace: argparse.Namespace) -> dict[str, Any]:
    """Turn parsed prefetch flags into keyword options for `safetensors_weights_iterator`.

    Only options given on the command line (or through ``$SGLANG_PREFETCH_BLOCK_SIZE_MB``)
    appear, so the library's defaults apply to the rest.

    Args:
        namespace: the result of ``parser.parse_args()`` after `add_prefetch_args`.

    Returns:
        ``{"prefetch": True | False | "auto", **options}``.

    Raises:
        ValueError: ``$SGLANG_PREFETCH_BLOCK_SIZE_MB`` is not a positive integer (only
            when the namespace did not come through `add_prefetch_args`, which checks it).

    Example:
        >>> prefetch_options_from_args(argparse.Namespace(prefetch_mode="auto"))
        {'prefetch': 'auto'}
    """
    get = vars(namespace).get
    mode = get("prefetch_mode")
    if mode is not None:
        prefetch: bool | str = {"off": False, "on": True, "auto": "auto"}[mode]
    else:
        prefetch = bool(get("weight_loader_prefetch_checkpoints", False))
    options: dict[str, Any] = {"prefetch": prefetch}
    if get("weight_loader_prefetch_num_threads") is not None:
        options["concurrency"] = get("weight_loader_prefetch_num_threads")
    if get("prefetch_strategy") is not None:
        options["strategy"] = get("prefetch_strategy")
    if get("prefetch_backend") is not None:
        options["backend"] = get("prefetch_backend")
    chunk_mb = get("prefetch_chunk_mb")
    if chunk_mb is None and os.environ.get(CHUNK_ENV):
        try:
            chunk_mb = _chunk_mb(os.environ[CHUNK_ENV])
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"${CHUNK_ENV}: {exc}") from None
    if chunk_mb is not None:
        options["chunk_bytes"] = int(chunk_mb) << 20
    window = get("prefetch_window")
    if window is not None:
        options["window_bytes"] = None if window == "none" else window
    if get("prefetch_scope") is not None:
        options["scope"] = get("prefetch_scope")
    if get("prefetch_replica_dir") is not None:
        options["replica_dir"] = get("prefetch_replica_dir")
    return options
