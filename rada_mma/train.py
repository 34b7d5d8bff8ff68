"""Training an adapter on cached features: presets, schedule, early stopping, resumable checkpoints.

Both methods touch only the final embeddings, so training never needs the
encoders: :func:`fit` runs on :class:`rada_mma.cache.Features` through
``AdaptedCLIP.logits_from_features``. Model selection uses the validation
split only. Under ``torchrun`` each rank takes its share of every batch and
gradients are summed, which equals one process on the whole batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .config import METHODS
from .wrapper import AdaptedCLIP

__all__ = ["PRESETS", "FitResult", "TrainConfig", "accuracy", "fit", "learning_rate", "preset"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """How an adapter is trained. :func:`preset` gives each method's released defaults."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"  # "adam", "adamw" or "sgd"
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # per-epoch "cosine" (Dassl's: a half period of `epochs` epochs) or "constant"
    warmup_epochs: int = 0  # epochs at `warmup_lr` before the schedule starts (Dassl's constant warm-up)
    warmup_lr: float = 1e-5
    patience: int = 0  # stop after this many epochs without a better validation accuracy; 0: never
    select: str = "last"  # which weights to keep: "last" epoch or "best_val" (validation only, never test)
    seed: int = 1
    amp: bool = True  # bf16 autocast when training on CUDA

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.select not in ("last", "best_val"):
            raise ValueError(f"select must be 'last' or 'best_val', got {self.select!r}")
        if self.warmup_epochs < 0 or self.patience < 0:
            raise ValueError("warmup_epochs and patience must be >= 0")


# The released set-ups (METHODS.md). RAda: 5 epochs, cosine with one warm-up
# epoch, batch 32, Adam; the YAML's lr of 5e-5 was overridden by the launch
# scripts with values that were not released, so lr is ours (set it with lr=).
# MMA: Adam 5e-3, weight decay 1e-4, batch 256, up to 200 epochs, early stopping
# on validation accuracy with patience 20.
_RADA = TrainConfig(epochs=5, batch_size=32, lr=1e-3, schedule="cosine", warmup_epochs=1)
_MMA = TrainConfig(
    epochs=200, batch_size=256, lr=5e-3, weight_decay=1e-4, schedule="constant", patience=20, select="best_val"
)
PRESETS: dict[str, TrainConfig] = {
    "rada": _RADA,
    "rada+adapter": _RADA,
    "mma+rada": _RADA,
    "mma": _MMA,
    "mma-master": _MMA,
}


def preset(method: str, **overrides: Any) -> TrainConfig:
    """The released training set-up of ``method`` with ``overrides`` applied."""
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}; known: {', '.join(sorted(fields))}")
    return dataclasses.replace(PRESETS[method], **overrides)


