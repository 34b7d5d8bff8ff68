"""Base-to-new results: harmonic mean, seed and dataset averages, the markdown table,
results.json written atomically and read back with checks."""

from __future__ import annotations

import json
import math

import pytest

from rada_mma.fewshot import evaluation
from rada_mma.fewshot.evaluation import (
    PUBLISHED,
    harmonic_mean,
    markdown_table,
    read_results,
    summarize,
    write_results,
)


def row(dataset: str, method: str, seed: int, base: float, new: float, **extra) -> dict:
    return {"dataset": dataset, "method": method, "seed": seed, "base": base, "new": new,
            "hm": harmonic_mean(base, new), **extra}


ROWS = [
    row("toy_a", "zero-shot", 1, 60.0, 70.0, all=50.0),
    row("toy_a", "rada", 1, 80.0, 70.0, all=60.0),
    row("toy_a", "rada", 2, 90.0, 60.0, all=62.0),
    row("toy_b", "zero-shot", 1, 50.0, 40.0, all=30.0),
    row("toy_b", "rada", 1, 70.0, 50.0, all=40.0),
    row("toy_b", "rada", 2, 60.0, 40.0, all=44.0),
]


def test_harmonic_mean():
    assert harmonic_mean(80.0, 80.0) == 80.0
    assert harmonic_mean(90.0, 60.0) == pytest.approx(72.0)
    assert harmonic_mean(90.0, 60.0) == harmonic_mean(60.0, 90.0)
    assert harmonic_mean(100.0, 0.0) == 0.0 and harmonic_mean(0.0, 0.0) == 0.0


def test_published_averages_take_the_hm_of_the_averages():
    """The papers' 11-dataset rows: HM of the averaged base and new (CLIP 69.34 / 74.22 -> 71.70)."""
    for method, (base, new, hm) in PUBLISHED.items():
        assert round(harmonic_mean(base, new), 2) == pytest.approx(hm, abs=0.011), method


def test_summarize_over_seeds_and_datasets():
    summary = {(r["dataset"], r["method"]): r for r in summarize(ROWS)}
    assert list(summary) == [("toy_a", "zero-shot"), ("toy_a", "rada"), ("toy_b", "zero-shot"), ("toy_b", "rada"),
                             ("average", "zero-shot"), ("average", "rada")]
    a = summary[("toy_a", "rada")]
    assert (a["seeds"], a["base"], a["new"], a["all"]) == (2, 85.0, 65.0, 61.0)
    assert a["hm"] == pytest.approx(harmonic_mean(85.0, 65.0))  # of the seed means, not the mean of the HMs
    assert a["hm"] != pytest.approx((ROWS[1]["hm"] + ROWS[2]["hm"]) / 2)
    average = summary[("average", "rada")]
    assert (average["base"], average["new"], average["all"], average["seeds"]) == (75.0, 55.0, 51.5, 2)
    assert average["hm"] == pytest.approx(harmonic_mean(75.0, 55.0))
    assert summary[("average", "zero-shot")]["seeds"] == 1

    # a method without results on every dataset gets no average; one dataset gets none at all
    partial = summarize(ROWS + [row("toy_a", "mma", 1, 85.0, 72.0)])
    assert ("average", "mma") not in {(r["dataset"], r["method"]) for r in partial}
    assert all(r["dataset"] != "average" for r in summarize(ROWS[:3]))
    # "all" is averaged only where every row has it
    assert "all" not in summarize([row("toy_a", "rada", 1, 1.0, 2.0), row("toy_a", "rada", 2, 3.0, 4.0, all=5.0)])[0]


def test_markdown_table():
    table = markdown_table(ROWS)
    lines = table.splitlines()
    assert lines[0] == "| dataset | method | seeds | base | new | HM | all |"
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|"
    assert "| toy_a | rada | 2 | 85.00 | 65.00 | 73.67 | 61.00 |" in lines
    assert f"| average | rada | 2 | 75.00 | 55.00 | {harmonic_mean(75, 55):.2f} | 51.50 |" in lines
    assert "Published" not in table  # toy datasets are none of the 11 benchmarks
    assert lines[-1].startswith("Accuracy in percent, mean over seeds.") and " all: every test image" in lines[-1]

    pets = [row("OxfordPets", "zero-shot", 1, 89.0, 97.0), row("OxfordPets", "rada", 1, 95.0, 97.0),
            row("OxfordPets", "mma", 1, 95.0, 98.0)]
    table = markdown_table(pets)
    assert "| dataset | method | seeds | base | new | HM |" in table.splitlines()  # no "all" column
    assert " all: " not in table  # nor its explanation
    published = table[table.index("Published averages"):]
    assert "beside ours on OxfordPets" in published
    assert "| zero-shot | 69.34 | 74.22 | 71.70 |" in published and "| rada | 82.16 | 74.14 | 77.94 |" in published
    assert "| mma |" not in published  # no published figures for it
    assert "Published" not in markdown_table(pets, published=False)


def test_write_results_checks_rows(tmp_path):
    good = row("toy", "rada", 1, 80.0, 70.0)
    cases = [
        ({k: v for k, v in good.items() if k not in ("seed", "hm")}, r"lacks \['seed', 'hm'\]"),
        ({**good, "base": float("nan")}, "'base' must be a finite number"),
        ({**good, "new": math.inf}, "'new' must be a finite number"),
        ({**good, "hm": "77.9"}, "'hm' must be a finite number"),
        ({**good, "all": True}, "'all' must be a finite number"),
        (["toy", "rada"], "a result row must be a JSON object"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            write_results([good, bad], tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written for invalid rows


def test_results_files_round_trip_and_are_atomic(tmp_path, monkeypatch):
    path = write_results(ROWS, tmp_path / "run")
    assert path == tmp_path / "run" / "results.json"
    assert read_results(path) == ROWS and read_results(tmp_path / "run") == ROWS
    assert (tmp_path / "run" / "results.md").read_text() == markdown_table(ROWS)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["results.json", "results.md"]

    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(evaluation.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_results(ROWS[:1], tmp_path / "run")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # old files whole, no temp left


def test_read_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json at .* run `rada-mma fit` or `bench` with --out"):
        read_results(tmp_path)
    path = tmp_path / "results.json"
    for content, match in [("{not json", "is not valid JSON"), ('{"rows": []}', "must hold a JSON list of result rows"),
                           (json.dumps([{"dataset": "toy"}]), r"row 0: result row .* lacks \['method', 'seed', 'base'"),
                           (json.dumps([row("toy", "rada", 1, 50.0, 60.0) | {"new": None}]), "'new' must be a finite")]:
        path.write_text(content)
        with pytest.raises(ValueError, match=match):
            read_results(path)
    path.write_text("[]")
    assert read_results(tmp_path) == []
