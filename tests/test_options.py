"""One option parser (loader_adapter/options.py): a value means the same, and is refused
with the same words, whether it comes as plug-in JSON, a server flag or a bench
configuration."""

from __future__ import annotations

import argparse

import pytest

from bench.configs import parse_config
from loader_adapter.args import add_prefetch_args, parse_window, prefetch_options_from_args
from loader_adapter.options import OPTION_VALUES, OptionError, parse_option, parse_options


def _flags(*argv: str) -> dict:
    parser = add_prefetch_args(argparse.ArgumentParser(exit_on_error=False))
    return prefetch_options_from_args(parser.parse_args(list(argv)))


@pytest.mark.parametrize(
    ("json_value", "flag", "config", "expected"),
    [
        ("512MiB", ("--prefetch-window", "512MiB"), "ours:window=512MiB", 512 << 20),
        ("none", ("--prefetch-window", "none"), "ours:window=off", None),
    ],
)
def test_a_window_means_the_same_everywhere(json_value, flag, config, expected):
    assert parse_options({"window_bytes": json_value}, where="json")["window_bytes"] == expected
    assert _flags(*flag)["window_bytes"] == expected
    assert parse_config(config).loader_options()["window_bytes"] == expected


def test_counts_and_sizes_mean_the_same_everywhere():
    assert parse_options({"concurrency": 3, "chunk_bytes": "32MiB"}, where="json") == {
        "concurrency": 3,
        "chunk_bytes": 32 << 20,
    }
    flags = _flags("--weight-loader-prefetch-num-threads", "3", "--prefetch-chunk-mb", "32")
    assert (flags["concurrency"], flags["chunk_bytes"]) == (3, 32 << 20)
    cfg = parse_config("ours:concurrency=3,chunk_mb=32").loader_options()
    assert (cfg["concurrency"], cfg["chunk_bytes"]) == (3, 32 << 20)
    assert _flags("--weight-loader-prefetch-num-threads", "auto")["concurrency"] == "auto"


def test_a_bad_value_is_refused_with_the_same_words_everywhere():
    words = OPTION_VALUES["window_bytes"]
    with pytest.raises(OptionError, match="window_bytes") as json_err:
        parse_options({"window_bytes": "lots"}, where="json")
    with pytest.raises(argparse.ArgumentTypeError) as flag_err:
        parse_window("lots")
    with pytest.raises(OptionError) as config_err:
        parse_config("ours:window=lots")
    for err in (json_err, flag_err, config_err):
        assert words in str(err.value)
    # JSON stays strict about types; text is converted only where text is given
    with pytest.raises(OptionError, match="skip_cached"):
        parse_options({"skip_cached": "yes"}, where="json")
    assert parse_option("skip_cached", "yes", where="text", text=True) is True
    with pytest.raises(OptionError, match="unknown option"):
        parse_option("windw", 1, where="test")


def test_a_bench_configuration_is_refused_before_any_rank_starts():
    # Before, a bad backend reached the rank processes and failed there.
    with pytest.raises(OptionError, match="'backend' must be"):
        parse_config("ours:backend=nope")


def test_scope_is_one_enum_equal_to_its_text():
    from loader_adapter import safetensors_weights_iterator
    from loader_adapter.options import SCOPES, Scope

    assert SCOPES == ("node", "cluster") and Scope.CLUSTER == "cluster"
    assert parse_options({"scope": "cluster"}, where="json")["scope"] == Scope.CLUSTER
    with pytest.raises(OptionError, match="'scope' must be"):
        parse_options({"scope": "rack"}, where="json")
    with pytest.raises(ValueError, match="scope must be 'node' or 'cluster'"):
        safetensors_weights_iterator([], scope="rack")
