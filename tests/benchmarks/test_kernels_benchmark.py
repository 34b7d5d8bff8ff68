"""``benchmarks/kernels.py`` end to end at tiny sizes, so that the script cannot rot.

No timing is asserted: only that every point runs (each in its own processes, as
in a real run), that the records carry what the issue asks for, and that the
fused and released implementations agree on them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
REQUIRED = (
    "method", "impl", "batch", "classes", "dim", "device", "dtype", "ms_median", "peak_mb",
    "max_abs_err_logits", "max_rel_err_grads", "oom",
)  # fmt: skip


@pytest.mark.slow
def test_benchmark_script_runs_at_tiny_sizes(tmp_path):
    out = tmp_path / "kernels_tiny.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--classes", "4", "--batch", "2", "--dim", "32",
           "--repeats", "1", "--min-repeats", "1", "--warmup", "0", "--matmul-size", "128", "--threads", "1",
           "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]

    records = json.loads(out.read_text())
    points = {(r["method"], r["impl"]) for r in records}
    assert points == {(m, i) for m in ("rada", "mma", "rada+adapter") for i in ("released", "fused")}
    for r in records:
        missing = [key for key in REQUIRED if key not in r]
        assert not missing, f"{r['method']}/{r['impl']} lacks {missing}"
        assert (r["batch"], r["classes"], r["dim"], r["device"], r["dtype"]) == (2, 4, 32, "cpu", "fp32")
        assert r["oom"] is False
        assert r["ms_median"] > 0 and r["peak_mb"] is not None and r["peak_mb_default_malloc"] is not None
        assert r["machine_matmul_gflops"] > 0
        assert r["max_abs_err_logits"] <= 1e-4, r
        assert r["max_rel_err_grads"] <= 1e-3, r
        if r["impl"] == "fused":
            assert r["flops"] > 0 and r["achieved_gflops"] > 0 and r["fraction_of_matmul"] > 0
        else:  # the released point is its own reference
            assert r["max_abs_err_logits"] == 0 and r["max_rel_err_grads"] == 0

    table = out.with_suffix(".md").read_text()
    assert "| rada+adapter | 2 | 4 | fp32 |" in table
    assert all(r["threads"] == 1 for r in records)
    assert out.with_suffix(".png").stat().st_size > 0


def test_flop_count_matches_hand_count():
    spec = importlib.util.spec_from_file_location("benchmark_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    b, k, d = 2, 3, 8
    # forward: qkv 6BKD², image query 2BD², text query 2KD², attention 8BK²D + 4BKD, out 2BKD², logits 2BKD
    forward = 6 * b * k * d * d + 2 * b * d * d + 2 * k * d * d + 8 * b * k * k * d + 4 * b * k * d
    forward += 2 * b * k * d * d + 2 * b * k * d
    # backward: weight gradients only for the projections of frozen features; attention ×2;
    # the output projection and the logits also pass gradients to their inputs
    backward = 6 * b * k * d * d + 2 * b * d * d + 2 * k * d * d + 2 * (8 * b * k * k * d + 4 * b * k * d)
    backward += 4 * b * k * d * d + 4 * b * k * d
    assert bench.fused_flops("rada", b, k, d) == {"forward": forward, "backward": backward, "total": forward + backward}
