"""When FUSE tests may skip: only where /dev/fuse cannot be opened, and never under CI=true."""

from __future__ import annotations

import os

import pytest

from bench.netfs import fuse_available


def _dev_fuse_opens() -> tuple[bool, str]:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return False, f"/dev/fuse cannot be opened: {exc}"
    os.close(fd)
    return True, ""


def require_fuse() -> None:
    """Skip when /dev/fuse cannot be opened (fail under CI=true); fail on anything else."""
    opens, why = _dev_fuse_opens()
    if not opens:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"FUSE is required in CI: {why}")
        pytest.skip(why)
    ok, why = fuse_available()
    if not ok:
        pytest.fail(f"/dev/fuse opens but FUSE is not usable: {why}")
