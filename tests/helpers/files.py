"""Tiny models and datasets on disk, for the tests that run the pipeline as a user would (the CLI, killed runs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

CLASSES = ("red_apple", "green_leaf", "blue_sky", "black_cat")  # sorted: black cat, blue sky | green leaf, red apple
COUNTS = {"train": 6, "val": 2, "test": 4}
# a 2-layer ViT and text transformer, 32-d embeddings: milliseconds per image
CONFIG = {"embed_dim": 32,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


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


def write_model(folder: Path, name: str, config: dict, seed: int) -> tuple[Path, Path]:
    """An open_clip JSON config named ``name`` and random weights drawn with ``seed``: ``(config, weights)``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    weights = folder / f"{name}-seed{seed}.pt"
    torch.save(open_clip.create_model(name).state_dict(), weights)
    return path, weights