@dataclass
class FitResult:
    """What :func:`fit` did: per-epoch history and the selected epoch."""

    # one record per epoch: epoch, lr, train_loss (mean over the epoch's images), val_acc (with a val split)
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1  # the epoch whose weights the model holds (the last one for select="last")
    best_val: float = float("nan")  # the highest validation accuracy seen (NaN without a val split)
    stopped_early: bool = False


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def accuracy(model: AdaptedCLIP, image_features: Tensor, labels: Tensor, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent of ``model`` on raw image features ``(N, D)`` (or ``(N, V, D)``: view 0)."""
    if image_features.dim() == 3:
        image_features = image_features[:, 0]
    if image_features.shape[0] == 0:
        raise ValueError("no features to evaluate: the split is empty")
    device = next(model.adapter.parameters()).device
    correct = 0
    for start in range(0, image_features.shape[0], batch_size):
        feats = image_features[start : start + batch_size].to(device)
        pred = model.logits_from_features(feats).argmax(-1).cpu()
        correct += int((pred == labels[start : start + batch_size]).sum())
    return 100.0 * correct / image_features.shape[0]


def _optimizer(params: list[torch.nn.Parameter], c: TrainConfig) -> torch.optim.Optimizer:
    if c.optimizer == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    cls = torch.optim.Adam if c.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=c.lr, weight_decay=c.weight_decay)


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (from 0), as Dassl's scheduler gives it to the released trainers.

    The first ``warmup_epochs`` epochs run at ``warmup_lr``; then ``"cosine"``
    is ``CosineAnnealingLR(T_max=epochs)`` counted from the end of the warm-up
    (Dassl's default ``WARMUP_RECOUNT``): ``lr · (1 + cos(π·(epoch − warmup)/epochs)) / 2``.
    So RAda's preset (5 epochs, 1 warm-up) runs at 1e-5, then lr × 1, 0.905, 0.655, 0.345.

    Example:
        >>> [round(learning_rate(preset("rada", lr=1.0), e), 4) for e in range(1, 5)]
        [1.0, 0.9045, 0.6545, 0.3455]
    """
    c = config
    if epoch < c.warmup_epochs:
        return c.warmup_lr
    if c.schedule == "constant":
        return c.lr
    return 0.5 * c.lr * (1 + math.cos(math.pi * (epoch - c.warmup_epochs) / c.epochs))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _run_key(model: AdaptedCLIP, train_labels: Tensor, c: TrainConfig, fingerprint: str) -> str:
    """What a checkpoint must agree on to be resumed: config, adapter, classes, data."""
    return json.dumps(
        {
            "train": dataclasses.asdict(c),
            "adapter": model.adapter.config.to_json(),
            "classes": model.num_classes,
            "n": int(train_labels.numel()),
            "data": fingerprint,
        },
        sort_keys=True,
    )


def _check_split(name: str, features: Tensor, labels: Tensor, classes: int) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
        raise TypeError(f"{name}_labels must be a 1-d integer tensor of class indices")
    if features.dim() not in (2, 3) or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name}_features must be (N, D) or (N, V, D) with N = len({name}_labels) = {labels.shape[0]}, "
            f"got {tuple(features.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError(f"the {name} split is empty; give at least one {name} image")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise ValueError(
            f"{name} labels span [{low}, {high}] but the model has {classes} classes set; call set_classes with "
            "the training classes first"
        )


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks in one collective; a parameter no rank has a gradient for keeps ``None``.

    A rank whose share of a batch is empty contributes zeros, so every rank
    takes part in the same collective however the batch was split.
    """
    anchor = params[0]
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=anchor.device)
    flat = torch.cat([*parts, present])
    dist.all_reduce(flat)
    offset = 0
    for p, has in zip(params, flat[-len(params) :].tolist(), strict=True):
        chunk = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        p.grad = chunk if has else None
        offset += p.numel()


def _all_reduce_sum(x: Tensor, device: torch.device) -> Tensor:
    """Sum a CPU tensor over ranks (NCCL reduces only CUDA tensors, gloo any)."""
    comm = x.to(device) if dist.get_backend() == "nccl" else x
    dist.all_reduce(comm)
    return comm.cpu()


def _load_checkpoint(path: Path, key: str) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors for a damaged file
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(err).__name__}); delete it to start over"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("key") != key:
        raise ValueError(
            f"{path} belongs to another run (other config, classes or data); "
            "use another out_dir, or delete the checkpoint to start over"
        )
    return ckpt


def fit(
    model: AdaptedCLIP,
    train_features: Tensor,
    train_labels: Tensor,
    *,
    config: TrainConfig,
    val_features: Tensor | None = None,
    val_labels: Tensor | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    data_fingerprint: str = "",
) -> FitResult:
    """Train ``model``'s adapter on cached image features for its current classes.

    Each epoch visits the training images in a seeded random order, in batches
    of ``config.batch_size``; the learning rate follows :func:`learning_rate`.
    The result depends only on the inputs and ``config`` (``seed`` included):
    the same call gives the same weights, and so does a run interrupted and
    resumed from ``out_dir``.

    Args:
        model: a wrapped CLIP with its (training) classes set.
        train_features: raw image embeddings ``(N, D)``, or ``(N, V, D)`` with V
            augmented views (each epoch draws one view per image, seeded).
        train_labels: ``(N,)`` class indices into the model's classes.
        config: see :func:`preset`.
        val_features, val_labels: the validation split ``(M, D)``, ``(M,)``, for
            early stopping and ``select="best_val"``; there is no test argument:
            the test split never enters training or model selection.
        out_dir: where ``checkpoint.pt`` is written after every epoch
            (atomically, rank 0 only); an interrupted run resumes from it,
            losing only the epoch it was in.
        resume: continue from a matching checkpoint in ``out_dir``; a checkpoint
            of another configuration or data is an error, never silently used.
        progress: show a progress bar (rank 0 only).
        data_fingerprint: identifies the training data (e.g. the cache's fingerprint).

    Returns:
        :class:`FitResult`; the model holds the selected weights.

    Example:
        >>> model.set_classes(text_features=base_text)
        >>> result = fit(model, train.image, train.labels, config=preset("mma"),
        ...              val_features=val.image, val_labels=val.labels, out_dir="runs/pets-mma")
    """
    c = config
    rank, world = _world()
    _check_split("train", train_features, train_labels, model.num_classes)
    if (val_features is None) != (val_labels is None):
        raise ValueError("give both val_features and val_labels, or neither")
    if val_features is not None:
        _check_split("val", val_features, val_labels, model.num_classes)
    if (c.patience or c.select == "best_val") and val_features is None:
        raise ValueError(
            f"config uses the validation split (patience={c.patience}, select={c.select!r}) but none was "
            "given; pass val_features/val_labels or set patience=0, select='last'"
        )
    device = next(model.adapter.parameters()).device
    params = model.trainable_parameters()
    optimizer = _optimizer(params, c)
    generator = torch.Generator().manual_seed(c.seed)
    result = FitResult()
    key = _run_key(model, train_labels, c, data_fingerprint)
    best_state: dict[str, Tensor] | None = None
    start_epoch, bad_epochs = 0, 0
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_path = out / CHECKPOINT
        if resume and ckpt_path.exists():
            ckpt = _load_checkpoint(ckpt_path, key)
            model.adapter.load_state_dict(ckpt["adapter"])
            optimizer.load_state_dict(ckpt["optimizer"])
            generator.set_state(ckpt["generator"])
            best_state = ckpt["best_state"] or None
            result = FitResult(**ckpt["result"])
            start_epoch, bad_epochs = ckpt["epoch"] + 1, ckpt["bad_epochs"]
            log.info("resuming from %s at epoch %d", ckpt_path, start_epoch)

    use_amp = c.amp and device.type == "cuda"
    n = train_labels.shape[0]
    epochs = range(start_epoch, c.epochs)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=f"fit {model.adapter.config.method}", initial=start_epoch, total=c.epochs)
    for epoch in epochs:
        if result.stopped_early:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(c, epoch)
        model.train()
        order = torch.randperm(n, generator=generator)
        views = (
            torch.randint(train_features.shape[1], (n,), generator=generator) if train_features.dim() == 3 else None
        )
        total = torch.zeros(2, dtype=torch.float64)  # summed loss, images
        for start in range(0, n, c.batch_size):
            batch = order[start : start + c.batch_size]
            local = batch[rank::world]  # every rank takes its share of the same global batch
            if len(local):
                feats = train_features[local] if views is None else train_features[local, views[local]]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model.logits_from_features(feats.to(device))
                    loss = F.cross_entropy(logits.float(), train_labels[local].to(device)) + model.regularization()
                # mean over the global batch = sum over ranks of local means weighted by their share
                (loss * (len(local) / len(batch))).backward()
                total += torch.tensor([float(loss.detach()) * len(local), len(local)], dtype=torch.float64)
            if world > 1:
                _all_reduce_grads(params)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if world > 1:
            total = _all_reduce_sum(total, device)
        model.eval()
        record = {"epoch": epoch, "lr": learning_rate(c, epoch), "train_loss": float(total[0] / total[1])}
        if val_features is not None:
            record["val_acc"] = accuracy(model, val_features, val_labels)
            if not record["val_acc"] <= result.best_val:  # first epoch, or better (NaN-safe)
                result.best_val, result.best_epoch, bad_epochs = record["val_acc"], epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.adapter.state_dict().items()}
            else:
                bad_epochs += 1
                if c.patience and bad_epochs >= c.patience:
                    result.stopped_early = True
                    log.info("early stop after epoch %d: no better validation accuracy for %d epochs", epoch, bad_epochs)
        result.history.append(record)
        if out is not None and rank == 0:
            _atomic_torch_save(
                {
                    "key": key,
                    "epoch": epoch,
                    "bad_epochs": bad_epochs,
                    "adapter": model.adapter.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "best_state": best_state or {},
                    "result": dataclasses.asdict(result),
                },
                out / CHECKPOINT,
            )
        if world > 1:
            dist.barrier()
    if c.select == "best_val" and best_state is not None:
        model.adapter.load_state_dict(best_state)
    elif c.select == "last":
        result.best_epoch = result.history[-1]["epoch"] if result.history else -1
    model.eval()
    return result
