"""Byte sizes in the bench: one parser for what people type, one compact formatter.

The parser accepts the project's one size syntax (`engine.units.parse_size`); the
formatter writes the short form used in checkpoint ids and messages (``512MiB``), which
results files use as keys, so it must not change.
"""

from __future__ import annotations

from engine.units import parse_size as _engine_parse_size

__all__ = ["format_size", "parse_size"]


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``"4GiB"``, ``"256 MiB"``, ``"1.5GB"`` or ``"4096"``.

    KiB, MiB, GiB, TiB (and the bare K, M, G, T) are powers of 1024; KB, MB, GB, TB are
    powers of 1000; case-insensitive.

    Args:
        text: the size as text, or an int (returned unchanged when not negative).

    Returns:
        The size in bytes, rounded down to an integer.

    Raises:
        ValueError: when `text` is not a non-negative size with a known unit.

    Example:
        >>> parse_size("4GiB"), parse_size("1.5KB"), parse_size("12")
        (4294967296, 1500, 12)
    """
    value = _engine_parse_size(text)
    if value < 0:
        raise ValueError(f"size must be >= 0, got {text!r}")
    return value


def format_size(n: int) -> str:
    """The shortest binary-unit form of `n` bytes, four significant digits, no space.

    Example:
        >>> format_size(512 << 20), format_size(3 << 29), format_size(100)
        ('512MiB', '1.5GiB', '100B')
    """
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g}{unit}"
    return f"{n}B"
