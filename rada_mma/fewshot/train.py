"""Training an adapter on cached features: presets, schedule, early stopping, resumable checkpoints.

Both methods touch only the final embeddings, so training never needs the
encoders: :func:`fit` runs on :class:`rada_mma.fewshot.Features` through
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import METHODS, check_field_types
from ..io import save_torch
from ..modules import classification_loss
from ..wrapper import AdaptedCLIP
from .distributed import all_reduce_grads, all_reduce_sum, barrier, rank_world

__all__ = [
    "CHOICES",
    "PER_EPOCH",
    "PRESETS",
    "RELEASED_PROMPT",
    "FitResult",
    "TrainConfig",
    "TrainingDiverged",
    "accuracy",
    "fit",
    "learning_rate",
    "parse_views",
    "preset",
    "steps_per_epoch",
]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# the values the string fields of TrainConfig take
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("cosine", "constant"),
    "select": ("last", "best_val"),
    "interpolation": ("bicubic", "bilinear", "nearest"),  # Dassl's INTERPOLATION_MODES
    "prompt": ("released", "dataset"),
}
PER_EPOCH = "per_epoch"
AUGMENTATION = "random_resized_crop+flip"  # Dassl's random_resized_crop + random_flip, then the model's normalisation
RELEASED_PROMPT = "a photo of a {}."  # RAda's CustomCLIP: "a photo of a " + name + "." for every dataset


def parse_views(value: str | int) -> int | str:
    """``"per_epoch"`` or a count ``>= 0`` (from the command line's text or from Python)."""
    if value == PER_EPOCH:
        return PER_EPOCH
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if isinstance(value, bool) or count < 0 or str(count) != str(value).strip():
        raise ValueError(f"views must be {PER_EPOCH!r} or an integer >= 0, got {value!r}")
    return count


def _option(help: str, *, parse: Any = None, **default: Any) -> Any:
    """A TrainConfig field with its help text (the command line's flags are made from these; ``parse``
    reads a flag whose type is not a plain int, float, bool or choice)."""
    return field(metadata={"help": help, "parse": parse}, **default)


@dataclass(frozen=True)
class TrainConfig:
    """How an adapter is trained. :func:`preset` gives each method's released defaults."""

    epochs: int = _option("training epochs (the most, with early stopping)")
    batch_size: int = _option("images per optimiser step")
    lr: float = _option("learning rate after the warm-up")
    optimizer: str = _option("optimiser", default="adam")
    weight_decay: float = _option("weight decay (L2, as torch's optimisers apply it)", default=0.0)
    momentum: float = _option("SGD momentum (sgd only)", default=0.9)
    schedule: str = _option(
        "per-epoch learning-rate schedule: Dassl's cosine over `epochs` epochs, or constant", default="cosine"
    )
    warmup_epochs: int = _option("epochs at warmup_lr before the schedule starts (Dassl's constant warm-up)", default=0)
    warmup_lr: float = _option("learning rate of the warm-up epochs", default=1e-5)
    patience: int = _option("stop after this many epochs without a better validation accuracy; 0: never", default=0)
    select: str = _option("weights to keep: the last epoch's, or the best validation epoch's (never test)", default="last")
    seed: int = _option("seed of the batch order and view draws", default=1)
    amp: bool = _option("bf16 autocast when training on CUDA", default=True)
    drop_last: bool = _option(
        "drop each epoch's last partial batch, as Dassl's training loader does (kept when all images fit in less "
        "than one batch)", default=False,
    )
    # What the training images look like: read by the protocols when they fill the feature
    # cache (fit() trains on the features it is given; see views there).
    views: int | str = _option(
        f"augmented views of each training image: {PER_EPOCH!r} (a fresh random crop and flip every epoch, as an "
        "on-the-fly loader draws them: `epochs` views cached), V > 0 (V views cached, each epoch draws one per "
        "image) or 0 (no augmentation)", default=0, parse=parse_views,
    )
    crop_scale: float = _option("smallest area fraction of the random resized crop (Dassl's 0.08; up to 1)", default=0.08)
    interpolation: str = _option("resampling of the random resized crop", default="bicubic")
    prompt: str = _option(
        f"class prompts of the adapter: 'released' (RAda's {RELEASED_PROMPT!r} for every dataset) or 'dataset' "
        "(the dataset's CoOp template); --template overrides both", default="dataset",
    )
    extract_amp: bool = _option("bf16 autocast when encoding images on CUDA (fp32 features when off)", default=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "views", parse_views(self.views))
        check_field_types(self)  # ints, finite floats, bools: NaN or "abc" never reaches an optimiser
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must lie in (0, 1], got {self.crop_scale}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        for name in ("warmup_epochs", "patience", "weight_decay", "momentum", "warmup_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 1 << 63:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")

    @property
    def view_count(self) -> int:
        """Augmented views cached per training image: 0 (none), V, or ``epochs`` for ``"per_epoch"``."""
        return self.epochs if self.views == PER_EPOCH else self.views

    @property
    def augmentation(self) -> dict[str, Any]:
        """What the training images go through, as ``run.json`` records it."""
        if self.views == 0:
            return {"kind": "none", "views": 0}
        return {"kind": AUGMENTATION, "scale": [self.crop_scale, 1.0], "interpolation": self.interpolation,
                "views": self.views}


# The released set-ups (docs/methods.md section 8). RAda (khufia/RAda's base-to-new YAML on
# Dassl): Adam, weight decay 5e-4, cosine with one constant warm-up epoch at 1e-5, the last
# partial batch dropped, a fresh RandomResizedCrop(scale 0.08-1, bicubic) + flip of every
# image every epoch, "a photo of a {}." prompts, fp32 features and training (CLIP cast to
# fp32 on its CPU load). lr, batch and epochs came from the launch scripts' command line and
# were never published: 1e-3, 32 and 5 are ours (32 and 5 are the YAML's own).
# MMA (dqmis/clip-mma): Adam 5e-3, weight decay 1e-4, batch 256, up to 200 epochs, early
# stopping on validation accuracy with patience 20, constant lr, no augmentation, CoOp's templates.
_RADA = TrainConfig(
    epochs=5, batch_size=32, lr=1e-3, weight_decay=5e-4, schedule="cosine", warmup_epochs=1, drop_last=True,
    views=PER_EPOCH, prompt="released", amp=False, extract_amp=False,
)
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


class TrainingDiverged(ValueError):
    """Training stopped at a non-finite loss (or weights): the run's settings cannot train this adapter."""


@dataclass
class FitResult:
    """What :func:`fit` did: per-epoch history and the selected epoch."""

    # one record per epoch: epoch, lr, train_loss (mean over the epoch's images), val_acc (with a val split)
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1  # the epoch whose weights the model holds (the last one for select="last")
    best_val: float = float("nan")  # the highest validation accuracy seen (NaN without a val split)
    stopped_early: bool = False

    @property
    def val_acc(self) -> float:
        """Validation accuracy of the weights the model holds (those of ``best_epoch``); NaN without a val split.

        What a sweep selects on (:func:`rada_mma.fewshot.sweep.run_sweep`), and what ``run.json`` records.
        """
        return next((h.get("val_acc", math.nan) for h in self.history if h["epoch"] == self.best_epoch), math.nan)


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


def steps_per_epoch(config: TrainConfig, images: int) -> int:
    """Optimiser steps in one epoch over ``images`` training images.

    With ``drop_last`` the final partial batch is left out, as Dassl's training
    loader does (``drop_last=is_train and len(data) >= batch_size``): a set smaller
    than one batch still makes its one step.

    Example:
        >>> steps_per_epoch(preset("rada"), 8 * 16), steps_per_epoch(preset("mma"), 8 * 16)
        (4, 1)
    """
    if config.drop_last and images >= config.batch_size:
        return images // config.batch_size
    return math.ceil(images / config.batch_size)


def _optimizer(params: list[torch.nn.Parameter], c: TrainConfig) -> torch.optim.Optimizer:
    if c.optimizer == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    cls = torch.optim.Adam if c.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=c.lr, weight_decay=c.weight_decay)


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


