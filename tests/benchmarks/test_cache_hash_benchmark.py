"""``benchmarks/cache_hash.py`` end to end on a tiny world task, so that the script cannot rot.

No timing is asserted (they depend on the machine): only that it measures what it claims and that the
report states the measured overhead against the 10 % threshold.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cache_hash.py"


def test_quick_run_writes_results(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_cache_hash", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "hash.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 16 * (2 + 1 + 2) and result["megabytes"] > 0 and result["threads"] == 1
    for name in ("stat", "content", "extract"):
        assert result["timings"][name]["seconds"] > 0 and len(result["timings"][name]["samples"]) == 1
    extra = result["timings"]["content"]["seconds"] - result["timings"]["stat"]["seconds"]
    assert result["overhead"] == extra / result["timings"]["extract"]["seconds"]
    assert set(result["reuse"]) == {"stat", "content"}
    report = out.with_suffix(".md").read_text()
    assert f"adds **{100 * result['overhead']:.1f} %**" in report and report.strip() == capsys.readouterr().out.strip()
