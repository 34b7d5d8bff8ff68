"""Training time: the released way (encoders every epoch) against the cache way (encode once, then fit).

Both ways train the same adapter, from the same initial weights, on the same
pixels, in the same batches, with the same learning rates, and end with the
same weights (up to float rounding):

- ``released``: what the authors' trainers do. Every epoch each training image
  is decoded, augmented (RAda's preset: a fresh ``RandomResizedCrop(scale 0.08-1,
  bicubic)`` and flip, drawn as :func:`rada_mma.fewshot.cache.augment_view` draws
  epoch ``e``'s view, so exactly the crop the cache holds; MMA's: none),
  preprocessed and passed through the frozen image encoder (under ``no_grad``,
  as a frozen backbone effectively runs), then the adapter takes its step;
  where the schedule selects on validation accuracy (MMA), the validation
  images go through the encoder after every epoch too.
- ``cache``: :func:`rada_mma.fewshot.extract_image_features` encodes the training
  images once per view (RAda: one view per epoch, MMA: one), and the validation
  images once, into cache files, and :func:`rada_mma.fewshot.fit` trains on the
  features, writing its resumable checkpoint every epoch as ``rada-mma fit`` does.

With RAda's per-epoch augmentation both ways run the encoder on every image
once per epoch, so one run costs the same either way; the cache pays off when
the same views train again: reruns, resumes, and sweeps over what does not
change the images (lr, alpha, temperature). The lr sweep measures that: three
learning rates, the released way training three times through the encoders,
the cache way extracting once (its first fit) and fitting three times, each
learning rate ending with the same weights both ways. RAda without augmentation
(``--views 0``) and MMA's schedule are timed as single runs.

Batches: the released way encodes its training images in its training
batches (32 for RAda, 256 for MMA), as the released trainers do; cache
extraction and every validation pass use ``--extract-batch`` images (default
32, the fastest on a CPU).

Timed: everything from the first image read to the trained adapter (for the
cache way: extraction, cache files, fit, checkpoints). Not timed, the same in
both: building the model, encoding the class texts once, the final test
evaluation, which uses the same test features for both.

Each single-run schedule of RAda runs ``--repeats`` times (default 3), alternating
ways; its figure is the median (the best run is reported too). MMA's runs once
by default (``--mma-repeats``): its released way takes minutes; the sweep runs
``--sweep-repeats`` times (default 1). Wall-clock and CPU time
(``time.process_time``: one torch thread, images decoded in-process with
``--workers 0``) are both recorded; on a machine shared with other work the wall
clock varies with their load and the CPU time much less, and the load average
is recorded too.

Schedules: RAda's preset (5 epochs, cosine with a warm-up epoch, batch 32 with
the last partial batch dropped, Adam with weight decay 5e-4, no validation) and
MMA's (Adam 5e-3, weight decay 1e-4, batch 256, 200 epochs, best-validation
selection) with early stopping off (patience 0) in both ways, so that both run
all 200 epochs: stopping at a different epoch would compare different amounts
of work.

The model is a small open_clip CLIP with random weights (default: a 6-layer ViT
of width 192 on 96x96 images in 8x8 patches, a 4-layer text transformer of
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
import dataclasses
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
    TrainConfig,
    accuracy,
    encode_class_texts,
    extract_image_features,
    fit,
    learning_rate,
    load_data,
    preset,
    steps_per_epoch,
)
from rada_mma.fewshot.cache import augment_view, default_augment  # noqa: E402
from rada_mma.fewshot.data import ImageDataset  # noqa: E402

# The speed-up targets of single runs without augmentation (the feature cache's issue). With per-epoch
# augmentation a single run encodes as much either way; its gain is the sweep's.
TARGETS = {"rada": 4.0, "mma": 50.0}
SWEEP_LRS = (5e-4, 1e-3, 2e-3)

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


class EpochImages(torch.utils.data.Dataset):
    """The released trainers' loader: ``(pixels, label)``, augmented afresh each epoch (``view = epoch``)."""

    def __init__(self, splits, preprocess, augment, seed: int):
        self.splits, self.preprocess, self.augment, self.seed, self.epoch = splits, preprocess, augment, seed, 0

    def __len__(self) -> int:
        return len(self.splits.train)

    def __getitem__(self, index: int):
        item = self.splits.train[index]
        image = self.splits.load_image(item)
        if self.augment is None:
            return self.preprocess(image), item.label
        return augment_view(self.augment, image, seed=self.seed, item=item, view=self.epoch), item.label


