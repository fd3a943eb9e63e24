"""Reading stripes from shared storage into the replica (`StripeReader`), on a real mount."""

from __future__ import annotations

import pytest
from file_support import write_random

from bench.netfs import mounted
from loader_adapter.cluster.plan import Stripe
from loader_adapter.cluster.replica import Replica
from loader_adapter.cluster.storage import StripeReader

MiB = 1 << 20


@pytest.mark.fuse
def test_a_stripe_is_in_flight_at_once_and_nothing_past_it_is_read(tmp_path):
    # On a store with a long round trip a stream of plain reads keeps a read-ahead window
    # or two in flight; the stripe reader asks for the whole stripe first.
    backing = tmp_path / "backing"
    backing.mkdir()
    data = write_random(backing / "a.safetensors", 32 * MiB, seed=5).read_bytes()
    replica = Replica.open(tmp_path / "r", "ckpt-prefetch-0-n-h", ["a.safetensors"],
                           [32 * MiB], 1, 0, 1)  # fmt: skip
    with mounted(
        backing, profile="many-streams", mountpoint=tmp_path / "mnt", latency_s=0.05
    ) as fs:
        fs.evict()
        fs.reset_counters()
        reader = StripeReader([str(fs.path / "a.safetensors")], replica)
        stripe = Stripe(0, 0, 4 * MiB, 8 * MiB, 4 * MiB, 0, 0, ())
        try:
            n = reader.read(stripe)
        finally:
            reader.close()
        counters = fs.counters()
    try:
        assert n == 8 * MiB
        assert replica.paths[0].read_bytes()[4 * MiB : 12 * MiB] == data[4 * MiB : 12 * MiB]
    finally:
        replica.close()
    assert counters.bytes_served == 8 * MiB  # nothing read past the stripe
    assert counters.max_inflight >= 6, counters  # 8 windows of 1 MiB asked at once
