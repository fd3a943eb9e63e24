"""The reliability runs behind the README's table: every fault survived, nothing lost."""

from __future__ import annotations

import pytest

from bench import reliability


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
