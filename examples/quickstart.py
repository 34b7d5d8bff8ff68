"""Quickstart: wrap a CLIP, train each adapter in an ordinary PyTorch loop, save it and load it back.

Runs offline on what ships with rada_mma: the small pretrained world CLIP and
the world's WorldShapes task (16 shape-colour classes drawn as outlines, a
style the CLIP never saw in pretraining). It prints zero-shot CLIP's accuracy
on 400 of the task's test images, then for every method in ``rada_mma.METHODS``

1. wraps the CLIP and sets the 16 class names,
2. trains the adapter on 16 images per class (200 steps of batch 32, AdamW),
3. prints its accuracy on the test images and the gain over zero-shot,
4. saves the adapter, loads it into a fresh wrap of the CLIP and checks that
   it reproduces the logits bit for bit.

Both adapters act only on CLIP's final embeddings, so the script encodes the
training images once (``encode_image``) and the loops train on those features
through ``model.logits_from_features``: what ``model(images)`` computes, without
re-running the frozen image encoder at every step. Evaluation and the reload
check call ``model(images)``, the drop-in path.
RAda+Adapter's residual adapters start a hair from the identity and train
(``adapter_init="small"``, the default; ``"released"`` is the authors' exact
form, whose adapters never move: docs/methods.md, section 4).

Takes 15-25 s from a fresh process (measured 15-23 s, about 13 s of CPU time,
on a shared 2-core CPU). It runs torch on one thread: with other jobs on the
CPU, two threads made the same run take 77 s.

    python examples/quickstart.py [--out DIR] [--steps 200] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from rada_mma import METHODS, wrap
from rada_mma.demo import load_world_clip, world


def preprocess_images(images: torch.Tensor, preprocess) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 images through CLIP's own preprocessing, as you would load any image."""
    return torch.stack([preprocess(Image.fromarray(image)) for image in images.numpy()])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item() * 100


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the adapter files (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps per method (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the adapters' initial weights and batches")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: fastest for this tiny model on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="rada_mma_quickstart_"))
    out.mkdir(parents=True, exist_ok=True)

    clip, preprocess, tokenizer = load_world_clip()  # any open_clip / HF / OpenAI CLIP works the same way
    task = world.TASKS["WorldShapes"]
    train = task.render("train", per_class=16)  # 16 shots per class
    test = task.render("test", per_class=25)  # 25 test images per class
    train_images = preprocess_images(train.images, preprocess)
    test_images = preprocess_images(test.images, preprocess)
    classes = task.classnames  # "cyan circle", "green circle", ...

    # zero-shot CLIP, and the frozen image encoder's output for the training images (the same for all methods)
    plain = wrap(clip).set_classes(classes, tokenizer=tokenizer).eval()
    with torch.no_grad(), plain.disable_adapter():
        zero_shot = accuracy(plain(test_images), test.labels)
    train_features = plain.encode_image(train_images)  # (256, 128), computed once

    print(f"{task.name}: {len(classes)} classes, {len(train.labels)} training, {len(test.labels)} test images")
    print(f"{'method':<14}{'test acc':>9}{'gain':>8}{'seconds':>9}  adapter file (reloaded bit for bit)")
    print(f"{'zero-shot':<14}{zero_shot:>8.1f}%")
    rows = []
    for method in METHODS:
        start = time.perf_counter()
        # --- the user's code: wrap, set classes, an ordinary training loop ---
        model = wrap(clip, method=method, generator=torch.Generator().manual_seed(args.seed))
        model.set_classes(classes, tokenizer=tokenizer)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(args.seed)
        model.train()
        for _ in range(args.steps):
            batch = torch.randperm(len(train.labels), generator=g)[:32]
            logits = model.logits_from_features(train_features[batch])  # = model(train_images[batch])
            loss = F.cross_entropy(logits, train.labels[batch]) + model.regularization()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            test_logits = model(test_images)
        adapted = accuracy(test_logits, test.labels)
        path = model.save_adapter(out / f"{method.replace('+', '_')}.safetensors", overwrite=True)

        # --- later, elsewhere: the same CLIP, a fresh wrap, the saved adapter, the same logits bit for bit ---
        fresh = wrap(clip, method=method).set_classes(classes, tokenizer=tokenizer).load_adapter(path).eval()
        with torch.no_grad():
            if not torch.equal(fresh(test_images), test_logits):
                raise SystemExit(f"{method}: the reloaded adapter does not reproduce the logits")
        seconds = time.perf_counter() - start
        print(f"{method:<14}{adapted:>8.1f}%{adapted - zero_shot:>+8.1f}{seconds:>9.1f}  {path}")
        rows.append({"method": method, "zero_shot": zero_shot, "adapted": adapted, "adapter": path})

    # every sentence below is computed from the rows above
    print(f"\nChance: {100 / len(classes):.1f}% ({len(classes)} classes). Zero-shot CLIP: {zero_shot:.1f}%.")
    behind = [row["method"] for row in rows if row["adapted"] <= row["zero_shot"]]
    if behind:
        print(f"Not above zero-shot after {args.steps} steps: {', '.join(behind)}.")
    else:
        gains = [row["adapted"] - row["zero_shot"] for row in rows]
        print(f"Every adapter beats zero-shot, by {min(gains):.1f} to {max(gains):.1f} points, "
              f"after {args.steps} steps on {len(train.labels) // len(classes)} images per class.")
    print(f"Each adapter file, loaded into a fresh wrap, reproduced its logits bit for bit ({out}).")
    return rows


if __name__ == "__main__":
    main()
