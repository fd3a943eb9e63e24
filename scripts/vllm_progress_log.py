"""Captures the log of a real vLLM load long enough for the progress lines (README).

Usage: python scripts/vllm_progress_log.py [OUT]   (default docs/results/vllm-progress.log)

A random Llama of about 1.5 GB (float32, 8 layers, hidden 2048) is written to a temporary
directory and served through the simulated slow NFS (bench/netfs.py) limited to 100 MB/s,
so that the load takes longer than the 10 s between two progress lines. vLLM (the
installed CPU build) loads it with ``load_format="ckpt-prefetch"`` and generates from token
ids (tests/_vllm_generate.py); the ckpt-prefetch lines of its log, with vLLM's own line
on the load's duration, are written to OUT.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from serving_support import make_tiny_llama, plugin_env  # noqa: E402

from bench.netfs import mounted  # noqa: E402

CONFIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8,
          "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000}  # fmt: skip


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs/results/vllm-progress.log"
    with tempfile.TemporaryDirectory(prefix="vllm-progress-") as tmp:
        model = Path(tmp) / "model"
        make_tiny_llama(model, config=CONFIG)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        env = plugin_env(Path(tmp) / "metadata")
        with mounted(model, profile="slow-nfs", bandwidth_bps=100e6) as fs:
            fs.evict()
            proc = subprocess.run(
                [sys.executable, "tests/_vllm_generate.py", str(fs.path), "ckpt-prefetch",
                 "--max-tokens", "4", "--memory", "0.3"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            served = fs.counters().bytes_served
    log = proc.stdout + proc.stderr
    keep = [line for line in log.splitlines()  # not vLLM's long configuration line
            if ("ckpt-prefetch" in line and "Initializing a V1" not in line)
            or "Loading weights took" in line]  # fmt: skip
    header = (
        f"# vLLM load_format=ckpt-prefetch, a {size / 1e9:.2f} GB random Llama on the simulated "
        f"slow NFS at 100 MB/s; storage served {served / size:.3f}x the checkpoint; exit "
        f"{proc.returncode}\n# made by: python scripts/vllm_progress_log.py\n"
    )
    out.write_text(header + "\n".join(keep) + "\n")
    print(out.read_text())
    if proc.returncode != 0:
        print(log[-3000:], file=sys.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
