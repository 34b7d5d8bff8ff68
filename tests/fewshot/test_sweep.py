"""Sweeps (``rada_mma.fewshot.sweep``) for real, on a tiny open_clip model and a task whose validation and test
splits disagree (tests/helpers/sweeps.py): the selection follows validation, ties go to the first configuration,
the test split is not read (not even from the cache) before the selection has ended, worker processes, torchrun
ranks and an interrupted and resumed sweep give what a serial sweep gives, and best.json runs as the sweep's own
runs. Run as a script this file is a torchrun worker (see tests/helpers/torchrun.py)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from rada_mma.fewshot import FeatureStore, RunSpec, Splits, cache, distributed, extract, run_base_to_new, runs
from rada_mma.fewshot.sweep import Grid, load_best, read_best, run_sweep, select_configuration
from rada_mma.fewshot.train import TrainingDiverged
from tests.helpers import sweeps, torchrun

FORK = multiprocessing.get_context("fork")


def is_test_item(item) -> bool:
    return Path(str(item.source)).parts[0] == "test"


def watch_the_test_split(mp: pytest.MonkeyPatch, best: Path, events: list[tuple[str, bool]]) -> None:
    """Every read of the test split (its features through the store, its cache files, its images' bytes or
    pixels) is recorded with whether the selection had ended (best.json written), and fails if it had not."""

    def seen(what: str) -> None:
        events.append((what, best.exists()))
        if not best.exists():
            raise AssertionError(f"the test split was read before the selection ended: {what}")

    images, safe_open, digest, load_image = FeatureStore.images, cache.safe_open, cache.data_digest, Splits.load_image

    def spy_images(self, splits, part, *args, **kwargs):
        if part == "test":
            seen("test features")
        return images(self, splits, part, *args, **kwargs)

    def spy_open(path, *args, **kwargs):
        if "-test-" in Path(path).name:
            seen(f"cache file {Path(path).name}")
        return safe_open(path, *args, **kwargs)

    def spy_digest(splits, items, *args, **kwargs):
        if any(is_test_item(item) for item in items):
            seen("test image bytes")
        return digest(splits, items, *args, **kwargs)

    def spy_load(self, item):
        if is_test_item(item):
            seen("test image")
        return load_image(self, item)

    for owner, name, spy in ((FeatureStore, "images", spy_images), (cache, "safe_open", spy_open),
                             (cache, "data_digest", spy_digest), (Splits, "load_image", spy_load)):
        mp.setattr(owner, name, spy)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    spec = sweeps.sweep_spec(sweeps.write_task(root), root / "serial")
    torch.set_num_threads(1)
    extract(spec.replace(out=str(root / "extracted")))  # the cache holds the test features before the sweep starts
    events: list[tuple[str, bool]] = []
    with pytest.MonkeyPatch.context() as mp:
        watch_the_test_split(mp, spec.out_dir / "best.json", events)
        sweep = run_sweep(spec, sweeps.GRID, seeds=sweeps.SEEDS)
    return {"root": root, "spec": spec, "sweep": sweep, "events": events}


def same_sweep(a, b) -> None:
    assert a.configurations == b.configurations and a.selected == b.selected and a.best == b.best
    assert a.rows == b.rows


# -- selection ---------------------------------------------------------------------------------------


def mean(rows, key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def test_the_selection_follows_validation_where_the_test_split_would_choose_otherwise(swept):
    sweep, spec = swept["sweep"], swept["spec"]
    by_lr = {c["values"]["lr"]: c["mean"] for c in sweep.configurations}
    assert by_lr[0.005] > by_lr[1e-6]  # validation prefers training
    assert sweep.best["selected"]["values"] == {"lr": 0.005, "momentum": 0.5}
    assert sweep.best["train"] == {**sweeps.TRAIN, "lr": 0.005, "momentum": 0.5}
    chosen = [r for r in sweep.rows if r["method"] == "mma"]
    grid = Grid(method="mma", values=sweeps.GRID)
    other = [r for seed in sweeps.SEEDS for r in run_base_to_new(grid.apply(spec, {"lr": 1e-6, "momentum": 0.5}).replace(
        seed=seed, out=str(swept["root"] / f"untrained-{seed}"))) if r["method"] == "mma"]
    # the test split prefers the configuration that barely trains: selecting on it would have picked that one
    assert mean(other, "base") > mean(chosen, "base") and mean(other, "hm") > mean(chosen, "hm")


def test_ties_go_to_the_first_configuration_in_grid_order(swept):
    configurations = swept["sweep"].configurations
    assert [c["values"] for c in configurations] == Grid(method="mma", values=sweeps.GRID).points()
    assert configurations[2]["val_acc"] == configurations[3]["val_acc"]  # Adam ignores momentum: a tie
    assert swept["sweep"].selected == 2
    assert select_configuration([70.0, 75.0, None, 75.0]) == 1
    assert select_configuration([None, 10.0]) == 1  # a configuration that diverged on a seed is never selected
    with pytest.raises(TrainingDiverged, match="every configuration"):
        select_configuration([None, None])


def test_the_test_split_is_read_only_after_the_selection(swept, tmp_path):
    events = swept["events"]
    assert events and all(after for _, after in events)  # read, and only once best.json was written
    assert any(what.startswith("cache file") for what, _ in events)  # the cache extract() filled, only then
    store = FeatureStore(RunSpec(out=str(tmp_path)), None, None, None)
    with store.seal("test"), pytest.raises(PermissionError, match="the test split is sealed"):
        store.images(None, "test", "all")


# -- outputs -------------------------------------------------------------------------------------------


def test_the_folder_holds_scores_selection_and_test_rows_of_the_selected_configuration(swept):
    sweep, out = swept["sweep"], swept["spec"].out_dir
    assert {"sweep.json", "sweep.md", "sweep.png", "best.json", "results.json", "results.md", "scores",
            "best-seed1", "best-seed2"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "sweep.json").read_text())
    assert record["configurations"] == sweep.configurations and record["selected"] == 2
    assert record["seeds"] == [1, 2] and record["grid"] == {"lr": [1e-6, 0.005], "momentum": [0.5, 0.9]}
    assert len(list((out / "scores").iterdir())) == 8  # 4 configurations x 2 seeds
    assert "| 2 | 0.005 | 0.5 |" in (out / "sweep.md").read_text() and "**selected**" in (out / "sweep.md").read_text()
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"], r["run"]) for r in rows] == [
        ("zero-shot", 1, "best-seed1"), ("mma", 1, "best-seed1"), ("zero-shot", 2, "best-seed2"), ("mma", 2, "best-seed2")]
    for seed in sweeps.SEEDS:  # each final run trained the selected configuration as the sweep did
        run = json.loads((out / f"best-seed{seed}" / "run.json").read_text())
        assert run["lr"] == 0.005 and run["val_acc"] == sweep.configurations[2]["val_acc"][str(seed)]


def test_best_json_is_the_selected_configuration_for_python(swept, tmp_path):
    spec, sweep = swept["spec"], swept["sweep"]
    path = spec.out_dir / "best.json"
    fields = load_best(path)
    assert fields == {"method": "mma", "options": {}, "train": sweep.best["train"], "shots": 4, "draw": "coop",
                      "rounding": None, "templates": None}
    assert read_best(spec.out_dir)["setting"] == "base2new"
    again = RunSpec(data=spec.data, out=str(tmp_path / "again"), model_config=spec.model_config,
                    pretrained=spec.pretrained, device="cpu", progress=False, cache_dir=spec.cache_dir, **fields)
    rows = run_base_to_new(again)  # seed 1
    assert rows == [{k: v for k, v in r.items() if k != "run"} for r in sweep.rows if r["seed"] == 1]
    (tmp_path / "bad.json").write_text(json.dumps({"method": "mma", "lr": 0.1}))
    with pytest.raises(ValueError, match=r"not a sweep configuration \(unknown keys \['lr'\]"):
        load_best(tmp_path / "bad.json")


# -- how the work is shared --------------------------------------------------------------------------------


def worker(root: Path) -> None:
    """One torchrun rank of the sweep of :func:`swept`'s task (its cache is filled: the ranks only train)."""
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    torch.set_num_threads(1)
    distributed.init_from_env()
    run_sweep(sweeps.sweep_spec(root, root / "ranks"), sweeps.GRID, seeds=sweeps.SEEDS)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_share_the_configurations_and_give_the_serial_sweep(swept):
    root = swept["root"]
    torchrun.run_ranks(__file__, root)
    for rank in (0, 1):  # each trained half of the 8 trainings (and ran one of the two seeds' final runs)
        assert "8 to train (4 here)" in (root / f"rank{rank}.log").read_text()
    sweep, ranks = swept["sweep"], root / "ranks"
    assert json.loads((ranks / "sweep.json").read_text())["configurations"] == sweep.configurations
    assert json.loads((ranks / "best.json").read_text()) == sweep.best
    assert json.loads((ranks / "results.json").read_text()) == sweep.rows
    assert len(list((ranks / "scores").iterdir())) == 8  # each rank wrote the scores it trained


