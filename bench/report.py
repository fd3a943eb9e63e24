"""Turn a results document into a terminal table, a PNG plot, and a comparison table.

Everything here reads only the results document, so a stored JSON file can be shown
again (``ckpt-prefetch-bench show``) or compared (``ckpt-prefetch-bench compare``).

Column meanings (also the table's caption):

* **time**: median wall time from the release of the ranks to the last rank holding
  every tensor (copied into its own memory); ``±`` is the spread (max - min) / median
  over the repeats, ``!`` marks a spread above 10%.
* **vs none**, **vs sglang**: speed-up, baseline time / this time (above 1 = faster).
* **/floor**: this time / the floor; the floor (``floor:raw``) is the same cold files
  read once by as many processes as there are ranks, 4 threads each, with no parsing.
  ``hot`` is the same load with every byte already cached (the parse + copy cost).
* **served**: bytes the storage served / the checkpoint's size (1.00 = each byte once).
* **CPU s/GB**: CPU seconds of all ranks / GB they consumed.
* **RSS MiB**: largest peak RSS of one rank (file pages mapped by safetensors included).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.models import UNSTABLE_SPREAD, ResultKey
from bench.results import compare

__all__ = ["CAPTION", "Row", "compare_table", "plot", "print_report", "rows", "table"]

log = logging.getLogger(__name__)

CAPTION = (
    "time = median wall time, release of the ranks -> last rank holds every tensor "
    "(copied into its own memory); ± = spread (max-min)/median, ! = spread > 10%. "
    "vs none / vs sglang = speed-up (baseline time / time). /floor = time / floor:raw, "
    "the cold files read once by W processes x 4 threads (16 MiB preadv, no parsing). "
    "hot = the plain load with every byte cached. served = bytes served by storage / "
    "checkpoint size. CPU s/GB = CPU s of all ranks (a reader process of theirs included) "
    "/ GB they consumed. pf CPU s/GB = CPU s of the prefetch's own workers on all ranks / "
    "GB of checkpoint. node CPU s/GB = busy CPU s of the whole node (every process, the "
    "filesystem client and server included: work charged to whoever runs) from release to "
    "the last rank done / GB of checkpoint. RSS = largest peak RSS of a rank (mapped file "
    "pages included)."
)

_FLOOR_ORDER = {"load": 0, "floor-raw": 1, "floor-fio": 2, "hot": 3}


@dataclass(frozen=True)
class Row:
    """One line of the table (numbers, not text).

    Attributes:
        scenario, fs, shape, ranks, config, kind: what was measured.
        median_s, spread, unstable: the time and its stability.
        vs_none, vs_sglang: speed-ups against the baselines of the same group, or None.
        vs_floor: median / floor:raw of the same group, or None.
        served: bytes served / checkpoint size, or None.
        cpu_s_per_gb, rss_mib: costs, or None.
        prefetch_cpu_s_per_gb: CPU seconds of the prefetch's own workers (all ranks, a
            reader process included) per GB of checkpoint, or None (no prefetch).
        node_cpu_s_per_gb: busy CPU seconds of the whole node (every process: ranks,
            readers, the filesystem client and the simulated server) per GB of checkpoint,
            from the ranks' release to the last one done, or None.
    """

    scenario: str
    fs: str
    shape: str
    ranks: int
    config: str
    kind: str
    median_s: float
    spread: float
    unstable: bool
    vs_none: float | None
    vs_sglang: float | None
    vs_floor: float | None
    served: float | None
    cpu_s_per_gb: float | None
    rss_mib: float | None
    prefetch_cpu_s_per_gb: float | None = None
    node_cpu_s_per_gb: float | None = None


def rows(doc: Mapping[str, Any]) -> list[Row]:
    """The table's rows: loads first, then floor:raw, floor:fio and hot, per group.

    A group is (scenario, filesystem, checkpoint, ranks); fio (measured once per
    filesystem and checkpoint) is shown in the group of every rank count.

    Args:
        doc: a results document.

    Returns:
        The rows in display order.

    Example:
        >>> [r.config for r in rows(doc)][:3]  # doctest: +SKIP
        ['none', 'sglang', 'ours']
    """
    groups: dict[tuple[str, str, str, int], list[Mapping[str, Any]]] = {}
    fio: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for r in doc["results"]:
        key = ResultKey.of(r)
        if r["kind"] == "floor-fio":
            fio[key[:3]] = r
        else:
            groups.setdefault(key.group, []).append(r)
    out: list[Row] = []
    for group, members in groups.items():
        f = fio.get(group[:3])
        out += _group_rows(group[3], [*members, f] if f is not None else members)
    return out


def _group_rows(ranks: int, members: Sequence[Mapping[str, Any]]) -> list[Row]:
    """One group's rows, with the speed-ups against its own baselines and floor."""
    by_cfg = {m["config"]: m["summary"]["median_s"] for m in members if m["kind"] == "load"}
    floor = next((m["summary"]["median_s"] for m in members if m["kind"] == "floor-raw"), None)
    base_none, base_sglang = by_cfg.get("none"), by_cfg.get("sglang")
    out = []
    for m in sorted(members, key=lambda m: _FLOOR_ORDER.get(m["kind"], 9)):
        s = m["summary"]
        t = s["median_s"]
        is_load = m["kind"] in ("load", "hot")
        out.append(
            Row(
                scenario=m["scenario"],
                fs=m["fs"],
                shape=m["shape"],
                ranks=ranks,
                config=m["config"],
                kind=m["kind"],
                median_s=t,
                spread=s["spread"],
                unstable=s["unstable"],
                vs_none=base_none / t if is_load and base_none and t > 0 else None,
                vs_sglang=base_sglang / t if is_load and base_sglang and t > 0 else None,
                vs_floor=t / floor
                if floor and m["kind"] != "floor-raw"
                else (1.0 if m["kind"] == "floor-raw" else None),
                served=s.get("bytes_served_ratio"),
                cpu_s_per_gb=s.get("cpu_s_per_gb"),
                rss_mib=s.get("peak_rss_mib"),
                prefetch_cpu_s_per_gb=s.get("prefetch_cpu_s_per_gb"),
                node_cpu_s_per_gb=s.get("node_cpu_s_per_gb"),
            )
        )
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec) + suffix


