"""The bench's types without running anything: results, their identity, the protocols.

The stored documents under docs/results were written before these types existed: they
must still load, show and compare, and a document the types write must have their
layout.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from bench import protocol as proto
from bench import report, results
from bench.models import InconsistentResult, Result, ResultKey, ResultSet, Sample
from bench.protocol import Job, RankReport

REPO = Path(__file__).resolve().parent.parent
STORED = sorted((REPO / "docs" / "results").glob("*.json"))
BENCH_DOCS = [p for p in STORED if json.loads(p.read_text()).get("tool", {}).get("name")]


def _report(rank: int, checksum: str | None = "c-1", **kw: Any) -> RankReport:
    fields: dict[str, Any] = {
        "rank": rank,
        "t_release": 10.0,
        "t_done": 12.0 + rank,
        "wall_s": 2.0 + rank,
        "cpu_s": 1.5,
        "peak_rss_bytes": 300 << 20,
        "peak_anon_bytes": 100 << 20,
        "bytes_consumed": 1 << 30,
        "tensors": 7,
        "checksum": checksum,
        "io_read_bytes": 4096,
        "prefetch": {"warmed_bytes": 1},
    }
    return RankReport(**{**fields, **kw})


def _sample(ranks: int = 2, checksum: str | None = "c-1") -> Sample:
    return Sample.of(
        wall_s=3.0,
        ranks=[_report(r, checksum) for r in range(ranks)],
        served=1 << 30,
        total_bytes=1 << 30,
        resident=0.0,
        detail={"hot": False},
    )


def _result(**kw: Any) -> Result:
    fields: dict[str, Any] = {
        "scenario": "cold",
        "kind": "load",
        "fs": "slow-nfs",
        "shape": "uniform",
        "checkpoint": "uniform-1GiB",
        "ranks": 2,
        "config": "ours",
        "spec": "ours",
        "memory_limit_bytes": None,
        "total_bytes": 1 << 30,
        "samples": (_sample(),),
    }
    return Result(**{**fields, **kw})


# --------------------------------------------------------------------------------------
# Sample and Result


def test_sample_derives_its_figures_from_the_rank_reports() -> None:
    s = _sample()
    assert s.rank_s == (2.0, 3.0)
    assert s.cpu_s == 3.0 and s.cpu_s_per_gb == pytest.approx(3.0 / ((2 << 30) / 1e9))
    assert s.bytes_served_ratio == 1.0 and s.checksum == "c-1"
    mixed = Sample.of(
        wall_s=1.0,
        ranks=[_report(0, "a"), _report(1, "b")],
        served=None,
        total_bytes=1,
        resident=1.5,
        detail=None,
    )
    assert mixed.checksum is None and mixed.bytes_served_ratio is None
    assert mixed.resident_before == 1.0


def _keeps(new: dict, old: dict) -> bool:
    """Every key of `old`, in the same order (a newer writer may add optional ones)."""
    it = iter(new)
    return all(k in it for k in old)


@pytest.mark.parametrize("name", ["quick.json", "full.json"])
def test_result_json_keeps_the_stored_layout(name: str) -> None:
    """Key for key, in order, what the documents under docs/results hold (new optional
    keys, such as the prefetch's own CPU, may stand between)."""
    stored = json.loads((REPO / "docs" / "results" / name).read_text())
    old = next(r for r in stored["results"] if r["kind"] == "load")
    new = _result().to_json()
    assert _keeps(new, old)
    assert _keeps(new["samples"][0], old["samples"][0])
    assert _keeps(new["samples"][0]["ranks"][0], old["samples"][0]["ranks"][0])
    assert _keeps(new["summary"], old["summary"])
    doc = results.new_document(
        settings={"suite": "t", "repeats": 1, "warmup": 0, "launcher": "forkserver"}
    )
    doc["results"].append(new)
    results.validate(doc)


def test_add_refuses_a_sample_of_another_rank_count() -> None:
    with pytest.raises(InconsistentResult, match="a sample of 3 ranks in a result of 2"):
        _result().add(_sample(ranks=3))


def test_add_refuses_a_sample_that_loaded_other_bytes() -> None:
    with pytest.raises(InconsistentResult, match="checksum c-2"):
        _result().add(_sample(checksum="c-2"))
    assert len(_result().add(_sample()).samples) == 2


def test_a_result_is_checked_when_it_is_made() -> None:
    with pytest.raises(ValueError, match="unknown result kind"):
        _result(kind="warm")
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        _result(ranks=0)


def test_result_set_merges_samples_under_one_key() -> None:
    results_ = ResultSet()
    results_.add(_result())
    results_.add(_result(config="none", spec="none"))
    merged = results_.add(_result())
    assert len(results_) == 2 and len(merged.samples) == 2
    assert [r.config for r in results_] == ["ours", "none"]  # first recorded, first listed
    assert [len(r["samples"]) for r in results_.to_json()] == [2, 1]


@pytest.mark.parametrize(
    "change",
    [
        {"spec": "ours:backend=pread"},
        {"kind": "hot"},
        {"memory_limit_bytes": 1 << 30},
        {"total_bytes": 1 << 20},
        {"shape": "skewed"},
    ],
)
def test_result_set_refuses_a_result_whose_description_disagrees(change: dict) -> None:
    results_ = ResultSet()
    results_.add(_result())
    with pytest.raises(InconsistentResult, match="recorded as"):
        results_.add(_result(**change))


def test_one_identity_for_merging_comparing_and_grouping() -> None:
    r = _result()
    stored = r.to_json()
    assert ResultKey.of(stored) == r.key
    assert r.key.group == ("cold", "slow-nfs", "uniform-1GiB", 2)
    legacy = {k: v for k, v in stored.items() if k != "checkpoint"}  # before checkpoint ids
    assert ResultKey.of(legacy).checkpoint == "uniform"
    doc = results.new_document(
        settings={"suite": "t", "repeats": 1, "warmup": 0, "launcher": "forkserver"}
    )
    doc["results"] = [stored, _result(config="none", spec="none").to_json()]
    rows, only_a, only_b = results.compare(doc, doc)
    assert [row.key for row in rows] == [ResultKey.of(x) for x in doc["results"]]
    assert only_a == only_b == []
    assert {(row.scenario, row.fs, row.ranks) for row in report.rows(doc)} == {
        ("cold", "slow-nfs", 2)
    }


# --------------------------------------------------------------------------------------
# Stored documents


@pytest.mark.parametrize("path", BENCH_DOCS, ids=[p.name for p in BENCH_DOCS])
def test_stored_documents_still_show_and_compare(path: Path, capsys: Any) -> None:
    from bench.cli import main

    assert main(["show", str(path)]) == 0
    assert main(["compare", str(path), str(path)]) == 0
    out = capsys.readouterr().out
    assert "floor:raw" in out and "1.00×" in out


# --------------------------------------------------------------------------------------
# Protocols


RANK_MESSAGES = [
    proto.Start(job=Job("ours", ["/a", "/b"], 2, 10, "/cg", False), world=2, dir="/tmp/x"),
    proto.Release(),
    proto.ServerReady(pid=7),
    proto.Ready(),
    proto.Ready(pid=8),
    proto.Failed(),
    proto.Released(t_release=12.5),
    proto.Done(status=(0, 1)),
    proto.RankResult(result=_report(0)),
    proto.Error(error="ValueError: x", traceback="Traceback ..."),
]
CONTROL_MESSAGES = [
    proto.Ping(),
    proto.GetCounters(),
    proto.ResetCounters(),
    proto.InjectEIO(path="a/b", offset=4096, length=10),
    proto.Vanish(path="a"),
    proto.Stall(),
    proto.Stall(seconds=2.0),
    proto.Unstall(),
    proto.ClearFaults(),
    proto.SetBandwidth(bps=None),
    proto.SetBandwidth(bps=3e8),
    proto.SetLatency(seconds=0.002),
    proto.Shutdown(),
]


@pytest.mark.parametrize("message", RANK_MESSAGES, ids=lambda m: type(m).__name__)
def test_rank_messages_round_trip(message: Any) -> None:
    line = proto.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert proto.decode_rank(line) == message


@pytest.mark.parametrize("message", CONTROL_MESSAGES, ids=lambda m: type(m).__name__)
def test_control_messages_round_trip(message: Any) -> None:
    assert proto.decode_control(proto.encode(message)) == message


def test_the_wire_format_other_programs_read() -> None:
    """A subprocess rank's lines, read by scripts that drive ``python -m bench.worker``."""
    assert json.loads(proto.encode(proto.Ready(pid=3))) == {"event": "ready", "pid": 3}
    line = json.loads(proto.encode(proto.RankResult(result=_report(1))))
    assert line["event"] == "result" and line["result"] == dataclasses.asdict(_report(1))
    assert proto.encode(proto.GetCounters()) == b'{"op": "counters"}\n'
    assert proto.decode_reply(proto.reply_ok({"n": 1})) == (True, {"n": 1})
    assert proto.decode_reply(proto.reply_error("ValueError: no")) == (False, "ValueError: no")


@pytest.mark.parametrize(
    "line", [b"not json\n", b'{"op": "teleport"}\n', b'{"event": "ready", "mood": 1}\n', b"[]"]
)
def test_what_is_not_a_message_is_refused(line: bytes) -> None:
    with pytest.raises(proto.ProtocolError):
        proto.decode_rank(line)


def test_each_protocol_reads_only_its_own_messages() -> None:
    with pytest.raises(proto.ProtocolError):
        proto.decode_control(proto.encode(proto.Release()))
    with pytest.raises(proto.ProtocolError):
        proto.decode_rank(proto.encode(proto.Shutdown()))


def test_the_netfs_server_answers_every_control_message() -> None:
    from bench._netfs_server import HANDLERS, ServerState
    from bench.bandwidth import LocalLink

    assert set(HANDLERS) == {type(m) for m in CONTROL_MESSAGES}
    state = ServerState(LocalLink(None), latency_s=0.0)
    for message in CONTROL_MESSAGES:
        HANDLERS[type(message)](state, message)
    assert state.shutting_down and state.latency_s == 0.002 and state.bandwidth_bps == 3e8
    assert HANDLERS[proto.Ping](state, proto.Ping())["pid"] > 0
    for message in (proto.InjectEIO(path="a/b", offset=4096, length=10), proto.Vanish("a")):
        HANDLERS[type(message)](state, message)
    assert state.eio == {"a/b": [(4096, 4106)]} and state.vanished == {"a"}
    with pytest.raises(ValueError, match="length > 0"):
        HANDLERS[proto.InjectEIO](state, proto.InjectEIO(path="a", offset=0, length=0))


def test_the_netfs_server_config_round_trips() -> None:
    cfg = proto.ServerConfig(
        backing="/b",
        mountpoint="/m",
        control="/c.sock",
        parent_pid=1,
        bandwidth_bps=None,
        latency_s=0.002,
        threads=8,
        max_read=1 << 20,
        max_background=256,
        congestion_threshold=192,
        allow_other=True,
    )
    assert proto.ServerConfig.from_json(cfg.to_json()) == cfg
    shared = dataclasses.replace(cfg, bandwidth_file="/dev/shm/netfs-bandwidth-x")
    assert proto.ServerConfig.from_json(shared.to_json()) == shared


def test_prefetch_cpu_counts_every_rank_per_gb_of_checkpoint() -> None:
    def rank(r: int, prefetch: dict | None) -> proto.RankReport:
        return proto.RankReport(r, 0.0, 1.0, 1.0, 2.0, 1, 1, 1 << 30, 1, "c", None, prefetch)

    with_pf = Sample.of(
        wall_s=1.0, ranks=[rank(0, {"cpu_s": 0.3}), rank(1, {"cpu_s": 0.1})],
        served=None, total_bytes=2_000_000_000, resident=0.0, detail=None,
    )  # fmt: skip
    assert with_pf.prefetch_cpu_s_per_gb == pytest.approx(0.2)
    without = Sample.of(
        wall_s=1.0, ranks=[rank(0, None)], served=None, total_bytes=1, resident=0.0, detail=None
    )
    assert without.prefetch_cpu_s_per_gb is None


def test_node_cpu_counts_what_every_process_on_the_node_spent():
    import resource
    import subprocess
    import sys
    import time

    from bench.procstat import NodeCPU

    with NodeCPU(interval=0.01) as node:
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", "import time\nt = time.process_time()\n"
             "while time.process_time() - t < 0.3: pass"],
            check=True,
        )  # fmt: skip
        t1 = time.monotonic()
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = node.busy_s(t0, t1)
    assert busy is not None and busy >= 0.3 - 0.05  # the child's 0.3 s, whoever else ran
    assert child.ru_utime + child.ru_stime >= 0.3
    assert node.busy_s(t0 - 3600, t1) is None  # before the first sample: unknown


def test_the_summary_gives_node_cpu_per_gb_of_checkpoint():
    from bench.models import summarize

    samples = [
        {"wall_s": w, "ranks": [], "detail": {"node_cpu_s": c}}
        for w, c in ((1.0, 2.0), (1.1, 3.0), (1.2, None))
    ]
    s = summarize(samples, total_bytes=2_000_000_000)
    assert s["node_cpu_s_per_gb"] == pytest.approx(1.25)  # median of 1.0 and 1.5
