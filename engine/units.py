"""Byte sizes as people write them ("16MiB", "4GB") and as the CLIs print them.

`parse_size` reads both; `format_bytes` is for people (``"3.00 GiB"``), `format_size` for
names and options that are parsed again (``"1.5GiB"``: no space, no trailing zeros).
"""

from __future__ import annotations

import re

__all__ = ["format_bytes", "format_size", "parse_size"]

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 10**3, "kib": 1 << 10,
    "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
    "g": 1 << 30, "gb": 10**9, "gib": 1 << 30,
    "t": 1 << 40, "tb": 10**12, "tib": 1 << 40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a byte size: a plain number of bytes or a number with a unit.

    Units: B, K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024) and KB, MB, GB, TB (powers of
    1000), case-insensitive.

    Args:
        text: e.g. ``"16MiB"``, ``"1.5GB"``, ``"4096"``.

    Returns:
        The size in bytes.

    Raises:
        ValueError: not a size, or a negative one.

    Example:
        >>> parse_size("16MiB"), parse_size("2GB")
        (16777216, 2000000000)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must be >= 0, got {text!r}")
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: use a number with an optional unit "
            "(B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Format a byte count with a binary unit.

    Example:
        >>> format_bytes(3 << 30)
        '3.00 GiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_size(n: int) -> str:
    """Format a byte count compactly, in the largest binary unit it reaches.

    Four significant digits at most, no space: the form a size takes in a name or an
    option, which `parse_size` reads back (exactly, for sizes of four digits or fewer).

    Example:
        >>> format_size(512 << 20), format_size(3 << 29), format_size(1000)
        ('512MiB', '1.5GiB', '1000B')
        >>> parse_size(format_size(3 << 29)) == 3 << 29
        True
    """
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g}{unit}"
    return f"{n}B"