def stop_when_scored(folder: Path, proc, failures: list, timeout: float = 120.0) -> None:
    """SIGSTOP ``proc`` as soon as it has written its first score: mid-sweep, however fast the machine."""
    deadline = time.monotonic() + timeout
    while not (folder.is_dir() and any(p.suffix == ".json" for p in folder.iterdir())):
        if not proc.is_alive() or time.monotonic() > deadline:
            failures.append(f"the sweep ended (status {proc.exitcode}) or stalled before its first score")
            return
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)


def test_a_killed_sweep_resumes_in_worker_processes_to_the_serial_sweep(swept, caplog):
    """Killed after its first score; started again with two worker processes, it trains only what is missing
    and ends where the serial, uninterrupted sweep ended."""
    spec = swept["spec"].replace(out=str(swept["root"] / "killed"))
    child = FORK.Process(target=run_sweep, args=(spec, sweeps.GRID), kwargs={"seeds": sweeps.SEEDS})
    child.start()
    failures: list[str] = []
    stop_when_scored(spec.out_dir / "scores", child, failures)
    try:
        assert not failures, failures[0]
        with pytest.raises(BlockingIOError, match=rf"in use by another run: process {child.pid} "):
            run_sweep(spec, sweeps.GRID, seeds=sweeps.SEEDS)  # one sweep per folder at a time
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    scored = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (spec.out_dir / "scores").iterdir()
              if p.suffix == ".json"}
    assert 1 <= len(scored) < 8 and not (spec.out_dir / "best.json").exists()
    with caplog.at_level(logging.INFO, logger="rada_mma.fewshot.sweep"):
        resumed = run_sweep(spec, sweeps.GRID, seeds=sweeps.SEEDS, workers=2)
    assert f"{len(scored)} of 8 trainings already scored" in caplog.text
    same_sweep(resumed, swept["sweep"])
    assert all((spec.out_dir / "scores" / name).stat().st_mtime_ns == mtime for name, (mtime, _) in scored.items())


