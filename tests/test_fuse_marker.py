"""The ``fuse`` marker: a marked test skips (with the reason) only where /dev/fuse cannot be
opened, and fails instead under ``CI=true``; an unmarked test is left alone."""

from __future__ import annotations

import os

import pytest

from conftest import pytest_runtest_setup


class _Item:
    def __init__(self, marked: bool) -> None:
        self.marked = marked

    def get_closest_marker(self, name: str) -> object | None:
        return object() if self.marked and name == "fuse" else None


@pytest.fixture
def no_dev_fuse(monkeypatch):
    real = os.open

    def fake_open(path, *args, **kwargs):
        if str(path) == "/dev/fuse":
            raise PermissionError(1, "Operation not permitted", "/dev/fuse")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_a_marked_test_skips_with_the_reason_where_dev_fuse_cannot_be_opened(
    no_dev_fuse, monkeypatch
):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="/dev/fuse cannot be opened"):
        pytest_runtest_setup(_Item(marked=True))
    pytest_runtest_setup(_Item(marked=False))  # unmarked: nothing checked


def test_under_ci_a_marked_test_fails_instead(no_dev_fuse, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="FUSE is required in CI"):
        pytest_runtest_setup(_Item(marked=True))
