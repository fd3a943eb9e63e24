"""The bench's pieces without running a suite: configs, plans, checksums, results, report, CLI.

Nothing here asserts a wall-clock threshold; the stored results document is built in
the test, so table, plot and compare run on a known input.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import report, results
from bench.baselines import SGLangStylePrefetcher, load_plain, load_sglang, sglang_plan
from bench.blockdev import block_device
from bench.checkpoint import scan_checkpoint
from bench.cli import main
from bench.configs import Config, parse_config
from bench.consumer import Consumer
from bench.errors import BenchError, ChecksumMismatch
from bench.floor import raw_pieces, raw_read_share
from bench.protocol import Job, RankReport
from bench.runner import Sampling, fio_available, plan, run_suite
from bench.store import ensure_checkpoint
from bench.suites import Matrix, Suite

MiB = 1 << 20


# --------------------------------------------------------------------------------------
# Configurations


@pytest.mark.parametrize(
    ("text", "kind", "spec"),
    [
        ("none", "none", "none"),
        ("sglang", "sglang", "sglang"),
        ("ours", "ours", "ours"),
        ("ours-files", "ours", "ours:strategy=files"),
        ("ours-c1-64m", "ours", "ours:chunk_mb=64,concurrency=1"),
        ("ours-pread", "ours", "ours:backend=pread"),
        ("ours-nowindow", "ours", "ours:window=off"),
        (
            "ours:window=auto,backend=pread,concurrency=2,chunk_mb=32",
            "ours",
            "ours:backend=pread,chunk_mb=32,concurrency=2,window=auto",
        ),
        ("sglang:threads=8,block_mb=32", "sglang", "sglang:block_mb=32,threads=8"),
        ("raw:threads=2", "raw", "raw:threads=2"),
    ],
)
def test_parse_config(text: str, kind: str, spec: str) -> None:
    cfg = parse_config(text)
    assert (cfg.name, cfg.kind, cfg.spec) == (text, kind, spec)
    assert parse_config(cfg.spec).spec == spec  # the canonical form parses to itself


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fast",
        "none:threads=2",
        "ours:bogus=1",
        "ours:concurrency=0",
        "sglang:threads=x",
        "ours:chunk_mb=-1",
        "ours:window=lots",
        "ours:concurrency",
    ],
)
def test_parse_config_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_config(text)


def test_loader_options_map_to_engine_names() -> None:
    cfg = parse_config("ours:chunk_mb=64,concurrency=1,window=off,skip_cached=off")
    opts = cfg.loader_options()
    assert opts == {
        "prefetch": True,
        "chunk_bytes": 64 * MiB,
        "concurrency": 1,
        "window_bytes": None,
        "skip_cached": False,
    }
    assert "window_bytes" not in parse_config("ours:window=auto").loader_options()
    assert parse_config("ours:window=512MiB").loader_options()["window_bytes"] == 512 * MiB
    assert parse_config("ours-noprefetch").loader_options()["prefetch"] is False


def test_job_roundtrip() -> None:
    job = Job("ours", ["/a", "/b"], 4, max_tensor_bytes=10, cgroup="/x", checksum=False)
    assert Job.from_json(job.to_json()) == job


# --------------------------------------------------------------------------------------
# Plans: SGLang-style and the raw floor


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("nfiles", [1, 3, 8, 9])
def test_sglang_plan_is_sorted_round_robin(world: int, nfiles: int) -> None:
    files = [f"/ckpt/model-{i:05d}.safetensors" for i in range(nfiles)]
    shuffled = files[::-1]
    plans = [sglang_plan(shuffled, r, world) for r in range(world)]
    assert plans == [sorted(files)[r::world] for r in range(world)]
    assert sorted(p for plan in plans for p in plan) == sorted(files)


def test_sglang_plan_rejects_bad_rank() -> None:
    with pytest.raises(ValueError):
        sglang_plan(["a"], 2, 2)


def test_sglang_prefetcher_reads_exactly_its_files(make_file: Any) -> None:
    files = [str(make_file(f"f{i}.bin", (i + 1) * MiB + 17)) for i in range(5)]
    for rank in range(2):
        plan = sglang_plan(files, rank, 2)
        pf = SGLangStylePrefetcher(plan, threads=4, block_bytes=MiB // 2).start()
        assert pf._thread is not None and pf._thread.daemon
        pf._thread.join(timeout=30)
        stats = pf.stats()
        assert stats["finished"] and not stats["errors"]
        assert stats["bytes_read"] == sum(os.path.getsize(f) for f in plan)
        assert stats["cpu_s"] > 0  # the reader threads' own CPU, counted as they read
        assert stats["files"] == len(plan)


def test_sglang_prefetcher_records_errors(tmp_path: Path) -> None:
    pf = SGLangStylePrefetcher([str(tmp_path / "missing")]).start()
    assert pf._thread is not None
    pf._thread.join(timeout=10)
    assert pf.stats()["errors"] and pf.stats()["bytes_read"] == 0


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 100), min_size=1, max_size=6),
    world=st.integers(1, 6),
    chunk=st.integers(1, 17),
)
def test_raw_pieces_cover_every_byte_once(sizes: list[int], world: int, chunk: int) -> None:
    files = [(f"f{i}", s) for i, s in enumerate(sizes)]
    seen: dict[str, list[tuple[int, int]]] = {}
    for rank in range(world):
        for path, off, length in raw_pieces(files, rank, world, chunk):
            assert 0 < length <= chunk
            seen.setdefault(path, []).append((off, off + length))
    for path, size in files:
        spans = sorted(seen.get(path, []))
        pos = 0
        for lo, hi in spans:
            assert lo == pos
            pos = hi
        assert pos == size


def test_raw_read_share_reads_everything_once(make_file: Any) -> None:
    files = [str(make_file(f"r{i}.bin", 3 * MiB + i)) for i in range(3)]
    total = sum(os.path.getsize(f) for f in files)
    got = sum(raw_read_share(files, r, 3, threads=2, chunk_bytes=MiB) for r in range(3))
    assert got == total


# --------------------------------------------------------------------------------------
# Checkpoints and the consumer's checksum


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("work")
    ckpt, made = ensure_checkpoint(work, shape="uniform", size_bytes=8 * MiB, shards=3)
    assert made
    return ckpt


def test_ensure_checkpoint_reuses(small_ckpt: Any) -> None:
    again, made = ensure_checkpoint(
        small_ckpt.directory.parent.parent, shape="uniform", size_bytes=8 * MiB, shards=3
    )
    assert not made and again == small_ckpt
    count, largest = scan_checkpoint(small_ckpt.files)
    assert (count, largest) == (small_ckpt.tensor_count, small_ckpt.max_tensor_bytes)
    assert len(small_ckpt.files) == 3


def _checksum(files: list[Path], *, reverse: bool = False, tamper: bool = False) -> str:
    import torch
    from safetensors import safe_open

    consumer = Consumer(torch.empty(16, dtype=torch.uint8))  # grows as needed
    items = []
    for f in sorted(files):
        with safe_open(str(f), framework="pt") as h:
            items += [(n, h.get_tensor(n).clone()) for n in h.keys()]  # noqa: SIM118
    if reverse:
        items.reverse()
    if tamper:
        name, t = items[-1]
        t.view(-1).view(torch.uint8)[-1] ^= 1
    for name, t in items:
        consumer(name, t)
    assert consumer.tensors == len(items)
    assert consumer.checksum is not None
    return consumer.checksum


def test_checksum_is_order_independent_and_catches_a_flipped_bit(small_ckpt: Any) -> None:
    files = list(small_ckpt.files)
    a = _checksum(files)
    assert _checksum(files, reverse=True) == a
    assert _checksum(files, tamper=True) != a


def test_plain_and_sglang_loads_see_the_same_tensors(small_ckpt: Any) -> None:
    import torch

    names: list[list[str]] = [[], []]
    c0 = Consumer(torch.empty(small_ckpt.max_tensor_bytes, dtype=torch.uint8))
    c1 = Consumer(torch.empty(small_ckpt.max_tensor_bytes, dtype=torch.uint8))
    load_plain(small_ckpt.files, lambda n, t: (names[0].append(n), c0(n, t)))
    pf = load_sglang(small_ckpt.files, 1, 2, lambda n, t: (names[1].append(n), c1(n, t)))
    assert pf.files == sorted(str(f) for f in small_ckpt.files)[1::2]
    assert names[0] == names[1] and len(names[0]) == small_ckpt.tensor_count
    assert c0.checksum == c1.checksum


def test_block_device_of_a_regular_path() -> None:
    dev = block_device("/")
    assert dev is None or (Path("/sys/block") / dev / "stat").exists()


# --------------------------------------------------------------------------------------
# The checksum check fails loudly


class FakeLauncher:
    """Returns made-up rank reports: a per-config checksum lets a test inject a mismatch."""

    def __init__(self, checksums: dict[str, str], tensors: int) -> None:
        self.checksums = checksums
        self.tensors = tensors
        self.jobs: list[Job] = []

    def run(self, job: Job, world: int, timeout: float) -> tuple[float, list[RankReport]]:
        self.jobs.append(job)
        cfg = parse_config(job.config)
        total = sum(os.path.getsize(f) for f in job.files)
        out = []
        for rank in range(world):
            share = total // world + (total % world if rank == 0 else 0)
            out.append(
                RankReport(
                    rank=rank,
                    t_release=0.0,
                    t_done=100.0 + 1.0 + rank / 10,
                    wall_s=1.0,
                    cpu_s=0.5,
                    peak_rss_bytes=1 << 20,
                    peak_anon_bytes=1 << 20,
                    bytes_consumed=share if cfg.kind == "raw" else 1000,
                    tensors=self.tensors if cfg.kind != "raw" else 0,
                    checksum=self.checksums.get(cfg.kind) if cfg.kind != "raw" else None,
                    io_read_bytes=10,
                    prefetch=None,
                )
            )
        return 100.0, out

    def close(self) -> None:
        pass


def _group(
    ckpt: Any, checksums: dict[str, str], configs: tuple[str, ...], launcher: Any = None
) -> dict[str, Any]:
    """Run a 2-rank, 2-repeat suite on local disk with made-up rank reports."""
    m = Matrix("cold", ("local",), (2,), (ckpt.shape,), configs, 8 * MiB, fio=False)
    suite = Suite(
        name="t",
        matrices=(m,),
        repeats=2,
        warmup=1,
        workdir=ckpt.directory.parent.parent,
        shards=3,
    )
    return run_suite(suite, launcher=launcher or FakeLauncher(checksums, ckpt.tensor_count))


def test_suite_records_samples(small_ckpt: Any) -> None:
    doc = _group(
        small_ckpt, {"none": "aa", "sglang": "aa", "ours": "aa"}, ("none", "sglang", "ours")
    )
    kinds = sorted((r["kind"], r["config"], len(r["samples"])) for r in doc["results"])
    assert kinds == [
        ("floor-raw", "floor:raw", 2),
        ("hot", "hot", 2),
        ("load", "none", 2),
        ("load", "ours", 2),
        ("load", "sglang", 2),
    ]
    for r in doc["results"]:
        assert r["samples"][0]["wall_s"] == pytest.approx(1.1)  # release -> last rank
        assert r["samples"][0]["rank_s"] == pytest.approx([1.0, 1.1])


def test_the_run_carries_out_exactly_the_planned_steps(small_ckpt: Any) -> None:
    """Progress totals and --dry-run count the same step list the run goes through."""
    m = Matrix("cold", ("local",), (1, 2), (small_ckpt.shape,), ("none", "ours"), 8 * MiB)
    suite = Suite(
        name="t",
        matrices=(m, dataclasses.replace(m, scenario="sweep", hot=False)),
        repeats=2,
        warmup=1,
        workdir=small_ckpt.directory.parent.parent,
        shards=3,
    )
    events: list[Any] = []
    launcher = FakeLauncher({"none": "aa", "ours": "aa"}, small_ckpt.tensor_count)
    fio = fio_available()
    steps = plan(suite, fuse_ok=True, fio_ok=fio)
    run_suite(suite, progress=events.append, launcher=launcher)
    finished = [e for e in events if e.finished is not None]
    assert len(finished) == len(steps) == finished[-1].done == finished[-1].total
    for event, step in zip(finished, steps, strict=True):
        assert event.finished.startswith(step.label)
    samples = [s for s in steps if isinstance(s, Sampling)]
    assert len(launcher.jobs) == len(samples)  # one launch per sample, warm-ups included
    # 1 checkpoint; per scenario and rank count: 1 warm-up + 2 x (floor + 2 configs)
    # (+ 2 hot in cold); fio once per scenario when installed
    assert len(steps) == 1 + 2 * (1 + 6 + 2) + 2 * (1 + 6) + (2 if fio else 0)


def test_dry_run_counts_the_planned_steps(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.netfs import fuse_available
    from bench.suites import quick_suite

    assert main(["run", "--dry-run"]) == 0
    out = capsys.readouterr().out
    planned = len(plan(quick_suite(), fuse_ok=fuse_available()[0]))
    assert f"\n{planned} steps (" in out


def test_checksum_mismatch_fails_loudly(small_ckpt: Any) -> None:
    with pytest.raises(ChecksumMismatch, match=r"CHECKSUM MISMATCH.*sglang"):
        _group(small_ckpt, {"none": "aa", "sglang": "bb"}, ("none", "sglang"))
    assert issubclass(ChecksumMismatch, BenchError)


# --------------------------------------------------------------------------------------
# Results, table, plot, compare on a stored document


def _sample(wall: float, served: float, checksum: str = "c-1") -> dict[str, Any]:
    return {
        "wall_s": wall,
        "rank_s": [wall * 0.98, wall],
        "cpu_s": 1.0,
        "cpu_s_per_gb": 0.5,
        "bytes_served": int(served * 1024),
        "bytes_served_ratio": served,
        "resident_before": 0.0,
        "checksum": checksum,
        "ranks": [
            {
                "rank": r,
                "wall_s": wall,
                "cpu_s": 0.5,
                "peak_rss_bytes": 300 * MiB,
                "peak_anon_bytes": 100 * MiB,
                "tensors": 1,
                "checksum": checksum,
            }
            for r in range(2)
        ],
        "detail": None,
    }


def stored_document() -> dict[str, Any]:
    """A small results document as `run_suite` writes it (two shapes, all kinds)."""
    doc = results.new_document(
        settings={"suite": "quick", "repeats": 3, "warmup": 1, "launcher": "forkserver"}
    )
    for shape in ("uniform", "single"):
        cid = f"{shape}-512MiB"
        doc["checkpoints"][cid] = {
            "shape": shape,
            "total_bytes": 1024,
            "tensor_count": 1,
            "max_tensor_bytes": 512,
            "files": [{"name": "model.safetensors", "size": 1024}],
            "checksum": "c-1",
        }
        for kind, cfg, walls in (
            ("load", "none", (8.0, 8.2, 8.1)),
            ("load", "sglang", (5.0, 5.1, 5.2)),
            ("load", "ours", (4.0, 4.1, 4.9)),
            ("floor-raw", "floor:raw", (3.9, 3.8, 3.9)),
            ("floor-fio", "floor:fio", (3.7,)),
            ("hot", "hot", (1.0, 1.0, 1.1)),
        ):
            samples = [_sample(w, 1.0 if kind != "hot" else 0.0) for w in walls]
            doc["results"].append(
                {
                    "scenario": "cold",
                    "kind": kind,
                    "fs": "slow-nfs",
                    "shape": shape,
                    "checkpoint": cid,
                    "ranks": 1 if kind == "floor-fio" else 4,
                    "config": cfg,
                    "spec": cfg,
                    "memory_limit_bytes": None,
                    "samples": samples,
                    "summary": results.summarize(samples, total_bytes=1024),
                }
            )
    doc["filesystems"]["slow-nfs"] = {"kind": "netfs", "label": "slow-nfs: simulated"}
    doc["duration_s"] = 12.0
    return doc


def test_stored_document_validates_and_roundtrips(tmp_path: Path) -> None:
    doc = stored_document()
    path = results.save(doc, tmp_path / "a.json")
    assert results.load(path) == json.loads(json.dumps(doc))
    bad = copy.deepcopy(doc)
    del bad["results"][0]["summary"]
    with pytest.raises(results.ResultsError, match="summary"):
        results.validate(bad)
    newer = dict(doc, schema_version=99)
    with pytest.raises(results.ResultsError, match="schema_version"):
        results.validate(newer)


def test_summary_median_spread_unstable() -> None:
    s = results.summarize(
        [_sample(4.0, 1.0), _sample(4.1, 1.0), _sample(4.9, 1.02)], total_bytes=1024
    )
    assert s["median_s"] == 4.1
    assert s["spread"] == pytest.approx(0.9 / 4.1)
    assert s["unstable"] is True
    assert s["bytes_served_ratio"] == pytest.approx(1.0, abs=0.001)
    assert s["peak_rss_mib"] == 300
    one = results.summarize([_sample(4.0, 1.0)], total_bytes=1024)
    assert one["spread"] == 0 and one["unstable"] is False


def test_rows_ratios() -> None:
    rows = {(r.shape, r.config): r for r in report.rows(stored_document())}
    ours = rows[("uniform", "ours")]
    assert ours.vs_none == pytest.approx(8.1 / 4.1)
    assert ours.vs_sglang == pytest.approx(5.1 / 4.1)
    assert ours.vs_floor == pytest.approx(4.1 / 3.9)
    assert ours.unstable
    assert rows[("uniform", "floor:raw")].vs_floor == 1.0
    assert rows[("uniform", "floor:fio")].ranks == 4  # shown in the group of its checkpoint
    order = [r.config for r in report.rows(stored_document()) if r.shape == "single"]
    assert order == ["none", "sglang", "ours", "floor:raw", "floor:fio", "hot"]


def test_table_and_plot(tmp_path: Path) -> None:
    from rich.console import Console

    doc = stored_document()
    console = Console(record=True, width=200)
    report.print_report(doc, console)
    text = console.export_text()
    for needle in (
        "ours",
        "sglang",
        "floor:raw",
        "hot",
        "vs sglang",
        "/floor",
        "served",
        "1.98×",
        "slow-nfs: simulated",
    ):
        assert needle in text
    png = report.plot(doc, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare(tmp_path: Path) -> None:
    a = stored_document()
    b = copy.deepcopy(a)
    for r in b["results"]:
        if r["config"] == "ours":
            for s in r["samples"]:
                s["wall_s"] /= 2
            r["summary"] = results.summarize(r["samples"], total_bytes=1024)
    b["results"].append(dict(b["results"][0], config="ours-files"))
    rows, only_a, only_b = results.compare(a, b)
    by = {(row.key[2], row.key[4]): row for row in rows}
    assert by[("uniform-512MiB", "ours")].ratio == pytest.approx(0.5)
    assert by[("uniform-512MiB", "ours")].significant
    assert by[("uniform-512MiB", "none")].ratio == 1.0
    assert not by[("uniform-512MiB", "none")].significant
    assert only_a == [] and len(only_b) == 1
    pa, pb = results.save(a, tmp_path / "a.json"), results.save(b, tmp_path / "b.json")
    assert main(["compare", str(pa), str(pb)]) == 0
    assert main(["show", str(pa), "--plot", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").exists()


# --------------------------------------------------------------------------------------
# CLI


def test_cli_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--quick",
        "--full",
        "--fs",
        "--ranks",
        "--shapes",
        "--size",
        "--configs",
        "--repeats",
        "--out",
        "--json",
        "--plot",
        "--workdir",
        "--launcher",
        "--memory-limit",
        "--scenario",
        "ours-c1-64m",
        "sorted(files)[rank::world]",
    ):
        assert flag in out


def test_cli_rejects_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["run", "--configs", "nonsense"],
        ["run", "--ranks", "0"],
        ["run", "--size", "lots"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    for argv, says in (
        (["run", "--fs", "nfs-of-dreams"], "unknown filesystem"),
        (["run", "--shapes", "cube"], "unknown shape"),
        (["run", "--scenario", "marathon"], "unknown scenario"),
        (["run", "--dry-run", "--scenario", "bigger-than-memory", "--memory-limit", "1MiB"],
         "too small"),
        (["make", "/tmp/unused", "--shape", "single", "--skew", "3"], "--skew applies"),
    ):  # fmt: skip
        assert main([*argv, "--workdir", "/tmp/unused"] if argv[0] == "run" else argv) == 2
        assert says in capsys.readouterr().err, argv


def test_cli_make_skew_alone_means_skewed(tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert main(["make", str(out), "--size", "8MiB", "--shards", "2", "--skew", "3"]) == 0
    sizes = sorted(f.stat().st_size for f in out.glob("*.safetensors"))
    assert sizes[1] > 2.5 * sizes[0]


def test_cli_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "make",
                str(tmp_path / "c"),
                "--size",
                "4MiB",
                "--shards",
                "2",
                "--shape",
                "skewed",
                "--skew",
                "3",
                "--dtypes",
                "bf16,fp8_e4m3",
            ]
        )
        == 0
    )
    assert "2 files" in capsys.readouterr().out
    assert (tmp_path / "c" / "model.safetensors.index.json").exists()


def test_config_dataclass_is_hashable() -> None:
    assert len({parse_config("ours"), parse_config("ours"), Config("x", "none")}) == 2


# --------------------------------------------------------------------------------------
# netfs control channel


def test_control_request_that_times_out_is_retried_on_a_new_connection(tmp_path: Path) -> None:
    """A starved server (no reply within the timeout) costs a retry, not the whole run."""
    import socket
    import threading

    from bench.netfs import ControlClient
    from bench.protocol import GetCounters

    path = str(tmp_path / "ctl.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    seen: list[bytes] = []

    def serve() -> None:
        silent, _ = srv.accept()  # first connection: reads the request, never answers
        silent.recv(4096)
        conn, _ = srv.accept()
        with conn, conn.makefile("rwb") as f:
            seen.append(f.readline())
            f.write(b'{"ok": true, "result": {"bytes_served": 7}}\n')
            f.flush()
        silent.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = ControlClient(path, timeout=0.3)
    try:
        assert client.call(GetCounters()) == {"bytes_served": 7}
    finally:
        client.close()
        srv.close()
    t.join(5)
    assert seen == [b'{"op": "counters"}\n']


def test_fio_reads_many_files_with_long_names(tmp_path: Path) -> None:
    """fio refuses an option over 4096 characters, which 64 long paths exceed together."""
    import shutil

    from bench.floor import fio_read

    if not shutil.which("fio"):
        pytest.skip("fio is not installed (scripts/setup.sh installs it)")
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    names = [deep / f"model-{i:05d}-of-00064-with-a-long-name.safetensors" for i in range(64)]
    for i, f in enumerate(names):
        f.write_bytes(bytes([i]) * (MiB + 4096 * i))  # tails past the last whole MiB
    assert len(":".join(map(str, names))) > 4096
    out = fio_read(names, ioengine="psync")
    assert out["bytes"] == out["whole_block_bytes"] == 64 * MiB


def test_plot_labels_every_configuration_of_every_scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every bar's colour is named in the legend, whatever scenario drew it."""
    import matplotlib.figure

    doc = stored_document()
    extra = copy.deepcopy(next(r for r in doc["results"] if r["config"] == "ours"))
    extra.update(scenario="sweep", config="ours-c1-64m")
    doc["results"].append(extra)
    seen: list[str] = []
    real_legend = matplotlib.figure.Figure.legend

    def spy(self, handles, labels, *a, **kw):
        seen.extend(labels)
        return real_legend(self, handles, labels, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "legend", spy)
    report.plot(doc, tmp_path / "plot.png")
    loads = {r["config"] for r in doc["results"] if r["kind"] == "load"}
    assert loads <= set(seen) and "ours-c1-64m" in seen
    assert len(seen) == len(set(seen))


