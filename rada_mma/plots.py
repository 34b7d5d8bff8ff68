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

from . import kernels
from .modules import MultiModalAdapter
from .wrapper import AdaptedCLIP

__all__ = ["plot_adapter", "plot_history"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'rada_mma[plot]'") from err
    return plt


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _image_attention(mma: MultiModalAdapter, f: Tensor, h: Tensor) -> Tensor:
    """The image token's attention over the K classes, mean over heads: ``(B, K)``."""
    return mma.image_attention(f, h).mean(1)


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
    scale = model.logit_scale()
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
        attn = _image_attention(adapter, kernels.normalize(feats), kernels.normalize(text)).cpu()  # (B, K)
        order = attn.argmax(-1).argsort()
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 5))
        im = ax.imshow(attn[order].numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel("image")
        ax.set_title("image token's attention over classes (mean over heads)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
