"""benchmarks/fit.py runs end to end at tiny sizes (--quick) and the two ways it times
train the same adapter. Timings are not checked: they depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fit.py"


@pytest.mark.slow
def test_quick_run_writes_results(tmp_path):
    out = tmp_path / "fit.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["threads"] == 1 and "timed" in result
    (run,) = result["runs"]
    assert run["size"] == "quick" and run["sizes"]["classes"] == 3 and run["encode_ms_per_image"] > 0
    assert [s["method"] for s in run["schedules"]] == ["rada", "mma"]
    for schedule, epochs in zip(run["schedules"], (2, 3), strict=True):
        released, cache = schedule["released"], schedule["cache"]
        assert schedule["config"]["epochs"] == epochs == released["epochs_run"] == cache["epochs_run"]
        assert not released["extrapolated"] and released["seconds"] > 0 and cache["seconds"] > 0
        assert len(released["samples"]) == len(cache["samples"]) == schedule["repeats"] == (3 if epochs == 2 else 1)
        assert cache["seconds"] == sorted(cache["samples"])[len(cache["samples"]) // 2]  # the median run
        assert schedule["speedup"] == pytest.approx(released["seconds"] / cache["seconds"])
        assert schedule["speedup_cpu"] == pytest.approx(released["cpu_seconds"] / cache["cpu_seconds"])
        assert schedule["meets_target"] == (schedule["speedup"] >= schedule["target"])
        # the same batches and learning rates both ways: the same adapter, the same accuracy
        assert schedule["same_test_accuracy"] and released["test_acc"] == cache["test_acc"]
        assert schedule["max_param_diff"] < 1e-4
    assert run["schedules"][1]["config"]["patience"] == 0  # MMA runs every epoch in both ways
    table = out.with_suffix(".md").read_text()
    assert "| rada | 2 |" in table and "| mma | 3 |" in table and table.strip() == done.stdout.strip()
