"""Training time: the released way (encoders every epoch) against the cache way (encode once, then fit).

Both ways train the same adapter, from the same initial weights, on the same
images, in the same batches, with the same learning rates, and end with the
same weights (up to float rounding):

- ``released``: what the authors' trainers do. Every epoch each training image
  is decoded, preprocessed and passed through the frozen image encoder (under
  ``no_grad``, as a frozen backbone effectively runs), then the adapter takes
  its step; where the schedule selects on validation accuracy (MMA), the
  validation images go through the encoder after every epoch too.
- ``cache``: :func:`rada_mma.fewshot.extract_image_features` encodes the training
  (and validation) images once, into a cache file, and :func:`rada_mma.fewshot.fit`
  trains on the features, writing its resumable checkpoint every epoch as
  ``rada-mma fit`` does.

Batches: the released way encodes its training images in its training
batches (32 for RAda, 256 for MMA), as the released trainers do; cache
extraction and every validation pass use ``--extract-batch`` images (default
32, the fastest on a CPU).

Timed: everything from the first image read to the trained adapter (for the
cache way: extraction, cache files, fit, checkpoints). Not timed, the same in
both: building the model, encoding the class texts once, the final test
evaluation, which uses the same test features for both.

Each way of RAda's schedule runs ``--repeats`` times (default 3), alternating
with the other; its figure is the median (the best run is reported too). MMA's
runs once by default (``--mma-repeats``): its released way takes minutes.
Wall-clock and CPU time (``time.process_time``: one torch thread, images
decoded in-process with ``--workers 0``) are both recorded; on a machine shared
with other work the wall clock varies with their load and the CPU time much
less, and the load average is recorded too.

Schedules: RAda's preset (5 epochs, cosine with a warm-up epoch, batch 32,
no validation) and MMA's (Adam 5e-3, weight decay 1e-4, batch 256, 200 epochs,
best-validation selection) with early stopping off (patience 0) in both ways,
so that both run all 200 epochs: stopping at a different epoch would compare
different amounts of work. Augmentation is off, so both ways see the same
pixels.

The model is a small open_clip CLIP with random weights (default: a 4-layer ViT
of width 128 on 64x64 images in 8x8 patches, a 4-layer text transformer of
width 128, 128-d embeddings), small enough for a CPU yet, as with real CLIPs,
with encoders that cost far more than the adapter. Images are generated PNGs
(a colour and a stripe frequency per class, plus noise).

Usage, from the repository root::

    python benchmarks/fit.py                 # writes benchmarks/results/fit_cpu.json and fit_cpu.md
    python benchmarks/fit.py --quick --json /tmp/fit.json     # seconds: tiny model, few images and epochs
    python benchmarks/fit.py --released-epochs 20             # time 20 released MMA epochs, extrapolate (labelled)
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: the repository root, for benchmarks.common

from benchmarks.common import RESULTS, load_average, machine, write_results  # noqa: E402
from rada_mma import wrap  # noqa: E402
from rada_mma.fewshot import (  # noqa: E402
    ImageDataset,
    TrainConfig,
    accuracy,
    encode_class_texts,
    extract_image_features,
    fit,
    learning_rate,
    load_data,
    preset,
)

TARGETS = {"rada": 4.0, "mma": 50.0}  # the issue's speed-up targets

# Model and data; epochs are the presets' (RAda 5, MMA 200) except in the quick smoke run.
SIZES = {
    # encoders ~20 ms per image on one CPU thread, ~70x an adapter step per batch, as with real CLIPs
    "full": dict(
        image_size=96,
        patch_size=8,
        layers=6,
        width=192,
        text_layers=4,
        text_width=128,
        embed_dim=128,
        classes=10,
        shots=16,
        val=4,
        test=8,
        epochs={"rada": 5, "mma": 200},
    ),
    # a 4-layer ViT on 64x64 images: ~3 ms per image, so fixed costs weigh more
    "small": dict(
        image_size=64,
        patch_size=8,
        layers=4,
        width=128,
        text_layers=4,
        text_width=128,
        embed_dim=128,
        classes=10,
        shots=16,
        val=4,
        test=8,
        epochs={"rada": 5, "mma": 200},
    ),
    "quick": dict(
        image_size=32,
        patch_size=8,
        layers=1,
        width=32,
        text_layers=1,
        text_width=32,
        embed_dim=32,
        classes=3,
        shots=4,
        val=2,
        test=2,
        epochs={"rada": 2, "mma": 3},
    ),
}


def build_model(size: dict, seed: int) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(seed)
    vision = open_clip.CLIPVisionCfg(
        layers=size["layers"],
        width=size["width"],
        head_width=32,
        patch_size=size["patch_size"],
        image_size=size["image_size"],
    )
    text = open_clip.CLIPTextCfg(
        context_length=16,
        vocab_size=49408,
        width=size["text_width"],
        heads=max(1, size["text_width"] // 32),
        layers=size["text_layers"],
    )
    model = open_clip.CLIP(size["embed_dim"], vision, text).eval()
    return model, open_clip.image_transform(size["image_size"], is_train=False)


def make_images(root: Path, size: dict, seed: int) -> Path:
    """An ImageFolder of PNGs: class c has its own colour and horizontal stripe frequency, plus noise."""
    rng = np.random.default_rng(seed)
    side = size["image_size"]
    rows = np.arange(side)[:, None, None]
    for split, count in (("train", size["shots"]), ("val", size["val"]), ("test", size["test"])):
        for c in range(size["classes"]):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True)
            colour = rng.uniform(40, 215, size=3)
            for i in range(count):
                stripes = 40 * np.sin(2 * math.pi * (c + 1) * rows / side + rng.uniform(0, 2 * math.pi))
                pixels = colour + stripes + rng.normal(0, 25, size=(side, side, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def adapted(clip, method: str, text: torch.Tensor, seed: int):
    """The same initial adapter for both ways."""
    model = wrap(clip, method=method, generator=torch.Generator().manual_seed(seed))
    return model.set_classes(text_features=text)


def released_way(
    model,
    splits,
    config: TrainConfig,
    preprocess,
    *,
    workers: int,
    eval_batch: int,
    epochs: int,
    cached_train: torch.Tensor | None,
) -> dict:
    """The authors' loop: images through the encoder every epoch, the same batches and learning rates as fit()."""
    if config.optimizer != "adam":
        raise ValueError("the released trainers use Adam")
    params = model.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)  # fit()'s batch order
    train_set = ImageDataset(splits, splits.train, preprocess)
    use_val = config.select == "best_val" or config.patience > 0
    val_loader = DataLoader(
        ImageDataset(splits, splits.val, preprocess), batch_size=eval_batch, num_workers=workers
    )
    n = len(splits.train)
    best_val, best_state, bad, history = float("nan"), None, 0, []
    feature_diff = 0.0
    started, cpu_started = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, epoch)
        model.train()
        order = torch.randperm(n, generator=generator)
        batches = [order[s : s + config.batch_size].tolist() for s in range(0, n, config.batch_size)]
        for batch, (images, labels) in zip(
            batches, DataLoader(train_set, batch_sampler=batches, num_workers=workers), strict=True
        ):
            features = model.encode_image(images)  # the frozen encoder, every epoch
            if (
                cached_train is not None
            ):  # how far the per-batch encodings are from the cache's (microseconds)
                feature_diff = max(feature_diff, float((features - cached_train[batch]).abs().max()))
            logits = model.logits_from_features(features)
            loss = F.cross_entropy(logits.float(), labels) + model.regularization()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        record = {"epoch": epoch}
        if use_val:
            val = [(model.encode_image(images), labels) for images, labels in val_loader]  # every epoch
            record["val_acc"] = accuracy(
                model, torch.cat([v[0] for v in val]), torch.cat([v[1] for v in val])
            )
            if not record["val_acc"] <= best_val:
                best_val, bad = record["val_acc"], 0
                best_state = {k: v.detach().clone() for k, v in model.adapter.state_dict().items()}
            else:
                bad += 1
                if config.patience and bad >= config.patience:
                    history.append(record)
                    break
        history.append(record)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if config.select == "best_val" and best_state is not None:
        model.adapter.load_state_dict(best_state)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "epochs_run": len(history),
        "history": history,
        "max_feature_diff": feature_diff,
    }


