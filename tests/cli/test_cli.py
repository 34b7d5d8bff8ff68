"""The rada-mma command, run in-process on a tiny open_clip architecture (a JSON config
and a weights file written here) and tiny ImageFolder datasets of generated PNGs.

Every command runs for real: extract, fit, eval, bench; each error a user will meet
ends with exit status 2 and one line on stderr saying what is wrong and what to do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from rada_mma.cli import main
from rada_mma.fewshot import data, runs
from rada_mma.fewshot.cache import extract_image_features, load_features
from rada_mma.fewshot.evaluation import harmonic_mean, read_results
from rada_mma.fewshot.train import accuracy
from tests.helpers import files
from tests.helpers.cli import run_error, run_ok
from tests.helpers.runs import CONFIG as TINY_CONFIG
from tests.helpers.runs import write_model

CLASSES, COUNTS, CONFIG = files.CLASSES, files.COUNTS, TINY_CONFIG


def make_images(root: Path, seed: int, counts: dict[str, int] = COUNTS) -> Path:
    return files.write_images(root, seed, counts)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config, weights = write_model(root / "models", "tiny-cli-clip", seed=0)
    _, other_weights = write_model(root / "models", "tiny-cli-clip", seed=1)
    wider = {**CONFIG, "vision_cfg": {**CONFIG["vision_cfg"], "width": 48}}
    _, wrong_weights = write_model(root / "other", "tiny-cli-wide", seed=0, config=wider)
    return {"root": root, "config": str(config), "weights": str(weights), "other_weights": str(other_weights),
            "wrong_weights": str(wrong_weights), "data": make_images(root / "toy_a", seed=0),
            "data_b": make_images(root / "toy_b", seed=1)}


def cli(world, command: str, *args: str, data: str | None = None, model: bool = True, shots: int = 4) -> list[str]:
    argv = [command]
    if model:
        argv += ["--model-config", world["config"], "--pretrained", world["weights"]]
    argv += ["--data", data or str(world["data"]), "--device", "cpu", *args]
    return argv + (["--shots", str(shots)] if shots else [])


@pytest.fixture(scope="module")
def mma_run(world, tmp_path_factory):
    """One `rada-mma fit --method mma` run shared by the tests that read it."""
    out = tmp_path_factory.mktemp("runs") / "toy-mma"
    code = main(cli(world, "fit", "--method", "mma", "--epochs", "3", "--out", str(out)))
    assert code == 0
    return out


# -- fit and eval ------------------------------------------------------------------------------


ROW_KEYS = {"dataset", "method", "seed", "base", "new", "hm", "all", "shots", "model"}


def test_fit_writes_the_run_folder(mma_run):
    names = {p.name for p in mma_run.iterdir()}
    assert {"adapter.safetensors", "results.json", "results.md", "training.png", "adapter.png", "checkpoint.pt",
            "train_config.json", "run.json", "split", "cache"} <= names
    for picture in ("training.png", "adapter.png"):
        assert (mma_run / picture).read_bytes().startswith(b"\x89PNG")
    rows = read_results(mma_run)
    assert [r["method"] for r in rows] == ["zero-shot", "mma"]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert (row["dataset"], row["seed"], row["shots"], row["model"]) == ("toy_a", 1, 4, "tiny-cli-clip")
        assert all(0 <= row[k] <= 100 for k in ("base", "new", "hm", "all"))
        assert row["hm"] == harmonic_mean(row["base"], row["new"])
    table = (mma_run / "results.md").read_text()
    assert table.startswith("| dataset | method | seeds | base | new | HM | all |") and "| toy_a | mma | 1 |" in table
    config = json.loads((mma_run / "train_config.json").read_text())
    assert (config["epochs"], config["lr"], config["batch_size"], config["patience"]) == (3, 5e-3, 256, 20)


def test_rows_are_the_base_new_and_all_accuracies(world, mma_run):
    """Recomputed with the library on CoOp's split: base and new classes alone, and all classes at once."""
    import rada_mma

    clip, _, preprocess = open_clip.create_model_and_transforms("tiny-cli-clip", pretrained=world["weights"])
    model = rada_mma.wrap(clip, method="mma").load_adapter(mma_run / "adapter.safetensors")
    tokenizer = open_clip.get_tokenizer("tiny-cli-clip")
    fewshot = data.few_shot(data.load_data(world["data"]), 4, 1)
    expected = {}
    for subset in ("base", "new", "all"):
        split = data.subsample_classes(fewshot, subset)
        model.set_classes(split.classnames, tokenizer=tokenizer, templates=["a photo of a {}."])
        feats = extract_image_features(model, split, split.test, preprocess, progress=False)
        expected[subset] = accuracy(model, feats.image, feats.labels)
        with model.disable_adapter():
            expected["zero-shot " + subset] = accuracy(model, feats.image, feats.labels)
    zero_shot, adapted = read_results(mma_run)
    assert {k: adapted[k] for k in ("base", "new", "all")} == {k: expected[k] for k in ("base", "new", "all")}
    assert {k: zero_shot[k] for k in ("base", "new", "all")} == {k: expected["zero-shot " + k] for k in ("base", "new", "all")}
    with model.disable_adapter():
        plain = model.logits_from_features(feats.image)
    assert not torch.allclose(model.logits_from_features(feats.image), plain)  # the adapter is not the identity


