"""Tiny datasets on disk, for the tests that run the pipeline as a user would (the CLI, killed runs); the
tiny model on disk is :func:`tests.helpers.runs.write_model`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("red_apple", "green_leaf", "blue_sky", "black_cat")  # sorted: black cat, blue sky | green leaf, red apple
COUNTS = {"train": 6, "val": 2, "test": 4}


def write_images(root: Path, seed: int, counts: dict[str, int] = COUNTS, classes: Sequence[str] = CLASSES) -> Path:
    """An ImageFolder root: ``root/<split>/<class>/<i>.png``, each class a colour, plus noise, 32x32."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.normal(size=(32, 32, 3)) * 40 + 60 * c).clip(0, 255).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root