def augmentation(config: TrainConfig, preprocess):
    """The preset's training augmentation, as the protocol builds it (None without views)."""
    if not config.view_count:
        return None
    return default_augment(preprocess, scale=(config.crop_scale, 1.0), interpolation=config.interpolation)


def released_way(model, splits, config: TrainConfig, preprocess, *, args, epochs: int, cached_train) -> dict:
    """The authors' loop: images through the encoder every epoch, the same batches and learning rates as fit()."""
    if config.optimizer != "adam":
        raise ValueError("the released trainers use Adam")
    params = model.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)  # fit()'s batch order
    train_set = EpochImages(splits, preprocess, augmentation(config, preprocess), args.seed)
    use_val = config.select == "best_val" or config.patience > 0
    val_loader = DataLoader(ImageDataset(splits, splits.val, preprocess), batch_size=args.extract_batch,
                            num_workers=args.workers)
    n = len(splits.train)
    steps = steps_per_epoch(config, n)  # drop_last as fit() (and Dassl) do
    best_val, best_state, bad, history, feature_diff = float("nan"), None, 0, [], 0.0
    started, cpu_started = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, epoch)
        model.train()
        train_set.epoch = epoch
        order = torch.randperm(n, generator=generator)
        batches = [order[s : s + config.batch_size].tolist() for s in range(0, steps * config.batch_size, config.batch_size)]
        loader = DataLoader(train_set, batch_sampler=batches, num_workers=args.workers)
        for batch, (images, labels) in zip(batches, loader, strict=True):
            features = model.encode_image(images)  # the frozen encoder, every epoch
            if cached_train is not None:  # how far the per-batch encodings are from the cache's
                cached = cached_train[batch] if cached_train.dim() == 2 else cached_train[batch, epoch]
                feature_diff = max(feature_diff, float((features - cached).abs().max()))
            loss = F.cross_entropy(model.logits_from_features(features).float(), labels) + model.regularization()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        record = {"epoch": epoch}
        if use_val:
            val = [(model.encode_image(images), labels) for images, labels in val_loader]  # every epoch
            record["val_acc"] = accuracy(model, torch.cat([v[0] for v in val]), torch.cat([v[1] for v in val]))
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
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "epochs_run": len(history), "history": history,
            "max_feature_diff": feature_diff}


def cache_way(model, splits, config: TrainConfig, preprocess, *, args, folder: Path, run: str = "run") -> dict:
    """Extract (or, when the files are there, load) the cached features, then fit()."""
    use_val = config.select == "best_val" or config.patience > 0
    common = dict(batch_size=args.extract_batch, num_workers=args.workers, progress=False)
    started, cpu_started = time.perf_counter(), time.process_time()
    views = config.view_count
    train = extract_image_features(model, splits, splits.train, preprocess, views=views,
                                   augment=augmentation(config, preprocess), seed=args.seed,
                                   cache_path=folder / f"train-v{views}.safetensors", **common)
    val = (extract_image_features(model, splits, splits.val, preprocess, cache_path=folder / "val.safetensors", **common)
           if use_val else None)
    extracted = time.perf_counter()
    result = fit(model, train.image, train.labels, config=config, val_features=None if val is None else val.image,
                 val_labels=None if val is None else val.labels, out_dir=folder / run, progress=False,
                 data_fingerprint=train.fingerprint)
    done, cpu_done = time.perf_counter(), time.process_time()
    return {"seconds": done - started, "cpu_seconds": cpu_done - cpu_started, "extract_seconds": extracted - started,
            "fit_seconds": done - extracted, "epochs_run": len(result.history), "train_features": train.image}