def _check_views(c: TrainConfig, features: Tensor) -> None:
    """(N, V, D) features must be what ``c.views`` says: ``epochs`` views or more for ``"per_epoch"``, any V else."""
    if features.dim() != 3:
        return
    if c.views == 0:
        raise ValueError(
            f"train_features hold {features.shape[1]} augmented views per image but the config has views=0 (no "
            "augmentation); pass (N, D) features, or set views to 'per_epoch' or a count"
        )
    if c.views == PER_EPOCH and features.shape[1] < c.epochs:
        raise ValueError(
            f"views='per_epoch' trains epoch e on view e, so {c.epochs} epochs need {c.epochs} views per image; "
            f"train_features hold {features.shape[1]}. Extract with views={c.epochs}, or set views to a count"
        )


def _check_inputs(model: AdaptedCLIP, c: TrainConfig, train: tuple[Tensor, Tensor], val: tuple | None) -> None:
    _check_split("train", *train, model.num_classes)
    _check_views(c, train[0])
    if val is not None:
        _check_split("val", *val, model.num_classes)
    elif c.patience or c.select == "best_val":
        raise ValueError(
            f"config uses the validation split (patience={c.patience}, select={c.select!r}) but none was "
            "given; pass val_features/val_labels or set patience=0, select='last'"
        )


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


