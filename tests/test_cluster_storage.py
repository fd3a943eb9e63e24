"""Cluster mode's `StripeReader` on a real FUSE mount: how deep it reads, and how far."""

from __future__ import annotations

from pathlib import Path

import pytest
from file_support import write_random

from bench.netfs import mounted
from engine._reader_child import ASK_WINDOWS
from loader_adapter.cluster.plan import Stripe
from loader_adapter.cluster.replica import Replica
from loader_adapter.cluster.storage import StripeReader

MiB = 1 << 20
pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]


def _read_one_stripe(tmp_path: Path, offset: int, length: int, **profile: object):
    """One stripe of a cold 48 MiB file read into a replica through a many-streams mount
    with `profile`'s overrides: (bytes read, the server's counters, replica == source)."""
    from fuse_support import require_fuse

    require_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    size = 48 * MiB
    write_random(backing / "a.bin", size, seed=5)
    (tmp_path / "replica").mkdir()
    replica = Replica.open(
        tmp_path / "replica", "ckpt-prefetch-test-s-h", ["a.bin"], [size], 3, 0, 1
    )
    try:
        with mounted(backing, profile="many-streams", mountpoint=tmp_path / "mnt", **profile) as fs:
            fs.evict()
            fs.reset_counters()
            reader = StripeReader([str(fs.path / "a.bin")], replica)
            try:
                n = reader.read(Stripe(1, 0, offset, length, offset, 1, 0, ()))
            finally:
                reader.close()
            counters = fs.counters()
        with open(backing / "a.bin", "rb") as f:
            f.seek(offset)
            same = bytes(replica.view(0, offset, length)) == f.read(length)
    finally:
        replica.close()
    return n, counters, same


def test_a_stripe_keeps_many_windows_in_flight_and_reads_nothing_past_it(tmp_path):
    # Plain reads keep one read-ahead window or two in flight (on a long round trip a
    # stream is then slow however wide the link): the stripe is asked for ASK_WINDOWS
    # windows ahead of its copy, and no byte of the neighbouring stripes leaves storage.
    # (1 MiB read-ahead windows and requests, 50 ms each.)
    n, counters, same = _read_one_stripe(tmp_path, 8 * MiB, 32 * MiB, latency_s=0.05)
    assert n == 32 * MiB and same
    assert counters.bytes_served == 32 * MiB, counters  # nothing past the stripe
    assert 6 <= counters.max_inflight <= ASK_WINDOWS + 4, counters


def test_with_read_ahead_nearly_off_a_stripe_is_read_plainly(tmp_path):
    # A WILLNEED call per 16 KiB window would cost more CPU than it saves: nothing is asked.
    n, counters, same = _read_one_stripe(
        tmp_path, 2 * MiB, 4 * MiB, latency_s=0.005, read_ahead_kb=16
    )
    assert n == 4 * MiB and same
    assert counters.bytes_served == 4 * MiB, counters
    assert counters.max_inflight <= 4, counters