def compare(record: dict, released_model, cache_model, test) -> None:
    """The same schedule ran both ways: test accuracies and the largest weight difference into ``record``."""
    for way, model in (("released", released_model), ("cache", cache_model)):
        record[way]["test_acc"] = accuracy(model, test.image, test.labels)
    record["same_test_accuracy"] = record["released"]["test_acc"] == record["cache"]["test_acc"]
    a, b = released_model.adapter.state_dict(), cache_model.adapter.state_dict()
    record["max_param_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    with released_model.disable_adapter():
        record["zero_shot_test_acc"] = accuracy(released_model, test.image, test.labels)


def median_record(samples: dict[str, list[float]]) -> dict:
    median = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "released": {"seconds": median["released"], "samples": samples["released"],
                     "cpu_seconds": median["released_cpu"], "cpu_samples": samples["released_cpu"]},
        "cache": {"seconds": median["cache"], "samples": samples["cache"], "cpu_seconds": median["cache_cpu"],
                  "cpu_samples": samples["cache_cpu"], "extract_seconds": median["extract"],
                  "fit_seconds": median["fit"]},
        "speedup": median["released"] / median["cache"],
        "speedup_best": min(samples["released"]) / min(samples["cache"]),
        "speedup_cpu": median["released_cpu"] / median["cache_cpu"],
    }


def one_schedule(label: str, method: str, config: TrainConfig, clip, splits, preprocess, text, test, args,
                 folder: Path) -> dict:
    """Both ways ``repeats`` times, alternating; the median time of each way is its figure."""
    repeats = args.repeats if method == "rada" else args.mma_repeats
    print(f"{label}: {config.epochs} epochs, batch {config.batch_size}, {repeats} repeat(s)", file=sys.stderr)
    epochs = config.epochs
    extrapolated = args.released_epochs is not None and args.released_epochs < config.epochs
    if extrapolated:
        epochs = args.released_epochs
    samples: dict[str, list[float]] = {k: [] for k in ("released", "cache", "released_cpu", "cache_cpu", "extract", "fit")}
    for repeat in range(repeats):
        shutil.rmtree(folder / label, ignore_errors=True)  # every repeat extracts and trains from scratch
        cache_model = adapted(clip, method, text, args.seed)
        cache = cache_way(cache_model, splits, config, preprocess, args=args, folder=folder / label)
        released_model = adapted(clip, method, text, args.seed)
        released = released_way(released_model, splits, config, preprocess, args=args, epochs=epochs,
                                cached_train=cache["train_features"])
        timed = released["seconds"]
        if extrapolated:  # linear in epochs: every epoch does the same work
            released["seconds"] = timed * config.epochs / released["epochs_run"]
            released["cpu_seconds"] *= config.epochs / released["epochs_run"]
        for key, value in (("released", released["seconds"]), ("cache", cache["seconds"]),
                           ("released_cpu", released["cpu_seconds"]), ("cache_cpu", cache["cpu_seconds"]),
                           ("extract", cache["extract_seconds"]), ("fit", cache["fit_seconds"])):
            samples[key].append(value)
        print(f"  repeat {repeat}: cache way {cache['seconds']:.2f} s, released way {released['seconds']:.2f} s"
              f"{f' (extrapolated from {epochs} epochs: {timed:.2f} s)' if extrapolated else ''}", file=sys.stderr)
    record = {"schedule": label, "method": method, "config": dataclasses.asdict(config), "repeats": repeats,
              **median_record(samples)}
    record["released"].update(extrapolated=extrapolated, epochs_run=released["epochs_run"],
                              max_feature_diff_vs_cache=released["max_feature_diff"])
    record["cache"]["epochs_run"] = cache["epochs_run"]
    augmented = config.view_count > 0
    record["target"] = None if augmented else TARGETS[method]  # augmented: the same encoder work either way
    if record["target"] is not None:
        record["meets_target"] = record["speedup"] >= record["target"]  # wall clock, median runs
        record["meets_target_cpu"] = record["speedup_cpu"] >= record["target"]
    if extrapolated:
        record["released"].update(seconds_timed=timed, epochs_timed=epochs)
    else:  # the same schedule ran both ways: same weights, same accuracy
        compare(record, released_model, cache_model, test)
    return record