def test_eval_reproduces_the_fit(world, mma_run, capsys):
    fitted = read_results(mma_run)
    shutil.copytree(mma_run, mma_run.parent / "copy")
    out = run_ok(cli(world, "eval", "--method", "mma", "--out", str(mma_run.parent / "copy")), capsys)
    assert read_results(mma_run.parent / "copy") == fitted
    assert "| toy_a | mma | 1 |" in out
    # an adapter file given explicitly, into another folder
    elsewhere = mma_run.parent / "elsewhere"
    run_ok(cli(world, "eval", "--method", "mma", "--adapter", str(mma_run / "adapter.safetensors"),
               "--out", str(elsewhere)), capsys)
    assert read_results(elsewhere) == fitted


def test_eval_of_another_adapter_never_overwrites_the_run(world, mma_run, tmp_path, capsys, caplog):
    """``eval --adapter X --out RUN`` once replaced RUN's results with X's: a folder that disagreed with itself."""
    before = {name: (mma_run / name).read_bytes() for name in ("results.json", "results.md", "adapter.png", "owner.json")}
    other = tmp_path / "other"
    run_ok(cli(world, "fit", "--method", "mma", "--epochs", "1", "--lr", "0.05", "--out", str(other)), capsys)
    with caplog.at_level(logging.WARNING, logger="rada_mma.fewshot.runs"):
        run_ok(cli(world, "eval", "--method", "mma", "--adapter", str(other / "adapter.safetensors"),
                   "--out", str(mma_run)), capsys)
    assert {name: (mma_run / name).read_bytes() for name in before} == before
    (evaluated,) = (mma_run / "evals").iterdir()
    assert evaluated.name.startswith("adapter-") and f"go to {evaluated}" in caplog.text
    assert read_results(evaluated) == read_results(other)  # the other adapter's numbers, in a folder of its own
    owner = json.loads((evaluated / "owner.json").read_text())
    assert owner["kind"] == "eval" and owner["adapter"] == str((other / "adapter.safetensors").resolve())
    # the run's own adapter, evaluated again, stays in the run's folder
    run_ok(cli(world, "eval", "--method", "mma", "--out", str(mma_run)), capsys)
    assert (mma_run / "results.json").read_bytes() == before["results.json"]
    assert [p.name for p in (mma_run / "evals").iterdir()] == [evaluated.name]


def test_a_run_folder_in_use_is_refused(world, tmp_path, capsys):
    """Two fits into one --out once both exited 0, one run's outputs silently lost."""
    out = tmp_path / "busy"
    with runs.hold(out):  # as another process's run holds it (flock: each holder is its own open file)
        line = run_error(cli(world, "fit", "--epochs", "1", "--out", str(out)), capsys)
    assert re.search(rf"{re.escape(str(out))} is in use by another run: process {os.getpid()} on .*; wait for it", line)
    assert not (out / "adapter.safetensors").exists()
    run_ok(cli(world, "fit", "--epochs", "1", "--out", str(out)), capsys)  # released: the next run goes ahead
    assert not (out / runs.LOCK_FILE).exists()
ISSUE_KEYS = {"method", "seed", "shots", "draw", "setting", "prompt_templates", "augmentation", "optimizer", "lr",
              "weight_decay", "batch_size", "drop_last", "epochs", "warmup_epochs", "schedule", "feature_dtype", "model",
              "pretrained", "rada_mma_version", "torch_version"}