def table(doc: Mapping[str, Any]) -> Any:
    """A rich Table of the document (see the module docstring for the columns).

    Args:
        doc: a results document.

    Returns:
        ``rich.table.Table``.

    Example:
        >>> rich.print(table(doc))  # doctest: +SKIP
    """
    from rich.table import Table

    scenarios = {r["scenario"] for r in doc["results"]}
    t = Table(
        title=_title(doc),
        caption=CAPTION,
        caption_justify="left",
        show_lines=False,
        header_style="bold",
    )
    if len(scenarios) > 1:
        t.add_column("scenario")
    for name in _COLUMNS:
        t.add_column(name, justify="left" if name in _LEFT else "right", no_wrap=True)
    prev: tuple[str, str, str, int] | None = None
    for r in rows(doc):
        key = (r.scenario, r.fs, r.shape, r.ranks)
        if prev is not None and key != prev:
            t.add_section()
        prev = key
        style = (
            "dim" if r.kind != "load" else ("bold green" if r.config.startswith("ours") else None)
        )
        cells = _cells(r)
        if len(scenarios) > 1:
            cells.insert(0, r.scenario)
        t.add_row(*cells, style=style)
    return t


_COLUMNS = ("config", "fs", "shape", "ranks", "time s", "vs none", "vs sglang", "/floor")
_COLUMNS += ("served", "CPU s/GB", "pf CPU s/GB", "node CPU s/GB", "RSS MiB")
_LEFT = ("scenario", "config", "fs", "shape")


def _cells(r: Row) -> list[str]:
    """One row of the table as text, in the order of `_COLUMNS`."""
    flag = "!" if r.unstable else ""
    return [
        r.config,
        r.fs,
        r.shape,
        str(r.ranks),
        f"{r.median_s:.2f} ±{r.spread:.0%}{flag}",
        _fmt(r.vs_none, ".2f", "×"),
        _fmt(r.vs_sglang, ".2f", "×"),
        _fmt(r.vs_floor, ".2f", "×"),
        _fmt(r.served, ".2f", "×"),
        _fmt(r.cpu_s_per_gb, ".3f"),
        _fmt(r.prefetch_cpu_s_per_gb, ".3f"),
        _fmt(r.node_cpu_s_per_gb, ".3f"),
        _fmt(r.rss_mib, ".0f"),
    ]


