"""Every repeat of a bench results JSON, side by side: does ours win each one?

For each group (filesystem, checkpoint, ranks), the k-th sample of every configuration
belongs to round k (the bench rotates the configurations within a round). Prints one
markdown table per group: the time of each configuration per round, ours / floor, and
whether ours beat each other configuration in that round.

Usage: python scripts/repeats_table.py RESULTS.json [--ours ours]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--ours", default="ours")
    a = ap.parse_args()
    with open(a.results) as f:
        doc = json.load(f)
    groups: dict[tuple[str, str, int], dict[str, list[float]]] = defaultdict(dict)
    for r in doc["results"]:
        key = (r["fs"], r["shape"], r["ranks"])
        groups[key][r["config"]] = [s["wall_s"] for s in r["samples"]]
    for (fs, shape, ranks), by in groups.items():
        others = [c for c in by if c not in (a.ours, "floor:raw", "floor:fio", "hot")]
        print(f"\n**{fs}, {shape}, {ranks} ranks**\n")
        cols = ["round", *by.keys(), f"{a.ours} / floor", *(f"{a.ours} < {c}" for c in others)]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        rounds = min(len(v) for v in by.values())
        for k in range(rounds):
            ours = by[a.ours][k]
            row = [str(k + 1), *(f"{by[c][k]:.2f}" for c in by)]
            floor = by.get("floor:raw", [None] * rounds)[k]
            row.append(f"{ours / floor:.3f}" if floor else "–")
            row += ["yes" if ours < by[c][k] else "**no**" for c in others]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
