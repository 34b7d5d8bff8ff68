"""Pictures of a run (needs the ``plot`` extra: matplotlib).

- training curves: loss and validation accuracy per epoch;
- what the adapter changed: for the RAda family the mean mask over images as a
  classes × dimensions map; for MMA the attention of each image over the classes;
- one comparison per setting: base / new / HM per method (:func:`plot_summary`),
  accuracy against shots (:func:`plot_shots`), accuracy per target
  (:func:`plot_targets`: transfer, domain generalisation, test-time training).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .. import kernels
from ..io import atomic_write
from ..wrapper import AdaptedCLIP
from .evaluation import accuracy_summary

__all__ = [
    "plot_adapter",
    "plot_history",
    "plot_shots",
    "plot_summary",
    "plot_sweep",
    "plot_targets",
    "plot_tta",
    "save_figure",
]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'rada_mma[plot]'") from err
    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out ``fig``, write it as a PNG atomically (:func:`rada_mma.io.atomic_write`) and close it."""
    fig.tight_layout()
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    finally:
        _pyplot().close(fig)


def plot_history(history: Sequence[dict[str, float]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Training loss and validation accuracy per epoch, saved as a PNG."""
    plt = _pyplot()
    epochs = [h["epoch"] + 1 for h in history]
    fig, loss_ax = plt.subplots(figsize=(6, 3.5))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], color="tab:blue", label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss", color="tab:blue")
    if any("val_acc" in h for h in history):
        acc_ax = loss_ax.twinx()
        acc_ax.plot(
            [h["epoch"] + 1 for h in history if "val_acc" in h],
            [h["val_acc"] for h in history if "val_acc" in h],
            color="tab:orange",
        )
        acc_ax.set_ylabel("validation accuracy (%)", color="tab:orange")
    loss_ax.set_title(title or "training")
    return save_figure(fig, path)


@torch.no_grad()
def plot_adapter(
    model: AdaptedCLIP,
    image_features: Tensor,
    path: str | os.PathLike,
    *,
    classnames: Sequence[str] | None = None,
    max_images: int = 256,
    max_classes: int = 64,
) -> Path:
    """What the adapter does on these images, saved as a PNG.

    RAda family: the mask averaged over images, ``(K, D)``, with its mean per
    class beside it. MMA: each image's attention over the K classes (averaged
    over heads), images sorted by their most attended class. The adapter runs
    over every class; the first ``max_classes`` are drawn (ImageNet's 1000 would
    make a figure hundreds of inches tall).
    """
    plt = _pyplot()
    feats = image_features[:max_images]
    if feats.dim() == 3:
        feats = feats[:, 0]
    device = next(model.adapter.parameters()).device
    feats = feats.to(device)
    text = model.text_features()
    scale = model.multiplicative_scale()
    adapter = model.adapter
    names = list(classnames) if classnames is not None else [str(i) for i in range(text.shape[0])]
    shown = f" (the first {max_classes} of {len(names)} classes)" if len(names) > max_classes else ""
    names = names[:max_classes]
    if adapter.has_mask:
        _, mask = adapter(feats, text, scale, return_mask=True)
        mean = mask.mean(0)[:max_classes].float().cpu().numpy()  # (K, D)
        fig, (ax, bar) = plt.subplots(1, 2, figsize=(10, 0.25 * len(names) + 2), gridspec_kw={"width_ratios": [4, 1]})
        im = ax.imshow(mean, aspect="auto", cmap="coolwarm", vmin=0, vmax=max(2.0, float(mean.max())))
        ax.set_xlabel("embedding dimension")
        ax.set_title("mean mask over images (1 = zero-shot)" + shown)
        fig.colorbar(im, ax=ax)
        bar.barh(range(len(names)), mean.mean(1))
        bar.axvline(1.0, color="k", lw=0.8)
        bar.set_title("mean per class")
        for a in (ax, bar):
            a.set_yticks(range(len(names)))
            a.set_yticklabels(names if a is ax else [], fontsize=7)
        bar.invert_yaxis()
    else:
        attn = adapter.image_attention(kernels.normalize(feats), kernels.normalize(text)).mean(1).cpu()  # (B, K)
        attn = attn[:, :max_classes]
        order = attn.argmax(-1).argsort()
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 5))
        im = ax.imshow(attn[order].numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel("image")
        ax.set_title("image token's attention over classes (mean over heads)" + shown)
        fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def plot_summary(rows: Sequence[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Base, new and HM per method, one panel per dataset: bars at the mean over seeds, whiskers at min and max.

    HM is the harmonic mean of each seed's base and new (its bar is their mean),
    so the whiskers show how far single seeds spread.
    """
    plt = _pyplot()
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(6.0, 4.5 * len(datasets)), 3.8), squeeze=False)
    metrics = ("base", "new", "hm")
    for ax, dataset in zip(axes[0], datasets, strict=True):
        of = [r for r in rows if r["dataset"] == dataset]
        methods = list(dict.fromkeys(r["method"] for r in of))
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            values = [[r[metric] for r in of if r["method"] == m] for m in methods]
            means = [sum(v) / len(v) for v in values]
            low = [m - min(v) for m, v in zip(means, values, strict=True)]
            high = [max(v) - m for m, v in zip(means, values, strict=True)]
            xs = [i + (j - 1) * width for i in range(len(methods))]
            ax.bar(xs, means, width, yerr=[low, high], capsize=2, label={"hm": "HM"}.get(metric, metric))
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=20, fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(dataset)
        ax.set_ylim(0, 100)
    axes[0][0].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_shots(rows: Sequence[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Accuracy against training images per class, one panel per dataset (CoOp's few-shot curves).

    A line per method at the mean over seeds, shaded between the lowest and the highest seed; zero-shot CLIP
    (0 shots) is a star and a dashed line.
    """
    plt = _pyplot()
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    shots = sorted({r["shots"] for r in rows})
    x_of = {k: i for i, k in enumerate(shots)}  # evenly spaced, as 1, 2, 4, 8, 16 are
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(5.0, 4.5 * len(datasets)), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        summary = accuracy_summary([r for r in rows if r["dataset"] == dataset], ("method", "shots"))
        for method in dict.fromkeys(e["method"] for e in summary):
            points = sorted((e for e in summary if e["method"] == method), key=lambda e: e["shots"])
            xs = [x_of[e["shots"]] for e in points]
            if method == "zero-shot":
                ax.axhline(points[0]["accuracy"], color="gray", ls="--", lw=0.8)
                ax.plot(xs, [e["accuracy"] for e in points], "*", color="gray", ms=10, label=method)
                continue
            line, = ax.plot(xs, [e["accuracy"] for e in points], "o-", label=method)
            ax.fill_between(xs, [e["spread"][0] for e in points], [e["spread"][1] for e in points],
                            color=line.get_color(), alpha=0.15)
        ax.set_xticks(range(len(shots)))
        ax.set_xticklabels([str(k) for k in shots])
        ax.set_xlabel("training images per class")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_targets(
    rows: Sequence[dict],
    path: str | os.PathLike,
    *,
    label: Callable[[dict], str] = lambda r: r["method"],
    title: str = "",
) -> Path:
    """Accuracy per target dataset: a group of bars per target, a bar per ``label(row)`` at the mean over seeds,
    whiskers at the lowest and highest seed (transfer, domain generalisation, test-time training)."""
    plt = _pyplot()
    labelled = [{**r, "label": label(r)} for r in rows]
    targets = list(dict.fromkeys(r["dataset"] for r in labelled))
    labels = list(dict.fromkeys(r["label"] for r in labelled))
    cells = {(e["label"], e["dataset"]): e for e in accuracy_summary(labelled, ("label", "dataset"))}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.7 * len(targets) + 2), 4.6))
    width = 0.8 / len(labels)
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20").colors
    for j, name in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i, t in enumerate(targets) if (name, t) in cells]
        got = [cells[(name, t)] for t in targets if (name, t) in cells]
        means = [e["accuracy"] for e in got]
        whiskers = [[m - e["spread"][0] for m, e in zip(means, got, strict=True)],
                    [e["spread"][1] - m for m, e in zip(means, got, strict=True)]]
        ax.bar(xs, means, width, yerr=whiskers, capsize=2, label=name, color=colours[j % len(colours)])
    ax.set_xticks(range(len(targets)))
    ax.set_xticklabels(targets, rotation=15, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(len(labels), 3), frameon=False)
    ax.set_title(title or "accuracy per target")
    return save_figure(fig, path)


def plot_tta(before: Tensor, after: Tensor, labels: Tensor, path: str | os.PathLike, *, title: str = "") -> Path:
    """What test-time training did to the original images' predictions ``(N, K)``: the entropy of the prediction
    before and after, and the accuracy before and after, with the images it fixed and broke."""
    plt = _pyplot()

    def entropy(logits: Tensor) -> Tensor:
        log_probs = logits.float().log_softmax(-1)
        return -(log_probs.exp() * log_probs).sum(-1)

    right_before, right_after = before.argmax(-1) == labels, after.argmax(-1) == labels
    fig, (hist, bars) = plt.subplots(1, 2, figsize=(9, 3.5), gridspec_kw={"width_ratios": [2, 1]})
    edges = torch.linspace(0, float(max(entropy(before).max(), entropy(after).max(), 1e-3)), 31).tolist()
    hist.hist(entropy(before).numpy(), bins=edges, alpha=0.6, label="before")
    hist.hist(entropy(after).numpy(), bins=edges, alpha=0.6, label="after")
    hist.set_xlabel("entropy of the prediction (nats)")
    hist.set_ylabel("images")
    hist.legend(fontsize=8)
    n = max(1, labels.shape[0])
    values = [100 * float(right_before.sum()) / n, 100 * float(right_after.sum()) / n,
              100 * float((~right_before & right_after).sum()) / n, 100 * float((right_before & ~right_after).sum()) / n]
    bars.bar(["before", "after", "fixed", "broken"], values, color=["tab:blue", "tab:orange", "tab:green", "tab:red"])
    bars.set_ylabel("% of images")
    bars.set_title("accuracy, and the images TTA changed", fontsize=9)
    hist.set_title(title or "test-time training")
    return save_figure(fig, path)


def plot_sweep(configurations: Sequence[dict], grid: Mapping[str, Sequence], selected: int, path: str | os.PathLike,
               *, title: str = "") -> Path:
    """Validation accuracy over a sweep's grid: one panel per swept key, the other keys at their selected values.

    Points at the mean over seeds, whiskers at the lowest and the highest seed, the selected configuration
    ringed; a value whose training diverged on a seed is marked on the axis. ``configurations`` are
    :class:`~rada_mma.fewshot.sweep.Sweep`'s.
    """
    plt = _pyplot()
    keys, chosen = list(grid), configurations[selected]["values"]
    fig, axes = plt.subplots(1, len(keys), figsize=(max(4.5, 3.4 * len(keys)), 3.4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys, strict=True):
        line = [c for c in configurations if all(c["values"][k] == chosen[k] for k in keys if k != key)]
        xs = list(range(len(line)))
        accs = [[a for a in c["val_acc"].values() if a is not None] for c in line]
        means = [math.nan if c["mean"] is None else c["mean"] for c in line]
        low = [0.0 if math.isnan(m) else m - min(a) for m, a in zip(means, accs, strict=True)]
        high = [0.0 if math.isnan(m) else max(a) - m for m, a in zip(means, accs, strict=True)]
        ax.errorbar(xs, means, yerr=[low, high], fmt="o-", capsize=3, color="tab:blue")
        at = [i for i, c in enumerate(line) if c["index"] == selected][0]
        ax.plot([at], [means[at]], "o", ms=13, mfc="none", mec="tab:red", mew=2, label="selected")
        for i, m in enumerate(means):
            if math.isnan(m):
                ax.annotate("diverged", (i, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                            fontsize=7, color="tab:red")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{c['values'][key]:g}" if isinstance(c["values"][key], float) else str(c["values"][key])
                            for c in line])
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (%)")
    axes[0][0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