def test_run_json_says_what_ran(world, mma_run, tmp_path, capsys, caplog):
    import rada_mma

    record = json.loads((mma_run / "run.json").read_text())
    assert ISSUE_KEYS <= set(record) and {"zero_shot_templates", "adapter", "steps_per_epoch"} <= set(record)
    assert (record["method"], record["seed"], record["shots"], record["draw"], record["setting"]) == (
        "mma", 1, 4, "coop", "base2new")
    assert record["augmentation"] == {"kind": "none", "views": 0}
    assert (record["epochs"], record["lr"], record["batch_size"], record["drop_last"]) == (3, 5e-3, 256, False)
    assert (record["model"], record["pretrained"], record["rada_mma_version"]) == (
        "tiny-cli-clip", world["weights"], rada_mma.__version__)
    assert record["prompt_templates"] == record["zero_shot_templates"] == ["a photo of a {}."]
    # RAda: the released recipe; and eval evaluates with the prompts the run recorded
    out = tmp_path / "rada"
    run_ok(cli(world, "fit", "--epochs", "2", "--template", "a drawing of a {}.", "--out", str(out)), capsys)
    rada = json.loads((out / "run.json").read_text())
    assert rada["augmentation"] == {"kind": "random_resized_crop+flip", "scale": [0.08, 1.0],
                                    "interpolation": "bicubic", "views": "per_epoch"}
    assert (rada["weight_decay"], rada["drop_last"], rada["feature_dtype"]) == (5e-4, True, "float32")
    assert rada["prompt_templates"] == ["a drawing of a {}."] and rada["steps_per_epoch"] == 1  # 8 images < 32
    fitted = read_results(out)[1]
    (drawing,) = [p.name for p in (out / "cache").glob("all-classes-*")]  # the one prompt set fit used
    with caplog.at_level(logging.INFO, logger="rada_mma.fewshot.cache"):
        run_ok(cli(world, "eval", "--out", str(out)), capsys)
    loaded = [r.getMessage() for r in caplog.records if "class text features" in r.getMessage()]
    assert any(drawing in m for m in loaded), loaded  # the adapter's recorded prompts, not the preset's
    assert read_results(out)[1] == fitted


def test_fit_rada_and_options(world, tmp_path, capsys):
    out = tmp_path / "rada"
    stdout = run_ok(cli(world, "fit", "--method", "rada", "--epochs", "2", "--lr", "0.01", "--select", "last",
                        "--option", "alpha=0.1", "--option", "softmax=row", "--out", str(out)), capsys)
    assert "| toy_a | rada | 1 |" in stdout and f"adapter, results and plots in {out}" in stdout
    from rada_mma import read_adapter_config

    adapter = read_adapter_config(out / "adapter.safetensors")
    assert (adapter.alpha, adapter.softmax) == (0.1, "row")
    assert json.loads((out / "train_config.json").read_text())["lr"] == 0.01
    assert {p.name for p in out.iterdir()} >= {"training.png", "adapter.png", "results.json"}


# -- extract and bench -------------------------------------------------------------------------


def test_extract_writes_the_caches_fit_reads(world, tmp_path, capsys, caplog):
    caches = tmp_path / "cache"
    out = run_ok(cli(world, "extract", "--shots", "0", "--cache-dir", str(caches), "--out", str(tmp_path / "x"),
                     shots=0), capsys)
    names = {p.name for p in caches.iterdir()}
    texts = [n for n in names if n.startswith("all-classes-")]  # one file per prompt set (here one: the default)
    assert len(texts) == 1 and names - set(texts) == {"all-train-v0.safetensors", "all-val-v0.safetensors",
                                                      "all-test-v0.safetensors"}
    assert f"in {caches}" in out
    assert load_features(caches / "all-train-v0.safetensors").image.shape == (24, 32)  # every training image
    # the few-shot draw with the preset's views: one fresh crop per image and epoch (2 epochs here)
    run_ok(cli(world, "extract", "--seed", "2", "--epochs", "2", "--cache-dir", str(caches), "--out", str(tmp_path / "x")),
           capsys)
    train = "base-4shot-seed2-ceil-train-v2-rrc0.08-bicubic.safetensors"
    assert {train, "base-4shot-seed2-ceil-val-v0.safetensors"} <= {p.name for p in caches.iterdir()}
    assert load_features(caches / train).image.shape == (8, 2, 32)  # 2 classes x 4, 2 views

    with caplog.at_level(logging.INFO, logger="rada_mma.fewshot.cache"):
        run_ok(cli(world, "fit", "--seed", "2", "--epochs", "2", "--lr", "0.05", "--cache-dir", str(caches),
                   "--out", str(tmp_path / "fit")), capsys)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if m.startswith("cached ") or "stale" in m]  # nothing encoded again
    assert len([m for m in messages if m.startswith("loaded ")]) == 4  # texts, test, few-shot train and val


