"""ckpt-prefetch engine: cooperative, byte-balanced page-cache warming of checkpoint files.

No torch, no safetensors: the engine deals in files and byte ranges only.

Example:
    >>> from engine import start_prefetch
    >>> with start_prefetch(["/etc/hostname"], rank=0, world=1) as handle:
    ...     report = handle.wait()
"""

from engine.backends import BACKENDS, Backend, resolve_backend
from engine.cursor import ConsumerCursor
from engine.engine import prefetch_async
from engine.errors import Failure, InvalidOptionError, PrefetchError, ResidencyUnknownError
from engine.handle import PrefetchHandle, start_prefetch
from engine.memory import MemoryBudget, auto_window, memory_budget
from engine.options import PrefetchOptions
from engine.plan import STRATEGIES, Extent, ResolvedFile, plan, resolve_files
from engine.report import PrefetchReport, Progress
from engine.residency import evict, resident_bytes

__all__ = [
    # planning
    "STRATEGIES",
    "Extent",
    "ResolvedFile",
    "plan",
    "resolve_files",
    # warming
    "BACKENDS",
    "Backend",
    "ConsumerCursor",
    "PrefetchHandle",
    "PrefetchOptions",
    "PrefetchReport",
    "Progress",
    "prefetch_async",
    "resolve_backend",
    "start_prefetch",
    # page cache and memory
    "MemoryBudget",
    "auto_window",
    "memory_budget",
    "evict",
    "resident_bytes",
    # errors
    "Failure",
    "InvalidOptionError",
    "PrefetchError",
    "ResidencyUnknownError",
]
