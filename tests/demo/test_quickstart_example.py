"""examples/quickstart.py runs and what it prints holds: every adapter beats zero-shot, which beats chance."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from rada_mma import METHODS

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def load_example():
    spec = importlib.util.spec_from_file_location("quickstart_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_prints_true_gains_and_reloads_every_adapter(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        # fewer steps than the default 200, to be quick; raises SystemExit if a reload changes the logits
        rows = load_example().main(["--out", str(tmp_path), "--steps", "100"])
    finally:
        torch.set_num_threads(threads)  # the example sets it; leave the rest of the session as it was
    printed = capsys.readouterr().out

    accuracy = {}  # what the table says, per row
    for line in printed.splitlines():
        match = re.match(r"^([\w+-]+)\s+(\d+\.\d)%", line)  # a table row: method, accuracy
        if match:
            accuracy[match[1]] = float(match[2])
    assert set(accuracy) == {"zero-shot", *METHODS}, printed
    chance = float(re.search(r"Chance: (\d+\.\d)%", printed)[1])
    assert accuracy["zero-shot"] > 3 * chance, printed  # a pretrained CLIP, not a random one
    for method in METHODS:
        assert accuracy[method] > accuracy["zero-shot"], f"{method} does not beat zero-shot:\n{printed}"
    assert "Every adapter beats zero-shot" in printed and "Not above zero-shot" not in printed

    assert [row["method"] for row in rows] == list(METHODS)
    for row in rows:
        assert Path(row["adapter"]).parent == tmp_path and Path(row["adapter"]).is_file()
        assert float(f"{row['adapted']:.1f}") == accuracy[row["method"]]