# -- what is refused ---------------------------------------------------------------------------------------


def test_grids_are_read_with_each_fields_type():
    grid = Grid.parse("rada", ["lr=1e-4,1e-3", "epochs=3,5", "views=per_epoch,0", "amp=true,false", "softmax=flat,row"])
    assert grid.values == {"lr": (1e-4, 1e-3), "epochs": (3, 5), "views": ("per_epoch", 0), "amp": (True, False),
                           "softmax": ("flat", "row")}
    assert len(grid.points()) == 32 and grid.points()[1] == {"lr": 1e-4, "epochs": 3, "views": "per_epoch",
                                                              "amp": True, "softmax": "row"}
    assert Grid.parse("mma", ["warmup-epochs=0,1"]).keys == ("warmup_epochs",)
    assert Grid(method="rada+adapter", values={"adapter-init": ["small", "blend"]}).keys == ("adapter_init",)
    for items, message in (
        (["depth=1,2"], r"unknown grid key 'depth': sweep a training setting \(epochs, batch-size, .*\) or an option "
                        r"of rada \(heads, temperature, softmax, regularizer, alpha\)"),
        (["blend=0.1"], r"option of rada \(heads"),  # MMA's option, not RAda's
        (["seed=1,2"], "seed is not a grid key"),
        (["lr=abc"], "lr takes a finite number, got 'abc'"),
        (["epochs=2.5"], "epochs takes an integer, got '2.5'"),
        (["views=-1"], "views must be 'per_epoch' or an integer >= 0"),
        (["lr=1e-3,1e-3"], "lr lists 0.001 twice"),
        (["lr=1e-3", "lr=1e-2"], "grid key lr is given twice"),
        (["lr"], "--grid takes KEY=V1,V2"),
    ):
        with pytest.raises(ValueError, match=message):
            Grid.parse("rada", items)
    with pytest.raises(ValueError, match="needs a non-empty list of values"):
        Grid(method="rada", values={"lr": []})


def test_what_a_sweep_refuses_before_it_trains(swept, tmp_path):
    spec = swept["spec"].replace(out=str(tmp_path / "s"))
    for changes, grid, kwargs, message in (
        ({"train": {**sweeps.TRAIN, "lr": 0.1}}, sweeps.GRID, {}, r"lr is both a grid key and a fixed setting \(0.1\)"),
        ({}, sweeps.GRID, {"workers": 0}, "workers must be an integer >= 1"),
        ({}, sweeps.GRID, {"seeds": (1, 1)}, "seeds must be distinct"),
        ({}, sweeps.GRID, {"setting": "dg"}, "setting must be one of base2new, all"),
        ({}, {"mma_heads": [3]}, {}, r"configuration mma_heads=3: mma_heads=3 must be a positive divisor"),
        ({}, {"batch_size": [0]}, {}, "configuration batch_size=0: batch_size must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            run_sweep(spec.replace(**changes), grid, **kwargs)
    assert not (tmp_path / "s" / "scores").exists()  # nothing trained
    with pytest.raises(FileExistsError, match=r"holds another finished sweep \(its grid differ\)"):
        run_sweep(swept["spec"], {"lr": [1e-3]}, seeds=sweeps.SEEDS)
    with runs.hold(tmp_path / "held"), pytest.raises(BlockingIOError, match="in use by another run"):
        run_sweep(spec.replace(out=str(tmp_path / "held")), sweeps.GRID)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