def test_extract_defaults_to_the_shots_fit_uses(world, tmp_path, capsys):
    # extract's default draw is fit's (16 shots): a later fit with the same --cache-dir encodes nothing
    for command in ("extract", "fit"):
        assert "training images per class; 0: all (default 16)" in help_text(command, capsys)
    caches = tmp_path / "cache"
    run_ok(cli(world, "extract", "--cache-dir", str(caches), "--out", str(tmp_path / "x"), shots=0), capsys)
    assert "base-16shot-seed1-ceil-train-v5-rrc0.08-bicubic.safetensors" in {p.name for p in caches.iterdir()}


def help_text(command: str, capsys) -> str:
    """``rada-mma COMMAND --help``, white space folded."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_bench_makes_one_table(world, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--model-config", world["config"], "--pretrained", world["weights"],
            "--data", str(world["data"]), str(world["data_b"]), "--seeds", "1", "2", "--methods", "rada",
            "--shots", "4", "--epochs", "1", "--device", "cpu", "--out", str(out)]
    stdout = run_ok(argv, capsys)
    rows = read_results(out)
    assert sorted((r["dataset"], r["seed"], r["method"]) for r in rows) == sorted(
        (d, s, m) for d in ("toy_a", "toy_b") for s in (1, 2) for m in ("zero-shot", "rada"))
    table = (out / "results.md").read_text()
    assert table.count("| dataset | method |") == 1
    for line in ("| toy_a | rada | 2 |", "| toy_b | zero-shot | 2 |", "| average | rada | 2 |"):
        assert line in table and line in stdout
    assert "Published" not in table  # toy datasets are none of the 11
    for dataset in ("toy_a", "toy_b"):  # one cache per dataset, shared by its runs
        names = {p.name for p in (out / dataset / "cache").iterdir()}
        assert {"all-test-v0.safetensors", "base-4shot-seed1-ceil-train-v1-rrc0.08-bicubic.safetensors",
                "base-4shot-seed2-ceil-train-v1-rrc0.08-bicubic.safetensors"} <= names
        for seed in (1, 2):
            assert (out / dataset / f"rada-seed{seed}" / "adapter.safetensors").is_file()
            # every row links to the record of the run it averages
            assert f"[seed {seed}]({dataset}/rada-seed{seed}/run.json)" in table
            assert json.loads((out / dataset / f"rada-seed{seed}" / "run.json").read_text())["seed"] == seed
    assert {r["run"] for r in rows if r["dataset"] == "toy_a"} == {"toy_a/rada-seed1", "toy_a/rada-seed2"}
    assert "run.json" not in stdout  # the printed table is for reading; results.md has the links


# -- what a user runs into ---------------------------------------------------------------------


def test_cache_of_another_model_is_rebuilt(world, tmp_path, capsys, caplog):
    caches = tmp_path / "cache"
    run_ok(cli(world, "fit", "--epochs", "1", "--cache-dir", str(caches), "--out", str(tmp_path / "a")), capsys)
    before = load_features(caches / "all-test-v0.safetensors")
    argv = cli(world, "fit", "--epochs", "1", "--cache-dir", str(caches), "--out", str(tmp_path / "b"), model=False)
    argv += ["--model-config", world["config"], "--pretrained", world["other_weights"]]
    with caplog.at_level(logging.WARNING, logger="rada_mma.fewshot.cache"):
        run_ok(argv, capsys)
    stale = [r.getMessage() for r in caplog.records if "is stale" in r.getMessage()]
    assert len(stale) == 4 and all("(weights changed" in m for m in stale)  # texts, test, train, val
    after = load_features(caches / "all-test-v0.safetensors")
    assert after.fingerprint != before.fingerprint and not torch.allclose(after.image, before.image)
    assert read_results(tmp_path / "a")[0] != read_results(tmp_path / "b")[0]


def test_errors_are_one_line_with_status_2(world, tmp_path, capsys):
    empty_class = make_images(tmp_path / "empty_class", seed=0, counts={"train": 2, "test": 1})
    (empty_class / "train" / "zebra").mkdir()
    coop = tmp_path / "coop"
    make_images(coop / "images", seed=0, counts={"train": 2, "test": 1})
    split = {"train": [[f"train/{c}/{i}.png", k, c] for k, c in enumerate(CLASSES) for i in range(2)],
             "val": [],
             "test": [[f"test/{c}/0.png", k, c] for k, c in enumerate(CLASSES)] + [["test/red_apple/7.png", 0, CLASSES[0]]]}
    (coop / "split_zhou_Toy.json").write_text(json.dumps(split))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"these are not weights")
    out = ["--out", str(tmp_path / "run")]
    cases = [
        (cli(world, "fit", *out, data=str(tmp_path / "nowhere")), "nowhere does not exist; give the dataset's folder"),
        (cli(world, "fit", *out, data=str(empty_class)), "zebra has no images"),
        (cli(world, "fit", *out, data=str(coop)), "names 1 images that are not in"),
        (cli(world, "fit", *out, model=False) + ["--model", "NoSuchNet-9"], "open_clip does not know the model 'NoSuchNet-9'"),
        (cli(world, "fit", *out, model=False) + ["--model-config", world["config"], "--pretrained", world["wrong_weights"]],
         "do not fit the model tiny-cli-clip"),
        (cli(world, "fit", *out, model=False) + ["--model-config", world["config"], "--pretrained", str(garbage)],
         "do not fit the model tiny-cli-clip"),
        (cli(world, "fit", *out, model=False) + ["--model-config", world["config"], "--pretrained", "/nowhere/w.pt"],
         "--pretrained /nowhere/w.pt: no such weights file"),
        (cli(world, "fit", *out, model=False) + ["--model", "ViT-B-16", "--model-config", world["config"]],
         "defines the model 'tiny-cli-clip'"),
        (cli(world, "fit", *out, model=False) + ["--model-config", str(tmp_path / "none.json")], "does not exist"),
        (cli(world, "fit", *out, "--option", "alpha"), "--option takes KEY=VALUE"),
        (cli(world, "eval", *out), "no adapter at"),
        # once: exit 0 with NaN logits, a traceback, or a raw Python message
        (cli(world, "fit", *out, "--option", "temperature=NaN"), "temperature must be a finite number, got nan"),
        (cli(world, "fit", *out, "--option", "temperature=abc"), "temperature must be a number, got 'abc' (str)"),
        (cli(world, "fit", *out, "--option", "alpha=Infinity"), "alpha must be a finite number, got inf"),
        (cli(world, "fit", *out, "--lr", "nan"), "lr must be a finite number, got nan"),
        (cli(world, "fit", *out, "--weight-decay", "inf"), "--weight-decay must be a finite number, got inf"),
        (cli(world, "fit", *out, "--seed", str(2**70)), "seed must lie in [0, 2**63)"),
        (cli(world, "eval", *out, "--seed", str(2**70)), "seed must lie in [0, 2**63)"),
        (cli(world, "fit", *out, shots=0) + ["--shots", "-3"], "shots must be >= 0 (0: every image), got -3"),
        (cli(world, "fit", *out, "--template", "a photo of {} and {}"), "must hold exactly one {}"),
    ]
    for argv, expected in cases:
        line = run_error(argv, capsys)
        assert expected in line, line
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
    # a run folder holds one run: another configuration is refused, not mixed in
    run_ok(cli(world, "fit", "--epochs", "1", *out), capsys)
    line = run_error(cli(world, "fit", "--epochs", "2", *out), capsys)
    assert "holds the finished run (train.epochs: 1 there, 2 now); choose another out folder" in line


def test_a_diverging_fit_stops_and_writes_no_adapter(world, tmp_path, capsys):
    """Once: exit 0, a saved adapter of NaN weights, 50 % accuracy."""
    out = tmp_path / "run"
    assert main(cli(world, "fit", "--method", "mma", "--lr", "1e30", "--epochs", "3", "--out", str(out))) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert re.match(r"rada-mma fit: error: training diverged: the loss is nan at epoch \d of 3, step 1 of 1", line)
    assert "No adapter is written" in line
    assert not (out / "adapter.safetensors").exists() and not (out / "results.json").exists()
    assert not (out / runs.LOCK_FILE).exists()  # released on the error path too


def test_console_script_help():
    script = Path(sys.executable).parent / "rada-mma"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for command in ("extract", "fit", "eval", "bench"):
        assert command in done.stdout


# -- choices a user must make, and the shipped CLIP -------------------------------------------


def test_a_missing_model_or_weights_choice_is_an_error_not_random_weights(world, tmp_path, capsys):
    out = ["--out", str(tmp_path / "run")]
    line = run_error(cli(world, "fit", *out, model=False), capsys)
    assert "no model given" in line and "--model" in line
    line = run_error(cli(world, "fit", *out, model=False) + ["--model-config", world["config"]], capsys)
    assert "no weights given for tiny-cli-clip" in line and "--pretrained 'random'" in line
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
    # asked for on purpose, random weights train
    run_ok(cli(world, "fit", *out, "--epochs", "1", model=False) + ["--model-config", world["config"],
                                                                    "--pretrained", "random"], capsys)
    assert (tmp_path / "run" / "adapter.safetensors").is_file()


@pytest.fixture(scope="module")
def world_task(tmp_path_factory):
    """A few images per class of the demo world's first task, as a CoOp folder."""
    import dataclasses

    from rada_mma.demo import world as demo_world
    from rada_mma.demo import write_task

    first = demo_world.TASKS[next(iter(demo_world.TASKS))]
    return write_task(dataclasses.replace(first, counts=(3, 2, 2)), tmp_path_factory.mktemp("world"))


