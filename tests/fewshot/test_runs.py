"""Run folders (``rada_mma.fewshot.runs``): one process at a time, one run per folder.

No model is loaded: :func:`runs.claim` decides from the run's settings and the adapter files alone.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from rada_mma.fewshot import RunSpec, runs


def spec(out, **changes) -> RunSpec:
    return RunSpec(data="/data/pets", out=str(out), model="ViT-B-16", pretrained="openai", **changes)


def fit_into(out, **changes) -> None:
    """What ``fit`` does to its folder: claim it, write the adapter."""
    with runs.claim(spec(out, **changes), train=True) as run:
        (run.out_dir / runs.ADAPTER_FILE).write_bytes(b"adapter of " + repr(sorted(changes.items())).encode())


def test_a_held_folder_is_refused_with_the_holders_pid(tmp_path):
    with runs.hold(tmp_path / "run"):
        with pytest.raises(BlockingIOError, match=rf"in use by another run: process {os.getpid()} on .*started "):
            with runs.claim(spec(tmp_path / "run"), train=True):
                pass
    with runs.claim(spec(tmp_path / "run"), train=True):  # released
        pass


def test_the_lock_is_released_on_every_exit(tmp_path):
    for error in (ValueError("bad input"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with runs.claim(spec(tmp_path / "run"), train=True):
                raise error
        assert not (tmp_path / "run" / runs.LOCK_FILE).exists()


def test_a_lock_file_left_by_a_killed_run_blocks_nothing(tmp_path):
    """The lock is the kernel's, released when its process dies; the file it leaves is taken over at once.
    (tests/fewshot/test_faults.py kills a real run and starts the next.)"""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / runs.LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    with runs.hold(folder):
        assert json.loads((folder / runs.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (folder / runs.LOCK_FILE).exists()


def test_a_finished_run_is_never_taken_over(tmp_path):
    fit_into(tmp_path / "run")
    owner = json.loads((tmp_path / "run" / runs.OWNER_FILE).read_text())
    assert owner["kind"] == "fit" and len(owner["adapter_sha256"]) == 64
    fit_into(tmp_path / "run")  # the same run again (resumed, or repeated): its own folder
    with pytest.raises(FileExistsError, match=r"holds the finished run \(train.lr: 0.001 there, 0.01 now\); choose"):
        fit_into(tmp_path / "run", train={"lr": 0.01})
    with pytest.raises(FileExistsError, match=r"\(seed: 1 there, 2 now, train.seed: 1 there, 2 now\)"):
        fit_into(tmp_path / "run", seed=2)


def test_an_unfinished_run_may_be_replaced(tmp_path):
    """A killed or diverged fit wrote no adapter: another fit may use the folder (fit checks the checkpoint)."""
    with pytest.raises(KeyboardInterrupt):
        with runs.claim(spec(tmp_path / "run"), train=True):
            raise KeyboardInterrupt
    fit_into(tmp_path / "run", train={"lr": 0.01})
    assert json.loads((tmp_path / "run" / runs.OWNER_FILE).read_text())["run"]["train"]["lr"] == 0.01


def test_evaluations_of_other_adapters_get_folders_of_their_own(tmp_path):
    run = tmp_path / "run"
    fit_into(run)
    own = run / runs.ADAPTER_FILE
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"another adapter")
    same_bytes = tmp_path / "copy.safetensors"
    same_bytes.write_bytes(own.read_bytes())
    assert runs.results_folder(spec(run), own) == run
    assert runs.results_folder(spec(run), same_bytes) == run  # the same adapter, wherever it lies
    elsewhere = runs.results_folder(spec(run), other)
    assert elsewhere.parent == run / "evals" and re.fullmatch(r"other-[0-9a-f]{10}", elsewhere.name)
    assert runs.results_folder(spec(run, seed=2), own).parent == run / "evals"  # another draw: not this run
    with runs.claim(spec(run), train=False, adapter=other) as evaluation:
        assert evaluation.out_dir == elsewhere and evaluation.cache_folder() == run / "cache"
    assert json.loads((elsewhere / runs.OWNER_FILE).read_text())["kind"] == "eval"
    assert runs.results_folder(spec(run), other) == elsewhere  # the same evaluation again: the same folder


def test_a_folder_evaluated_first_belongs_to_that_adapter(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.write_bytes(b"a")
    second.write_bytes(b"b")
    with runs.claim(spec(tmp_path / "eval"), train=False, adapter=first) as evaluation:
        assert evaluation.out_dir == tmp_path / "eval"
    assert runs.results_folder(spec(tmp_path / "eval"), first) == tmp_path / "eval"
    assert runs.results_folder(spec(tmp_path / "eval"), second).parent == tmp_path / "eval" / "evals"
    with pytest.raises(FileExistsError, match="holds the evaluation of an adapter"):
        fit_into(tmp_path / "eval")


def test_folders_from_before_the_record_are_told_by_their_adapter(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / runs.ADAPTER_FILE).write_bytes(b"old adapter")
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"other")
    assert runs.results_folder(spec(run), run / runs.ADAPTER_FILE) == run
    assert runs.results_folder(spec(run), other).parent == run / "evals"