class _Run:
    """One training run's state: what a checkpoint holds, and the steps of :func:`fit`."""

    def __init__(self, model: AdaptedCLIP, c: TrainConfig, key: str, out: Path | None):
        self.model, self.config, self.key, self.out = model, c, key, out
        self.rank, self.world = rank_world()
        self.device = next(model.adapter.parameters()).device
        self.params = model.trainable_parameters()
        self.optimizer = _optimizer(self.params, c)
        self.generator = torch.Generator().manual_seed(c.seed)
        self.result = FitResult()
        self.best_state: dict[str, Tensor] | None = None
        self.start_epoch = self.bad_epochs = 0

    # -- checkpoints ------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from ``out/checkpoint.pt`` when it belongs to this run; another run's is an error."""
        path = self.out / CHECKPOINT
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises pickle, zip and runtime errors for a damaged file
            raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}); delete it to start over") from err
        if not isinstance(ckpt, dict) or ckpt.get("key") != self.key:
            raise ValueError(
                f"{path} belongs to another run (other config, classes or data); "
                "use another out_dir, or delete the checkpoint to start over"
            )
        self.model.adapter.load_state_dict(ckpt["adapter"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.generator.set_state(ckpt["generator"])
        self.best_state = ckpt["best_state"] or None
        self.result = FitResult(**ckpt["result"])
        self.start_epoch, self.bad_epochs = ckpt["epoch"] + 1, ckpt["bad_epochs"]
        log.info("resuming from %s at epoch %d", path, self.start_epoch)

    def checkpoint(self, epoch: int) -> None:
        """Write the state after ``epoch`` atomically (rank 0), so that a killed run loses one epoch at most."""
        if self.out is not None and self.rank == 0:
            state = {
                "key": self.key,
                "epoch": epoch,
                "bad_epochs": self.bad_epochs,
                "adapter": self.model.adapter.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "best_state": self.best_state or {},
                "result": dataclasses.asdict(self.result),
            }
            save_torch(self.out / CHECKPOINT, state)
        barrier()

    # -- epochs -----------------------------------------------------------------------------

    def train_epoch(self, epoch: int, features: Tensor, labels: Tensor) -> dict[str, float]:
        """One pass over the training images in a seeded order; the epoch's record."""
        c, model, device = self.config, self.model, self.device
        lr = learning_rate(c, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        n = labels.shape[0]
        order = torch.randperm(n, generator=self.generator)
        views = None  # (N,) view of each image this epoch
        if features.dim() == 3:
            if c.views == PER_EPOCH:  # view e is every image's fresh draw of epoch e
                views = torch.full((n,), epoch, dtype=torch.long)
            else:
                views = torch.randint(features.shape[1], (n,), generator=self.generator)
        # summed loss on the device: reading it every step would make the host wait for a GPU
        loss_sum, images = torch.zeros((), dtype=torch.float64, device=device), 0
        use_amp = c.amp and device.type == "cuda"
        steps = steps_per_epoch(c, n)
        for step, start in enumerate(range(0, steps * c.batch_size, c.batch_size)):
            batch = order[start : start + c.batch_size]
            local = batch[self.rank :: self.world]  # every rank takes its share of the same global batch
            if len(local):
                feats = features[local] if views is None else features[local, views[local]]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model.logits_from_features(feats.to(device))
                    loss = classification_loss(logits, labels[local].to(device), model.regularization(), check=False)
            if device.type == "cpu":  # before a NaN gradient reaches the weights; on a GPU once an epoch, below
                self.check_finite(float(loss.detach()) if len(local) else 0.0, epoch, step, steps)
            if len(local):
                # mean over the global batch = sum over ranks of local means weighted by their share
                (loss * (len(local) / len(batch))).backward()
                loss_sum += loss.detach().double() * len(local)
                images += len(local)
            if self.world > 1:
                all_reduce_grads(self.params)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        total = torch.stack([loss_sum.cpu(), torch.tensor(float(images), dtype=torch.float64)])  # one sync an epoch
        if self.world > 1:
            total = all_reduce_sum(total, device)
        if not math.isfinite(float(total[0])):  # on a GPU, where no step waited to check its loss
            self.diverged(f"the loss became NaN or infinite during epoch {epoch + 1} of {c.epochs}")
        model.eval()
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):  # the last step overflowed
            self.diverged(f"the adapter's weights became NaN or infinite at the end of epoch {epoch + 1}")
        return {"epoch": epoch, "lr": lr, "train_loss": float(total[0] / total[1])}

    def check_finite(self, loss: float, epoch: int, step: int, steps: int) -> None:
        """Stop at the first non-finite loss of any rank (every rank stops at the same step)."""
        bad = not math.isfinite(loss)
        if self.world > 1:
            bad = bool(all_reduce_sum(torch.tensor([float(bad)]), self.device)[0] > 0)
        if bad:
            value = f"the loss is {loss}" if self.world == 1 else "the loss of a rank is non-finite"
            where = f"epoch {epoch + 1} of {self.config.epochs}, step {step + 1} of {steps}"
            self.diverged(f"{value} at {where} (lr {learning_rate(self.config, epoch):g})")

    def diverged(self, what: str) -> None:
        kept = (f"; {self.out / CHECKPOINT} keeps the last finite epoch: delete it (or use another out_dir) to train "
                "with other settings") if self.out is not None and (self.out / CHECKPOINT).exists() else ""
        raise TrainingDiverged(
            f"training diverged: {what}. No adapter is written. Likely causes: a learning rate too high (try 10x "
            f"lower), or adapter options that make the logits overflow (temperature, alpha, blend){kept}"
        )

    def validate(self, record: dict[str, float], features: Tensor, labels: Tensor) -> None:
        """Validation accuracy into ``record``; keeps the best weights and counts epochs without progress."""
        record["val_acc"] = accuracy(self.model, features, labels)
        result = self.result
        if not record["val_acc"] <= result.best_val:  # first epoch, or better (NaN-safe)
            result.best_val, result.best_epoch, self.bad_epochs = record["val_acc"], record["epoch"], 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.adapter.state_dict().items()}
            return
        self.bad_epochs += 1
        if self.config.patience and self.bad_epochs >= self.config.patience:
            result.stopped_early = True
            log.info("early stop after epoch %d: no better validation accuracy for %d epochs", record["epoch"], self.bad_epochs)

    def select(self) -> FitResult:
        """Load the weights ``config.select`` asks for; the result."""
        if self.config.select == "best_val" and self.best_state is not None:
            self.model.adapter.load_state_dict(self.best_state)
        elif self.config.select == "last":
            self.result.best_epoch = self.result.history[-1]["epoch"] if self.result.history else -1
        self.model.eval()
        return self.result


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
    of ``config.batch_size`` (the last partial one dropped with ``drop_last``, see
    :func:`steps_per_epoch`); the learning rate follows :func:`learning_rate`.
    The result depends only on the inputs and ``config`` (``seed`` included):
    the same call gives the same weights, and so does a run interrupted and
    resumed from ``out_dir``.

    Args:
        model: a wrapped CLIP with its (training) classes set.
        train_features: raw image embeddings ``(N, D)`` (trained on as they are), or
            ``(N, V, D)`` with V augmented views: with ``config.views="per_epoch"``
            epoch ``e`` reads view ``e`` of every image (V >= epochs), with a count each
            epoch draws one view per image (seeded).
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
    if (val_features is None) != (val_labels is None):
        raise ValueError("give both val_features and val_labels, or neither")
    val = None if val_features is None else (val_features, val_labels)
    _check_inputs(model, config, (train_features, train_labels), val)
    out = Path(out_dir) if out_dir is not None else None
    run = _Run(model, config, _run_key(model, train_labels, config, data_fingerprint), out)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and (out / CHECKPOINT).exists():
            run.resume()
    epochs = range(run.start_epoch, config.epochs)
    if progress and run.rank == 0:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=f"fit {model.adapter.config.method}", initial=run.start_epoch, total=config.epochs)
    for epoch in epochs:
        if run.result.stopped_early:
            break
        record = run.train_epoch(epoch, train_features, train_labels)
        if val is not None:
            run.validate(record, *val)
        run.result.history.append(record)
        run.checkpoint(epoch)
    return run.select()