def test_the_shipped_clip_is_named_world_clip_everywhere(world_task, tmp_path, capsys):
    common = ["--model", "world-clip", "--data", str(world_task), "--shots", "2", "--device", "cpu"]
    run_ok(["extract", *common, "--out", str(tmp_path / "x")], capsys)
    run_ok(["fit", *common, "--epochs", "1", "--out", str(tmp_path / "fit")], capsys)
    assert read_results(tmp_path / "fit")[0]["model"] == "world-clip"
    run_ok(["eval", *common, "--out", str(tmp_path / "fit")], capsys)
    run_ok(["bench", *common, "--methods", "mma", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path / "b")],
           capsys)
    assert [r["method"] for r in read_results(tmp_path / "b")] == ["zero-shot", "mma"]
    # the adapter file records its base: predict needs no --model
    out = run_ok(["predict", "--adapter", str(tmp_path / "fit" / "adapter.safetensors"), "--images",
                  str(world_task / "images" / "test"), "--out", str(tmp_path / "p.jsonl"), "--k", "2"], capsys)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    base_classes = {item[2] for item in json.loads(next(world_task.glob("split_zhou_*.json")).read_text())["test"]
                    if item[1] < 8}  # the first half of the task's 16 classes
    assert len(rows) == len(list((world_task / "images" / "test").rglob("*.png"))) and f"{len(rows)} images" in out
    assert all(len(r["classes"]) == 2 and set(r["classes"]) <= base_classes for r in rows)


