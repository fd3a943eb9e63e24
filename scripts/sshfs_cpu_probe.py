"""Where the prefetch's CPU goes on the real client: reads in flight, read size, process.

Mounts the bench's sshfs (`bench.sshfs`, default profile), then warms a cold 1 GiB skewed
checkpoint the way 4 local ranks would (64 MiB, 16 MiB or 4 MiB stripes dealt round-robin,
`bench.baselines.stripe_plan`), either with one bare ``sendfile`` thread per rank (plain
striping) or through one `engine.reader_process.ReaderProcess` per rank (what ours does)
with 1, 2 or 4 reads in flight. Prints the rate and the readers' CPU-s per GB.

Usage: python scripts/sshfs_cpu_probe.py [--repeats N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time
from pathlib import Path

from bench.baselines import stripe_plan
from bench.sshfs import mounted
from bench.store import ensure_checkpoint
from engine.reader_process import ReaderProcess

RANKS = 4
CASES = [  # (how, stripe bytes, reads in flight per rank[, reader threads])
    ("threads", 64 << 20, 1),
    ("reader", 64 << 20, 1),
    ("reader", 16 << 20, 1),
    ("reader", 4 << 20, 1),
    ("reader", 16 << 20, 2),
    ("reader", 64 << 20, 2),
    ("reader", 4 << 20, 4),
    ("reader", 64 << 20, 4),
    ("reader", 16 << 20, 1, 64),  # threads as the engine sized them: stream_limit's bound
]


def _thread_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime


def _rank(
    how: str, plan: list[tuple[str, int, int]], inflight: int, threads: int, cpus: list[float]
) -> None:
    if how == "threads":
        null = os.open(os.devnull, os.O_WRONLY)
        c = _thread_cpu()
        for path, off, n in plan:
            fd = os.open(path, os.O_RDONLY)
            done = 0
            while done < n and (k := os.sendfile(null, fd, off + done, min(8 << 20, n - done))):
                done += k
            os.close(fd)
        cpus.append(_thread_cpu() - c)
        os.close(null)
        return
    reader = ReaderProcess(threads=threads)
    pending = []
    for path, off, n in plan:
        pending.append(reader.submit(path, off, n, skip_cached=True))
        if len(pending) >= inflight:
            pending.pop(0).result()
    for fut in pending:
        fut.result()
    cpus.append(reader.cpu_s())  # start-up included
    reader.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/ckpt-prefetch-bench"))
    a = ap.parse_args()
    ckpt, _ = ensure_checkpoint(a.workdir, shape="skewed", size_bytes=1 << 30)
    with mounted(ckpt.directory, profile="sshfs") as fs:
        files = sorted(str(p) for p in fs.path.iterdir() if p.suffix == ".safetensors")
        total = sum(os.path.getsize(f) for f in files)
        for _ in range(a.repeats):
            for how, stripe, inflight, *more in CASES:
                nthreads = more[0] if more else inflight
                fs.evict()
                time.sleep(0.3)
                cpus: list[float] = []
                t = time.monotonic()
                threads = [
                    threading.Thread(
                        target=_rank,
                        args=(how, stripe_plan(files, r, RANKS, stripe), inflight, nthreads, cpus),
                    )
                    for r in range(RANKS)
                ]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                dt = time.monotonic() - t
                print(
                    f"{how:7s} {stripe >> 20:2d} MiB stripes, {inflight} in flight per rank "
                    f"({inflight * RANKS:2d} per node), {nthreads:2d} reader threads: "
                    f"{total / dt / 1e6:4.0f} MB/s, "
                    f"{sum(cpus) / (total / 1e9):.3f} CPU-s/GB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
