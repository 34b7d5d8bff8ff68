"""What whole runs need in tests: a tiny open_clip model on disk, and tiny datasets of generated PNGs in the
layouts the loader knows (ImageFolder; CoOp's ImageNet and its test-only variants)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

# a 2-layer ViT (32x32 images, 8x8 patches) and a 2-layer text transformer, 32-d embeddings
CONFIG = {"embed_dim": 32,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def write_model(folder: Path, name: str = "tiny-run-clip", seed: int = 0, config: dict = CONFIG) -> tuple[str, str]:
    """An open_clip architecture's JSON config (default the tiny ``CONFIG``) named ``name`` and random weights
    drawn with ``seed``, in ``folder``: their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    weights = folder / f"{name}-seed{seed}.pt"
    torch.save(open_clip.create_model(name).state_dict(), weights)
    return str(path), str(weights)


def write_images(folder: Path, label: int, count: int, seed: int) -> None:
    """``count`` 32x32 PNGs in ``folder``: a colour per label, plus noise."""
    rng = np.random.default_rng(seed * 1000 + label)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = (rng.normal(size=(32, 32, 3)) * 40 + 50 * label).clip(0, 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{i}.png")


def image_folder(root: Path, classes: list[str], counts: dict[str, int], seed: int = 0) -> Path:
    """An ImageFolder root: ``root/<split>/<class>/<i>.png`` for each split in ``counts``."""
    for split, n in counts.items():
        for label, name in enumerate(classes):
            write_images(root / split / name, label, n, seed + hash(split) % 97)
    return root


def imagenet_layout(root: Path, wnids: dict[str, str], counts: dict[str, int], seed: int = 0) -> Path:
    """CoOp's ImageNet folder: ``root/images/{train,val}/<wnid>/`` and ``root/classnames.txt``."""
    for split, n in counts.items():
        for label, wnid in enumerate(sorted(wnids)):
            write_images(root / "images" / split / wnid, label, n, seed + len(split))
    (root / "classnames.txt").write_text("".join(f"{w} {name}\n" for w, name in sorted(wnids.items())))
    return root


def variant_layout(root: Path, image_dir: str, folders: dict[str, int], listing: dict[str, str] | None,
                   count: int, seed: int = 5) -> Path:
    """A test-only ImageNet variant: ``root/<image_dir>/<folder>/`` (``folders``: folder -> colour label) and,
    when given, ``root/classnames.txt``."""
    for folder, label in folders.items():
        write_images(root / image_dir / folder, label, count, seed)
    if listing is not None:
        (root / "classnames.txt").write_text("".join(f"{w} {name}\n" for w, name in listing.items()))
    return root
