"""Engine micro-benchmark: cold/hot warming of local files against fio, CPU, RSS, 4 ranks.

Measures the engine alone (no parsing) on a local filesystem, each sample in a fresh
process after evicting the files:

- cold throughput of one rank vs ``fio --ioengine=io_uring --iodepth=32 --bs=1M`` over the
  same files (both in the same run);
- CPU seconds per GB of the warming threads (after a warm-up pass);
- hot time (everything already cached) as a share of the cold time;
- RSS growth of the warming process while it warms;
- 4 rank processes at once: bytes read from the block device / the files' size, and
  residency afterwards.

Usage: ``python -m bench.engine_bench --size 4GiB --files 8 --repeats 3``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.blockdev import block_device, sectors_read
from bench.results import host_metadata
from engine import evict, resident_bytes
from engine.units import format_bytes, parse_size

log = logging.getLogger(__name__)

_WORKER = r"""
import json, sys, threading, time
import psutil
from engine import start_prefetch
backend, rank, world, *files = sys.argv[1:]
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.perf_counter()
report = start_prefetch(files, int(rank), int(world), backend=backend).wait()
wall = time.perf_counter() - t0
stop.set(); t.join()
io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
print(json.dumps({"wall_s": wall, "cpu_s": report.cpu_s, "warmed": report.warmed_bytes,
                  "cached": report.cached_bytes, "ok": report.ok, "backend": report.backend,
                  "rss_growth": peak[0] - base, "read_bytes": int(io["read_bytes"])}))
