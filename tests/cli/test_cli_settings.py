"""The settings from the command line: fit --setting all, eval of an adapter on another dataset (transfer) and
with --tta, bench over a shot sweep and a transfer/test-time grid, and the errors a user meets (one line, exit 2)."""

from __future__ import annotations

import logging

import pytest

from rada_mma.fewshot.evaluation import read_results
from tests.helpers import runs
from tests.helpers.cli import run_error, run_ok

TTA_FLAGS = ["--tta-views", "4", "--tta-keep", "0.5", "--tta-augment", "crop"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-settings")
    config, weights = runs.write_model(root / "model", name="tiny-settings-clip")
    return {"root": root, "model": ["--model-config", config, "--pretrained", weights, "--device", "cpu"],
            "a": str(runs.image_folder(root / "toy_a", ["ant", "bee", "cat"], {"train": 5, "test": 3})),
            "b": str(runs.image_folder(root / "toy_b", ["owl", "pig"], {"train": 4, "test": 3}, seed=3))}


def test_fit_all_then_eval_elsewhere_and_at_test_time(setup, tmp_path, capsys, caplog):
    model, fit, cache = setup["model"], tmp_path / "fit", ["--cache-dir", str(tmp_path / "cache")]
    # the views fit will read: RAda's preset draws one per epoch, so extract is told the epochs too
    run_ok(["extract", *model, "--data", setup["a"], "--setting", "all", "--shots", "2", "--epochs", "1", *cache,
            "--out", str(tmp_path / "x")], capsys)
    with caplog.at_level(logging.INFO, logger="rada_mma.fewshot.cache"):
        out = run_ok(["fit", *model, "--data", setup["a"], "--setting", "all", "--shots", "2", "--epochs", "1", *cache,
                      "--out", str(fit)], capsys)
    assert not [r for r in caplog.records if r.getMessage().startswith("cached ")]  # extract encoded all of it
    assert "| toy_a | rada |" in out and "2-shot" in out
    adapter = str(fit / "adapter.safetensors")
    out = run_ok(["eval", *model, "--data", setup["b"], "--adapter", adapter, "--out", str(tmp_path / "b")], capsys)
    rows = read_results(tmp_path / "b")
    assert [(r["setting"], r["source"], r["dataset"], r["classes"]) for r in rows] == [("transfer", "toy_a", "toy_b", 2)] * 2
    assert "| rada |" in out and "toy_b" in out
    run_ok(["eval", *model, "--data", setup["a"], "--out", str(fit)], capsys)  # its own folder: the all setting
    assert {r["setting"] for r in read_results(fit)} == {"all"}
    run_ok(["eval", *model, "--data", setup["b"], "--adapter", adapter, "--tta", *TTA_FLAGS,
            "--out", str(tmp_path / "tta")], capsys)
    assert [(r["tta"], r["start"]) for r in read_results(tmp_path / "tta")] == [
        (False, "zero-shot"), (False, "few-shot"), (True, "few-shot")]
    run_ok(["eval", *model, "--data", setup["b"], "--method", "rada", "--tta", *TTA_FLAGS,
            "--out", str(tmp_path / "zero")], capsys)  # RAda's ✗ row: no --adapter
    assert read_results(tmp_path / "zero")[-1]["start"] == "zero-shot"


def test_bench_sweeps_shots_and_runs_transfer_and_tta_grids(setup, tmp_path, capsys):
    common = [*setup["model"], "--methods", "rada", "--seeds", "1", "--epochs", "1"]
    run_ok(["bench", *common, "--setting", "all", "--data", setup["a"], "--shots", "1", "2", "--out",
            str(tmp_path / "sweep")], capsys)
    assert (tmp_path / "sweep" / "results.md").read_text().startswith("| dataset | method | 0-shot | 1-shot | 2-shot |")
    out = run_ok(["bench", *common, "--setting", "cross-dataset", "--source", setup["a"], "--targets", setup["b"],
                  "--shots", "2", "--out", str(tmp_path / "xd")], capsys)
    assert "| method | toy_a (source) | toy_b | average |" in out
    assert (tmp_path / "xd" / "results.png").is_file()
    run_ok(["bench", *common, "--setting", "tta", "--source", setup["a"], "--targets", setup["b"], "--shots", "2",
            *TTA_FLAGS, "--out", str(tmp_path / "xd")], capsys)  # the same folder: the source run is reused
    starts = [(r["method"], r["tta"], r["start"]) for r in read_results(tmp_path / "xd")]
    assert starts == [("zero-shot", False, "zero-shot"), ("rada", True, "zero-shot"), ("rada", False, "few-shot"),
                      ("rada", True, "few-shot")]
    assert "| rada† + TTA | ✓ | ✓ |" in (tmp_path / "xd" / "results.md").read_text()


def test_setting_errors_are_one_line(setup, tmp_path, capsys):
    model, out = setup["model"], ["--out", str(tmp_path / "o")]
    cases = [
        (["bench", *model, "--setting", "cross-dataset", "--targets", setup["b"], *out], "needs --source DATA"),
        (["bench", *model, "--setting", "dg", "--source", setup["a"], "--targets", setup["b"], "--shots", "1", "2",
          *out], "--shots takes one value with --setting dg"),
        (["bench", *model, "--setting", "all", *out], "--setting all needs --data"),
        (["eval", *model, "--data", setup["a"], "--tta", "--setting", "all", *out], "--tta is a setting of its own"),
        (["eval", *model, "--data", setup["a"], "--setting", "transfer", *out], "no adapter at"),
        (["eval", *model, "--data", setup["a"], "--tta", "--tta-keep", "2", *out], "keep must be in (0, 1]"),
    ]
    for argv, expected in cases:
        assert expected in run_error(argv, capsys)