def cache_way(
    model, splits, config: TrainConfig, preprocess, *, workers: int, extract_batch: int, folder: Path
) -> dict:
    use_val = config.select == "best_val" or config.patience > 0
    started, cpu_started = time.perf_counter(), time.process_time()
    train = extract_image_features(
        model,
        splits,
        splits.train,
        preprocess,
        batch_size=extract_batch,
        num_workers=workers,
        cache_path=folder / "train.safetensors",
        progress=False,
    )
    val = (
        extract_image_features(
            model,
            splits,
            splits.val,
            preprocess,
            batch_size=extract_batch,
            num_workers=workers,
            cache_path=folder / "val.safetensors",
            progress=False,
        )
        if use_val
        else None
    )
    extracted = time.perf_counter()
    result = fit(
        model,
        train.image,
        train.labels,
        config=config,
        val_features=None if val is None else val.image,
        val_labels=None if val is None else val.labels,
        out_dir=folder / "run",
        progress=False,
        data_fingerprint=train.fingerprint,
    )
    done, cpu_done = time.perf_counter(), time.process_time()
    return {
        "seconds": done - started,
        "cpu_seconds": cpu_done - cpu_started,
        "extract_seconds": extracted - started,
        "fit_seconds": done - extracted,
        "epochs_run": len(result.history),
        "train_features": train.image,
    }


