"""Inference cost: zero-shot CLIP against each adapter, in images per second and in percent of the encoder.

A prediction is the image encoder, then the logits. For zero-shot CLIP the logits
are one ``(B, D) x (D, K)`` product; an adapter adds its per-image work, since
everything it derives from the classes alone (text features, RAda's text
queries, MMA's class keys and values, the earlier MMA's text-text attention) is
computed once per class set (:meth:`rada_mma.AdaptedCLIP.class_terms`) and
reused. Per image, MMA then costs ``O(K·D)``; RAda attends over the K classes of
each image, ``O(K·D² + K²·D)``, which no class-side precomputation removes.

Measured, for each model and K (default 10, 100, 1000), on one batch of random
images (``--batch``, default 32) with random class features:

- ``encoder_ms``: the image encoder (``model.encode_image``), per image;
- ``head_ms``: the logits from the encoder's features (``logits_from_features``
  without gradients: the inference path with the class terms cached), per image,
  for zero-shot CLIP and each adapter; ``setup_ms``: computing the class terms once;
- ``images_per_s = 1 / (encoder_ms + head_ms)``, and the adapter's overhead in
  percent of the encoder's time, ``100 · (head_ms − zero-shot head_ms) / encoder_ms``.

Each figure is the median of timed repeats after a warm-up (at least
``--min-repeats``, more while they fit ``--budget`` seconds), in wall-clock and
in CPU time (``time.process_time``). ``end_to_end`` times ``model.predict`` on the
same batch for every method at the largest K, as a check that encoder and head add up.

Models: ``world-clip`` (the shipped small CLIP, 64x64 images, 128-d) and
``ViT-B-16`` (open_clip's ViT-B/16 architecture with random weights: 224x224
images, 512-d; nothing is downloaded). Threads: ``--threads`` (default 1: on a
machine shared with other work one thread times steadily; the load average is
recorded).

Usage, from the repository root::

    python benchmarks/inference.py --json benchmarks/results/inference_cpu.json
    python benchmarks/inference.py --models world-clip --classes 10 --batch 4 --min-repeats 1 --budget 0 \\
        --json /tmp/inference.json          # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: the repository root, for the imports below

from benchmarks.common import environment, load_average, write_results  # noqa: E402
from rada_mma import METHODS, wrap  # noqa: E402
from rada_mma.backends import BACKENDS  # noqa: E402

MODELS = ("world-clip", "ViT-B-16")
CLASSES = (10, 100, 1000)
GOAL_PCT = 10.0  # the adapter's overhead at K = 1000 on ViT-B/16, in percent of the encoder


def build(name: str) -> tuple[torch.nn.Module, int]:
    """The CLIP and its image size, offline."""
    if name == "world-clip":
        from rada_mma.demo import load_world_clip

        model, _, _ = load_world_clip()
    else:
        import open_clip

        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None)  # the architecture; random weights, no download
    return model.eval(), BACKENDS["open_clip"].image_size(model)[0]


def timed(fn: Callable[[], object], *, min_repeats: int, budget: float) -> tuple[float, float, int]:
    """Median wall and CPU seconds of ``fn`` after one warm-up call, and the number of timed calls."""
    fn()
    walls, cpus = [], []
    while len(walls) < min_repeats or sum(walls) < budget:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        if len(walls) >= 50:
            break
    return statistics.median(walls), statistics.median(cpus), len(walls)


def run_model(name: str, args: argparse.Namespace) -> list[dict]:
    clip, size = build(name)
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    zero = wrap(clip, "mma")  # zero-shot CLIP: the same wrapper with its adapter disabled
    b = args.batch
    with torch.no_grad():
        enc_wall, enc_cpu, enc_n = timed(lambda: zero.encode_image(images), min_repeats=args.min_repeats,
                                         budget=args.budget)
        features = zero.encode_image(images)
    zero.unwrap()
    dim = features.shape[1]
    print(f"{name}: encoder {1e3 * enc_wall / b:.2f} ms/image (D = {dim})", file=sys.stderr)
    records = []
    for k in args.classes:
        text = torch.randn(k, dim, generator=torch.Generator().manual_seed(k))
        for method in ("zero-shot", *args.methods):
            model = wrap(clip, "mma" if method == "zero-shot" else method)
            model.set_classes(text_features=text)
            context = model.disable_adapter() if method == "zero-shot" else torch.no_grad()
            with torch.no_grad(), context:
                start = time.perf_counter()
                model.class_terms()
                setup = time.perf_counter() - start
                wall, cpu, n = timed(lambda m=model: m.logits_from_features(features), min_repeats=args.min_repeats,
                                     budget=args.budget)
            model.unwrap()
            records.append(dict(
                model=name, classes=k, method=method, batch=b, dim=dim, image_size=size,
                encoder_ms=1e3 * enc_wall / b, encoder_cpu_ms=1e3 * enc_cpu / b, encoder_repeats=enc_n,
                head_ms=1e3 * wall / b, head_cpu_ms=1e3 * cpu / b, head_repeats=n, setup_ms=1e3 * setup,
                load_average=load_average(),
            ))  # fmt: skip
            print(f"  K={k:<5} {method:<13} head {1e3 * wall / b:8.3f} ms/image", file=sys.stderr)
    _derive(records)
    if args.end_to_end:
        _end_to_end(clip, images, text, records, args)
    return records


def _derive(records: list[dict]) -> None:
    """images/s and the overhead over zero-shot, in percent of the encoder (wall and CPU time)."""
    zero = {(r["model"], r["classes"]): r for r in records if r["method"] == "zero-shot"}
    for r in records:
        z = zero[(r["model"], r["classes"])]
        r["images_per_s"] = 1e3 / (r["encoder_ms"] + r["head_ms"])
        r["overhead_pct"] = 100 * (r["head_ms"] - z["head_ms"]) / r["encoder_ms"]
        r["overhead_cpu_pct"] = 100 * (r["head_cpu_ms"] - z["head_cpu_ms"]) / r["encoder_cpu_ms"]


def _end_to_end(clip, images: torch.Tensor, text: torch.Tensor, records: list[dict], args) -> None:
    """``model.predict`` on the batch, per method at the largest K: the sum of the parts, measured whole."""
    k = text.shape[0]
    for r in records:
        if r["classes"] != k:
            continue
        model = wrap(clip, "mma" if r["method"] == "zero-shot" else r["method"])
        model.set_classes(text_features=text)
        with model.disable_adapter() if r["method"] == "zero-shot" else torch.no_grad():
            wall, _, _ = timed(lambda m=model: m.predict(images, k=5), min_repeats=1, budget=0)
        model.unwrap()
        r["predict_ms"] = 1e3 * wall / images.shape[0]


def markdown(records: list[dict], meta: dict) -> str:
    lines = [
        f"# Inference: zero-shot CLIP vs each adapter ({meta['device']})",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s); load average "
        f"{meta['load_before']:.1f} before, {meta['load_after']:.1f} after the run (the machine is shared with "
        "other work: wall times vary with it, CPU times much less). Per image, median of timed repeats on one "
        f"batch of {records[0]['batch']} random images with random class features; the adapter's class-side "
        "terms are computed once per class set (`setup ms`, not in the per-image figures). `overhead`: the "
        "adapter's extra time over zero-shot CLIP's logits, in percent of the image encoder's time (CPU time in "
        f"parentheses). Goal: ≤ {GOAL_PCT:.0f}% at K = 1000 on ViT-B/16.",
        "",
        "| model | K | method | encoder ms | head ms | setup ms | images/s | overhead | predict ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        predict = f"{r['predict_ms']:.2f}" if "predict_ms" in r else "–"
        overhead = "–" if r["method"] == "zero-shot" else f"{r['overhead_pct']:.1f}% ({r['overhead_cpu_pct']:.1f}%)"
        lines.append(
            f"| {r['model']} | {r['classes']} | {r['method']} | {r['encoder_ms']:.2f} | {r['head_ms']:.3f} | "
            f"{r['setup_ms']:.1f} | {r['images_per_s']:.1f} | {overhead} | {predict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--classes", nargs="+", type=int, default=list(CLASSES), help="K values (default 10 100 1000)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed repeats per figure")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed repeats per figure")
    parser.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                        help="skip timing model.predict at the largest K")
    parser.add_argument("--json", type=Path, help="write the records here (and the table beside it, .md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    records = [r for name in args.models for r in run_model(name, args)]
    meta = dict(environment("cpu"), load_before=load_before or 0.0, load_after=load_average() or 0.0)
    for r in records:
        r.update(machine=meta["machine"], torch=meta["torch"], threads=meta["threads"],
                 run_load_average=[meta["load_before"], meta["load_after"]])
    text = markdown(records, meta)
    print(text)
    if args.json:
        write_results(args.json, records, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
