"""Pictures of a run (needs the ``plot`` extra: matplotlib).

- training curves: loss and validation accuracy per epoch;
- what the adapter changed: for the RAda family the mean mask over images as a
  classes × dimensions map; for MMA the attention of each image over the classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .. import kernels
from ..io import atomic_write
from ..wrapper import AdaptedCLIP

__all__ = ["plot_adapter", "plot_history", "plot_summary", "save_figure"]


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
) -> Path:
    """What the adapter does on these images, saved as a PNG.

    RAda family: the mask averaged over images, ``(K, D)``, with its mean per
    class beside it. MMA: each image's attention over the K classes (averaged
    over heads), images sorted by their most attended class.
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
    if adapter.has_mask:
        _, mask = adapter(feats, text, scale, return_mask=True)
        mean = mask.mean(0).float().cpu().numpy()  # (K, D)
        fig, (ax, bar) = plt.subplots(1, 2, figsize=(10, 0.25 * len(names) + 2), gridspec_kw={"width_ratios": [4, 1]})
        im = ax.imshow(mean, aspect="auto", cmap="coolwarm", vmin=0, vmax=max(2.0, float(mean.max())))
        ax.set_xlabel("embedding dimension")
        ax.set_title("mean mask over images (1 = zero-shot)")
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
        order = attn.argmax(-1).argsort()
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 5))
        im = ax.imshow(attn[order].numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel("image")
        ax.set_title("image token's attention over classes (mean over heads)")
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
