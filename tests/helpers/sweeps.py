"""A task on which the validation split and the test split disagree, for sweeps: selecting on validation must
not pick what the test split would prefer.

Four classes, ant and bee the base half. Training and validation images are coloured by their class; the base
classes' test images carry each other's colour. Training (a high learning rate) learns the colours: better on
validation, worse on the base classes' test images than the untrained adapter (a tiny learning rate). The Adam
optimiser ignores momentum, so each learning rate's two momentum values tie.
"""

from __future__ import annotations

from pathlib import Path

from rada_mma.fewshot import RunSpec
from tests.helpers import runs

CLASSES = ("ant", "bee", "cat", "dog")
TEST_COLOUR = {"ant": 1, "bee": 0, "cat": 2, "dog": 3}  # the base classes swapped
GRID = {"lr": [1e-6, 0.005], "momentum": [0.5, 0.9]}
SEEDS = (1, 2)
METHOD = "mma"
MODEL = "tiny-sweep-clip"
TRAIN = {"epochs": 30, "patience": 0, "select": "last"}


def write_task(root: Path) -> Path:
    """The task, ``root/task/{train,val,test}/<class>/<i>.png`` (6 training, 4 validation and 4 test images per
    class), and a tiny open_clip model in ``root/model``; ``root``."""
    for split, count in (("train", 6), ("val", 4), ("test", 4)):
        for label, name in enumerate(CLASSES):
            runs.write_images(root / "task" / split / name, TEST_COLOUR[name] if split == "test" else label, count,
                              seed=len(split))
    runs.write_model(root / "model", name=MODEL)
    return root


def sweep_spec(root: Path, out: Path) -> RunSpec:
    """MMA on the task of :func:`write_task`, 4 shots, 30 epochs, the cache in ``root/cache``, no progress bars."""
    model = root / "model"
    return RunSpec(data=str(root / "task"), out=str(out), model_config=str(model / f"{MODEL}.json"),
                   pretrained=str(model / f"{MODEL}-seed0.pt"), shots=4, device="cpu", progress=False,
                   cache_dir=str(root / "cache"), method=METHOD, train=TRAIN)