def lr_sweep(config: TrainConfig, clip, splits, preprocess, text, test, args, folder: Path) -> dict:
    """RAda's preset at each of ``args.sweep_lrs``: the released way trains through the encoders each time,
    the cache way extracts its views once (in its first fit) and reuses them."""
    lrs = list(args.sweep_lrs)
    print(f"lr sweep {lrs}: {config.epochs} epochs, {args.sweep_repeats} repeat(s)", file=sys.stderr)
    samples: dict[str, list[float]] = {k: [] for k in ("released", "cache", "released_cpu", "cache_cpu", "extract", "fit")}
    for repeat in range(args.sweep_repeats):
        shutil.rmtree(folder / "sweep", ignore_errors=True)
        cache_models, caches = [], []
        for lr in lrs:  # the first extracts, the others find the cache files
            cache_models.append(adapted(clip, "rada", text, args.seed))
            caches.append(cache_way(cache_models[-1], splits, dataclasses.replace(config, lr=lr), preprocess,
                                    args=args, folder=folder / "sweep", run=f"lr{lr:g}"))
        released_models, released = [], []
        for lr in lrs:
            released_models.append(adapted(clip, "rada", text, args.seed))
            released.append(released_way(released_models[-1], splits, dataclasses.replace(config, lr=lr), preprocess,
                                         args=args, epochs=config.epochs, cached_train=caches[0]["train_features"]))
        for key, way, field in (("released", released, "seconds"), ("cache", caches, "seconds"),
                                ("released_cpu", released, "cpu_seconds"), ("cache_cpu", caches, "cpu_seconds"),
                                ("extract", caches, "extract_seconds"), ("fit", caches, "fit_seconds")):
            samples[key].append(sum(run[field] for run in way))
        print(f"  repeat {repeat}: cache way {samples['cache'][-1]:.2f} s, released way {samples['released'][-1]:.2f} s",
              file=sys.stderr)
    record = {"schedule": "rada lr sweep", "method": "rada", "lrs": lrs, "config": dataclasses.asdict(config),
              "repeats": args.sweep_repeats, **median_record(samples), "target": None, "per_lr": []}
    record["cache"]["first_extract_seconds"] = caches[0]["extract_seconds"]
    for lr, released_model, cache_model in zip(lrs, released_models, cache_models, strict=True):
        per = {"lr": lr, "released": {}, "cache": {}}
        compare(per, released_model, cache_model, test)
        record["per_lr"].append(per)
    record["same_test_accuracy"] = all(p["same_test_accuracy"] for p in record["per_lr"])
    record["max_param_diff"] = max(p["max_param_diff"] for p in record["per_lr"])
    record["released"]["max_feature_diff_vs_cache"] = max(r["max_feature_diff"] for r in released)
    return record


def warm_up(clip, text: torch.Tensor, features: torch.Tensor, methods: list[str]) -> None:
    """One-time costs (kernel selection, first allocations) paid before either way is timed."""
    labels = torch.arange(len(features)) % text.shape[0]
    for method in methods:
        config = preset(method, epochs=1, patience=0, select="last", views=0)
        fit(adapted(clip, method, text, 0), features, labels, config=config, progress=False)