def _title(doc: Mapping[str, Any]) -> str:
    host = doc["host"]
    s = doc["settings"]
    mem = host.get("mem_total_bytes", 0) / (1 << 30)
    return (
        f"ckpt-prefetch-bench {s.get('suite')} — {host.get('cpu_count')} CPUs, "
        f"{mem:.0f} GiB, kernel {host.get('kernel')}, repeats {s.get('repeats')}, "
        f"{doc['created']}"
    )


def print_report(doc: Mapping[str, Any], console: Any = None) -> None:
    """Print the table, the filesystems and checkpoints used, and the warnings.

    Args:
        doc: a results document.
        console: a ``rich.console.Console``; default one on stdout.
    """
    from rich.console import Console

    console = console or Console()
    console.print(table(doc))
    for name, fs in doc.get("filesystems", {}).items():
        console.print(f"[bold]{name}[/]: {fs.get('label', '')}", highlight=False)
    for cid, c in doc.get("checkpoints", {}).items():
        console.print(
            f"[bold]{cid}[/]: {len(c['files'])} files, {c['total_bytes'] / (1 << 20):.0f} MiB,"
            f" {c['tensor_count']} tensors, checksum {c.get('checksum')}",
            highlight=False,
        )
    if doc.get("duration_s") is not None:
        console.print(f"suite took {doc['duration_s']:.0f} s", highlight=False)
    for w in doc.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


