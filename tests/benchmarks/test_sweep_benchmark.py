"""benchmarks/sweep.py runs end to end at tiny sizes (--quick): the separate fits and the sweep select the same
configuration from the same validation accuracies and report the same test rows. Timings are not checked: they
depend on the machine."""

from __future__ import annotations

import json

import pytest

from benchmarks import sweep as benchmark


@pytest.mark.slow
def test_quick_run_writes_results(tmp_path, capsys):
    """In this process (the fits and the sweep it times are processes of their own)."""
    out = tmp_path / "sweep.json"
    assert benchmark.main(["--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["grid"] == {"lr": ["1e-3", "1e-2"]} and result["seeds"] == [1] and result["trainings"] == 2
    assert list(result["ways"]) == ["fits", "sweep --workers 2"]
    fits, sweep = result["ways"]["fits"], result["ways"]["sweep --workers 2"]
    assert fits["commands"] == 2 and sweep["commands"] == 1 and sweep["workers"] == 2
    assert len(fits["val_acc"]) == 2 and all(len(v) == 1 for v in fits["val_acc"])
    assert sweep["same_val_acc"] and sweep["same_selection"] and sweep["same_test_rows"]
    assert sweep["val_acc"] == fits["val_acc"] and len(sweep["test_rows"]) == 1
    assert result["selected"] == {"lr": ["1e-3", "1e-2"][fits["selected"]]}
    assert sweep["speedup"] == pytest.approx(fits["seconds"] / sweep["seconds"])
    assert sweep["cpu_seconds"] > 0 and fits["load_before"] is not None
    table = out.with_suffix(".md").read_text()
    assert "| sweep --workers 2 | 1 (1 at a time) |" in table and "**selected**" in table
    assert table.strip() == printed.strip()
