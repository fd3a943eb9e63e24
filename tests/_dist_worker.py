"""One rank of the torch.distributed (gloo) rank-discovery test; run as a subprocess.

Usage: python tests/_dist_worker.py RANK WORLD PORT CHECKPOINT_DIR OUT_JSON

Joins a gloo process group on 127.0.0.1:PORT, discovers its local rank (the host identity
comes from $CKPT_PREFETCH_HOST_ID), loads the checkpoint with prefetch on, and writes what
it found to OUT_JSON.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import torch
import torch.distributed as dist

import loader_adapter.iterator as iterator_mod
from loader_adapter import discover_local_rank, safetensors_weights_iterator


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ckpt, out = sys.argv[4], sys.argv[5]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        local = discover_local_rank()
        started: list[Any] = []
        real = iterator_mod.start_prefetch

        def spy(*args: Any, **kwargs: Any) -> Any:
            started.append(real(*args, **kwargs))
            return started[-1]

        iterator_mod.start_prefetch = spy
        digest = hashlib.sha256()
        count = 0
        for name, tensor in safetensors_weights_iterator(ckpt, prefetch=True):
            digest.update(name.encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            count += 1
        report = started[0].report
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(
            {
                "rank": local.rank,
                "world": local.world,
                "source": local.source,
                "report_rank": report.rank,
                "report_world": report.world,
                "tensors": count,
                "digest": digest.hexdigest(),
            },
            f,
        )


if __name__ == "__main__":
    main()
