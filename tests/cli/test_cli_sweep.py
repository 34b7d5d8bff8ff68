"""``rada-mma sweep`` and ``fit --config`` on the task of tests/helpers/sweeps.py: the sweep's table and files,
the selected configuration run again by ``fit --config OUT/best.json`` (flags given win over the file), several
datasets with the all-class setting, and the errors a user meets (one line, exit 2)."""

from __future__ import annotations

import json
import shutil

import pytest

from rada_mma.cli import build_parser, config_defaults, spec_from_args
from rada_mma.fewshot.evaluation import read_results
from tests.helpers import sweeps
from tests.helpers.cli import run_error, run_ok


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = sweeps.write_task(tmp_path_factory.mktemp("cli-sweep"))
    spec = sweeps.sweep_spec(root, root / "unused")
    return {"root": root, "data": spec.data, "cache": ["--cache-dir", spec.cache_dir],
            "model": ["--model-config", spec.model_config, "--pretrained", spec.pretrained, "--device", "cpu"]}


def flags(task) -> list[str]:
    """The task's model, shots and training settings (sweeps.TRAIN) as flags."""
    return [*task["model"], *task["cache"], "--method", sweeps.METHOD, "--shots", "4", "--epochs", "30",
            "--patience", "0", "--select", "last"]


def test_sweep_then_fit_the_selected_configuration(task, tmp_path, capsys):
    out = tmp_path / "sweep"
    printed = run_ok(["sweep", *flags(task), "--data", task["data"], "--grid", "lr=1e-6,0.005", "--grid",
                      "momentum=0.5,0.9", "--seeds", "1", "2", "--workers", "2", "--out", str(out)], capsys)
    assert "| 2 | 0.005 | 0.5 |" in printed and "**selected**" in printed and f"{out / 'best.json'}" in printed
    best = json.loads((out / "best.json").read_text())
    assert best["selected"]["values"] == {"lr": 0.005, "momentum": 0.5}
    assert best["train"] == {"epochs": 30, "patience": 0, "select": "last", "lr": 0.005, "momentum": 0.5}
    fitted = tmp_path / "fit"  # the file alone sets method, shots and training; the model and data are flags
    run_ok(["fit", *task["model"], *task["cache"], "--data", task["data"], "--config", str(out / "best.json"),
            "--out", str(fitted)], capsys)
    assert read_results(fitted) == [{k: v for k, v in r.items() if k != "run"} for r in read_results(out)
                                    if r["seed"] == 1]


def test_flags_given_win_over_the_config_file(task, tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"method": "mma", "options": {"blend": 0.3, "mma_heads": 2}, "shots": 4,
                                "train": {"lr": 0.005, "epochs": 30, "views": 0, "amp": False},
                                "templates": ["a {}."], "setting": "all"}))
    base = ["fit", *task["model"], "--data", task["data"], "--config", str(path), "--out", str(tmp_path / "o")]
    args = build_parser(config_defaults(str(path))).parse_args(base)
    spec = spec_from_args(args)
    assert (spec.method, spec.shots, spec.templates, args.setting) == ("mma", 4, ("a {}.",), "all")
    assert spec.options == {"blend": 0.3, "mma_heads": 2}
    assert spec.train == {"lr": 0.005, "epochs": 30, "views": 0, "amp": False}
    given = build_parser(config_defaults(str(path))).parse_args(
        [*base, "--lr", "0.1", "--option", "blend=0.5", "--shots", "2", "--template", "b {}.", "--setting", "base2new",
         "--amp"])
    spec = spec_from_args(given)
    assert spec.train == {"lr": 0.1, "epochs": 30, "views": 0, "amp": True} and spec.shots == 2
    assert spec.options == {"blend": 0.5, "mma_heads": 2} and spec.templates == ("b {}.",)
    assert given.setting == "base2new"


def test_several_datasets_each_select_their_own_configuration(task, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(task["data"], other)
    out = tmp_path / "sweeps"
    run_ok(["sweep", *flags(task), "--data", task["data"], str(other), "--setting", "all", "--grid", "lr=1e-6,0.005",
            "--seeds", "1", "--out", str(out)], capsys)
    for folder in ("task", "other"):
        best = json.loads((out / folder / "best.json").read_text())
        assert best["setting"] == "all" and (out / folder / "best-seed1" / "run.json").is_file()
    rows = read_results(out)
    assert [(r["dataset"], r["method"], r["setting"], r["run"]) for r in rows] == [
        ("task", "zero-shot", "all", "task/best-seed1"), ("task", "mma", "all", "task/best-seed1"),
        ("other", "zero-shot", "all", "other/best-seed1"), ("other", "mma", "all", "other/best-seed1")]


def test_sweep_errors_are_one_line(task, tmp_path, capsys):
    common = ["sweep", *flags(task), "--data", task["data"], "--out", str(tmp_path / "s")]
    assert "unknown grid key 'depth'" in run_error([*common, "--grid", "depth=1,2"], capsys)
    assert "lr takes a finite number, got 'abc'" in run_error([*common, "--grid", "lr=abc"], capsys)
    assert "--shots takes one value in a sweep" in run_error([*common, "--shots", "1", "2", "--grid", "lr=1"], capsys)
    assert "epochs is both a grid key and a fixed setting" in run_error([*common, "--grid", "epochs=1,2"], capsys)
    (tmp_path / "x.json").write_text("[1, 2]")
    line = run_error(["fit", *task["model"], "--data", task["data"], "--config", str(tmp_path / "x.json"), "--out",
                      str(tmp_path / "f")], capsys)
    assert "must hold a JSON object" in line
