"""Test-time training, as TPT does it, for every adapter: one test image at a time, no labels.

For each test image: N views (the original and N − 1 augmented ones: random resized crops and flips for
ImageNet and its variants, followed by AugMix for the other datasets), the ρ·N most confident views (lowest
entropy of their prediction) are kept, the entropy of their averaged prediction is minimised for S steps of
AdamW on the adapter's parameters only (the encoders are frozen, the class texts fixed), the original image
is predicted, and the adapter is reset before the next image. TPT's defaults: N = 64, ρ = 0.1, S = 1,
lr 5e-3 (:class:`TTAConfig`).

The backbone is frozen, so each view goes through the image encoder once, into the feature cache
(:func:`rada_mma.fewshot.extract_image_features`, chunks of :data:`CHUNK` images, each view seeded by the
image and its index, so every run and every method shares the same views); the adaptation then runs on an
image's N view embeddings in one pass through the adapter. :func:`adapt_and_predict` works on such
embeddings; :func:`run_tta` is ``rada-mma eval --tta``; :func:`run_tta_grid` is ``bench --setting tta``.

>>> rows = run_tta(RunSpec(data="~/data/imagenet-adversarial", out="runs/a-tta", method="rada",
...                        model="ViT-B-16", pretrained="openai"), TTAConfig())   # RAda from zero-shot
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..wrapper import AdaptedCLIP
from . import data as fsdata
from . import runs
from .cache import default_augment, extract_image_features
from .datasets import IMAGENET_VARIANTS, find_dataset
from .distributed import all_reduce_sum, is_main, rank_world
from .evaluation import row_label, write_results
from .models import model_name
from .protocol import (
    ADAPTER_FILE,
    FeatureStore,
    RunSpec,
    adapter_templates,
    dataset_runs,
    load_splits,
    maybe_plot,
    run_folder,
    saved_adapter,
    wrapped_model,
    zero_shot_templates,
)
from .record import read_run_record, write_run_record
from .settings import train_source

__all__ = [
    "AUGMENTS",
    "CHUNK",
    "TTAConfig",
    "TTAOutcome",
    "TTAResult",
    "adapt_dataset",
    "average_entropy",
    "confident_views",
    "kept_views",
    "run_tta",
    "run_tta_grid",
    "adapt_and_predict",
    "view_augment",
]

log = logging.getLogger(__name__)

AUGMENTS = ("auto", "crop", "augmix")
CHUNK = 1024  # test images whose views are encoded (and cached) together: memory stays CHUNK · N · D floats


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class TTAConfig:
    """How each test image is adapted to (TPT's defaults). The command line's ``--tta-*`` flags are these fields."""

    views: int = _help("views per test image, the original included (TPT: 64)", 64)
    keep: float = _help("share of the views kept: the most confident, by the entropy of their prediction (TPT: 0.1)", 0.1)
    steps: int = _help("AdamW steps per image (TPT: 1)", 1)
    lr: float = _help("AdamW learning rate (TPT: 5e-3)", 5e-3)
    weight_decay: float = _help("AdamW weight decay (TPT: torch's default, 0.01)", 0.01)
    augment: str = _help("the augmented views: crop (random resized crops and flips: TPT's for ImageNet and its "
                         "variants), augmix (crops, then AugMix: TPT's for the other datasets), or auto (by dataset)",
                         "auto")
    seed: int = _help("seed of the views (shared by every run, so that each view is encoded once)", 0)

    def __post_init__(self) -> None:
        if self.views < 1 or self.steps < 0:
            raise ValueError(f"views must be >= 1 and steps >= 0, got views={self.views}, steps={self.steps}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1] (a share of the views), got {self.keep}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")

    @property
    def kept(self) -> int:
        """How many of its ``views`` an image keeps: ``int(views · keep)`` as TPT takes it, at least one."""
        return kept_views(self.views, self.keep)


def kept_views(views: int, keep: float) -> int:
    """``int(views · keep)`` (TPT: 6 of 64 at 0.1), at least one (TPT's would keep none of 8 at 0.1)."""
    return max(1, int(views * keep))


@dataclass
class TTAResult:
    """What :func:`adapt_and_predict` gives: the original images' logits before and after adaptation."""

    before: Tensor  # (N, K): the adapter as given, on the original image
    after: Tensor  # (N, K): after the image's adaptation
    seconds_per_image: float  # wall time of the adaptation (selection, steps, prediction), encoding excluded


# -- the objective --------------------------------------------------------------------------------


def average_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean predicted distribution over the rows of ``logits`` ``(V, K)``: TPT's objective.

    The mean is taken over probabilities (a log-mean-exp of the log-softmax), not over logits.
    """
    log_probs = logits.float().log_softmax(-1)  # (V, K)
    mean = log_probs.logsumexp(0) - math.log(logits.shape[0])  # (K,) log of the mean probability
    mean = mean.clamp(min=torch.finfo(mean.dtype).min)
    return -(mean.exp() * mean).sum()


def confident_views(logits: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` rows of ``logits`` ``(V, K)`` whose prediction has the lowest entropy."""
    log_probs = logits.float().log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # (V,)
    return entropy.argsort(stable=True)[:count]


# -- adaptation on embeddings -------------------------------------------------------------------------


def adapt_and_predict(model: AdaptedCLIP, views: Tensor, *, config: TTAConfig = TTAConfig(),
                      progress: bool = False, shard: bool = False) -> TTAResult:
    """Adapt to each image on its own and predict it; the model is as it was after the call.

    Args:
        model: a wrapped CLIP with its (target) classes set; its adapter is the starting point for every image.
        views: raw image embeddings ``(N, V, D)`` of N images, view 0 the original image. Each image uses its own
            views only, so its prediction does not depend on the other images.
        config: the views kept, steps, learning rate (``config.views`` is not used: V is ``views.shape[1]``).
        progress: show a progress bar.
        shard: under ``torchrun``, rank ``r`` adapts images ``r, r + W, ...`` and every rank gets every
            image's logits (the same as one process computes); ``seconds_per_image`` is each image's time on
            its rank, averaged over the images.

    Returns:
        :class:`TTAResult` with the logits ``(N, K)`` of the original images before and after adaptation.

    The adapter's weights (and gradients, and the model's train/eval mode) are restored when the call ends,
    even by an error: the in-memory adapter, and any file it came from, are unchanged.
    """
    if views.dim() != 3 or views.shape[0] == 0 or views.shape[-1] != model.adapter.dim:
        raise ValueError(f"views must be (N, V, D) embeddings with N > 0 and D = {model.adapter.dim}, got "
                         f"{tuple(views.shape)}")
    if shard and rank_world()[1] > 1:
        return _sharded(model, views, config, progress)
    adapter = model.adapter
    params = [p for p in adapter.parameters() if p.requires_grad]
    device = next(adapter.parameters()).device
    saved = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    grads, was_training = [p.grad for p in params], model.training
    count = kept_views(views.shape[1], config.keep)
    before = torch.empty(views.shape[0], model.num_classes)
    after = torch.empty_like(before)
    images = range(views.shape[0])
    if progress:
        from tqdm.auto import tqdm

        images = tqdm(images, desc=f"test-time training {adapter.config.method}", unit="image")
    model.eval()
    started = time.perf_counter()
    try:
        for i in images:
            before[i], after[i] = _adapt_one(model, params, saved, views[i].to(device), count, config)
    finally:
        adapter.load_state_dict(saved)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        model.train(was_training)
    return TTAResult(before=before, after=after, seconds_per_image=(time.perf_counter() - started) / views.shape[0])


def _adapt_one(model: AdaptedCLIP, params: list[torch.nn.Parameter], start: dict[str, Tensor], views: Tensor,
               count: int, config: TTAConfig) -> tuple[Tensor, Tensor]:
    """One image: reset, select its confident views, S steps, predict the original. ``views`` is ``(V, D)``."""
    model.adapter.load_state_dict(start)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)  # fresh state per image
    with torch.no_grad():
        scores = model.logits_from_features(views)  # (V, K): every view in one pass
    chosen = views[confident_views(scores, count)]  # (ρ·V, D); an image's rows are independent, so TPT's
    for _ in range(config.steps):  # forward over all views then indexing gives exactly these logits
        loss = average_entropy(model.logits_from_features(chosen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        adapted = model.logits_from_features(views[:1])[0]
    return scores[0].cpu(), adapted.cpu()


# -- views ------------------------------------------------------------------------------------------


def view_augment(kind: str, preprocess: Any, dataset: str | None = None) -> tuple[str, Any]:
    """The augmentation of the views and its resolved kind: ``"crop"`` is a random resized crop (area 8-100%, as
    torchvision's default) and a horizontal flip before the preprocessing's other steps; ``"augmix"`` adds
    torchvision's ``AugMix(severity=1, all_ops=False)`` (TPT's operations and severity) after them; ``"auto"``
    picks crops for ImageNet and its variants, AugMix otherwise, as TPT does."""
    if kind == "auto":
        info = find_dataset(dataset)
        kind = "crop" if dataset in IMAGENET_VARIANTS or (info is not None and info.name == "ImageNet") else "augmix"
    crops = default_augment(preprocess, scale=(0.08, 1.0))
    if kind == "augmix":
        from torchvision import transforms as T

        steps = list(crops.transforms)
        crops = T.Compose([*steps[:2], T.AugMix(severity=1, all_ops=False), *steps[2:]])
    return kind, crops


def _views_of(spec: RunSpec, store: FeatureStore, splits: fsdata.Splits, original: Tensor, start: int,
              config: TTAConfig, kind: str, augment: Any) -> Tensor:
    """``(n, V, D)``: the original embeddings of test images ``start ...`` and their V − 1 augmented views."""
    if config.views == 1:
        return original[:, None]
    items = splits.test[start : start + original.shape[0]]
    augmented = extract_image_features(
        store.model, splits, items, store.preprocess, views=config.views - 1, augment=augment, seed=config.seed,
        batch_size=spec.extract_batch_size, device=spec.device_name, progress=spec.progress and is_main(),
        cache_path=store.folder / f"tta-{kind}-seed{config.seed}-{start:07d}-test-v{config.views - 1}.safetensors",
    )
    return torch.cat([original[:, None], augmented.image], 1)


def _sharded(model: AdaptedCLIP, views: Tensor, config: TTAConfig, progress: bool) -> TTAResult:
    """:func:`adapt_and_predict` with the images shared among ``torchrun`` ranks (every rank gets every result)."""
    rank, world = rank_world()
    mine = torch.arange(rank, views.shape[0], world)
    before, after = torch.zeros(views.shape[0], model.num_classes), torch.zeros(views.shape[0], model.num_classes)
    part = TTAResult(before[:0], after[:0], 0.0)  # a rank without images (fewer images than ranks) adds nothing
    if len(mine):
        part = adapt_and_predict(model, views[mine], config=config, progress=progress)
    before[mine], after[mine] = part.before, part.after
    device = next(model.adapter.parameters()).device
    seconds = all_reduce_sum(torch.tensor([part.seconds_per_image * len(mine)], dtype=torch.float64), device)
    return TTAResult(all_reduce_sum(before, device), all_reduce_sum(after, device), float(seconds) / views.shape[0])


# -- runs -----------------------------------------------------------------------------------------------


@dataclass
class TTAOutcome:
    """Test-time training on a dataset's test split (:func:`adapt_dataset`): per test image, in item order."""

    dataset: str
    items: list[fsdata.Item]
    labels: Tensor  # (N,)
    zero_shot: Tensor  # (N, K) zero-shot CLIP's logits
    before: Tensor  # (N, K) the adapter as loaded (or initialised), without adaptation
    after: Tensor  # (N, K) after each image's own adaptation
    seconds_per_image: float  # adaptation only; the views' encoding excluded
    config: TTAConfig  # as used (``augment`` resolved)
    num_classes: int


def adapt_dataset(spec: RunSpec, config: TTAConfig = TTAConfig()) -> TTAOutcome:
    """Encode every test image's views (cached) and adapt to each image on its own: :func:`run_tta` without rows.

    ``spec.adapter`` is the starting point (``None``: the method's initial weights, seeded by ``spec.seed``).
    """
    adapter_file = saved_adapter(spec) if spec.adapter else None
    splits = load_splits(spec)
    model, preprocess, tokenizer = wrapped_model(spec)
    if adapter_file is not None:
        model.load_adapter(adapter_file)
    store = FeatureStore(spec, model, preprocess, tokenizer)
    train_config = spec.train_config()
    # the adapter's prompts as its preset makes them (RAda's released one), zero-shot CLIP's the dataset's
    text = store.texts(splits, adapter_templates(spec, train_config, splits.name))
    zero_text = store.texts(splits, zero_shot_templates(spec, splits.name))
    model.set_classes(text_features=text)
    test = store.images(splits, "test", "all", train_config)
    kind, augment = view_augment(config.augment, preprocess, splits.name)
    log.info("test-time training on %s: %d images, %d views each (%s), %d kept, %d step(s) at lr %g", splits.name,
             len(test), config.views, kind, kept_views(config.views, config.keep), config.steps, config.lr)
    parts = []
    for start in range(0, len(test), CHUNK):
        views = _views_of(spec, store, splits, test.image[start : start + CHUNK], start, config, kind, augment)
        parts.append(adapt_and_predict(model, views, config=config, progress=spec.progress and is_main(), shard=True))
    with torch.no_grad(), model.disable_adapter():
        device = next(model.adapter.parameters()).device
        model.set_classes(text_features=zero_text)
        zero = torch.cat([model.logits_from_features(test.image[i : i + CHUNK].to(device)).cpu()
                          for i in range(0, len(test), CHUNK)])
        model.set_classes(text_features=text)
    return TTAOutcome(
        dataset=splits.name, items=list(splits.test), labels=test.labels, zero_shot=zero,
        before=torch.cat([p.before for p in parts]), after=torch.cat([p.after for p in parts]),
        seconds_per_image=sum(p.seconds_per_image * p.before.shape[0] for p in parts) / len(test),
        config=dataclasses.replace(config, augment=kind), num_classes=model.num_classes,
    )


def run_tta(spec: RunSpec, config: TTAConfig = TTAConfig(), *, source: str | None = None) -> list[dict[str, Any]]:
    """``rada-mma eval --tta``: test-time training on every test image of ``spec.data``, among all its classes.

    Args:
        spec: ``data`` the target; ``adapter`` a trained adapter to start from (RAda†), or ``None`` for the
            method's initial weights (for RAda, exactly zero-shot CLIP: its ``W_o`` starts at zero).
        config: see :class:`TTAConfig`.
        source: the trained adapter's dataset, for the rows (default: its ``run.json``).

    Returns:
        Rows with ``setting: "tta"``: zero-shot CLIP; the trained adapter without TTA (when one is given);
        the adapter with TTA (``start`` ``"zero-shot"``, ``"init"`` or ``"few-shot"``, ``seconds_per_image``).
        The run folder gets them (``results.json``, ``results.md``), ``run.json`` and ``tta.png``.
    """
    adapter_file = saved_adapter(spec) if spec.adapter else None
    with runs.claim(spec, train=False, adapter=adapter_file) as spec:  # one process per run folder
        return _tta_rows(spec, config, adapter_file, source)


def _tta_rows(spec: RunSpec, config: TTAConfig, adapter_file: Path | None, source: str | None) -> list[dict[str, Any]]:
    trained = (read_run_record(adapter_file.parent) or {}) if adapter_file is not None else {}
    source = source or trained.get("dataset")
    done = adapt_dataset(spec, config)
    zero_start = torch.allclose(done.before, done.zero_shot, rtol=1e-4, atol=1e-3)  # RAda's W_o = 0: exactly
    start = "few-shot" if adapter_file else "zero-shot" if zero_start else "init"
    common = {"setting": "tta", "dataset": done.dataset, "source": source, "classes": done.num_classes}
    run = {"seed": spec.seed, "model": model_name(spec.model, spec.model_config)}
    rows = [{**common, "method": "zero-shot", **run, "tta": False, "start": "zero-shot",
             "accuracy": _percent(done.zero_shot, done.labels)}]
    if adapter_file is not None:
        rows.append({**common, "method": spec.method, **run, "tta": False, "start": "few-shot",
                     "accuracy": _percent(done.before, done.labels)})
    rows.append({**common, "method": spec.method, **run, "tta": True, "start": start,
                 "accuracy": _percent(done.after, done.labels), "seconds_per_image": done.seconds_per_image,
                 "tta_config": dataclasses.asdict(done.config)})
    if is_main():
        from .plots import plot_tta

        write_results(rows, spec.out_dir)  # creates the folder
        maybe_plot(plot_tta, done.before, done.after, done.labels, spec.out_dir / "tta.png",
                   title=f"{done.dataset} {spec.method}")
        write_run_record(spec, spec.out_dir, setting="tta", dataset=done.dataset, source=source,
                         adapter_file=str(adapter_file) if adapter_file else None, adapter_run=trained or None,
                         tta=dataclasses.asdict(done.config))
    return rows


def _percent(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * float((logits.argmax(-1) == labels).float().mean())


def run_tta_grid(
    spec: RunSpec,
    targets: Sequence[tuple[str, str | None]],
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    config: TTAConfig = TTAConfig(),
    source: tuple[str, str | None] | None = None,
    on_run: Callable[[RunSpec], None] | None = None,
) -> list[dict[str, Any]]:
    """RAda's table 3 for every method: test-time training on every target from the method's initial weights
    and, with a ``source``, from an adapter trained on every class of it (``spec.shots`` shots: the † rows).

    Args:
        spec: what every run shares.
        targets, source: ``(data folder, dataset name or None)``.
        methods, seeds: the grid (the seed draws the source's shots and the untrained adapter's weights).
        out: source runs in ``OUT/<source>/<method>-<K>shot-seed<N>`` (shared with the other settings' grids),
            test-time runs in ``OUT/<target>/<method>-tta-{init,from-<source>}-seed<N>``.
        config: see :class:`TTAConfig`; the views are encoded once per target and shared by every run.
        on_run: called with each run's spec before it starts.

    Returns:
        The rows (zero-shot once per target and seed), also in ``OUT/results.{json,md,png}``.
    """
    from .plots import plot_targets

    out = Path(out).expanduser()
    runs = dataset_runs(spec, ([source] if source else []) + list(targets), out)
    src = runs.pop(0) if source else None
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        for index, method in enumerate(methods):
            starts: list[tuple[str | None, str]] = [(None, "init")]
            name = None
            if src is not None:
                trained, source_rows = train_source(spec, src, out, method, seed, on_run)
                name = source_rows[0]["dataset"]
                starts.append((str(trained.out_dir / ADAPTER_FILE), f"from-{src[2]}"))
            for data_path, target, folder, cache in runs:
                for adapter, how in starts:
                    run = spec.replace(data=data_path, dataset=target, method=method, seed=seed, adapter=adapter,
                                       cache_dir=str(cache), out=str(run_folder(out, folder, f"{method}-tta-{how}", seed)))
                    if on_run is not None:
                        on_run(run)
                    first = index == 0 and adapter is None
                    rows += [r for r in run_tta(run, config, source=name) if r["method"] != "zero-shot" or first]
    if is_main():
        write_results(rows, out)
        maybe_plot(plot_targets, rows, out / "results.png", label=row_label, title="test-time training")
    return rows
