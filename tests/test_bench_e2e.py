"""The bench end to end in a reduced size: real rank processes, real loads, real counters.

The quick suite's shape (none / sglang / ours, floor, fio, hot) on a 64 MiB checkpoint
with 2 ranks and 1 repeat, on local disk and through the simulated network filesystem.
Assertions are about behaviour and counts (the JSON validates, the checksums agree,
each byte is served once), never about wall-clock time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import results
from bench.cli import main
from bench.configs import parse_config
from bench.errors import BenchError, BenchInterrupted
from bench.filesystems import make_cold, open_fs
from bench.launchers import ForkserverLauncher, SubprocessLauncher
from bench.measure import measure
from bench.runner import run_suite
from bench.store import checkpoint_id, ensure_checkpoint
from bench.suites import Matrix, Suite

MiB = 1 << 20
SIZE = 64 * MiB
CONFIGS = ("none", "sglang", "ours")

pytestmark = pytest.mark.slow


def _suite(workdir: Path, fs: tuple[str, ...], **kw: Any) -> Suite:
    m = Matrix(
        scenario="cold",
        fs=fs,
        ranks=(2,),
        shapes=("uniform", "single"),
        configs=kw.pop("configs", CONFIGS),
        size_bytes=SIZE,
    )
    return Suite(
        name="test",
        matrices=(m,),
        repeats=1,
        warmup=1,
        workdir=workdir,
        shards=4,
        timeout_s=120,
        **kw,
    )


def _check_document(doc: dict[str, Any], fs: str) -> None:
    results.validate(doc)
    assert doc["schema_version"] == results.SCHEMA_VERSION
    assert doc["host"]["cpu_count"] >= 1 and doc["host"]["kernel"]
    assert set(doc["checkpoints"]) == {checkpoint_id(s, SIZE) for s in ("uniform", "single")}
    for cid, ckpt in doc["checkpoints"].items():
        mine = [r for r in doc["results"] if r["checkpoint"] == cid and r["fs"] == fs]
        loads = [r for r in mine if r["kind"] in ("load", "hot")]
        assert sorted(r["config"] for r in loads) == sorted([*CONFIGS, "hot"])
        # one checksum for every configuration, every rank, every sample
        sums = {rk["checksum"] for r in loads for s in r["samples"] for rk in s["ranks"]}
        assert sums == {ckpt["checksum"]} and ckpt["checksum"]
        for r in loads:
            for s in r["samples"]:
                assert [rk["tensors"] for rk in s["ranks"]] == [ckpt["tensor_count"]] * 2
                assert s["resident_before"] < 0.01 or r["kind"] == "hot"
                assert len(s["rank_s"]) == 2 and s["wall_s"] == pytest.approx(max(s["rank_s"]))
                assert all(rk["bytes_consumed"] > 0.99 * ckpt["total_bytes"] for rk in s["ranks"])
        kinds = {r["kind"] for r in mine}
        assert {"load", "floor-raw", "hot"} <= kinds
        if shutil.which("fio"):  # installed by scripts/setup.sh: its floor must be there
            assert "floor-fio" in kinds, [w for w in doc["warnings"] if "fio" in w]


def test_quick_suite_reduced_local(tmp_path: Path) -> None:
    doc = run_suite(_suite(tmp_path / "work", ("local",)))
    _check_document(doc, "local")
    assert doc["filesystems"]["local"]["kind"] == "local"
    for r in doc["results"]:
        if r["kind"] == "hot":  # the checkpoint was cached: the ranks read none of it
            # A rank's read_bytes counts every file it faults in from disk, its libraries
            # too when memory pressure evicted them (once 0.09% of this checkpoint in CI).
            assert r["summary"]["bytes_served_ratio"] < 0.01


@pytest.mark.fuse
def test_quick_suite_reduced_netfs(tmp_path: Path) -> None:
    doc = run_suite(_suite(tmp_path / "work", ("slow-nfs",)))
    _check_document(doc, "slow-nfs")
    for r in doc["results"]:
        served = r["summary"]["bytes_served_ratio"]
        if r["kind"] == "hot":
            # Cached: the mount serves almost none of it. Not exactly none: a few pages
            # evicted by memory pressure are read again (0.03% once in CI, 5 pages).
            # The cold loads below, at 1.0, are the control.
            assert served < 0.01, served
        elif r["kind"] in ("load", "floor-raw"):
            # the node reads each byte from storage once, whichever configuration
            assert 0.999 <= served <= 1.02, (r["config"], served)


@pytest.mark.fuse
def test_cli_run_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    code = main(
        [
            "run",
            "--fs",
            "slow-nfs",
            "--ranks",
            "2",
            "--shapes",
            "single",
            "--size",
            "32MiB",
            "--configs",
            "none,ours-files,ours-c1-64m",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--workdir",
            str(tmp_path / "w"),
            "--json",
            str(out),
            "--no-fio",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = results.load(out)
    assert out.with_suffix(".png").exists()
    assert {r["config"] for r in doc["results"]} == {
        "none",
        "ours-files",
        "ours-c1-64m",
        "floor:raw",
        "hot",
    }
    assert all(len(r["samples"]) == 2 for r in doc["results"])
    assert doc["settings"]["argv"][0] == "run"
    for needle in ("ours-c1-64m", "vs none", "floor:raw", "served"):
        assert needle in captured.out
    assert "[" in captured.err  # plain progress lines when stderr is not a terminal


def test_subprocess_launcher_gives_the_same_checksum(tmp_path: Path) -> None:
    ckpt, _ = ensure_checkpoint(tmp_path, shape="uniform", size_bytes=16 * MiB, shards=3)
    sums = []
    for launcher in (SubprocessLauncher(), ForkserverLauncher()):
        try:
            with open_fs("local", ckpt) as fs:
                s = measure(
                    launcher,
                    fs,
                    ckpt,
                    parse_config("sglang"),
                    2,
                    hot=False,
                    timeout=120,
                    cgroup=None,
                )
        finally:
            launcher.close()
        assert len({r.checksum for r in s.ranks}) == 1
        sums.append(s.checksum)
    assert sums[0] == sums[1] and sums[0] is not None


def test_a_failing_rank_fails_the_measurement_and_the_server_recovers(tmp_path: Path) -> None:
    ckpt, _ = ensure_checkpoint(tmp_path, shape="single", size_bytes=8 * MiB)
    launcher = ForkserverLauncher()
    try:
        with open_fs("local", ckpt) as fs:
            # An option only the engine checks, so the rank fails (parse_config refuses a
            # bad value of the options every entry point shares, such as a backend).
            with pytest.raises(BenchError, match="unknown order"):
                measure(
                    launcher,
                    fs,
                    ckpt,
                    parse_config("ours:order=nope"),
                    2,
                    hot=False,
                    timeout=60,
                    cgroup=None,
                )
            s = measure(
                launcher, fs, ckpt, parse_config("none"), 2, hot=False, timeout=60, cgroup=None
            )
            assert s.checksum
    finally:
        launcher.close()


def test_partial_results_are_kept_on_failure(tmp_path: Path) -> None:
    suite = _suite(tmp_path / "work", ("local",), configs=("none", "ours:order=nope"))
    with pytest.raises(BenchError) as exc:
        run_suite(suite)
    doc = exc.value.document
    assert doc is not None and any(
        r["config"] == "none" or r["kind"] == "floor-raw" for r in doc["results"]
    )
    assert any(w.startswith("partial: stopped after") for w in doc["warnings"])
    results.validate(doc)  # `show` can read it


def test_ctrl_c_keeps_the_results_measured_so_far(tmp_path: Path) -> None:
    suite = _suite(tmp_path / "work", ("local",), configs=("none", "ours"))

    def interrupt_after_first_load(event: Any) -> None:
        if event.finished is not None and "none #1" in event.finished:
            raise KeyboardInterrupt

    with pytest.raises(BenchInterrupted) as exc:
        run_suite(suite, progress=interrupt_after_first_load)
    doc = exc.value.document
    assert doc is not None
    assert [r["config"] for r in doc["results"] if r["kind"] == "load"] == ["none"]
    assert doc["duration_s"] > 0
    assert any(w.startswith("partial: interrupted after") for w in doc["warnings"])
    results.validate(doc)  # `show` can read it


def test_any_failure_keeps_the_results_measured_so_far(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.measure

    def broken(*_a: Any, **_k: Any) -> float:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(bench.measure, "make_hot", broken)  # the hot load runs last
    with pytest.raises(BenchError) as exc:
        run_suite(_suite(tmp_path / "work", ("local",), configs=("none",)))
    doc = exc.value.document
    assert doc is not None and [r["config"] for r in doc["results"] if r["kind"] == "load"]
    assert any("OSError" in w and "Input/output error" in w for w in doc["warnings"])
    results.validate(doc)


def test_a_short_raw_floor_read_stops_the_run(tmp_path: Path) -> None:
    suite = _suite(tmp_path / "work", ("local",), configs=("none",))

    def shrink_a_shard(event: Any) -> None:
        if event.finished is None and event.description.endswith("floor:raw #1"):
            shard = sorted((tmp_path / "work").rglob("*.safetensors"))[0]
            os.truncate(shard, shard.stat().st_size - MiB)

    with pytest.raises(BenchError, match="raw readers read"):
        run_suite(suite, progress=shrink_a_shard)


def test_without_fuse_netfs_falls_back_to_local_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import netfs

    monkeypatch.setattr(netfs, "fuse_available", lambda: (False, "no /dev/fuse here"))
    m = Matrix(
        scenario="cold",
        fs=("slow-nfs", "fast-nfs"),
        ranks=(1,),
        shapes=("single",),
        configs=("none",),
        size_bytes=8 * MiB,
        fio=False,
        hot=False,
    )
    doc = run_suite(Suite(name="test", matrices=(m,), repeats=1, warmup=0, workdir=tmp_path))
    assert {r["fs"] for r in doc["results"]} == {"local"}
    assert any("FUSE is unavailable" in w and "no /dev/fuse here" in w for w in doc["warnings"])
    assert doc["host"]["fuse"] == {"available": False, "reason": "no /dev/fuse here"}


@pytest.mark.fuse
def test_cold_means_the_backing_files_too(tmp_path: Path) -> None:
    """A mount whose server reads from a warm backing cache is not cold storage."""
    import mmap

    ckpt, _ = ensure_checkpoint(tmp_path, shape="single", size_bytes=8 * MiB)
    with open_fs("local-fuse", ckpt) as fs:
        assert make_cold(fs, ckpt.total_bytes) < 0.01
        with open(ckpt.files[0], "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            sum(m[i] for i in range(0, len(m), 4096))  # mapped pages survive DONTNEED
            with pytest.raises(BenchError, match="cannot make the checkpoint cold"):
                make_cold(fs, ckpt.total_bytes)
        assert make_cold(fs, ckpt.total_bytes) < 0.01


@pytest.mark.fuse
def test_served_waits_for_reads_still_in_the_server(tmp_path: Path) -> None:
    import threading

    ckpt, _ = ensure_checkpoint(tmp_path, shape="single", size_bytes=4 * MiB)
    with open_fs("local-fuse", ckpt) as fs:
        fs.evict()
        fs.start_count()
        fs.mount.stall()

        def read() -> None:
            with open(fs.files[0], "rb") as f:
                f.read(4096)  # one request (and its readahead)

        reader = threading.Thread(target=read)
        reader.start()
        while fs.mount.counters().stalled == 0:
            pass
        threading.Timer(0.3, fs.mount.unstall).start()
        assert fs.served() >= 4096  # counted after the stall lifted, not 0 at once
        assert fs.last_counters["requests"] >= 1
        reader.join(10)


def test_the_engine_alone_is_a_configuration_of_the_suite(tmp_path: Path) -> None:
    """The engine-alone bench as the ``engine`` scenario: ``start_prefetch`` in each rank,
    nothing parsed, beside the raw floor, in the one results schema and table."""
    from bench.report import rows

    m = Matrix(
        "engine", ("local",), (2,), ("uniform",), ("engine", "engine:backend=pread"), SIZE,
        hot=False, fio=False,
    )  # fmt: skip
    doc = run_suite(Suite(name="t", matrices=(m,), repeats=1, warmup=0, workdir=tmp_path))
    results.validate(doc)
    loads = {r["config"]: r for r in doc["results"] if r["kind"] == "load"}
    assert set(loads) == {"engine", "engine:backend=pread"}
    total = next(iter(doc["checkpoints"].values()))["total_bytes"]
    for r in loads.values():
        s = r["samples"][0]
        assert sum(rk["bytes_consumed"] for rk in s["ranks"]) == total  # each byte once
        assert all(rk["checksum"] is None and rk["tensors"] == 0 for rk in s["ranks"])
        reports = [rk["prefetch"] for rk in s["ranks"]]
        assert sum(p["warmed_bytes"] + p["cached_bytes"] for p in reports) == total
    pread = loads["engine:backend=pread"]["samples"][0]["ranks"][0]["prefetch"]
    assert pread["backend"].startswith("pread")
    assert {r.config for r in rows(doc)} == {"engine", "engine:backend=pread", "floor:raw"}