def run_size(name: str, args: argparse.Namespace) -> dict:
    size = SIZES[name]
    clip, preprocess = build_model(size, args.seed)
    schedules = []
    with tempfile.TemporaryDirectory(prefix="rada_mma_fit_bench_") as tmp:
        splits = load_data(make_images(Path(tmp) / "data", size, args.seed))
        probe = wrap(clip, method="rada")
        text = encode_class_texts(probe, splits.classnames, ["a photo of a {}."],
                                  tokenizer=open_clip.SimpleTokenizer(context_length=16))
        started = time.perf_counter()
        test = extract_image_features(probe, splits, splits.test, preprocess, batch_size=args.extract_batch,
                                      progress=False)
        encode_ms = 1e3 * (time.perf_counter() - started) / len(splits.test)
        warm_up(clip, text, test.image, args.methods)
        for method in args.methods:
            overrides = {"epochs": size["epochs"][method]}
            if method == "mma":
                overrides["patience"] = 0  # both ways run every epoch (see the module's docstring)
            config = preset(method, **overrides)
            shared = (clip, splits, preprocess, text, test, args)
            schedules.append(one_schedule(method, method, config, *shared, Path(tmp)))
            if method == "rada":
                plain = dataclasses.replace(config, views=0)
                schedules.append(one_schedule("rada --views 0", "rada", plain, *shared, Path(tmp)))
                if args.sweep_lrs:
                    schedules.append(lr_sweep(config, *shared, Path(tmp)))
    return {
        "size": name,
        "sizes": {k: v for k, v in size.items() if k != "epochs"},
        "image_encoder_params": sum(p.numel() for p in clip.visual.parameters()),
        "encode_ms_per_image": encode_ms,
        "schedules": schedules,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _target(r: dict) -> str:
    if r["target"] is None:
        return "none: the same encoder work both ways" if r["schedule"] != "rada lr sweep" else "none"
    met = {True: "met", False: "NOT met"}
    return f">= {r['target']:.0f}x: wall {met[r['meets_target']]}, CPU {met[r['meets_target_cpu']]}"


def _row(r: dict) -> str:
    rel, cache = r["released"], r["cache"]
    released_s = f"{rel['seconds']:.2f} / {rel['cpu_seconds']:.2f}" + (
        f" (extrapolated from {rel['epochs_timed']} epochs: {rel['seconds_timed']:.2f} s wall)"
        if rel.get("extrapolated") else "")
    if "per_lr" in r:
        accs = ", ".join(f"{p['released']['test_acc']:.2f} / {p['cache']['test_acc']:.2f}" for p in r["per_lr"])
    else:
        accs = f"{rel['test_acc']:.2f} / {cache['test_acc']:.2f}" if "test_acc" in rel else "n/a (extrapolated)"
    views = r["config"]["views"]
    zero = r.get("zero_shot_test_acc", r["per_lr"][0].get("zero_shot_test_acc") if "per_lr" in r else None)
    return (f"| {r['schedule']} | {r['config']['epochs']} | {views} | {r['repeats']} | {released_s} "
            f"| {cache['seconds']:.2f} / {cache['cpu_seconds']:.2f}; {cache['extract_seconds']:.2f} + "
            f"{cache['fit_seconds']:.2f} | {r['speedup']:.1f}x ({r['speedup_best']:.1f}x) | {r['speedup_cpu']:.1f}x "
            f"| {_target(r)} | {accs} | {_fmt(zero, '.2f')} | {_fmt(r.get('max_param_diff'), '.1e')} |")


def markdown(result: dict) -> str:
    lines = [
        "# Training time: released way (encoders every epoch) vs cache way (encode once, then fit)",
        "",
        f"Machine: {result['machine']}, {result['threads']} torch thread(s), torch {result['torch']}, open_clip "
        f"{result['open_clip']}; load average {result['load_before']:.1f} before, {result['load_after']:.1f} after "
        "(the machine is shared with other work: wall-clock timings carry that noise; CPU time, the process's own "
        "with one thread and image decoding in-process, much less). Timed: " + result["timed"] + ".",
        "",
        "RAda trains with its preset's augmentation in both ways (views per_epoch: a fresh RandomResizedCrop + flip "
        "of every image every epoch; the released way augments on the fly, drawing exactly the crops the cache "
        "holds), so one run encodes as many images either way; the lr sweep (three learning rates) shows what the "
        "cache saves when the same views train again. `rada --views 0` is RAda without augmentation. MMA (no "
        "augmentation, its preset) with early stopping off (patience 0) in both ways, so that both run all 200 "
        "epochs (selection on validation accuracy kept: both evaluate the validation images every epoch).",
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
            "| schedule | epochs | views | runs | released: wall / CPU (s) | cache: wall / CPU (s); extract + fit (wall) "
            "| speed-up, wall: median (best run) | speed-up, CPU time | target "
            "| test acc released / cache | zero-shot | max param diff |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [_row(r) for r in run["schedules"]]
        diffs = ", ".join(
            f"{r['released']['max_feature_diff_vs_cache']:.1e} ({r['schedule']})" for r in run["schedules"]
        )
        sweeps = [r for r in run["schedules"] if "per_lr" in r]
        lines += ["", f"Largest difference between an image's features encoded in a training batch and in the cache: "
                      f"{diffs}."]
        for r in sweeps:
            lines += ["", f"The lr sweep ({', '.join(f'{lr:g}' for lr in r['lrs'])}) sums the three runs of each way; "
                          f"the cache way extracted its views once ({r['cache']['first_extract_seconds']:.2f} s, in the "
                          "first run) and read them from the cache file in the other two. Test accuracy is listed per "
                          "learning rate."]
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
    parser.add_argument("--sweep-lrs", nargs="*", type=float, default=list(SWEEP_LRS),
                        help="learning rates of RAda's sweep (default 5e-4 1e-3 2e-3; none: no sweep)")
    parser.add_argument("--sweep-repeats", type=int, default=1, help="timings of the sweep per way (median kept)")
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