"""


def make_files(directory: Path, total: int, count: int) -> list[Path]:
    """Create (or reuse) `count` files of random bytes totalling `total` bytes, fsync'ed."""
    directory.mkdir(parents=True, exist_ok=True)
    size = total // count
    files = []
    block = os.urandom(8 << 20)
    for i in range(count):
        p = directory / f"shard-{i:03d}.bin"
        files.append(p)
        if p.exists() and p.stat().st_size == size:
            continue
        with open(p, "wb") as f:
            left = size
            while left:
                n = min(left, len(block))
                # vary the data so no layer can deduplicate it
                f.write(block[:n] if (left // n) % 2 else block[n - 1 :: -1][:n])
                left -= n
            f.flush()
            os.fsync(f.fileno())
    return files


def evict_all(files: Sequence[Path]) -> None:
    """Evict every file and check that less than 1% stays resident."""
    for f in files:
        evict(f)
    total = sum(f.stat().st_size for f in files)
    left = sum(resident_bytes(f) for f in files)
    if left > 0.01 * total:
        raise RuntimeError(f"eviction failed: {left} of {total} bytes still resident")


def run_worker(files: Sequence[Path], *, backend: str, rank: int, world: int) -> subprocess.Popen:
    """Start one warming process (fresh interpreter)."""
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, backend, str(rank), str(world), *map(str, files)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def collect(proc: subprocess.Popen) -> dict[str, Any]:
    """Wait for a worker and parse its JSON line."""
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed with exit status {proc.returncode}")
    return json.loads(out)


def fio_cold(files: Sequence[Path]) -> float | None:
    """fio io_uring QD32 1 MiB sequential buffered read of the files; bytes/s, or None."""
    if shutil.which("fio") is None:
        return None
    evict_all(files)
    names = ":".join(str(f).replace(":", "\\:") for f in files)
    out = subprocess.run(
        ["fio", "--name=floor", "--ioengine=io_uring", "--iodepth=32", "--bs=1M",
         "--direct=0", "--rw=read", f"--filename={names}", "--output-format=json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = json.loads(out.stdout)["jobs"][0]["read"]
    return float(job["bw_bytes"])


def measure(files: Sequence[Path], *, backend: str, repeats: int) -> dict[str, Any]:
    """Run every measurement `repeats` times; return medians and raw samples."""
    total = sum(f.stat().st_size for f in files)
    samples: dict[str, list[float]] = {
        "fio_bps": [], "cold_bps": [], "cpu_s_per_gb": [], "hot_over_cold": [],
        "rss_growth": [], "ranks4_read_ratio": [], "ranks4_proc_read_ratio": [],
        "ranks4_min_resident": [], "ranks4_wall_s": [],
    }  # fmt: skip
    # Warm-up: this VM charges first touch of fresh memory; pay it outside the samples.
    evict_all(files)
    collect(run_worker(files, backend=backend, rank=0, world=1))
    for i in range(repeats):
        log.info("repeat %d/%d", i + 1, repeats)
        fio = fio_cold(files)
        if fio is not None:
            samples["fio_bps"].append(fio)
        evict_all(files)
        cold = collect(run_worker(files, backend=backend, rank=0, world=1))
        if not cold["ok"] or cold["warmed"] + cold["cached"] != total:
            raise RuntimeError(f"cold warm incomplete: {cold}")
        hot = collect(run_worker(files, backend=backend, rank=0, world=1))
        samples["cold_bps"].append(total / cold["wall_s"])
        samples["cpu_s_per_gb"].append(cold["cpu_s"] / (total / 1e9))
        samples["hot_over_cold"].append(hot["wall_s"] / cold["wall_s"])
        samples["rss_growth"].append(cold["rss_growth"])

        evict_all(files)
        dev = block_device(files[0]) or "?"
        before = sectors_read(dev)
        t0 = time.perf_counter()
        procs = [run_worker(files, backend=backend, rank=r, world=4) for r in range(4)]
        results = [collect(p) for p in procs]
        wall = time.perf_counter() - t0
        after = sectors_read(dev)
        if not all(r["ok"] for r in results):
            raise RuntimeError(f"a rank failed: {results}")
        samples["ranks4_read_ratio"].append((after - before) * 512 / total)
        samples["ranks4_proc_read_ratio"].append(sum(r["read_bytes"] for r in results) / total)
        samples["ranks4_min_resident"].append(
            min(resident_bytes(f) / f.stat().st_size for f in files)
        )
        samples["ranks4_wall_s"].append(wall)
    medians = {k: statistics.median(v) for k, v in samples.items() if v}
    return {"total_bytes": total, "files": len(files), "backend": backend, "device": dev,
            "repeats": repeats, "median": medians, "samples": samples}  # fmt: skip


def render(result: dict[str, Any]) -> str:
    """A plain-text summary table of `measure`'s result."""
    m = result["median"]
    lines = [
        f"engine bench: {format_bytes(result['total_bytes'])} in {result['files']} files on "
        f"/dev/{result['device']}, backend={result['backend']}, median of {result['repeats']}",
        f"  cold warm, 1 rank          {m['cold_bps'] / 1e9:6.2f} GB/s",
    ]
    if "fio_bps" in m:
        lines.append(f"  fio io_uring QD32 1M       {m['fio_bps'] / 1e9:6.2f} GB/s"
                     f"   (ours / fio = {m['cold_bps'] / m['fio_bps']:.2f})")  # fmt: skip
    lines += [
        f"  CPU per GB (warm threads)  {m['cpu_s_per_gb']:6.3f} CPU-s/GB",
        f"  hot / cold time            {m['hot_over_cold'] * 100:6.2f} %",
        f"  RSS growth while warming   {m['rss_growth'] / 2**20:6.1f} MiB",
        f"  4 ranks: device read       {m['ranks4_read_ratio']:6.3f} x the files' size",
        f"  4 ranks: read_bytes, summed {m['ranks4_proc_read_ratio']:6.3f} x (/proc/PID/io: "
        "these processes only)",
        f"  4 ranks: least resident    {m['ranks4_min_resident'] * 100:6.2f} % of a file",
        f"  4 ranks: wall              {m['ranks4_wall_s']:6.2f} s",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the engine benchmark; print the table, write JSON. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine_bench",
        description="Engine-only benchmark on local files: cold vs fio, CPU/GB, hot, RSS, "
        "4 ranks' device reads.",
    )
    parser.add_argument("--size", default="4GiB", help="total size of the files (%(default)s)")
    parser.add_argument("--files", type=int, default=8, help="number of files (%(default)s)")
    parser.add_argument("--backend", default="auto", help="read backend (%(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="samples (%(default)s)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp/ckpt-prefetch-engine-bench"),
        help="where the files live; must be a local block-device filesystem (%(default)s)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("bench-results/engine.json"),
        help="where to write the result (%(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = make_files(args.dir, parse_size(args.size), args.files)
    result = measure(files, backend=args.backend, repeats=args.repeats)
    result["command"] = "python -m bench.engine_bench " + " ".join(argv or sys.argv[1:])
    result["kernel"] = os.uname().release
    result["host"] = host_metadata()  # the commit and machine, as the suite's results
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