def one_schedule(
    method: str, config: TrainConfig, clip, splits, preprocess, text, test, args, folder: Path
) -> dict:
    """Both ways ``repeats`` times, alternating; the median time of each way is its figure."""
    repeats = args.repeats if method == "rada" else args.mma_repeats
    print(
        f"{method}: {config.epochs} epochs, batch {config.batch_size}, {repeats} repeat(s)", file=sys.stderr
    )
    epochs = config.epochs
    extrapolated = args.released_epochs is not None and args.released_epochs < config.epochs
    if extrapolated:
        epochs = args.released_epochs
    samples: dict[str, list[float]] = {
        k: [] for k in ("released", "cache", "released_cpu", "cache_cpu", "extract", "fit")
    }
    for repeat in range(repeats):
        shutil.rmtree(folder / method, ignore_errors=True)  # every repeat extracts and trains from scratch
        cache_model = adapted(clip, method, text, args.seed)
        cache = cache_way(
            cache_model,
            splits,
            config,
            preprocess,
            workers=args.workers,
            extract_batch=args.extract_batch,
            folder=folder / method,
        )
        released_model = adapted(clip, method, text, args.seed)
        released = released_way(
            released_model,
            splits,
            config,
            preprocess,
            workers=args.workers,
            eval_batch=args.extract_batch,
            epochs=epochs,
            cached_train=cache["train_features"],
        )
        timed = released["seconds"]
        if extrapolated:  # linear in epochs: every epoch does the same work
            released["seconds"] = timed * config.epochs / released["epochs_run"]
            released["cpu_seconds"] *= config.epochs / released["epochs_run"]
        samples["released"].append(released["seconds"])
        samples["cache"].append(cache["seconds"])
        samples["released_cpu"].append(released["cpu_seconds"])
        samples["cache_cpu"].append(cache["cpu_seconds"])
        samples["extract"].append(cache["extract_seconds"])
        samples["fit"].append(cache["fit_seconds"])
        print(
            f"  repeat {repeat}: cache way {cache['seconds']:.2f} s, released way {released['seconds']:.2f} s"
            f"{f' (extrapolated from {epochs} epochs: {timed:.2f} s)' if extrapolated else ''}",
            file=sys.stderr,
        )

    median = {k: statistics.median(v) for k, v in samples.items()}
    record = {
        "method": method,
        "config": dict(vars(config)),
        "repeats": repeats,
        "released": {
            "seconds": median["released"],
            "samples": samples["released"],
            "cpu_seconds": median["released_cpu"],
            "cpu_samples": samples["released_cpu"],
            "extrapolated": extrapolated,
            "epochs_run": released["epochs_run"],
            "max_feature_diff_vs_cache": released["max_feature_diff"],
        },
        "cache": {
            "seconds": median["cache"],
            "samples": samples["cache"],
            "cpu_seconds": median["cache_cpu"],
            "cpu_samples": samples["cache_cpu"],
            "extract_seconds": median["extract"],
            "fit_seconds": median["fit"],
            "epochs_run": cache["epochs_run"],
        },
        "speedup": median["released"] / median["cache"],
        "speedup_best": min(samples["released"]) / min(samples["cache"]),
        "speedup_cpu": median["released_cpu"] / median["cache_cpu"],
        "target": TARGETS[method],
    }
    record["meets_target"] = record["speedup"] >= record["target"]  # wall clock, median runs
    record["meets_target_cpu"] = record["speedup_cpu"] >= record["target"]
    if extrapolated:
        record["released"].update(seconds_timed=timed, epochs_timed=epochs)
    else:  # the same schedule ran both ways: same weights, same accuracy
        for way, model in (("released", released_model), ("cache", cache_model)):
            record[way]["test_acc"] = accuracy(model, test.image, test.labels)
        record["same_test_accuracy"] = record["released"]["test_acc"] == record["cache"]["test_acc"]
        a, b = released_model.adapter.state_dict(), cache_model.adapter.state_dict()
        record["max_param_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
        with released_model.disable_adapter():
            record["zero_shot_test_acc"] = accuracy(released_model, test.image, test.labels)
    return record


def warm_up(clip, text: torch.Tensor, features: torch.Tensor, methods: list[str]) -> None:
    """One-time costs (kernel selection, first allocations) paid before either way is timed."""
    labels = torch.arange(len(features)) % text.shape[0]
    for method in methods:
        fit(
            adapted(clip, method, text, 0),
            features,
            labels,
            config=preset(method, epochs=1, patience=0, select="last"),
            progress=False,
        )


def run_size(name: str, args: argparse.Namespace) -> dict:
    size = SIZES[name]
    clip, preprocess = build_model(size, args.seed)
    schedules = []
    with tempfile.TemporaryDirectory(prefix="rada_mma_fit_bench_") as tmp:
        splits = load_data(make_images(Path(tmp) / "data", size, args.seed))
        probe = wrap(clip, method="rada")
        text = encode_class_texts(
            probe,
            splits.classnames,
            ["a photo of a {}."],
            tokenizer=open_clip.SimpleTokenizer(context_length=16),
        )
        started = time.perf_counter()
        test = extract_image_features(
            probe, splits, splits.test, preprocess, batch_size=args.extract_batch, progress=False
        )
        encode_ms = 1e3 * (time.perf_counter() - started) / len(splits.test)
        warm_up(clip, text, test.image, args.methods)
        for method in args.methods:
            overrides = {"epochs": size["epochs"][method]}
            if method == "mma":
                overrides["patience"] = 0  # both ways run every epoch (see the module's docstring)
            config = preset(method, **overrides)
            schedules.append(
                one_schedule(method, config, clip, splits, preprocess, text, test, args, Path(tmp))
            )
    return {
        "size": name,
        "sizes": {k: v for k, v in size.items() if k != "epochs"},
        "image_encoder_params": sum(p.numel() for p in clip.visual.parameters()),
        "encode_ms_per_image": encode_ms,
        "schedules": schedules,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    lines = [
        "# Training time: released way (encoders every epoch) vs cache way (encode once, then fit)",
        "",
        f"Machine: {result['machine']}, {result['threads']} torch thread(s), torch {result['torch']}, open_clip "
        f"{result['open_clip']}; load average {result['load_before']:.1f} before, {result['load_after']:.1f} after "
        "(the machine is shared with other work: wall-clock timings carry that noise; CPU time, the process's own "
        "with one thread and image decoding in-process, much less). Timed: " + result["timed"] + ".",
        "",
        "Augmentation off in both ways; MMA with early stopping off (patience 0) in both ways, so that both run all "
        "200 epochs (selection on validation accuracy kept: both evaluate the validation images every epoch).",
    ]
    for run in result["runs"]:
        size = run["sizes"]
        lines += [
            "",
            f"## Size {run['size']!r}: ViT {size['layers']} layers, width {size['width']}, "
            f"{size['image_size']}x{size['image_size']} images",
            "",
            f"open_clip CLIP with random weights: ViT {size['layers']} layers, width {size['width']}, "
            f"{size['image_size']}x{size['image_size']} images in {size['patch_size']}x{size['patch_size']} patches "
            f"({run['image_encoder_params']:,} image-encoder parameters, {run['encode_ms_per_image']:.1f} ms per image); "
            f"text {size['text_layers']} layers, width {size['text_width']}; {size['embed_dim']}-d embeddings. "
            f"Data: {size['classes']} classes x {size['shots']} generated training images, {size['val']} validation "
            f"and {size['test']} test images per class.",
            "",
            "| schedule | epochs | runs | released: wall / CPU (s) | cache: wall / CPU (s); extract + fit (wall) "
            "| speed-up, wall: median (best run) | speed-up, CPU time | target "
            "| test acc released / cache | zero-shot | max param diff |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in run["schedules"]:
            rel, cache = r["released"], r["cache"]
            released_s = f"{rel['seconds']:.2f} / {rel['cpu_seconds']:.2f}" + (
                f" (extrapolated from {rel['epochs_timed']} epochs: {rel['seconds_timed']:.2f} s wall)"
                if rel["extrapolated"]
                else ""
            )
            accs = (
                f"{rel['test_acc']:.2f} / {cache['test_acc']:.2f}"
                if "test_acc" in rel
                else "n/a (extrapolated)"
            )
            met = {True: "met", False: "NOT met"}
            lines.append(
                f"| {r['method']} | {r['config']['epochs']} | {r['repeats']} | {released_s} "
                f"| {cache['seconds']:.2f} / {cache['cpu_seconds']:.2f}; {cache['extract_seconds']:.2f} + "
                f"{cache['fit_seconds']:.2f} | {r['speedup']:.1f}x ({r['speedup_best']:.1f}x) | {r['speedup_cpu']:.1f}x "
                f"| >= {r['target']:.0f}x: wall {met[r['meets_target']]}, CPU {met[r['meets_target_cpu']]} "
                f"| {accs} | {_fmt(r.get('zero_shot_test_acc'), '.2f')} | {_fmt(r.get('max_param_diff'), '.1e')} |"
            )
        diffs = ", ".join(
            f"{r['released']['max_feature_diff_vs_cache']:.1e} ({r['method']})" for r in run["schedules"]
        )
        lines += [
            "",
            f"Largest difference between an image's features encoded in a training batch and in the cache: "
            f"{diffs}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, 3 classes x 4 shots, 2 and 3 epochs"
    )
    parser.add_argument(
        "--size",
        nargs="+",
        default=["full"],
        choices=("full", "small"),
        help="model and data sizes to run (default full; small: a 4-layer ViT on 64x64 images)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS / "fit_cpu.json",
        help="where the results go (and a .md beside it)",
    )
    parser.add_argument("--methods", nargs="+", default=["rada", "mma"], choices=("rada", "mma"))
    parser.add_argument(
        "--released-epochs",
        type=int,
        default=None,
        help="time only this many released epochs and extrapolate (labelled in the results)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers for decoding images (both ways)"
    )
    parser.add_argument(
        "--extract-batch",
        type=int,
        default=32,
        help="images per encoder pass outside training (cache extraction, validation); default 32: on a CPU "
        "a ViT runs ~30%% faster per image in batches of 32 than of 128 (on a GPU, larger is faster)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine more threads spin-wait and collapse)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings of RAda's schedule per way (median kept)"
    )
    parser.add_argument(
        "--mma-repeats", type=int, default=1, help="timings of MMA's schedule per way (median kept)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = ["quick"] if args.quick else args.size
    load_before = load_average()
    runs = [run_size(name, args) for name in sizes]
    result = {
        "benchmark": "fit",
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "load_before": load_before,
        "load_after": load_average(),
        "timed": "from the first image read to the trained adapter; the model, the class texts (encoded once) "
        "and the test evaluation (the same test features for both ways) are not timed",
        "runs": runs,
    }
    table = markdown(result)
    write_results(args.json, result, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
