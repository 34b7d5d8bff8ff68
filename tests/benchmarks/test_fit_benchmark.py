"""benchmarks/fit.py runs end to end at tiny sizes (--quick) and the two ways it times
train the same adapter, augmented views and lr sweep included. Timings are not checked:
they depend on the machine."""

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
    schedules = {s["schedule"]: s for s in run["schedules"]}
    assert list(schedules) == ["rada", "rada --views 0", "rada lr sweep", "mma"]
    assert schedules["rada"]["config"]["views"] == "per_epoch" and schedules["rada --views 0"]["config"]["views"] == 0
    for name, epochs in (("rada", 2), ("rada --views 0", 2), ("mma", 3)):
        schedule = schedules[name]
        released, cache = schedule["released"], schedule["cache"]
        assert schedule["config"]["epochs"] == epochs == released["epochs_run"] == cache["epochs_run"]
        assert not released["extrapolated"] and released["seconds"] > 0 and cache["seconds"] > 0
        assert len(released["samples"]) == len(cache["samples"]) == schedule["repeats"] == (3 if epochs == 2 else 1)
        assert cache["seconds"] == sorted(cache["samples"])[len(cache["samples"]) // 2]  # the median run
        assert schedule["speedup"] == pytest.approx(released["seconds"] / cache["seconds"])
        assert schedule["speedup_cpu"] == pytest.approx(released["cpu_seconds"] / cache["cpu_seconds"])
        if schedule["target"] is not None:
            assert schedule["meets_target"] == (schedule["speedup"] >= schedule["target"])
        # the same pixels (augmented crops included), batches and learning rates both ways: the same adapter
        assert schedule["same_test_accuracy"] and released["test_acc"] == cache["test_acc"]
        assert schedule["max_param_diff"] < 1e-4
    assert schedules["rada"]["target"] is None  # augmented: both ways encode every image once per epoch
    sweep = schedules["rada lr sweep"]
    assert [p["lr"] for p in sweep["per_lr"]] == sweep["lrs"] == [5e-4, 1e-3, 2e-3]
    assert sweep["same_test_accuracy"] and sweep["max_param_diff"] < 1e-4
    assert sweep["cache"]["extract_seconds"] > sweep["cache"]["first_extract_seconds"] > 0  # later runs only load
    assert schedules["mma"]["config"]["patience"] == 0  # MMA runs every epoch in both ways
    table = out.with_suffix(".md").read_text()
    assert "| rada | 2 | per_epoch |" in table and "| mma | 3 | 0 |" in table and "| rada lr sweep |" in table
    assert table.strip() == done.stdout.strip()
