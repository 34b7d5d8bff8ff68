"""Faults, for real: a fit killed with SIGKILL and started again, a save killed mid-write.

A few seconds in all: a tiny open_clip model and ImageFolder on disk; the run to kill is a forked
child of the test process (no start-up imports; one torch thread, so nothing of OpenMP to inherit).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

from rada_mma import RationalMask, load_adapter, save_adapter
from rada_mma.fewshot import RunSpec, run_base_to_new, runs
from rada_mma.fewshot.train import CHECKPOINT
from tests.helpers import files
from tests.helpers.runs import write_model

EPOCHS = 12
FORK = multiprocessing.get_context("fork")


def freeze_after(path, proc, failures: list, timeout: float = 120.0) -> None:
    """Stop ``proc`` (SIGSTOP) as soon as ``path`` exists: mid-run, however fast or slow the machine."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not proc.is_alive() or time.monotonic() > deadline:
            failures.append(f"the run ended (status {proc.exitcode}) or stalled before writing {path.name}")
            return
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)


def kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()


def test_a_killed_fit_resumes_to_the_adapter_of_an_uninterrupted_one(tmp_path, caplog):
    config, weights = write_model(tmp_path / "model", "tiny-fault-clip", seed=0)
    settings = dict(data=str(files.write_images(tmp_path / "data", seed=0)), model_config=str(config),
                    pretrained=str(weights), method="rada", shots=4, device="cpu", progress=False,
                    cache_dir=str(tmp_path / "cache"), train={"epochs": EPOCHS})
    out = tmp_path / "run"
    child = FORK.Process(target=run_base_to_new, args=(RunSpec(out=str(out), **settings),))
    child.start()
    failures: list[str] = []
    watcher = threading.Thread(target=freeze_after, args=(out / CHECKPOINT, child, failures), daemon=True)
    watcher.start()
    try:
        reference = run_base_to_new(RunSpec(out=str(tmp_path / "reference"), **settings))  # meanwhile: uninterrupted
        watcher.join()
        assert not failures, failures[0]
        assert child.is_alive() and not (out / "results.json").exists()  # frozen mid-run, holding the folder
        # a second run into the same folder at the same time is refused, naming the holder
        with pytest.raises(BlockingIOError, match=rf"in use by another run: process {child.pid} on "):
            run_base_to_new(RunSpec(out=str(out), **settings))
    finally:
        kill(child)
    killed_at = torch.load(out / CHECKPOINT, weights_only=True)["epoch"]
    assert killed_at < EPOCHS - 1 and (out / runs.LOCK_FILE).exists()  # the dead run's lock file is left behind

    with caplog.at_level(logging.INFO, logger="rada_mma.fewshot.train"):
        rows = run_base_to_new(RunSpec(out=str(out), **settings))  # the next run is not blocked by it
    assert f"at epoch {killed_at + 1}" in caplog.text  # resumed, not started over
    assert rows == reference
    assert (out / "adapter.safetensors").read_bytes() == (tmp_path / "reference" / "adapter.safetensors").read_bytes()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name == runs.LOCK_FILE]


def save_forever(modules, path, ready) -> None:
    ready.set()
    for i in itertools.count():  # one adapter, then the other, over the same file
        save_adapter(modules[i % 2], path, overwrite=True)


def test_a_save_killed_mid_write_leaves_a_whole_adapter_and_no_temporaries(tmp_path):
    """24 kills of such a loop once left 17 of our temporaries and 15 of safetensors' own (4.5 GB)."""
    path = tmp_path / "adapter.safetensors"
    modules = [RationalMask(dim=512, generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    expected = [module.state_dict() for module in modules]
    save_adapter(modules[1], path)
    torn = 0
    for writes in (1, 2, 3):
        ready = FORK.Event()
        child = FORK.Process(target=save_forever, args=(modules, path, ready))
        child.start()
        ready.wait()
        for _ in range(writes):  # killed while its n-th temporary is being written
            started = time.monotonic()
            while not any(f"-{child.pid}." in name for name in os.listdir(tmp_path)) and time.monotonic() - started < 60:
                time.sleep(0.0005)
        kill(child)
        torn += any(f"-{child.pid}." in name for name in os.listdir(tmp_path))
        loaded = load_adapter(path).state_dict()  # whole: one adapter or the other, never a mix or a torn file
        assert any(all(torch.equal(loaded[k], v) for k, v in state.items()) for state in expected)
    assert torn, "no kill landed mid-write"
    save_adapter(RationalMask(dim=8, heads=4), tmp_path / "next.safetensors")  # the next write into the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "next.safetensors"]