def test_a_filesystem_name_carries_the_client_settings_a_user_varies():
    from bench.filesystems import check_fs, split_fs
    from bench.runner import _floor_config

    assert split_fs("sshfs:max_conns=4;latency_at=link;latency_s=0.005") == (
        "sshfs", {"max_conns": 4, "latency_at": "link", "latency_s": 0.005}
    )  # fmt: skip
    check_fs("sshfs:max_conns=4;latency_at=link")
    check_fs("slow-nfs:latency_s=0.02")
    assert _floor_config("many-streams:latency_s=0.3").spec == "raw:threads=32"
    assert _floor_config("slow-nfs:floor_threads=16").spec == "raw:threads=16"
    with pytest.raises(ValueError, match="unknown field"):
        check_fs("sshfs:max_con=4")  # a typo is refused before anything is mounted
    from bench import sshfs
    from bench.netfs_profiles import profile_with_overrides

    fields = {"max_conns", "latency_s", "latency_at"}
    changed = profile_with_overrides(sshfs.PROFILES, "sshfs", {"max_conns": 4}, fields)
    assert changed.max_conns == 4 and "overridden: max_conns=4" in changed.description
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        check_fs("sshfs:max_conns")
    with pytest.raises(ValueError, match="unknown filesystem"):
        check_fs("nfs4")
    with pytest.raises(ValueError, match="no overrides"):
        check_fs("local:x=1")