def test_errors_name_flags_not_python_arguments(world, tmp_path, capsys):
    coop = tmp_path / "coop"
    make_images(coop / "images", seed=0, counts={"train": 1, "test": 1})
    split = {"train": [[f"train/{c}/0.png", k, c] for k, c in enumerate(CLASSES)],
             "test": [[f"elsewhere/{c}/0.png", k, c] for k, c in enumerate(CLASSES)]}
    (coop / "split_zhou_Toy.json").write_text(json.dumps(split))
    line = run_error(cli(world, "fit", "--out", str(tmp_path / "run"), data=str(coop)), capsys)
    assert "--split-file" in line and "split_file" not in line


def test_fit_takes_threads(world, tmp_path, capsys):
    run_ok(cli(world, "fit", "--threads", "1", "--epochs", "1", "--out", str(tmp_path / "run")), capsys)
    assert torch.get_num_threads() == 1


def test_predict_writes_one_line_per_image(world, mma_run, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(world["data"] / "test" / "black_cat", folder)
    (folder / "zz-corrupt.png").write_bytes(b"\x89PNG but truncated")
    adapter = str(mma_run / "adapter.safetensors")
    model = ["--model-config", world["config"], "--pretrained", world["weights"], "--device", "cpu"]
    out = run_ok(["predict", "--adapter", adapter, "--images", str(folder), "--out", str(tmp_path / "p.csv"),
                  "--no-progress", *model], capsys)
    assert "4 images classified; 1 unreadable" in out
    header, *rows = (tmp_path / "p.csv").read_text().splitlines()
    assert header.startswith("path,class_1,probability_1,class_2") and len(rows) == 5
    assert "cannot read the image" in rows[-1] and all(row.endswith(",") for row in rows[:-1])
    # the file records the weights' file name, not where it is: say which flag to give
    line = run_error(["predict", "--adapter", adapter, "--images", str(folder), "--out", str(tmp_path / "q.csv")], capsys)
    assert "--pretrained /path/to/tiny-cli-clip-seed0.pt" in line
    # another CLIP's weights: a warning that names both, or with --strict an error
    other = ["--model-config", world["config"], "--pretrained", world["other_weights"], "--device", "cpu"]
    main(["predict", "--adapter", adapter, "--images", str(folder), "--out", str(tmp_path / "r.jsonl"), *other])
    assert "tiny-cli-clip-seed0.pt" in capsys.readouterr().err
    line = run_error(["predict", "--adapter", adapter, "--images", str(folder), "--out", str(tmp_path / "s.jsonl"),
                      "--strict", *other], capsys)
    assert "tiny-cli-clip-seed0.pt" in line and "tiny-cli-clip-seed1.pt" in line
    line = run_error(["predict", "--adapter", adapter, "--images", str(folder), "--out", str(tmp_path / "p.csv"),
                      *model], capsys)  # exists: not overwritten
    assert "--out" in line and "pass --overwrite to replace it" in line


def all_options(command: str) -> dict[str, str | None]:
    """``--flag: help`` of every option of ``rada-mma COMMAND``."""
    from rada_mma.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {flag: action.help for action in sub._actions for flag in action.option_strings if flag.startswith("--")}


COMMANDS = ("extract", "fit", "eval", "bench", "demo")


@pytest.mark.parametrize("command", (*COMMANDS, "predict"))
def test_every_option_says_what_it_does(command):
    missing = [flag for flag, text in all_options(command).items() if not text]
    assert not missing, f"{command}: no help for {missing}"


def test_eval_takes_no_training_flags():
    assert not {"--epochs", "--lr", "--batch-size", "--patience"} & set(all_options("eval"))
    assert {"--epochs", "--lr", "--batch-size", "--patience", "--amp"} <= set(all_options("fit"))


FLAGS_0_1 = {  # every flag rada-mma 0.1 had, per command: each still parses
    "common": ["--model", "--pretrained", "--model-config", "--data", "--split-file", "--dataset", "--template",
               "--shots", "--cache-dir", "--extract-batch-size", "--device", "--rounding", "--out"],
    # --views is now part of the training recipe (the presets set it): every command that trains or fills the
    # training cache has it; eval, which never read it, does not
    "training": ["--option", "--epochs", "--lr", "--batch-size", "--weight-decay", "--patience", "--warmup-epochs",
                 "--schedule", "--select", "--optimizer", "--views"],
    "extract": ["--seed", "--views"], "fit": ["--method", "--seed"], "eval": ["--method", "--seed", "--adapter"],
    "bench": ["--methods", "--seeds"], "demo": ["--methods", "--seeds", "--tasks", "--world-dir", "--threads",
                                                "--no-progress"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_0_1_still_exists(command):
    wanted = FLAGS_0_1["common"] + FLAGS_0_1[command]
    if command in ("fit", "eval", "bench", "demo"):
        wanted += FLAGS_0_1["training"] if command != "eval" else ["--option"]
    assert set(wanted) <= set(all_options(command))


def test_every_file_a_run_writes_is_readable_by_others(world, tmp_path, capsys):
    import os

    old = os.umask(0o022)
    try:
        run_ok(cli(world, "fit", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")),
               capsys)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 12  # adapter, checkpoint, results, config, plots, split, 4 caches
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o644)}, modes
