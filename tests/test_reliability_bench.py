"""The reliability runs behind the README's table: every fault survived, nothing lost."""

from __future__ import annotations

import pytest

from bench import reliability

MiB = 1 << 20


@pytest.mark.fuse
def test_every_fault_is_survived_with_identical_tensors(tmp_path):
    outcomes = reliability.run(1, tmp_path)
    assert len(outcomes) == 5
    for o in outcomes:
        assert (o.runs, o.survived, o.lost, o.wrong) == (1, 1, 0, 0), o
    table = reliability.render(outcomes, "python -m bench.reliability --runs 1")
    assert table.count("\n| ") == 5  # one row per fault after the header
    doc = reliability.document(outcomes, "python -m bench.reliability --runs 1")
    assert doc["host"]["git_commit"] and doc["host"]["cpu_count"] >= 1  # as the suite's
    assert [o["fault"] for o in doc["outcomes"]] == [o.fault for o in outcomes]


@pytest.mark.fuse
@pytest.mark.timeout(300)
def test_the_fault_runs_are_a_scenario_of_the_suite(tmp_path):
    """``--scenario faults`` through the suite's one runner and results schema: every
    fault a result, each survived with no tensor lost or wrong."""
    from bench import results
    from bench.runner import run_suite
    from bench.suites import Matrix, Suite

    m = Matrix("faults", ("fast-nfs",), (1,), ("uniform",), (), 24 * MiB, faults=True,
               hot=False, fio=False)  # fmt: skip
    suite = Suite(name="t", matrices=(m,), repeats=1, warmup=0, workdir=tmp_path, shards=4)
    doc = run_suite(suite)
    results.validate(doc)
    faults = [r for r in doc["results"] if r["spec"].startswith("fault:")]
    assert len(faults) == len(reliability._scenarios())
    for r in faults:
        d = r["samples"][0]["detail"]
        assert (d["runs"], d["survived"], d["lost"], d["wrong"]) == (1, 1, 0, 0), d
    assert doc["warnings"] == []
