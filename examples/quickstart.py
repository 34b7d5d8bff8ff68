"""Quickstart: wrap a CLIP, train each adapter in an ordinary loop, save and reload it.

Runs offline on a CPU in well under a minute. The CLIP here is a small open_clip
model with random weights and the images are generated, so zero-shot accuracy
is near chance: the point is the workflow, not the numbers.

    python examples/quickstart.py [--out runs/quickstart] [--steps 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from rada_mma import METHODS, wrap

CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "purple ring", "orange stripe"]


def small_clip(seed: int = 0) -> torch.nn.Module:
    """A 2-layer ViT / 2-layer text transformer open_clip CLIP with random weights (no download)."""
    torch.manual_seed(seed)
    vision = open_clip.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
    text = open_clip.CLIPTextCfg(context_length=16, vocab_size=49408, width=64, heads=2, layers=2)
    return open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text).eval()


def make_images(per_class: int, seed: int, noise: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class is a fixed colour plus a fixed random pattern; samples add heavy noise."""
    g = torch.Generator().manual_seed(1234)
    patterns = torch.randn(len(CLASSES), 3, 32, 32, generator=g)
    colours = torch.randn(len(CLASSES), 3, 1, 1, generator=g)
    g.manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    images = 0.5 * patterns[labels] + colours[labels]
    return images + noise * torch.randn(images.shape, generator=g), labels


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    return (model(images).argmax(-1) == labels).float().mean().item() * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for the adapter files (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per method")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="rada_mma_quickstart_"))
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = open_clip.SimpleTokenizer(context_length=16)
    train_x, train_y = make_images(per_class=16, seed=1)  # 16 shots per class
    test_x, test_y = make_images(per_class=32, seed=2)
    lr = {"rada": 1e-2, "rada+adapter": 1e-2, "mma": 2e-2, "mma-master": 2e-2, "mma+rada": 1e-2}

    print(f"{'method':<14}{'zero-shot':>10}{'adapted':>10}{'reloaded':>10}{'seconds':>9}  file")
    for method in METHODS:
        start = time.perf_counter()
        # --- the user's code: wrap, set classes, an ordinary training loop ---
        model = wrap(small_clip(), method=method, generator=torch.Generator().manual_seed(0))
        model.set_classes(CLASSES, tokenizer=tokenizer, templates=["a photo of a {}.", "a {} shape."])
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr[method])
        with model.disable_adapter():
            zero_shot = accuracy(model, test_x, test_y)
        model.train()
        g = torch.Generator().manual_seed(0)
        for _ in range(args.steps):
            batch = torch.randperm(len(train_y), generator=g)[:32]
            logits = model(train_x[batch])
            loss = F.cross_entropy(logits, train_y[batch]) + model.regularization()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        adapted = accuracy(model, test_x, test_y)
        path = model.save_adapter(out / f"{method.replace('+', '_')}.safetensors", overwrite=True)

        # --- later, elsewhere: a fresh CLIP, the saved adapter, the same logits bit for bit ---
        fresh = wrap(small_clip(), method=method).set_classes(
            CLASSES, tokenizer=tokenizer, templates=["a photo of a {}.", "a {} shape."]
        )
        fresh.load_adapter(path).eval()
        with torch.no_grad():
            if not torch.equal(fresh(test_x), model(test_x)):
                raise SystemExit(f"{method}: reloaded adapter does not reproduce the logits")
        reloaded = accuracy(fresh, test_x, test_y)
        seconds = time.perf_counter() - start
        print(f"{method:<14}{zero_shot:>9.1f}%{adapted:>9.1f}%{reloaded:>9.1f}%{seconds:>9.1f}  {path}")
    print(f"\nchance is {100 / len(CLASSES):.1f}%; the CLIP has random weights, so zero-shot sits near it.")


if __name__ == "__main__":
    main()
