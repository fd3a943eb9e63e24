"""One rank of a two-"node" gloo job that loads through the plug-ins' shared path.

``python tests/_plugin_cluster_worker.py RANK WORLD PORT CHECKPOINT OPTIONS_JSON OUT [SPLIT]``:
joins the gloo group, loads with `load_with_prefetch` and the options a plug-in would
parse, compares every tensor with ``safetensors.torch.load_file``, and writes what it saw
(tensors, mismatches, our log lines) as JSON to OUT. With SPLIT ``halves``, rank r skips
the tensors of the other ranks' share (the i-th tensor by name is rank ``i % WORLD``'s, and
every fifth is every rank's, like the dense tensors of an expert-parallel job), as a
plug-in skips other ranks' experts.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch.distributed as dist

from bench.cluster_sim import reference_tensors, same_bytes
from loader_adapter.integrations._common import load_with_prefetch, parse_options


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main(
    rank: int, world: int, port: int, checkpoint: str, options: str, out: str, split: str = ""
) -> None:
    lines = _Lines()
    logging.getLogger("loader_adapter").addHandler(lines)
    logging.getLogger("loader_adapter").setLevel(logging.INFO)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    files = sorted(str(p) for p in Path(checkpoint).glob("*.safetensors"))
    reference = reference_tensors(checkpoint)
    parsed = parse_options(json.loads(options), where="test")
    skip = None
    if split == "halves":
        others = {n for i, n in enumerate(sorted(reference)) if i % world != rank and i % 5}
        skip = others.__contains__
        reference = {n: t for n, t in reference.items() if n not in others}
    seen, mismatches = 0, []
    for name, tensor in load_with_prefetch(files, parsed, lambda: None, engine="test", skip=skip):
        seen += 1
        if not same_bytes(reference.pop(name, None), tensor):
            mismatches.append(name)
    dist.barrier()
    dist.destroy_process_group()
    Path(out).write_text(
        json.dumps(
            {"tensors": seen, "left": sorted(reference), "mismatches": mismatches,
             "lines": lines.lines}
        )
    )  # fmt: skip


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), a[3], a[4], a[5], *a[6:7])
