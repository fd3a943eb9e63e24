"""Serving-engine flags: add_prefetch_args and prefetch_options_from_args."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.checkpoint import make_checkpoint
from engine import BACKENDS, STRATEGIES
from loader_adapter import (
    add_prefetch_args,
    parse_window,
    prefetch_options_from_args,
    safetensors_weights_iterator,
)
from loader_adapter.args import CHUNK_ENV

MiB = 1 << 20


@pytest.fixture(autouse=True)
def no_env_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHUNK_ENV, raising=False)


def parse(*argv: str) -> dict:
    parser = add_prefetch_args(argparse.ArgumentParser(prog="serve"))
    return prefetch_options_from_args(parser.parse_args(list(argv)))


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    parser = add_prefetch_args(argparse.ArgumentParser(prog="serve"))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: serve")
    return err


def test_defaults_leave_engine_defaults() -> None:
    assert parse() == {"prefetch": False}


def test_sglang_flags() -> None:
    assert parse(
        "--weight-loader-prefetch-checkpoints", "--weight-loader-prefetch-num-threads", "2"
    ) == {"prefetch": True, "concurrency": 2}


def test_all_flags() -> None:
    assert parse(
        "--weight-loader-prefetch-checkpoints",
        "--prefetch-strategy",
        "files",
        "--prefetch-backend",
        "pread",
        "--prefetch-chunk-mb",
        "64",
        "--prefetch-window",
        "8GiB",
    ) == {
        "prefetch": True,
        "strategy": "files",
        "backend": "pread",
        "chunk_bytes": 64 * MiB,
        "window_bytes": 8 << 30,
    }


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--prefetch-mode", "auto"], "auto"),
        (["--prefetch-mode", "on"], True),
        (["--prefetch-mode", "off", "--weight-loader-prefetch-checkpoints"], False),
        (["--weight-loader-prefetch-checkpoints"], True),
    ],
)
def test_prefetch_mode(argv: list[str], expected: object) -> None:
    assert parse(*argv)["prefetch"] == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("8GiB", 8 << 30), ("512MiB", 512 * MiB), ("2GB", 2 * 10**9), ("1024", 1024),
     ("auto", "auto"), ("AUTO", "auto"), ("none", None), ("unlimited", None)],
)  # fmt: skip
def test_window_values(value: str, expected: object) -> None:
    assert parse("--prefetch-window", value)["window_bytes"] == expected


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_accepted(strategy: str) -> None:
    assert parse("--prefetch-strategy", strategy)["strategy"] == strategy


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_every_backend_accepted(backend: str) -> None:
    assert parse("--prefetch-backend", backend)["backend"] == backend


def test_invalid_strategy_names_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "--prefetch-strategy", "random")
    assert "invalid choice: 'random'" in err
    for s in STRATEGIES:
        assert s in err


def test_invalid_backend_names_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "--prefetch-backend", "io_uring")
    for b in ("auto", *BACKENDS):
        assert b in err


def test_invalid_mode(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "--prefetch-mode", "maybe")
    assert "off" in err and "auto" in err


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        # the messages of loader_adapter.options, the same as for the plug-ins' JSON
        ("--prefetch-window", "8XB", ["8GiB", "'auto'", "'none'", "'8XB'"]),
        ("--prefetch-window", "0", [">= 1 byte"]),
        ("--prefetch-chunk-mb", "0", [">= 1"]),
        ("--prefetch-chunk-mb", "big", ["positive integer"]),
        ("--prefetch-chunk-mb", "20000", ["16.00 GiB"]),  # past the largest stripe
        ("--weight-loader-prefetch-num-threads", "-2", [">= 1", "'auto'"]),
    ],
)
def test_invalid_values(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, words: list[str]
) -> None:
    err = usage_error(capsys, flag, value)
    assert flag in err
    for w in words:
        assert w in err


def test_env_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHUNK_ENV, "32")
    assert parse()["chunk_bytes"] == 32 * MiB
    assert parse("--prefetch-chunk-mb", "8")["chunk_bytes"] == 8 * MiB
    # A namespace that did not come through add_prefetch_args still honours it.
    assert prefetch_options_from_args(argparse.Namespace())["chunk_bytes"] == 32 * MiB


def test_env_chunk_size_invalid(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(CHUNK_ENV, "lots")
    err = usage_error(capsys)
    assert "--prefetch-chunk-mb" in err and "lots" in err
    with pytest.raises(ValueError, match=CHUNK_ENV):
        prefetch_options_from_args(argparse.Namespace())


def test_parse_window_rejects() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_window("-1GiB")


def test_options_drive_the_iterator(tmp_path: Path) -> None:
    info = make_checkpoint(tmp_path, size_bytes=MiB, shards=2)
    opts = parse(
        "--weight-loader-prefetch-checkpoints",
        "--weight-loader-prefetch-num-threads", "2",
        "--prefetch-chunk-mb", "1",
        "--prefetch-window", "none",
        "--prefetch-backend", "pread",
    )  # fmt: skip
    names = [n for n, _ in safetensors_weights_iterator(info.files, **opts)]
    assert len(names) == info.tensor_count


def test_help_lists_flags() -> None:
    text = add_prefetch_args(argparse.ArgumentParser()).format_help()
    for flag in (
        "--weight-loader-prefetch-checkpoints",
        "--weight-loader-prefetch-num-threads",
        "--prefetch-strategy",
        "--prefetch-backend",
        "--prefetch-chunk-mb",
        "--prefetch-window",
        CHUNK_ENV,
    ):
        assert flag in text
