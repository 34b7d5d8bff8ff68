"""``benchmarks/inference.py`` end to end at a tiny size, so that the script cannot rot.

No timing is asserted: only that it runs and that its records carry the figures the
README reports (images per second, the overhead in percent of the encoder), consistently.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "inference.py"


@pytest.mark.slow
def test_inference_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "inference.json"
    cmd = [sys.executable, str(SCRIPT), "--models", "world-clip", "--classes", "5", "--batch", "2",
           "--methods", "rada", "mma", "--min-repeats", "1", "--budget", "0", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["zero-shot", "rada", "mma"]
    for r in records:
        assert (r["model"], r["classes"], r["batch"], r["dim"], r["threads"]) == ("world-clip", 5, 2, 128, 1)
        assert r["encoder_ms"] > 0 and r["head_ms"] > 0 and r["predict_ms"] > 0
        assert r["images_per_s"] == pytest.approx(1e3 / (r["encoder_ms"] + r["head_ms"]))
    zero = records[0]
    for r in records[1:]:
        assert r["overhead_pct"] == pytest.approx(100 * (r["head_ms"] - zero["head_ms"]) / r["encoder_ms"])
    table = out.with_suffix(".md").read_text()
    assert "| world-clip | 5 | rada |" in table and "Goal: ≤ 10% at K = 1000 on ViT-B/16" in table