def _panels(results: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """Rows of panels, (scenario, fs), each with its checkpoints from the left."""
    rows_: dict[tuple[str, str], list[str]] = {}
    for r in results:
        key = ResultKey.of(r)
        cols = rows_.setdefault((key.scenario, key.fs), [])
        if key.checkpoint not in cols:
            cols.append(key.checkpoint)
    return rows_


def _bars(ax: Any, sel: Sequence[Mapping[str, Any]], ranks: list[int], style: _Style) -> None:
    """One bar per configuration and rank count: the median, error bars min..max."""
    loaded = {r["config"] for r in sel if r["kind"] == "load"}
    here = [c for c in style.configs if c in loaded]
    width = 0.8 / max(1, len(here))
    for slot, cfg in enumerate(here):
        xs, ys, lo, hi = [], [], [], []
        for x, rk in enumerate(ranks):
            m = _find(sel, "load", rk, cfg)
            if m is None:
                continue
            s = m["summary"]
            xs.append(x - 0.4 + width * (slot + 0.5))
            ys.append(s["median_s"])
            lo.append(s["median_s"] - s["min_s"])
            hi.append(s["max_s"] - s["median_s"])
        if xs:
            color = style.cmap(style.configs.index(cfg) % style.cmap.N)
            label = cfg if cfg not in style.labelled else None
            ax.bar(xs, ys, width * 0.9, yerr=[lo, hi], capsize=2, color=color, label=label)
            style.labelled.add(cfg)


def _ticks(ax: Any, sel: Sequence[Mapping[str, Any]], ranks: list[int], first: bool) -> None:
    """A black tick at floor:raw and a grey dashed one at the hot load, per rank count."""
    for kind, color, label in (
        ("floor-raw", "black", "floor (raw cold read)"),
        ("hot", "grey", "hot cache"),
    ):
        for x, rk in enumerate(ranks):
            m = _find(sel, kind, rk)
            if m is not None:
                ax.hlines(
                    m["summary"]["median_s"],
                    x - 0.45,
                    x + 0.45,
                    colors=color,
                    linestyles="--" if kind == "hot" else "-",
                    linewidth=1.5,
                    label=label if first and x == 0 else None,
                )


def _find(
    sel: Sequence[Mapping[str, Any]], kind: str, ranks: int, config: str | None = None
) -> Mapping[str, Any] | None:
    for r in sel:
        if r["kind"] == kind and int(r["ranks"]) == ranks and config in (None, r["config"]):
            return r
    return None


@dataclass
class _Style:
    """What every panel shares: one colour per configuration, each named in the legend once."""

    configs: list[str]
    cmap: Any
    labelled: set[str]


def _panel(ax: Any, sel: Sequence[Mapping[str, Any]], title: str, style: _Style, first: bool):
    ranks = sorted({int(r["ranks"]) for r in sel})
    _bars(ax, sel, ranks, style)
    _ticks(ax, sel, ranks, first)
    ax.set_xticks(range(len(ranks)), [f"{rk} ranks" for rk in ranks])
    ax.set_ylabel("load time (s)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _legend(fig: Any, axes: Any) -> None:
    """One legend for the figure: every label once, in the order the panels drew them."""
    handles, labels = [], []
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab, strict=True):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    fig.legend(
        handles, labels, loc="upper center", ncol=min(6, len(labels)), fontsize=8, frameon=False
    )


def plot(doc: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw load time per configuration and rank count, one panel per shape, as PNG.

    Rows of panels are (scenario, filesystem); bars are the median, error bars span
    min..max over the repeats; a black tick marks floor:raw and a grey one the hot load.

    Args:
        doc: a results document.
        path: the PNG to write (parent directories are created).

    Returns:
        The path written.

    Example:
        >>> plot(doc, "bench-results/quick.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in doc["results"] if r["kind"] != "floor-fio"]
    panels = _panels(results)
    if not panels:
        raise ValueError("the document has no results to plot")
    configs = list(dict.fromkeys(r["config"] for r in results if r["kind"] == "load"))
    ncols = max(len(c) for c in panels.values())
    fig, axes = plt.subplots(
        len(panels),
        ncols,
        squeeze=False,
        figsize=(4.2 * ncols + 1, 3.4 * len(panels) + 0.6 + 0.15 * len(configs) / 6),
    )
    # one colour per configuration across the figure (tab20 has 20 distinct ones)
    style = _Style(configs, plt.get_cmap("tab10" if len(configs) <= 10 else "tab20"), set())
    for i, ((scen, fs), cols) in enumerate(panels.items()):
        for j, ax in enumerate(axes[i]):
            if j >= len(cols):
                ax.set_visible(False)
                continue
            sel = [r for r in results if ResultKey.of(r)[:3] == (scen, fs, cols[j])]
            title = f"{cols[j]} — {fs}" + (f" [{scen}]" if scen != "cold" else "")
            _panel(ax, sel, title, style, first=(i, j) == (0, 0))
    _legend(fig, axes)
    fig.suptitle(_title(doc), fontsize=8, y=0.01, va="bottom")
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, 0.25 / height, 1, 1 - 0.45 / height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_table(
    a: Mapping[str, Any], b: Mapping[str, Any], names: Sequence[str] = ("A", "B")
) -> Any:
    """A rich Table of the ratios B / A for the measurements present in both runs.

    Args:
        a: the reference results document.
        b: the other results document.
        names: column labels for the two runs.

    Returns:
        ``rich.table.Table``; rows where the change exceeds both runs' spreads are marked.

    Example:
        >>> rich.print(compare_table(load("a.json"), load("b.json")))  # doctest: +SKIP
    """
    from rich.table import Table

    matched, only_a, only_b = compare(a, b)
    t = Table(
        title=f"{names[1]} vs {names[0]} (ratio = {names[1]} / {names[0]}; below 1.00 = faster)",
        caption=f"* = change larger than the spread of both runs "
        f"(spread threshold for 'unstable' is {UNSTABLE_SPREAD:.0%}). "
        f"Only in {names[0]}: {len(only_a)}; only in {names[1]}: {len(only_b)}.",
        caption_justify="left",
        header_style="bold",
    )
    a_name, b_name = names[0], names[1]
    for name in ("scenario", "fs", "shape", "ranks", "config", f"{a_name} s", f"{b_name} s"):
        t.add_column(name, justify="left" if name in _LEFT else "right", no_wrap=True)
    for name in ("ratio", f"served {a_name}", f"served {b_name}"):
        t.add_column(name, justify="right", no_wrap=True)
    for row in matched:
        scen, fs, shape, ranks, cfg = row.key
        mark = "*" if row.significant else ""
        style = None
        if row.significant:
            style = "green" if row.ratio < 1 else "red"
        t.add_row(
            scen,
            fs,
            shape,
            str(ranks),
            cfg,
            f"{row.a_s:.2f}",
            f"{row.b_s:.2f}",
            f"{row.ratio:.2f}×{mark}",
            _fmt(row.a_served, ".2f", "×"),
            _fmt(row.b_served, ".2f", "×"),
            style=style,
        )
    return t
